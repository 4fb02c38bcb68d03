"""Batched generation with a KV cache: greedy / temperature / top-k / top-p, stop strings, logprobs, streaming.

    prefill:  one forward over the left-padded prompts fills the cache
    decode:   one token per row per step, each reading the cache; finished rows keep a slot but are ignored

`generate` returns one `Generation` per prompt with its text, token ids and the model's log-probability of each
generated token (log-softmax of the raw logits: what RL recipes compare against). `stream` yields text pieces.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from ragseek.model.transformer import Transformer

if TYPE_CHECKING:
    from ragseek.model.tokenizer import Tokenizer

FinishReason = Literal["eos", "stop", "length"]


@dataclass
class SamplingConfig:
    max_new_tokens: int = field(default=128, metadata={"help": "tokens generated at most per prompt"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; otherwise logits are divided by it"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0 = all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus: keep the smallest set with mass >= top_p"})
    seed: int | None = field(default=None, metadata={"help": "seed of the sampling generator (None = random)"})
    stop: list[str] = field(default_factory=list, metadata={"help": "stop strings; the text is cut before them"})

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0 and max_new_tokens >= 0")


@dataclass
class Generation:
    text: str
    tokens: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= cfg.top_p  # mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def decode_steps(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    eos_ids: set[int],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next token ids (B,), their logprobs (B,)) per step for left-padded prompts; the caller stops it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + cfg.max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({cfg.max_new_tokens}) exceeds max_seq_len {model.cfg.max_seq_len}")
    pad = next(iter(eos_ids), 0)
    ids = torch.full((B, P), pad, dtype=torch.long)
    mask = torch.zeros(B, total, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p)
        mask[i, P - len(p) :] = 1
    dtype = next(model.parameters()).dtype
    cache = model.make_cache(B, total, dtype=dtype)
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    logits = model(ids, cache, 0, mask[:, :P])[:, -1]
    for pos in range(P, total):
        logprobs = logits.float().log_softmax(-1)
        nxt = sample_next(logits, cfg, generator)
        yield nxt, logprobs.gather(-1, nxt[:, None]).squeeze(-1)
        if pos + 1 < total:
            logits = model(nxt[:, None], cache, pos, mask[:, : pos + 1])[:, -1]


def generate_ids(
    model: Transformer, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, eos_ids: set[int], tokenizer: Tokenizer | None = None
) -> list[Generation]:
    """Generate for token-id prompts. Rows end at an EOS id, a stop string (needs the tokenizer) or max_new_tokens."""
    B = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(B)]
    logps: list[list[float]] = [[] for _ in range(B)]
    reason: list[FinishReason | None] = [None] * B
    if cfg.max_new_tokens:
        for nxt, lp in decode_steps(model, prompts, cfg, eos_ids):
            for i in range(B):
                if reason[i] is not None:
                    continue
                t = int(nxt[i])
                tokens[i].append(t)
                logps[i].append(float(lp[i]))
                if t in eos_ids:
                    reason[i] = "eos"
                elif cfg.stop and tokenizer is not None and _find_stop(tokenizer.decode(tokens[i]), cfg.stop) is not None:
                    reason[i] = "stop"
            if all(r is not None for r in reason):
                break
    out = []
    for i in range(B):
        text = tokenizer.decode(tokens[i]) if tokenizer is not None else ""
        cut = _find_stop(text, cfg.stop) if cfg.stop else None
        out.append(Generation(text if cut is None else text[:cut], tokens[i], logps[i], reason[i] or "length"))
    return out


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str],
    cfg: SamplingConfig | None = None,
    **overrides,
) -> list[Generation]:
    """Generate for text prompts (already chat-formatted if the model wants it). Keyword overrides set SamplingConfig."""
    cfg = _resolve(cfg, overrides)
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = [tokenizer.encode(p) for p in batch]
    return generate_ids(model, ids, cfg, {tokenizer.eos_id}, tokenizer)


def stream(
    model: Transformer, tokenizer: Tokenizer, prompt: str, cfg: SamplingConfig | None = None, **overrides
) -> Iterator[str]:
    """Yield the text of one generation piece by piece (whole UTF-8 characters only), honouring stop strings."""
    cfg = _resolve(cfg, overrides)
    tokens: list[int] = []
    emitted = 0
    hold = max((len(s) for s in cfg.stop), default=0)  # keep back text that might be the start of a stop string
    for nxt, _ in decode_steps(model, [tokenizer.encode(prompt)], cfg, {tokenizer.eos_id}):
        t = int(nxt[0])
        if t == tokenizer.eos_id:
            break
        tokens.append(t)
        text = tokenizer.decode(tokens)
        cut = _find_stop(text, cfg.stop) if cfg.stop else None
        if cut is not None:
            yield text[emitted:cut]
            return
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            continue
        ready = len(text) - hold
        if ready > emitted:
            yield text[emitted:ready]
            emitted = ready
    text = tokenizer.decode(tokens)
    if len(text) > emitted:
        yield text[emitted:]


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _resolve(cfg: SamplingConfig | None, overrides: dict) -> SamplingConfig:
    if cfg is None:
        return SamplingConfig(**overrides)
    if overrides:
        return SamplingConfig(**{**cfg.__dict__, **overrides})
    return cfg
