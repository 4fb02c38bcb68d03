"""`ragseek serve`: an OpenAI-compatible HTTP API over any ragseek LLM backend."""

from __future__ import annotations

import typer

from ragseek.llm.base import SPECS

LLM_HELP = f"the LLM: {SPECS}"
BASE_URL_HELP = (
    "base URL of the OpenAI-compatible endpoint for --llm openai:MODEL (default: $OPENAI_BASE_URL)"
)


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        llm: str = typer.Option("local", help=LLM_HELP),
        base_url: str = typer.Option(None, help=BASE_URL_HELP),
        host: str = typer.Option(
            "127.0.0.1", help="address to listen on (0.0.0.0 exposes the server to the network)"
        ),
        port: int = typer.Option(8000, help="port to listen on"),
        served_model_name: str = typer.Option(
            None, help="the model id clients send (default: the --llm spec)"
        ),
    ) -> None:
        """Serve an LLM over an OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models."""
        import uvicorn

        from ragseek.llm.base import load_llm
        from ragseek.llm.server import create_app

        uvicorn.run(create_app(load_llm(llm, base_url), served_model_name), host=host, port=port)
