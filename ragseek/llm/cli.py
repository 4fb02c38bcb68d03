"""`ragseek serve`: an OpenAI-compatible HTTP API over any ragseek LLM backend; with `--store`, the page too."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass
from pathlib import Path

import typer

from ragseek.config import config_field, require, with_configs
from ragseek.llm.base import SPECS

if typing.TYPE_CHECKING:
    from ragseek.rag.pipeline import AskConfig, StepsConfig
    from ragseek.rag.search import ANNConfig, BM25Config, SearchConfig

LLM_HELP = f"the LLM: {SPECS}"
BASE_URL_HELP = (
    "base URL of the OpenAI-compatible endpoint for --llm openai:MODEL (default: $OPENAI_BASE_URL)"
)


@dataclass
class ServeConfig:
    host: str = config_field("127.0.0.1", "address to listen on (0.0.0.0 exposes the server to the network)")
    port: int = config_field(8000, "port to listen on")
    served_model_name: str | None = config_field(None, "the model id clients send (default: the --llm spec)")
    api_key: str | None = config_field(
        None,
        "require 'Authorization: Bearer KEY' on every request, as OpenAI's API does (default: $RAGSEEK_API_KEY; "
        "neither set: no key; prefer the variable, a flag shows in the process list)",
    )
    max_body_bytes: int = config_field(1 << 20, "largest request body in bytes; a larger one gets 413 unread")
    max_prompt_chars: int = config_field(
        100_000, "most characters of prompt (all prompts, all messages) in one request; more gets 400"
    )
    queue_size: int = config_field(
        32,
        "requests waiting while one generates (one model, one generation at a time); more get 503 + Retry-After",
    )

    def __post_init__(self):
        require(0 <= self.port <= 65535, "port", self.port, "give a port from 0 to 65535")
        require(
            self.max_body_bytes > 0, "max_body_bytes", self.max_body_bytes, "give a positive number of bytes"
        )
        require(
            self.max_prompt_chars > 0, "max_prompt_chars", self.max_prompt_chars, "give a positive number"
        )
        require(self.queue_size >= 0, "queue_size", self.queue_size, "give 0 (no waiting) or more")


def serve(
    llm: str = typer.Option("local", help=LLM_HELP),
    base_url: str = typer.Option(None, help=BASE_URL_HELP),
    store: Path = typer.Option(
        None,
        "--store",
        help="also serve a page at / asking this store (and POST /v1/ask, /v1/documents); the flags of "
        "`ragseek ask` are its defaults (docs/serve.md)",
    ),
    cfg: ServeConfig = None,
    ask_cfg: AskConfig = None,
    steps: StepsConfig = None,
    search_cfg: SearchConfig = None,
    bm25: BM25Config = None,
    ann: ANNConfig = None,
) -> None:
    """Serve an LLM over an OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models; with --store,
    a page at / to ask the store's documents (answers streamed, citations opening their exact spans)."""
    import dataclasses

    import uvicorn

    from ragseek.llm.base import load_llm
    from ragseek.llm.page import Library
    from ragseek.llm.server import create_app

    cfg = dataclasses.replace(cfg, api_key=cfg.api_key or os.environ.get("RAGSEEK_API_KEY") or None)
    auth = "a Bearer key required" if cfg.api_key else "no key (--api-key or $RAGSEEK_API_KEY to require one)"
    typer.echo(
        f"ragseek serve: {auth}; body <= {cfg.max_body_bytes:,} bytes, prompt <= {cfg.max_prompt_chars:,} characters, "
        f"{cfg.queue_size} waiting at most",
        err=True,
    )
    if not cfg.api_key and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(
            f"warning: --host {cfg.host} without a key: anyone who reaches the port can use the model",
            err=True,
        )
    library = None
    if store is not None:
        library = Library(store, ask_cfg, steps, search_cfg, bm25, ann)
        info = library.info(check=True)
        typer.echo(
            f"ragseek serve: the page at http://{cfg.host}:{cfg.port}/ asks {info['path']} ({info['documents']} "
            f"documents, {info['chunks']} chunks; {search_cfg.retriever}, k {search_cfg.k}, embedder "
            f"{search_cfg.embedder})",
            err=True,
        )
    uvicorn.run(create_app(load_llm(llm, base_url), cfg, library), host=cfg.host, port=cfg.port)


def register(app: typer.Typer) -> None:
    # `ragseek ask`'s settings (its classes, its k) are the page's, with --store
    from ragseek.rag.cli import ASK_DEFAULTS
    from ragseek.rag.pipeline import AskConfig, StepsConfig
    from ragseek.rag.search import ANNConfig, BM25Config, SearchConfig

    classes = (ServeConfig, AskConfig, StepsConfig, SearchConfig, BM25Config, ANNConfig)
    app.command()(with_configs(serve, {c.__name__: c for c in classes}, **ASK_DEFAULTS))
