"""Batched generation with a KV cache: greedy / temperature / top-k / top-p, stop strings, logprobs, streaming.

    prefill:  one forward over the distinct left-padded prompts fills the cache, then it is repeated per row
    decode:   one token per row per step, each reading the cache; a row that samples EOS leaves the batch

`generate` returns one `Generation` per prompt with its text, token ids and the model's log-probability of each
generated token (log-softmax of the raw logits: what RL recipes compare against). `stream` yields text pieces.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ragseek import progress
from ragseek.model.sampling import SamplingConfig
from ragseek.model.transformer import Transformer

if TYPE_CHECKING:
    from ragseek.model.tokenizer import Tokenizer

FinishReason = Literal["eos", "stop", "length"]


@dataclass
class Generation:
    text: str
    tokens: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


def sample_next(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | Sequence[torch.Generator] | None
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,); `generator` one for the batch, or one per row (row i's draw is then
    its own generator's next uniform, whatever the other rows are)."""
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
    # Inverse-CDF draw, one uniform per row (torch.multinomial draws one exponential per vocabulary entry): the
    # first token whose cumulative mass exceeds u · total. u <= 1 - 2^-24 and the sums are fp64, so u · total <
    # total and a token of zero mass is never drawn.
    cdf = logits.softmax(-1).double().cumsum(-1)
    # the generators are CPU ones on every device, so a seed samples the same tokens on CPU and GPU
    if isinstance(generator, Sequence):
        u = torch.cat([torch.rand(1, 1, generator=g) for g in generator])
    else:
        u = torch.rand(cdf.shape[0], 1, generator=generator)
    u = u.double().to(cdf.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)


def compile_decoding(model: Transformer) -> bool:
    """Opt in: run decoding steps (one new token per row) through torch.compile (inductor's C++ kernels fuse the
    norms, rotary, SwiGLU and residual adds between the matmuls; int8 linears stay fbgemm's). The first step
    compiles (tens of seconds; inductor keeps the result in its on-disk cache), so it pays off on long runs.
    Prefill stays eager. Logits match eager decoding to float rounding (~1e-5), not bit for bit: fp32 greedy tokens
    stayed the same on SmolLM2, int8 ones may not (a rounding can move an activation's quantisation step).

    Returns False, leaving decoding eager, where no C++ compiler is found; a step that fails to compile warns on
    stderr and falls back to eager for good.
    """
    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        return False
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import CppCompileError

    compiled = torch.compile(model.forward, dynamic=True)
    state: dict[str, Callable] = {"step": compiled}

    def step(*args):
        try:
            return state["step"](*args)
        except (TorchDynamoException, CppCompileError) as e:  # never required: decode on without it
            print(
                f"ragseek: torch.compile failed ({type(e).__name__}: {e}); decoding without it",
                file=sys.stderr,
            )
            state["step"] = model.forward
            return model.forward(*args)

    model.decode_step = step
    return True


