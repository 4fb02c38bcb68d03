"""`ragseek serve`: an OpenAI-compatible HTTP API over any ragseek LLM backend; with `--store`, the page too."""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Iterator
from dataclasses import dataclass

import typer

from ragseek import progress
from ragseek.config import config_field, require, with_configs
from ragseek.llm.base import LLM, SPECS

if typing.TYPE_CHECKING:
    from ragseek.rag.pipeline import AskConfig, StepsConfig
    from ragseek.rag.search import ANNConfig, BM25Config, SearchConfig

LLM_HELP = f"the LLM: {SPECS}"
# prompts the reranker scores per call while a progress line counts them (the backends batch within a call)
SCORED_PER_LINE_STEP = 4
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


class ShownLLM:
    """An LLM whose calls show progress lines (ragseek/progress.py), for the commands: `complete` under `writing`
    (HyDE, a rewrite, chunk contexts; the local backend adds its decode line), `stream` until its first piece (the
    prompt's prefill, the wait before an answer streams), `logprobs` (the reranker) counted prompt by prompt."""

    def __init__(self, llm: LLM, writing: str = "write"):
        self.llm, self.name, self.writing = llm, llm.name, writing

    def complete(self, prompts, max_tokens=256, temperature=0.0, stop=None) -> list[str]:
        with progress.task(f"{self.writing} ({self.name}, {len(prompts)} prompt{'s' * (len(prompts) != 1)})"):
            return self.llm.complete(prompts, max_tokens, temperature, stop)

    def stream(self, prompt, max_tokens=256, temperature=0.0, stop=None) -> Iterator[str]:
        pieces = self.llm.stream(prompt, max_tokens, temperature, stop)
        return progress.until_first(pieces, f"answer ({self.name}): reading the prompt")

    def logprobs(self, prompts, continuations) -> list[float]:
        # the same prompt scored against several continuations (the reranker's yes / no) stays in one call: the
        # backends run it once
        keys = [json.dumps(p) for p in prompts]
        unique = list(dict.fromkeys(keys))
        out: list[float] = [0.0] * len(prompts)
        with progress.task(f"score ({self.name})", total=len(unique), unit="prompts") as line:
            for s in range(0, len(unique), SCORED_PER_LINE_STEP):
                part = set(unique[s : s + SCORED_PER_LINE_STEP])
                rows = [i for i, k in enumerate(keys) if k in part]
                scores = self.llm.logprobs([prompts[i] for i in rows], [continuations[i] for i in rows])
                for i, v in zip(rows, scores, strict=True):
                    out[i] = v
                line.advance(len(part))
        return out

    def token_logprobs(self, texts, top=0):
        with progress.task(f"score ({self.name}, {len(texts)} texts)"):
            return self.llm.token_logprobs(texts, top)


def load_shown_llm(spec: str, base_url: str | None = None, writing: str = "write") -> ShownLLM:
    """`load_llm(spec, base_url)` under a progress line, its calls shown (`ShownLLM`)."""
    from ragseek.llm.base import load_llm

    with progress.task(f"loading the LLM ({spec})"):
        return ShownLLM(load_llm(spec, base_url), writing)


def serve(
    llm: str = typer.Option("local", help=LLM_HELP),
    base_url: str = typer.Option(None, help=BASE_URL_HELP),
    store: str = typer.Option(
        None,
        "--store",
        help="also serve a page at / asking this store (a folder or a postgresql:// URL, as `ragseek ask "
        "--store`), and POST /v1/ask, /v1/documents; the flags of `ragseek ask` are its defaults (docs/serve.md)",
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

    # a server's requests are no phases of one command: uvicorn's log lines say what runs
    progress.enable(False)
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
