"""The LLM protocol every backend implements, `load_llm(spec)`, and the scoring helpers local models share.

A prompt is either a raw string or a chat (a list of {"role", "content"} dicts); backends render chats with
their model's chat template. `logprobs` scores a forced continuation, as the LLM reranker needs:

    log P(c | p) = sum_i log p(c_i | p, c_<i)          (c tokenised on its own, appended to p's tokens)

so log P("yes" | prompt) - log P("no" | prompt) is a relevance score.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

Message = dict[str, str]
Prompt = str | list[Message]  # a raw prompt, or a chat the backend renders with its chat template

SPECS = "local, local:base, local:PATH, hf:PATH or openai:MODEL"


@dataclass
class TokenLogprobs:
    """Per-token log-probabilities of a text, in the OpenAI completions `logprobs` layout."""

    # each token's text (a character split across tokens belongs to the token completing it)
    tokens: list[str]
    text_offset: list[int]  # where each token starts in the text
    # log p(t_i | t_<i); None for the first token (nothing to condition on)
    token_logprobs: list[float | None]
    # the k most likely tokens per position (None when k = 0)
    top_logprobs: list[dict[str, float] | None] | None


class LLM(Protocol):
    name: str

    def complete(
        self,
        prompts: Sequence[Prompt],
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: list[str] | None = None,
    ) -> list[str]:
        """One completion per prompt (batched), cut before the first stop string."""
        ...

    def stream(
        self, prompt: Prompt, max_tokens: int = 256, temperature: float = 0.0, stop: list[str] | None = None
    ) -> Iterator[str]:
        """The completion of one prompt, piece by piece."""
        ...

    def logprobs(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[float]:
        """log P(continuation | prompt) for each pair: the sum over the continuation's tokens."""
        ...

    def token_logprobs(self, texts: Sequence[str], top: int = 0) -> list[TokenLogprobs]:
        """Every token's log-probability given the tokens before it (what `echo` + `logprobs` returns)."""
        ...


def load_llm(spec: str, base_url: str | None = None) -> LLM:
    """`local` (the embedded SmolLM2-135M-Instruct with the shipped reader adapter), `local:base` (without it),
    `local:PATH` (an HF folder, a .gguf file, or an adapter folder for the embedded model), `hf:PATH` or
    `openai:MODEL`.

    openai: the API key comes from OPENAI_API_KEY, the base URL from `base_url` or OPENAI_BASE_URL.
    """
    kind, _, arg = spec.partition(":")
    if kind not in _BACKENDS or (kind != "local" and not arg):
        raise ValueError(f"unknown LLM spec {spec!r}: use {SPECS} (e.g. --llm hf:/models/qwen2.5-0.5b)")
    if base_url and kind != "openai":
        raise ValueError(f"--base-url applies to --llm openai:MODEL only, not to {spec!r}")
    return _BACKENDS[kind](arg, base_url)


def _local(path: str, _: str | None) -> LLM:
    from ragseek.llm.local import LocalLLM

    return LocalLLM.from_path(path or None)


def _hf(path: str, _: str | None) -> LLM:
    from ragseek.llm.hf import HFLLM

    return HFLLM.from_path(path)


def _openai(model: str, base_url: str | None) -> LLM:
    from ragseek.llm.openai_backend import OpenAILLM

    return OpenAILLM(model, base_url=base_url or os.environ.get("OPENAI_BASE_URL"))


_BACKENDS: dict[str, Callable[[str, str | None], LLM]] = {"local": _local, "hf": _hf, "openai": _openai}


def check_pairs(prompts: Sequence[Prompt], continuations: Sequence[str]) -> None:
    if len(prompts) != len(continuations):
        raise ValueError(
            f"logprobs needs one continuation per prompt, got {len(prompts)} prompts and {len(continuations)}"
        )
    if any(not c for c in continuations):
        raise ValueError("logprobs: every continuation must be a non-empty string")


# ---------------------------------------------------------------------------------------------------------------------
# scoring shared by the local and hf backends: `forward(ids (B, T), mask (B, T)) -> logits (B, T, V)`

Forward = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def _padded_batches(seqs: Sequence[Sequence[int]], pad_id: int, max_batch_tokens: int):
    """(indices, ids (B, T), mask (B, T)) batches: sequences sorted by length, right-padded, at most
    `max_batch_tokens` padded tokens each (the logits are B·T·V floats)."""
    import torch

    if any(not s for s in seqs):
        raise ValueError("scoring needs at least one token per sequence; got an empty text")
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    while order:
        batch = [order.pop()]  # the longest left; shorter ones join while B·T stays within budget
        T = len(seqs[batch[0]])
        while order and (len(batch) + 1) * T <= max_batch_tokens:
            batch.append(order.pop())
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[row, : len(seqs[i])] = 1
        yield batch, ids, mask