@torch.inference_mode()
def decode_steps(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    eos_ids: set[int],
    seeds: Sequence[int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next token ids (B,), their logprobs (B,)) per step for left-padded prompts; the caller stops it.

    Identical prompts are prefilled once and their cache is repeated (GRPO's G samples of one prompt). A row that
    samples an EOS id leaves the batch: at later steps it gets the pad id (the first EOS id) with logprob 0.
    `seeds` (one per row, instead of cfg.seed): each row samples from its own generator, so what it samples does
    not depend on the rows batched with it (GRPO's groups split over ranks sample what one process samples).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + cfg.max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({P}) + max_new_tokens ({cfg.max_new_tokens}) exceeds max_seq_len {model.cfg.max_seq_len}"
        )
    pad = next(iter(eos_ids), 0)
    device = model.embed_tokens.weight.device
    distinct = {tuple(p): i for i, p in enumerate(dict.fromkeys(tuple(p) for p in prompts))}
    prompt_of = torch.tensor([distinct[tuple(p)] for p in prompts], device=device)
    ids = torch.full((len(distinct), P), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(distinct), total, dtype=torch.long, device=device)
    for p, i in distinct.items():
        ids[i, P - len(p) :] = torch.tensor(p)
        mask[i, P - len(p) :] = 1
    dtype = next(model.parameters()).dtype
    cache = model.make_cache(len(distinct), total, dtype=dtype)
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    row_generators = [torch.Generator().manual_seed(s) for s in seeds] if seeds is not None else None
    padded = bool((mask[:, :P] == 0).any())  # without padding, decoding steps need no mask at all
    forward = getattr(model, "decode_step", model)  # set by compile_decoding
    h, _, _ = model.hidden_states(ids, cache, 0, mask[:, :P])
    logits = model.lm_head(model.norm(h[prompt_of, -1]))  # the head on the last prompt position only
    cache.select_rows(prompt_of)
    mask = mask[prompt_of]
    rows = torch.arange(B, device=device)  # the rows still decoding
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    for pos in range(P, total):
        logprobs = logits.float().log_softmax(-1)
        nxt = sample_next(
            logits, cfg, generator if row_generators is None else [row_generators[i] for i in rows.tolist()]
        )
        tokens = torch.full((B,), pad, dtype=torch.long, device=device).index_copy_(0, rows, nxt)
        chosen = logprobs.gather(-1, nxt[:, None]).squeeze(-1)
        yield tokens, torch.zeros(B, device=device).index_copy_(0, rows, chosen)
        going = ~torch.isin(nxt, eos)
        if not going.all():
            kept = going.nonzero().squeeze(-1)
            if not len(kept):
                return
            rows, nxt, mask = rows[kept], nxt[kept], mask[kept]
            cache.select_rows(kept)
        if pos + 1 < total:
            logits = forward(nxt[:, None], cache, pos, mask[:, : pos + 1] if padded else None)[:, -1]


def generate_ids(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    eos_ids: set[int],
    tokenizer: Tokenizer | None = None,
    seeds: Sequence[int] | None = None,
) -> list[Generation]:
    """Generate for token-id prompts. Rows end at an EOS id, a stop string (needs the tokenizer) or max_new_tokens.
    `seeds`: one generator per row (`decode_steps`)."""
    B = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(B)]
    logps: list[list[float]] = [[] for _ in range(B)]
    reason: list[FinishReason | None] = [None] * B
    if cfg.max_new_tokens:
        # a line counting steps: a token for each row still decoding
        line = ("decode", "tok") if B == 1 else (f"decode {B} rows", "steps")
        for nxt, lp in progress.counted(
            decode_steps(model, prompts, cfg, eos_ids, seeds), *line, cfg.max_new_tokens
        ):
            for i in range(B):
                if reason[i] is not None:
                    continue
                t = int(nxt[i])
                tokens[i].append(t)
                logps[i].append(float(lp[i]))
                if t in eos_ids:
                    reason[i] = "eos"
                elif (
                    cfg.stop
                    and tokenizer is not None
                    and find_stop(tokenizer.decode(tokens[i]), cfg.stop) is not None
                ):
                    reason[i] = "stop"
            if all(r is not None for r in reason):
                break
    out = []
    for i in range(B):
        text = tokenizer.decode(tokens[i]) if tokenizer is not None else ""
        cut = find_stop(text, cfg.stop) if cfg.stop else None
        out.append(
            Generation(text if cut is None else text[:cut], tokens[i], logps[i], reason[i] or "length")
        )
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
    # keep back text that might be the start of a stop string
    hold = max((len(s) for s in cfg.stop), default=0)
    for nxt, _ in decode_steps(model, [tokenizer.encode(prompt)], cfg, {tokenizer.eos_id}):
        t = int(nxt[0])
        if t == tokenizer.eos_id:
            break
        tokens.append(t)
        text = tokenizer.decode(tokens)
        cut = find_stop(text, cfg.stop) if cfg.stop else None
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


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _resolve(cfg: SamplingConfig | None, overrides: dict) -> SamplingConfig:
    if cfg is None:
        return SamplingConfig(**overrides)
    if overrides:
        return SamplingConfig(**{**cfg.__dict__, **overrides})
    return cfg


@dataclass
class SpeculativeStats:
    steps: int  # main-model verify forwards after the prefill
    drafted: list[int]  # drafts proposed at depth 1..D
    accepted: list[int]  # drafts accepted at depth 1..D

    @property
    def acceptance(self) -> list[float]:
        """Acceptance rate of the draft at each depth (depth 1 = the 2nd token of a step, as DeepSeek-V3 reports)."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted, strict=False)]

    @property
    def tokens_per_step(self) -> float:
        return (self.steps + sum(self.accepted)) / max(self.steps, 1)


@torch.inference_mode()
def speculative_generate(
    model: Transformer, prompt: Sequence[int], max_new_tokens: int, eos_ids: set[int]
) -> tuple[list[int], SpeculativeStats]:
    """Greedy self-speculative decoding with the MTP modules (batch 1); token-identical to plain greedy decoding.

    State: L committed tokens whose keys are in the main cache, and g = the main model's greedy next token.
    Each step (D = mtp_depth):
      draft   module k runs over the positions it has not seen exactly yet, reading h^{k-1} and Emb(t_{j+k});
              its output at position L-1 proposes token L+k (module 1 after g, module 2 after that, ...)
      verify  one main forward over [g, d_1..d_D] at positions L..L+D gives the main model's greedy choice after
              each prefix; the longest prefix of drafts that agrees is accepted, and the main model's choice after
              it becomes the next g. Cache entries past the accepted prefix are simply overwritten later.
    Module k's entry at position j is exact once t_{j+k} is committed, so it reruns from position L-k+1.
    """
    cfg = model.cfg
    D = cfg.mtp_depth
    if D == 0:
        raise ValueError("speculative decoding drafts with the MTP modules: the model has mtp_depth=0")
    P = len(prompt)
    total = P + max_new_tokens + D + 1
    if total > cfg.max_seq_len:
        raise ValueError(
            f"prompt + max_new_tokens + mtp_depth + 1 = {total} exceeds max_seq_len {cfg.max_seq_len}"
        )
    dtype = next(model.parameters()).dtype
    cache = model.make_cache(1, total, dtype=dtype, mtp=True)
    main_caches, mtp_caches = cache.layers[: cfg.n_layers], cache.layers[cfg.n_layers :]
    device = model.embed_tokens.weight.device
    # h^0 (main) .. h^{D-1} at every position
    hbuf = torch.zeros(D, 1, total, cfg.dim, dtype=dtype, device=device)
    tokens = torch.zeros(1, total, dtype=torch.long, device=device)
    tokens[0, :P] = torch.tensor(prompt)
    exact = [0] * D  # module k+1 has exact cache entries and outputs for positions < exact[k]

    def main_forward(start: int, n: int) -> torch.Tensor:
        h = _run_blocks(
            model.layers, model.embed_tokens(tokens[:, start : start + n]), model, start, main_caches
        )
        hbuf[0, :, start : start + n] = h
        return model.lm_head(model.norm(h))[0].argmax(-1)  # greedy choice after each position

    g = int(main_forward(0, P)[-1])
    L, out = P, []
    stats = SpeculativeStats(0, [0] * D, [0] * D)
    while len(out) < max_new_tokens and not (out and out[-1] in eos_ids):
        tokens[0, L] = g
        for k in range(1, D + 1):  # draft
            start = exact[k - 1]
            emb = model.embed_tokens(tokens[:, start + k : L + k])
            module = model.mtp[k - 1]
            x = module.eh_proj(torch.cat([module.enorm(emb), module.hnorm(hbuf[k - 1, :, start:L])], dim=-1))
            h = _run_blocks([module.block], x, model, start, mtp_caches[k - 1 : k])
            if k < D:
                hbuf[k, :, start:L] = h
            tokens[0, L + k] = model.lm_head(module.norm(h[:, -1])).argmax(-1)
            exact[k - 1] = L - k + 1
        choice = main_forward(L, D + 1)  # verify: choice[i] is the greedy token after position L + i
        a = 0
        while a < D and int(tokens[0, L + 1 + a]) == int(choice[a]):
            a += 1
        stats.steps += 1
        for i in range(D):
            stats.drafted[i] += int(i <= a)  # depth i+1 is only tested when all earlier drafts were accepted
            stats.accepted[i] += int(i < a)
        out.extend(tokens[0, L : L + 1 + a].tolist())
        L, g = L + 1 + a, int(choice[a])
        if any(t in eos_ids for t in out):
            out = out[: next(i for i, t in enumerate(out) if t in eos_ids) + 1]
    return out[:max_new_tokens], stats


def _run_blocks(blocks, x: torch.Tensor, model: Transformer, start: int, caches) -> torch.Tensor:
    """Run blocks over x (1, n, d) at positions [start, start + n) with their caches (no padding)."""
    n = x.shape[1]
    positions, mask = model._positions_and_mask(1, n, start, None, x.device)
    rope = model.rotary(positions)
    for block, c in zip(blocks, caches, strict=False):
        x = block(x, rope, mask, c, start)
    return x
