"""A minimal OpenAI-compatible HTTP server for any ragseek LLM backend (`ragseek serve --llm local`).

    GET  /v1/models
    POST /v1/chat/completions   model, messages, max_tokens, temperature, stop, stream (server-sent events)
    POST /v1/completions        model, prompt (one or a list), max_tokens, temperature, stop, stream, echo, logprobs

`echo` + `logprobs` returns every prompt token's log-probability (tokens, token_logprobs, text_offset,
top_logprobs), which is how an `openai:` client scores continuations. Sampling is temperature only (top_p must be
1, n must be 1). The LLM protocol returns text, not why it stopped, so finish_reason is always "stop" and there is
no `usage`. Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad request,
404 for a model this server does not serve, 501 for what the backend cannot do.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator

from ragseek.llm.base import LLM, TokenLogprobs


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
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def create_app(llm: LLM, served_name: str | None = None) -> FastAPI:
    """The app serving `llm` under the model id `served_name` (default: `llm.name`); run it with uvicorn."""
    name = served_name or llm.name
    started = int(time.time())
    app = FastAPI(title="ragseek", description=f"OpenAI-compatible API serving {name}")

    def check_model(model: str) -> None:
        if model != name:
            raise APIError(
                404,
                f"model {model!r} is not served here; this server serves {name!r} (see GET /v1/models)",
                "model",
            )

    @app.exception_handler(APIError)
    def _api_error(_: Request, err: APIError) -> JSONResponse:
        return _error(err.status, err.message, err.param)

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

    @app.get("/v1/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": started, "owned_by": "ragseek"}],
        }

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        check_model(req.model)
        messages = [m.model_dump() for m in req.messages]
        max_tokens = next((m for m in (req.max_completion_tokens, req.max_tokens) if m is not None), 256)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if req.stream:
            pieces = _primed(llm.stream(messages, max_tokens, req.temperature, req.stops))
            first = {**head, "object": "chat.completion.chunk"}
            chunks = itertools.chain(
                [
                    {
                        **first,
                        "choices": [
                            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        ],
                    }
                ],
                (
                    {**first, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
                    for p in pieces
                ),
                [{**first, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}],
            )
            return _sse(chunks)
        text = llm.complete([messages], max_tokens, req.temperature, req.stops)[0]
        message = {"role": "assistant", "content": text}
        return {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt: give a string or a non-empty list of strings", "prompt")
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
            pieces = _primed(llm.stream(prompts[0], max_tokens, req.temperature, req.stops))
            choice = {"index": 0, "logprobs": None}
            chunks = itertools.chain(
                ({**head, "choices": [{**choice, "text": p, "finish_reason": None}]} for p in pieces),
                [{**head, "choices": [{**choice, "text": "", "finish_reason": "stop"}]}],
            )
            return _sse(chunks)
        texts = (
            llm.complete(prompts, max_tokens, req.temperature, req.stops)
            if max_tokens
            else [""] * len(prompts)
        )
        scored: list[TokenLogprobs | None] = [None] * len(prompts)
        if req.logprobs is not None:
            scored = llm.token_logprobs(
                [p + t for p, t in zip(prompts, texts, strict=True)], top=req.logprobs
            )
        choices = []
        for i, (p, t, tl) in enumerate(zip(prompts, texts, scored, strict=True)):
            logprobs = None if tl is None else _logprobs_json(tl, 0 if req.echo else len(p), req.logprobs)
            choices.append(
                {"index": i, "text": p + t if req.echo else t, "logprobs": logprobs, "finish_reason": "stop"}
            )
        return {**head, "choices": choices}

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


def _primed(pieces: Iterator[str]) -> Iterator[str]:
    """Run the first step now, so that a failure there (a prompt too long, ...) is an error response, not a cut stream."""
    first = next(pieces, None)
    return itertools.chain([] if first is None else [first], pieces)


def _sse(chunks) -> StreamingResponse:
    lines = itertools.chain((f"data: {json.dumps(c)}\n\n" for c in chunks), ["data: [DONE]\n\n"])
    return StreamingResponse(lines, media_type="text/event-stream")


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "not_found_error", 501: "not_implemented"}.get(
        status, "server_error"
    )
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status
    )
