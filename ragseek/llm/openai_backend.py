"""`openai:MODEL`: any OpenAI-compatible HTTP endpoint (OpenAI, DeepSeek, vLLM, Ollama, llama.cpp, `ragseek serve`).

Chats go to /v1/chat/completions (the server applies the chat template), raw prompts to /v1/completions; a batch
is sent as concurrent requests, one per prompt (what every server accepts; vLLM batches them again). Scoring uses
/v1/completions with `echo` + `logprobs`, which `ragseek serve` and vLLM support and OpenAI's chat-only models do
not; a chat cannot be scored this way, since its template lives on the server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from ragseek.llm.base import Prompt, TokenLogprobs, check_pairs

SCORING_HELP = (
    "use --llm local or hf:PATH, or a server whose /v1/completions returns prompt logprobs with echo=true "
    "(ragseek serve, vLLM)"
)


class OpenAILLM:
    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 600,
    ):
        from openai import OpenAI

        key = api_key or os.environ.get("OPENAI_API_KEY")
        if key is None:
            if base_url is None:
                raise ValueError(
                    f"openai:{model} needs an API key: set OPENAI_API_KEY, or give --base-url (or OPENAI_BASE_URL) "
                    "for a local server that needs none"
                )
            key = "none"  # local servers (vLLM, llama.cpp, ragseek serve) accept any key
        self.client = OpenAI(api_key=key, base_url=base_url, timeout=timeout)
        self.model, self.name = model, f"openai:{model}"
        self.concurrency = concurrency  # requests in flight at once

    def complete(
        self,
        prompts: Sequence[Prompt],
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: list[str] | None = None,
    ) -> list[str]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda p: self._one(p, max_tokens, temperature, stop), prompts))

    def stream(
        self, prompt: Prompt, max_tokens: int = 256, temperature: float = 0.0, stop: list[str] | None = None
    ) -> Iterator[str]:
        args = dict(
            model=self.model, max_tokens=max_tokens, temperature=temperature, stop=stop or None, stream=True
        )
        if isinstance(prompt, str):
            for chunk in self.client.completions.create(prompt=prompt, **args):
                if chunk.choices and chunk.choices[0].text:
                    yield chunk.choices[0].text
            return
        for chunk in self.client.chat.completions.create(messages=prompt, **args):
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    def logprobs(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[float]:
        """Sum of the echoed logprobs of the tokens that start at or after the prompt's end (the server tokenises
        prompt + continuation together, so the prompt must end on a token boundary)."""
        check_pairs(prompts, continuations)
        if not all(isinstance(p, str) for p in prompts):
            raise NotImplementedError(
                f"{self.name}: scoring a chat needs its chat template, which the server keeps; pass raw string "
                f"prompts, or {SCORING_HELP}"
            )
        scored = self.token_logprobs([p + c for p, c in zip(prompts, continuations, strict=True)])
        out = []
        for p, c, tl in zip(prompts, continuations, scored, strict=True):
            start = len(p)
            straddling = [t for t, o in zip(tl.tokens, tl.text_offset, strict=True) if o < start < o + len(t)]
            if straddling:
                raise ValueError(
                    f"{self.name}: the server tokenised the end of the prompt and the start of the continuation {c!r} "
                    f"as one token {straddling[0]!r}; end the prompt on a token boundary (e.g. start the continuation "
                    "with a space)"
                )
            out.append(
                sum(
                    lp
                    for lp, o in zip(tl.token_logprobs, tl.text_offset, strict=True)
                    if o >= start and lp is not None
                )
            )
        return out

    def token_logprobs(self, texts: Sequence[str], top: int = 0) -> list[TokenLogprobs]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda t: self._echo(t, top), texts))

    def _echo(self, text: str, top: int) -> TokenLogprobs:
        from openai import APIStatusError

        try:  # max_tokens=1 and logprobs>=1: what servers accept most widely; the generated token is dropped below
            resp = self.client.completions.create(
                model=self.model, prompt=text, max_tokens=1, temperature=0, echo=True, logprobs=max(top, 1)
            )
        except APIStatusError as err:
            if err.status_code not in (404, 405, 501):  # a bad request (too long, ...) stays what it is
                raise
            raise NotImplementedError(
                f"{self.name}: the server refused /v1/completions with echo + logprobs "
                f"({err.status_code}: {err.message}); {SCORING_HELP}"
            ) from err
        lp = resp.choices[0].logprobs
        if lp is None or lp.token_logprobs is None or lp.text_offset is None:
            raise NotImplementedError(
                f"{self.name}: the server returned no prompt logprobs for echo=true; {SCORING_HELP}"
            )
        n = sum(o < len(text) for o in lp.text_offset)  # the echoed text's tokens, not the generated one
        top_lp = lp.top_logprobs[:n] if top and lp.top_logprobs is not None else None
        return TokenLogprobs(lp.tokens[:n], lp.text_offset[:n], lp.token_logprobs[:n], top_lp)

    def _one(self, prompt: Prompt, max_tokens: int, temperature: float, stop: list[str] | None) -> str:
        args = dict(model=self.model, max_tokens=max_tokens, temperature=temperature, stop=stop or None)
        if isinstance(prompt, str):
            return self.client.completions.create(prompt=prompt, **args).choices[0].text
        return self.client.chat.completions.create(messages=prompt, **args).choices[0].message.content or ""
