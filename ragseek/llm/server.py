"""A minimal OpenAI-compatible HTTP server for any ragseek LLM backend (`ragseek serve --llm local`).

    GET  /v1/models
    POST /v1/chat/completions   model, messages, max_tokens, temperature, stop, stream (server-sent events)
    POST /v1/completions        model, prompt (one or a list), max_tokens, temperature, stop, stream, echo, logprobs

`echo` + `logprobs` returns every prompt token's log-probability (tokens, token_logprobs, text_offset,
top_logprobs), which is how an `openai:` client scores continuations. Sampling is temperature only (top_p must be
1, n must be 1). The LLM protocol returns text, not why it stopped, so finish_reason is always "stop" and there is
no `usage`. Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad request,
404 for a model this server does not serve, 501 for what the backend cannot do.

Under abuse (ServeConfig's limits, `ragseek serve --help`), every route gets the first two:
    401  no `Authorization: Bearer KEY` when the server has a key (BearerAuth; checked before the body is read)
    413  a body over max_body_bytes (BodyLimit; from its Content-Length, or as soon as a chunked body passes it)
    400  prompts over max_prompt_chars in one request (check_prompt_chars)
    503  the queue is full (Gate: one generation at a time, queue_size waiting; Retry-After says when to come back)
A client that hangs up stops its generation at the model's next forward pass (Gate, Cancelled).

With a store (`ragseek serve --store STORE`, ragseek/llm/page.py) it also serves a page at `/` and the JSON routes
the page uses: POST /v1/ask (`ragseek ask --json`'s object, or streamed), GET /v1/documents (a cited document's
text), POST /v1/documents (upload and ingest). The page's own files are public; every /v1 route needs the key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ragseek.llm.base import LLM, TokenLogprobs
from ragseek.llm.cli import ServeConfig

if TYPE_CHECKING:
    from ragseek.llm.page import Library


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if v != 1:
            raise ValueError("ragseek serve samples with temperature only; leave top_p at 1")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError("ragseek serve returns one choice per prompt; leave n at 1")
        return v

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # the newer name of max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)  # top alternatives per token (0 = only the chosen one)

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_only(cls, v: object) -> object:
        if isinstance(v, list) and not all(isinstance(p, str) for p in v):
            raise ValueError("give a string or a list of strings (token-id prompts are not supported)")
        return v


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


# ---------------------------------------------------------------------------------------------------------------------
# limits, auth and the queue: the middlewares guard every route of the app; a route that generates takes its turn
# through the Gate (app.state.gate), so a new route (POST /v1/ask) gets all of them by the same two lines.


class BearerAuth:
    """401 unless the request carries `Authorization: Bearer KEY`, OpenAI's header. It runs before the body is read,
    and compares SHA-256 digests in constant time (no timing leak of the key or its length).

    `public`: paths a GET or HEAD reaches without the key (the page's static files: a browser's navigation sends no
    header; the page then sends the key the user types with each /v1 request)."""

    def __init__(self, app: ASGIApp, key: str, public: Callable[[str], bool] = lambda path: False):
        self.app, self.digest, self.public = app, hashlib.sha256(key.encode()).digest(), public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD") and self.public(scope["path"]):
            return await self.app(scope, receive, send)
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            message = MISSING_KEY
        elif not hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), self.digest):
            message = "incorrect API key"
        else:
            return await self.app(scope, receive, send)
        response = _error(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


MISSING_KEY = (
    "missing API key: send the header 'Authorization: Bearer KEY' (the key this server was started with: "
    "ragseek serve --api-key, or $RAGSEEK_API_KEY)"
)


class BodyLimit:
    """413 for a request body over `max_bytes`: refused from its Content-Length before a byte is read, or, sent
    without one (chunked), as soon as it passes the limit; the rest is never read."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def message(self, size: int | None) -> str:
        body = "the request body" if size is None else f"the request body ({size:,} bytes)"
        return (
            f"{body} exceeds this server's limit of {self.max_bytes:,} bytes (ragseek serve --max-body-bytes)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(413, self.message(int(declared)))(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # an HTTPException: FastAPI re-raises it from its body reading, the app's handler answers
                raise HTTPException(413, self.message(None))
            return message

        await self.app(scope, counted, send)


def check_prompt_chars(chars: int, limit: int, param: str) -> None:
    """400 when a request's prompts hold more than `limit` characters in all (before any tokenizer sees them)."""
    if chars > limit:
        raise APIError(
            400,
            f"{param}: {chars:,} characters exceed this server's limit of {limit:,} per request "
            "(ragseek serve --max-prompt-chars); shorten the prompt",
            param,
        )


class Cancelled(Exception):
    """The client of a generation hung up."""


# the Turn whose work this thread is running (set around each call, read by the model's forward pre-hook)
_running = threading.local()
_hooked: weakref.WeakSet = weakref.WeakSet()


def _stop_if_cancelled(module: Any, args: Any) -> None:
    """A forward pre-hook on the served model: the generation of a client that hung up stops at its next forward pass
    (the LLM protocol has no cancel argument; every torch backend runs forward passes)."""
    turn = getattr(_running, "turn", None)
    if turn is not None and turn.cancelled.is_set():
        raise Cancelled()


class Turn:
    """A request's turn at the model: `run` work in a worker thread, `stream` pieces; `leave` hands the model on
    (idempotent). Its client hanging up sets `cancelled`."""

    def __init__(self, gate: Gate, receive: Receive):
        self.gate, self.cancelled = gate, threading.Event()
        self.started: float | None = None
        self._closers: list[Callable[[], Any]] = []
        self._watcher = asyncio.ensure_future(self._watch(receive))
        self._left = False

    async def _watch(self, receive: Receive) -> None:
        # the body has been read: the next message is the disconnect
        while (await receive())["type"] != "http.disconnect":
            pass
        self.cancelled.set()

    def _call(self, fn: Callable, *args: Any) -> Any:
        if self.cancelled.is_set():
            raise Cancelled()
        _running.turn = self
        try:
            return fn(*args)
        finally:
            _running.turn = None

    async def run(self, fn: Callable, *args: Any) -> Any:
        """fn(*args) on the gate's worker thread; Cancelled once the client has gone. A caller cancelled meanwhile
        still waits for the thread (as anyio.to_thread does), so the next turn never overlaps this one."""
        done = asyncio.wrap_future(self.gate.worker.submit(self._call, fn, *args))
        with anyio.CancelScope(shield=True):
            await asyncio.wait({done})
        return done.result()

    async def reports(self, fn: Callable, *args: Any) -> AsyncIterator[tuple[bool, Any]]:
        """fn(*args, report) on the gate's worker thread: (False, x) for each report(x) as it comes (a piece of
        text, a progress step), then (True, fn's value); fn's error is raised. Closed early (its client hung up),
        it stops fn at the model's next forward pass and waits for the thread."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        work = asyncio.ensure_future(
            self.run(fn, *args, lambda x: loop.call_soon_threadsafe(queue.put_nowait, x))
        )
        try:
            while True:
                item = asyncio.ensure_future(queue.get())
                await asyncio.wait({item, work}, return_when=asyncio.FIRST_COMPLETED)
                if not item.done():
                    item.cancel()
                    break
                yield False, item.result()
            # every report was queued before the thread returned
            while not queue.empty():
                yield False, queue.get_nowait()
            yield True, work.result()
        finally:
            if not work.done():
                self.cancelled.set()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait({work})
            # retrieved: its Cancelled is no "exception never retrieved"
            if not work.cancelled():
                work.exception()

    async def stream(self, start: Callable[[], Iterator[str]]) -> AsyncIterator[str]:
        """The pieces of `start()`, its first computed now, so that a failure there (a prompt too long, ...) is an
        error response, not a cut stream. It ends early, quietly, when the client hangs up."""
        pieces = await self.run(lambda: iter(start()))
        self._closers.append(getattr(pieces, "close", lambda: None))
        first = await self.run(next, pieces, None)

        async def rest() -> AsyncIterator[str]:
            piece = first
            try:
                while piece is not None:
                    yield piece
                    piece = await self.run(next, pieces, None)
            except Cancelled:
                return

        return rest()

    def leave(self) -> None:
        if self._left:
            return
        self._left = True
        self._watcher.cancel()
        for close in self._closers:
            close()
        if self.started is not None:
            self.gate.release(time.monotonic() - self.started)
        self.gate.admitted -= 1


class Gate:
    """One model, one generation at a time: a request waits its turn in a queue of at most `queue_size`; beyond that
    it gets 503 with Retry-After (the queue's length times a moving average of a turn's seconds). A client that hangs
    up, waiting or generating, stops at the model's next forward pass, and its turn passes on. Every turn's work runs
    on the gate's one worker thread, so what a turn uses (the model, the page's SQLite store) stays on one thread.

        texts = await gate.run(request, llm.complete, prompts)             # a whole answer
        turn, pieces = await gate.stream(request, lambda: llm.stream(p))   # send the pieces, then turn.leave()
    """

    def __init__(self, queue_size: int, model: Any = None):
        self.queue_size = queue_size
        self.admitted = 0  # generating + waiting
        self.seconds = 1.0
        self._free = asyncio.Semaphore(1)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="ragseek-gate")
        if hasattr(model, "register_forward_pre_hook") and model not in _hooked:
            model.register_forward_pre_hook(_stop_if_cancelled)
            _hooked.add(model)

    async def enter(self, request: Request) -> Turn:
        """Wait for the model; 503 when `queue_size` requests already wait. Call `leave()` on the turn when done."""
        if self.admitted > self.queue_size:
            retry = max(1, math.ceil(self.seconds * self.admitted))
            raise APIError(
                503,
                f"the server is busy: 1 request generating and {self.admitted - 1} waiting (ragseek serve "
                f"--queue-size {self.queue_size}); retry after {retry} s",
                headers={"Retry-After": str(retry)},
            )
        self.admitted += 1
        turn = Turn(self, request.receive)
        try:
            await self._free.acquire()
        except BaseException:
            turn.leave()
            raise
        turn.started = time.monotonic()
        return turn

    def release(self, seconds: float) -> None:
        self.seconds = 0.8 * self.seconds + 0.2 * seconds
        self._free.release()

    async def run(self, request: Request, fn: Callable, *args: Any) -> Any:
        """fn(*args) in a worker thread when the request's turn comes."""
        turn = await self.enter(request)
        try:
            return await turn.run(fn, *args)
        finally:
            turn.leave()

    async def stream(
        self, request: Request, start: Callable[[], Iterator[str]]
    ) -> tuple[Turn, AsyncIterator[str]]:
        """The turn and the pieces of `start()` (Turn.stream); the response that sends them leaves the turn."""
        turn = await self.enter(request)
        try:
            return turn, await turn.stream(start)
        except BaseException:
            turn.leave()
            raise


