"""`ragseek serve`: an OpenAI-compatible HTTP API over any ragseek LLM backend."""

from __future__ import annotations

from dataclasses import dataclass

import typer

from ragseek.config import config_field, with_configs
from ragseek.llm.base import SPECS

LLM_HELP = f"the LLM: {SPECS}"
BASE_URL_HELP = (
    "base URL of the OpenAI-compatible endpoint for --llm openai:MODEL (default: $OPENAI_BASE_URL)"
)


@dataclass
class ServeConfig:
    host: str = config_field("127.0.0.1", "address to listen on (0.0.0.0 exposes the server to the network)")
    port: int = config_field(8000, "port to listen on")
    served_model_name: str | None = config_field(None, "the model id clients send (default: the --llm spec)")


def serve(
    llm: str = typer.Option("local", help=LLM_HELP),
    base_url: str = typer.Option(None, help=BASE_URL_HELP),
    cfg: ServeConfig = None,
) -> None:
    """Serve an LLM over an OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models."""
    import uvicorn

    from ragseek.llm.base import load_llm
    from ragseek.llm.server import create_app

    uvicorn.run(create_app(load_llm(llm, base_url), cfg.served_model_name), host=cfg.host, port=cfg.port)


def register(app: typer.Typer) -> None:
    app.command()(with_configs(serve, {"ServeConfig": ServeConfig}))