def forced_logprobs(
    forward: Forward, seqs: Sequence[Sequence[int]], pad_id: int, max_batch_tokens: int = 2048, top: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """For each sequence t: log p(t_i | t_<i) for i >= 1 (a (T-1,) tensor) and the top-k (ids, logprobs) per position.

    Batched by `_padded_batches`; the attention mask keeps padding out of every real token's context.
    """
    import torch

    out: list = [None] * len(seqs)
    for batch, ids, mask in _padded_batches(seqs, pad_id, max_batch_tokens):
        with torch.inference_mode():
            logits = forward(ids, mask)  # (B, T, V)
            for row, i in enumerate(batch):
                n = len(seqs[i])
                lp = logits[row, : n - 1].float().log_softmax(-1)  # (n-1, V): position j predicts t_{j+1}
                chosen = lp.gather(-1, ids[row, 1:n, None]).squeeze(-1)
                top_lp, top_ids = lp.topk(top, dim=-1) if top else (None, None)
                out[i] = (chosen, top_ids, top_lp)
    return out


def next_token_logprobs(
    forward: Forward, prompts: Sequence[Sequence[int]], pad_id: int, max_batch_tokens: int = 2048
) -> list[torch.Tensor]:
    """log p(· | prompt), a (V,) tensor per prompt: the distribution of the token after it."""
    import torch

    out: list = [None] * len(prompts)
    for batch, ids, mask in _padded_batches(prompts, pad_id, max_batch_tokens):
        with torch.inference_mode():
            logits = forward(ids, mask)
            for row, i in enumerate(batch):
                out[i] = logits[row, len(prompts[i]) - 1].float().log_softmax(-1)
    return out


def sum_continuations(
    forward: Forward,
    prompt_ids: Sequence[Sequence[int]],
    cont_ids: Sequence[Sequence[int]],
    pad_id: int,
    max_batch_tokens: int = 2048,
) -> list[float]:
    """sum_i log p(c_i | p, c_<i) for each (p, c) token-id pair, in one batched forward per budget of tokens.

    One-token continuations are read off their prompt's next-token distribution, so a prompt scored against
    several one-token answers ("yes" / "no") takes one forward, not one per answer."""
    if any(not p for p in prompt_ids):
        raise ValueError("logprobs: every prompt must tokenise to at least one token")
    out: list[float] = [0.0] * len(prompt_ids)
    single = [i for i, c in enumerate(cont_ids) if len(c) == 1]
    unique = list(dict.fromkeys(tuple(prompt_ids[i]) for i in single))
    dists = dict(zip(unique, next_token_logprobs(forward, unique, pad_id, max_batch_tokens), strict=True))
    for i in single:
        out[i] = float(dists[tuple(prompt_ids[i])][cont_ids[i][0]])
    longer = [i for i, c in enumerate(cont_ids) if len(c) != 1]
    scored = forced_logprobs(
        forward, [list(prompt_ids[i]) + list(cont_ids[i]) for i in longer], pad_id, max_batch_tokens
    )
    for i, (chosen, _, _) in zip(longer, scored, strict=True):
        out[i] = float(chosen[len(chosen) - len(cont_ids[i]) :].sum())
    return out


def text_logprobs(
    forward: Forward,
    decode: Callable[[list[int]], str],
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    top: int = 0,
    max_batch_tokens: int = 2048,
) -> list[TokenLogprobs]:
    """TokenLogprobs of token-id sequences; `decode` (keeping special tokens) gives each token's text and offset."""
    scored = forced_logprobs(forward, seqs, pad_id, max_batch_tokens, top) if seqs else []
    out = []
    for seq, (chosen, top_ids, top_lp) in zip(seqs, scored, strict=True):
        tokens, offsets = token_spans(decode, list(seq))
        top_logprobs = None
        if top:
            top_logprobs = [None] + [
                {decode([int(t)]): float(v) for t, v in zip(ids_j, lp_j, strict=True)}
                for ids_j, lp_j in zip(top_ids, top_lp, strict=True)
            ]
        out.append(TokenLogprobs(tokens, offsets, [None, *chosen.tolist()], top_logprobs))
    return out


def token_spans(decode: Callable[[list[int]], str], ids: list[int]) -> tuple[list[str], list[int]]:
    """Each token's text and start offset in decode(ids), from growing prefixes (byte-level BPE safe)."""
    tokens, offsets, done = [], [], ""
    for i in range(len(ids)):
        # an unfinished UTF-8 character decodes to U+FFFD: wait for it
        text = decode(ids[: i + 1]).rstrip("\ufffd")
        offsets.append(len(done))
        tokens.append(text[len(done) :])
        done = text
    return tokens, offsets
