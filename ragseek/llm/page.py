"""The page `ragseek serve --store STORE` serves at `/`, and the JSON routes it uses (docs/serve.md, "The page"):

    GET  /                   the page: ragseek/llm/static/ (plain HTML, CSS, JS; nothing is fetched from elsewhere)
    GET  /v1/ask/settings    what the page shows: retriever, k and query mode with their defaults, the store's size
    POST /v1/ask             question, retriever, k, query -> `ragseek ask --json`'s object (pipeline.Answer.as_json);
                             stream: server-sent events {"text"} per piece of the answer, then {"answer": object}
    GET  /v1/documents       chunk_id, or doc_id (+ source): a document's cleaned text, the text citations index;
                             start / end: only that window of it (offset = start)
    POST /v1/documents       name (+ stream); the body is the file: saved under STORE/uploads/ and ingested;
                             stream: {"progress": {stage, done, total}} events, then {"report": IngestReport}

Asking and uploading take their turn at the model through the server's Gate, so they share its queue, limits and
hang-up handling with the OpenAI routes; they run on the gate's one worker thread, where the store the page asks
is opened (a SQLite connection belongs to one thread). Reading a document or the settings opens the store
anew in a thread of its own and never waits for a generation.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, get_args

import anyio.to_thread
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from ragseek.llm.base import LLM
from ragseek.llm.cli import ServeConfig
from ragseek.llm.server import APIError, Cancelled, Turn, check_prompt_chars, error_body, event_stream
from ragseek.rag.documents import SUFFIXES
from ragseek.rag.pipeline import DONT_KNOW, AskConfig, StepsConfig, ask
from ragseek.rag.query import QueryMode
from ragseek.rag.search import ANNConfig, BM25Config, RetrieverName, SearchConfig, Searcher
from ragseek.rag.splitters import SplitterConfig
from ragseek.rag.store import Store, StoreConfig

STATIC = Path(__file__).parent / "static"
# the page may load its own files only (no CDN, no font service), and no other site may frame it
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
MAX_K = 50  # the most sources one question may ask for (each is a chunk in the prompt)
NO_STORE = (
    "this server has no page: start it with `ragseek serve --store STORE` (a store from `ragseek ingest`)"
)
log = logging.getLogger(__name__)


def is_public(path: str) -> bool:
    """The page's own files, which a browser fetches without the API key (BearerAuth's `public`)."""
    return path == "/" or path.startswith("/static/")


@dataclass
class Library:
    """The store the page asks (a folder, or a postgresql:// URL: `Store`), and `ragseek ask`'s settings for it
    (the flags of `ragseek serve --store`); a request changes retriever, k and query mode only."""

    store: str | Path
    ask: AskConfig = field(default_factory=AskConfig)
    steps: StepsConfig = field(default_factory=StepsConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    bm25: BM25Config = field(default_factory=BM25Config)
    ann: ANNConfig = field(default_factory=ANNConfig)
    _searcher: Searcher | None = field(default=None, init=False, repr=False)

    # --- on the gate's worker thread -------------------------------------------------------------------

    def searcher(self, retriever: str | None = None, k: int | None = None) -> Searcher:
        """The one searcher (its indexes loaded once, rebuilt when the store changes), set to this request's
        retriever and k: turns run one at a time, on one thread."""
        if self._searcher is None:
            self._searcher = Searcher(Store(self.store), self.search, self.bm25, self.ann)
        self._searcher.cfg = replace(
            self.search, retriever=retriever or self.search.retriever, k=k or self.search.k
        )
        return self._searcher

    def check(self, retriever: str | None = None) -> None:
        """LookupError, saying what to do, when the store has no chunks or vectors for the retriever."""
        try:
            self.searcher(retriever).check()
        except LookupError as e:
            raise APIError(409, f"{e} (or add a document on the page)") from e

    def answer(
        self,
        llm: LLM,
        question: str,
        retriever: str | None,
        k: int | None,
        query: str | None,
        on_text: Callable[[str], None] | None = None,
    ) -> dict:
        """`ragseek ask --json`'s object for `question` (`on_text` receives the answer as it streams)."""
        self.check(retriever)
        steps = replace(self.steps, query=query or self.steps.query)
        return ask(question, self.searcher(retriever, k), llm, self.ask, steps, on_text).as_json()

    def add(self, name: str, data: bytes, on_progress: Callable[[dict], None] | None = None) -> dict:
        """Save an uploaded file as ROOT/uploads/NAME and ingest it, split as the store's last document was;
        ValueError naming the reason when it is not a document (the file is then removed, or restored). ROOT is
        the store's folder, or for PostgreSQL its local cache folder on this server's machine (`Store.root`)."""
        store = self.searcher().store
        path = store.root / "uploads" / name
        path.parent.mkdir(exist_ok=True)
        before = path.read_bytes() if path.exists() else None
        path.write_bytes(data)

        def progress(stage: str, done: int, total: int) -> None:
            if on_progress:
                on_progress({"stage": stage, "done": done, "total": total})

        report = store.ingest(
            [path], _splitter(store), StoreConfig(embedder=self.search.embedder), None, progress
        )
        if report.failed:
            if before is None:
                path.unlink()
            else:
                path.write_bytes(before)
            reasons = "; ".join(f["reason"] for f in report.failed)
            raise ValueError(f"{name}: {reasons}: nothing was added")
        return {"path": str(path), **report.as_json()}

    # --- in a thread of their own: a connection each -------------------------------------------------

    @contextmanager
    def _open(self, check: bool = False) -> Iterator[Store]:
        # the store was checked when the server opened it (`ragseek serve` calls info(check=True)): a click on a
        # citation does not read every page again (PRAGMA quick_check)
        store = Store(self.store, check=check)
        try:
            yield store
        finally:
            store.close()

    def info(self, check: bool = False) -> dict:
        """The store's location (its folder, or its URL without the password), documents and chunks; `check`: run
        SQLite's quick_check first (Store)."""
        with self._open(check) as store:
            info = store.info()
        return {"path": store.location, "documents": info["documents"], "chunks": info["chunks"]}

    def document(
        self, chunk_id: int | None, doc_id: str | None, source: str | None, start: int, end: int | None
    ) -> dict:
        """The document holding chunk `chunk_id`, or `doc_id` (of `source`), with text[start:end]."""
        with self._open() as store:
            if chunk_id is not None:
                rows = store.sql("SELECT source, doc_id FROM chunks WHERE id = ?", (chunk_id,))
                if not rows:
                    raise APIError(
                        404, f"no chunk {chunk_id} in the store: ask again (the store has changed)"
                    )
                ((source, doc_id),) = rows
            elif doc_id is None:
                raise APIError(
                    400, "give chunk_id, or doc_id (and source when two sources hold it)", "doc_id"
                )
            try:
                doc = store.document(doc_id, source)
            except KeyError as e:
                raise APIError(404, e.args[0], "doc_id") from e
            except LookupError as e:
                raise APIError(409, str(e), "source") from e
        end = len(doc.text) if end is None else min(end, len(doc.text))
        start = min(start, end)
        return {
            "doc_id": doc.doc_id,
            "source": doc.source,
            "title": doc.title,
            "chars": len(doc.text),
            "offset": start,
            "text": doc.text[start:end],
        }


def _splitter(store: Store) -> SplitterConfig:
    """The splitter the store's last document was split with (an upload is chunked as the rest), else the default."""
    rows = store.sql("SELECT splitter FROM documents ORDER BY added DESC LIMIT 1")
    return SplitterConfig(**json.loads(rows[0][0])) if rows else SplitterConfig()


UPLOAD_NAME = re.compile(r"[^\w.-]+")


def upload_name(name: str) -> str:
    """A safe file name for an upload (its last path part, odd characters as _); 400 unless ragseek reads it."""
    safe = UPLOAD_NAME.sub("_", name.replace("\\", "/").rsplit("/", 1)[-1]).lstrip(".")
    if Path(safe).suffix.lower() not in SUFFIXES:
        raise APIError(
            400,
            f"{name!r} is not a document ragseek reads: upload a {', '.join(SUFFIXES)} file",
            "name",
        )
    return safe


class AskRequest(BaseModel):
    question: str
    retriever: RetrieverName | None = None
    k: int | None = Field(None, ge=1, le=MAX_K)
    query: QueryMode | None = None
    stream: bool = False


async def _events(
    turn: Turn, work: Callable, report: Callable[[Any], dict], done: Callable[[Any], dict]
) -> AsyncIterator[dict]:
    """The events of work(report) on the turn: report(x) for each report, done(value) at the end, or an error
    event (the stream has already begun: its status is sent) when it fails; nothing when the client has gone."""
    try:
        async for finished, x in turn.reports(work):
            yield done(x) if finished else report(x)
    except Cancelled:
        return
    except APIError as e:
        yield error_body(e.status, e.message, e.param)
    except ValueError as e:
        yield error_body(400, str(e))
    except Exception as e:
        log.exception("ragseek serve: a streamed request failed")
        yield error_body(500, f"the server failed: {type(e).__name__}: {e}")


def add_routes(app: FastAPI, llm: LLM, cfg: ServeConfig, library: Library | None) -> None:
    """The page and its routes over `library`; without one, `/` and those routes say how to get them."""
    if library is None:

        @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
        @app.api_route("/v1/ask", methods=["POST"], include_in_schema=False)
        @app.api_route("/v1/ask/settings", methods=["GET"], include_in_schema=False)
        @app.api_route("/v1/documents", methods=["GET", "POST"], include_in_schema=False)
        def no_page():
            raise APIError(404, NO_STORE)

        return
    gate = app.state.gate
    name = cfg.served_model_name or llm.name
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.get("/v1/ask/settings")
    async def settings() -> dict:
        s, steps = library.search, library.steps
        return {
            "model": name,
            "store": await anyio.to_thread.run_sync(library.info),
            "defaults": {"retriever": s.retriever, "k": s.k, "query": steps.query},
            "choices": {"retriever": list(get_args(RetrieverName)), "query": list(get_args(QueryMode))},
            "max_k": MAX_K,
            "dont_know": DONT_KNOW,
            "max_prompt_chars": cfg.max_prompt_chars,
            "max_body_bytes": cfg.max_body_bytes,
            "suffixes": list(SUFFIXES),
        }

    @app.post("/v1/ask")
    async def ask_route(req: AskRequest, request: Request):
        if not req.question.strip():
            raise APIError(400, "question: it is empty: type a question", "question")
        check_prompt_chars(len(req.question), cfg.max_prompt_chars, "question")
        work = partial(library.answer, llm, req.question, req.retriever, req.k, req.query)
        if not req.stream:
            return await gate.run(request, work)
        turn = await gate.enter(request)
        try:
            # an empty store is an error response, not a cut stream
            await turn.run(library.check, req.retriever)
        except BaseException:
            turn.leave()
            raise
        return event_stream(turn, _events(turn, work, lambda t: {"text": t}, lambda a: {"answer": a}))

    @app.get("/v1/documents")
    async def document(
        chunk_id: int | None = None,
        doc_id: str | None = None,
        source: str | None = None,
        start: int = Query(0, ge=0),
        end: int | None = Query(None, ge=0),
    ) -> dict:
        return await anyio.to_thread.run_sync(library.document, chunk_id, doc_id, source, start, end)

    @app.post("/v1/documents")
    async def upload(request: Request, name: str, stream: bool = False):
        safe = upload_name(name)
        # BodyLimit stops it at --max-body-bytes
        data = await request.body()
        if not data:
            raise APIError(400, f"{name}: the file is empty: nothing to add", "body")
        work = partial(library.add, safe, data)
        if not stream:
            return await gate.run(request, work)
        turn = await gate.enter(request)
        return event_stream(turn, _events(turn, work, lambda p: {"progress": p}, lambda r: {"report": r}))