def create_app(llm: LLM, cfg: ServeConfig | None = None, library: Library | None = None) -> FastAPI:
    """The app serving `llm` under the model id `cfg.served_model_name` (default: `llm.name`), with cfg's limits and
    API key (taken as given: `ragseek serve` reads $RAGSEEK_API_KEY); run it with uvicorn. With a `library` (a
    store and `ragseek ask`'s settings) it also serves the page and its routes (ragseek/llm/page.py)."""
    from ragseek.llm import page

    cfg = cfg or ServeConfig()
    name = cfg.served_model_name or llm.name
    started = int(time.time())
    app = FastAPI(title="ragseek", description=f"OpenAI-compatible API serving {name}")
    app.state.gate = gate = Gate(cfg.queue_size, getattr(llm, "model", None))
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    if cfg.api_key:
        # added last, so it runs first: an unauthenticated client cannot make the server read a body
        app.add_middleware(BearerAuth, key=cfg.api_key, public=page.is_public)

    def check_model(model: str) -> None:
        if model != name:
            raise APIError(
                404,
                f"model {model!r} is not served here; this server serves {name!r} (see GET /v1/models)",
                "model",
            )

    @app.exception_handler(APIError)
    def _api_error(_: Request, err: APIError) -> JSONResponse:
        return _error(err.status, err.message, err.param, headers=err.headers)

    @app.exception_handler(HTTPException)
    def _http_error(_: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail), headers=err.headers)

    @app.exception_handler(RequestValidationError)
    def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors()]
        first = err.errors()[0]["loc"][1:] if err.errors() else ()
        return _error(400, "invalid request: " + "; ".join(problems), ".".join(str(x) for x in first) or None)

    # the backend's own checks (prompt too long, ...)
    @app.exception_handler(ValueError)
    def _value_error(_: Request, err: ValueError) -> JSONResponse:
        return _error(400, str(err))

    @app.exception_handler(NotImplementedError)
    def _not_implemented(_: Request, err: NotImplementedError) -> JSONResponse:
        return _error(501, str(err))

    # nobody reads it: nginx's "client closed request"
    @app.exception_handler(Cancelled)
    def _cancelled(_: Request, err: Cancelled) -> JSONResponse:
        return _error(499, "the client hung up; its generation was stopped")

    @app.get("/v1/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": started, "owned_by": "ragseek"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        check_prompt_chars(sum(len(m.content) for m in req.messages), cfg.max_prompt_chars, "messages")
        messages = [m.model_dump() for m in req.messages]
        max_tokens = next((m for m in (req.max_completion_tokens, req.max_tokens) if m is not None), 256)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if req.stream:
            turn, pieces = await gate.stream(
                request, lambda: llm.stream(messages, max_tokens, req.temperature, req.stops)
            )
            first = {**head, "object": "chat.completion.chunk"}
            return _sse(
                turn,
                pieces,
                lambda p: {
                    **first,
                    "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}],
                },
                before={
                    **first,
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    ],
                },
                after={**first, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            )
        (text,) = await gate.run(request, llm.complete, [messages], max_tokens, req.temperature, req.stops)
        message = {"role": "assistant", "content": text}
        return {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt: give a string or a non-empty list of strings", "prompt")
        check_prompt_chars(sum(map(len, prompts)), cfg.max_prompt_chars, "prompt")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
        }
        if req.stream:
            if len(prompts) > 1 or req.echo or req.logprobs is not None:
                raise APIError(400, "stream=true takes one prompt, without echo or logprobs", "stream")
            turn, pieces = await gate.stream(
                request, lambda: llm.stream(prompts[0], max_tokens, req.temperature, req.stops)
            )
            choice = {"index": 0, "logprobs": None}
            return _sse(
                turn,
                pieces,
                lambda p: {**head, "choices": [{**choice, "text": p, "finish_reason": None}]},
                after={**head, "choices": [{**choice, "text": "", "finish_reason": "stop"}]},
            )

        def generate() -> tuple[list[str], list[TokenLogprobs | None]]:
            texts = (
                llm.complete(prompts, max_tokens, req.temperature, req.stops)
                if max_tokens
                else [""] * len(prompts)
            )
            if req.logprobs is None:
                return texts, [None] * len(prompts)
            return texts, llm.token_logprobs(
                [p + t for p, t in zip(prompts, texts, strict=True)], top=req.logprobs
            )

        texts, scored = await gate.run(request, generate)
        choices = []
        for i, (p, t, tl) in enumerate(zip(prompts, texts, scored, strict=True)):
            logprobs = None if tl is None else _logprobs_json(tl, 0 if req.echo else len(p), req.logprobs)
            choices.append(
                {"index": i, "text": p + t if req.echo else t, "logprobs": logprobs, "finish_reason": "stop"}
            )
        return {**head, "choices": choices}

    page.add_routes(app, llm, cfg, library)
    return app


def _logprobs_json(tl: TokenLogprobs, start: int, top: int | None) -> dict:
    """OpenAI's logprobs object for the tokens starting at or after `start` (the prompt's end unless echoing)."""
    keep = [i for i, o in enumerate(tl.text_offset) if o >= start]
    tops = tl.top_logprobs if top else None
    return {
        "tokens": [tl.tokens[i] for i in keep],
        "token_logprobs": [tl.token_logprobs[i] for i in keep],
        "text_offset": [tl.text_offset[i] for i in keep],
        "top_logprobs": [tops[i] for i in keep] if tops is not None else None,
    }


class _HeldStream(StreamingResponse):
    """A streamed response that holds its turn at the model until it has been sent, however it ends."""

    def __init__(self, turn: Turn, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream")
        self.turn = turn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.turn.leave()


def _sse(
    turn: Turn,
    pieces: AsyncIterator[str],
    chunk: Callable[[str], dict],
    *,
    after: dict,
    before: dict | None = None,
) -> StreamingResponse:
    """Server-sent events: `before`, one chunk per piece, `after`, [DONE]."""

    async def events() -> AsyncIterator[dict]:
        if before is not None:
            yield before
        async for p in pieces:
            yield chunk(p)
        yield after

    return event_stream(turn, events())


def event_stream(turn: Turn, events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: each dict of `events` as one `data:` line, then `data: [DONE]`; the response holds the
    turn at the model until it has been sent."""

    async def lines() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return _HeldStream(turn, lines())


def _error(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    kind = ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    501: "not_implemented",
}
