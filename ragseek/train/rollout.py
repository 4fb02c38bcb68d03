"""Everything about rollouts, the sampling half of an RL step (GRPO, PPO) and the logps every preference loss needs.

    class GRPOConfig(RolloutConfig, RecipeConfig): ...        # max_new_tokens, temperature, top_p: cfg.sampling
    rollout_model = RolloutModel(policy, cfg.loop.dtype)       # the policy, or its bf16 copy for sampling
    rollout = sample_groups(rollout_model(), tokenizer, rows, G, cfg.sampling(seed, step))  # B prompts × G
    rewards, each = score(reward_fns, weights, rollout)        # Σ_k w_k f_k(prompts, completions, answer=...)
    logps = logps_of(policy, rollout.tensors(), temperature)   # (N, S − 1), the loss's log π
    metrics = {**rollout.metrics(), ...}                       # entropy, response length, tok/s, generation share

`response_logps(model, batch)` is the per-token log-probability of given responses (a batch of input_ids,
attention_mask and response_mask: `Rollout.tensors()`, `collate_preference`): what DPO, PPO and GRPO compare
between policies.

    logps, mask = response_logps(model, batch)   # (B, T-1) each

Position t of the outputs scores token t + 1 of `input_ids` from the logits at t (the shift is done here), so
`mask[:, t] = response_mask[:, t + 1]`: 1 where the scored token is a response token.

Two savings, both exact (the values and gradients of one forward over the rows with the head on every position):
  shared prompts  each row splits at its first response token into a prompt and a continuation (`split_prompts`);
                  every distinct prompt runs through the trunk once, its KV cache is repeated for the rows that
                  share it (a GRPO group's G completions, a DPO pair) and the continuations run on top of it, with
                  autograd through the cache, so a shared prompt's gradient is the sum over its rows.
  scored rows     the lm head and the log-softmax run only on the states that score a response token: with
                  SmolLM2's 49k vocabulary the head is a fifth of the FLOPs of every position it runs on.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ragseek.config import config_field
from ragseek.model import SamplingConfig, Tokenizer
from ragseek.model.decoding import compile_decoding, generate_ids
from ragseek.model.transformer import Transformer
from ragseek.train.data import pad_right
from ragseek.train.distributed import full
from ragseek.train.loop import AUTOCAST_DTYPES, Precision
from ragseek.train.losses import token_logps
from ragseek.train.rewards import RewardFn
from ragseek.train.run import frozen


@dataclass
class PromptSplit:
    """Right-padded rows as distinct left-padded prompts and the right-padded continuations that follow them."""

    prompt_ids: Tensor  # (U, Lp) the distinct prompts, left-padded (pad id 0)
    prompt_mask: Tensor  # (U, Lp) 1 on real tokens
    prompt_of: Tensor  # (N,) row -> its prompt
    ids: Tensor  # (N, Lc) continuations, right-padded (pad id 0), Lc >= 1
    mask: Tensor  # (N, Lc) 1 on real tokens
    response: Tensor  # (N, Lc) bool, the continuation tokens that are response tokens


def split_prompts(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> PromptSplit:
    """Split each right-padded row before its first response token (after token 0 at least: it is never scored)."""
    S = input_ids.shape[1]
    real, response = attention_mask.bool(), response_mask.bool()
    lengths = real.sum(-1)
    if (
        not torch.equal(real, torch.arange(S, device=real.device) < lengths[:, None])
        or (response & ~real).any()
    ):
        raise ValueError("rows must be right-padded, with response tokens only where attention_mask is 1")
    first = torch.where(response.any(-1), response.int().argmax(-1), lengths).clamp(min=1)
    Lp = int(first.max())
    # (N, Lp): the row position at each left-padded prompt column, then (N, Lc) at each continuation column
    col = torch.arange(Lp, device=first.device) - (Lp - first)[:, None]
    prompts = torch.where(col >= 0, input_ids.gather(1, col.clamp(min=0)), -1)
    distinct, prompt_of = torch.unique(prompts, dim=0, return_inverse=True)
    col = first[:, None] + torch.arange(max(int((lengths - first).max()), 1), device=first.device)
    real_cont = col < lengths[:, None]
    col = col.clamp(max=S - 1)
    return PromptSplit(
        prompt_ids=distinct.clamp(min=0),
        prompt_mask=(distinct >= 0).long(),
        prompt_of=prompt_of,
        ids=torch.where(real_cont, input_ids.gather(1, col), 0),
        mask=real_cont.long(),
        response=response.gather(1, col) & real_cont,
    )


def shared_prompt_hidden_states(model: Transformer, split: PromptSplit) -> tuple[Tensor, Tensor]:
    """Last block's states of the distinct prompts (U, Lp, d), each run once, and of the continuations (N, Lc, d),
    which attend to their prompt's cached keys and values."""
    Lp, Lc = split.prompt_ids.shape[1], split.ids.shape[1]
    cache = model.make_cache(split.prompt_ids.shape[0], Lp + Lc, dtype=next(model.parameters()).dtype)
    h_prompt, _, _ = model.hidden_states(split.prompt_ids, cache, 0, split.prompt_mask)
    cache.select_rows(split.prompt_of)
    mask = torch.cat([split.prompt_mask[split.prompt_of], split.mask], dim=1)
    h, _, _ = model.hidden_states(split.ids, cache, Lp, mask)
    return h_prompt, h


def response_logps(
    model: Transformer, batch: Mapping[str, Tensor], temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """log π(y_t | x, y_<t) for every next token, (B, T-1), 0 where `mask` is 0; and that shifted mask (B, T-1).

    batch: input_ids, attention_mask, response_mask, each (B, T), right-padded; response_mask is 1 on the response
    tokens (other keys are ignored). `temperature` divides the logits first (the sampling distribution of a rollout).
    """
    response_mask = batch["response_mask"]
    split = split_prompts(batch["input_ids"], batch["attention_mask"], response_mask)
    h_prompt, h = shared_prompt_hidden_states(model, split)
    # column j scores continuation token j: the prompt's last state for j = 0, the continuation's state j - 1 after
    scoring = torch.cat([h_prompt[split.prompt_of, -1:], h[:, :-1]], dim=1)
    logits = model.lm_head(model.norm(scoring[split.response]))  # (n, V), n = the response tokens scored
    logps = token_logps(logits[None], split.ids[split.response][None], temperature)[0]
    mask = response_mask[:, 1:]
    return logps.new_zeros(mask.shape).masked_scatter(mask.bool(), logps), mask


def logps_of(model: nn.Module, batch: dict[str, Tensor], temperature: float) -> Tensor:
    """Per-token logps (N, S − 1) of the batch's next tokens under `model` (`response_logps`)."""
    return response_logps(model, batch, temperature)[0]


# ---------------------------------------------------------------------------------------------------------------------
# sampling groups


@dataclass
class Rollout:
    """N = B·G sequences prompt + completion, right-padded; `response_mask` is 1 on the completion's tokens."""

    input_ids: Tensor  # (N, S)
    attention_mask: Tensor  # (N, S)
    response_mask: Tensor  # (N, S)
    completions: list[str]
    # completion tokens per sequence (EOS included)
    lengths: list[int]
    # log π(y_t) of every sampled token, as the sampler saw it (temperature 1 logits)
    sampled_logps: list[float]
    # each sequence's prompt row ("prompt", "answer", ...): a prompt's G sequences are consecutive
    rows: list[dict[str, Any]]
    # time.perf_counter() when sampling began, and the seconds it took
    started: float
    gen_s: float

    def tensors(self) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "response_mask": self.response_mask,
        }

    def column(self, key: str) -> list[Any]:
        """One dataset column per sequence (`answer`: the ground truth the rewards compare with)."""
        return [row[key] for row in self.rows]

    def entropy(self) -> float:
        """−mean log π(y_t) over the sampled tokens: a Monte-Carlo estimate of the per-token entropy H(π), unbiased
        at temperature 1 (E_{y~π}[−log π(y)] = H); free, since the sampler kept the logprobs."""
        return -sum(self.sampled_logps) / max(len(self.sampled_logps), 1)

    def metrics(self) -> dict[str, float]:
        """The step's sampling numbers, timed from the start of sampling to now (the end of the updates)."""
        step_s = time.perf_counter() - self.started
        generated = sum(self.lengths)
        return {
            "entropy": self.entropy(),
            "response_length": generated / len(self.lengths),
            "tok_s": generated / step_s,
            "gen_share": self.gen_s / step_s,
            "step_s": step_s,
        }


@dataclass
class RolloutConfig:
    """How an RL recipe samples its completions (`sampling`): GRPOConfig and PPOConfig extend it, so these are their
    own top-level keys."""

    max_new_tokens: int = config_field(64, "completion length cap")
    temperature: float = config_field(1.0, "sampling temperature (the logps of the loss use it too, as TRL)")
    top_p: float = config_field(1.0, "nucleus sampling mass")
    compile_rollouts: bool = config_field(
        False,
        "torch.compile the rollout model's decoding step (decoding.compile_decoding): about a minute once, then "
        "faster rollouts (bf16, 8 rows: 1.17x); the logits match eager decoding to ~1e-5, not bit for bit",
    )

    def sampling(self, seed: int, step: int) -> SamplingConfig:
        """The step's sampler, seeded by (seed, step): a resumed step samples exactly what the killed run did."""
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=seed * 1_000_003 + step,
        )


def sample_groups(
    model: Transformer,
    tokenizer: Tokenizer,
    rows: Sequence[dict[str, Any]],
    group_size: int,
    sampling: SamplingConfig,
    first: int = 0,
) -> Rollout:
    """G completions per prompt row (`load_prompts`: its "prompt_ids", repeated G times, consecutive): one batched,
    left-padded generation with the KV cache (`generate_ids`: each prompt is prefilled once), returned as
    right-padded prompt + completion rows ready for a training forward.

    Sequence k of the step (k = first + its index here; `first`, this rank's first sequence under torchrun, whose
    share of the step's groups starts there) samples from its own generator seeded sampling.seed · 2^20 + k: what
    it samples depends on its prompt, the weights and k, never on the other rows, so the step's B·G completions are
    the same on one process and split over any number of ranks."""
    started = time.perf_counter()
    rows = [row for row in rows for _ in range(group_size)]
    repeated = [list(row["prompt_ids"]) for row in rows]
    seeds = None if sampling.seed is None else [(sampling.seed << 20) + first + k for k in range(len(rows))]
    was_training = model.training
    model.eval()
    generations = generate_ids(model, repeated, sampling, {tokenizer.eos_id}, tokenizer, seeds)
    model.train(was_training)
    sequences = [p + g.tokens for p, g in zip(repeated, generations, strict=True)]
    masks = [[0] * len(p) + [1] * len(g.tokens) for p, g in zip(repeated, generations, strict=True)]
    return Rollout(
        input_ids=pad_right(sequences, tokenizer.pad_id),
        attention_mask=pad_right([[1] * len(s) for s in sequences], 0),
        response_mask=pad_right(masks, 0),
        completions=[g.text for g in generations],
        lengths=[len(g.tokens) for g in generations],
        sampled_logps=[lp for g in generations for lp in g.logprobs],
        rows=rows,
        started=started,
        gen_s=time.perf_counter() - started,
    )


class RolloutModel:
    """What rollouts sample from. fp32: the policy itself. bf16 (`loop.dtype`): a bf16 copy of the policy whose
    weights are refreshed from it before every rollout (`__call__`, 0.04 s for 135M), the role a bf16 vLLM engine
    plays in TRL and verl. Decoding a small batch is bound by reading the weights, and bf16 halves them: rollouts run
    1.7x faster on this CPU (avx512_bf16). The samples then come from a policy one bf16 rounding away from the
    trained one (as with vLLM); the loss's logps always come from the trained policy under the loop's autocast.

    `sharded`: the policy is about to be sharded by FSDP (`World.parallelize`), so even in fp32 rollouts sample
    from a whole copy, made here from the unsharded policy; under torchrun every rank refreshes its copy from the
    gathered weights before every rollout, and samples its own groups.

    `compiled` (RolloutConfig.compile_rollouts): the model that samples decodes through a compiled step
    (`compile_decoding`; inductor reads the weights as inputs, so the refreshed or trained weights need no
    recompile)."""

    def __init__(self, policy: Transformer, dtype: Precision, sharded: bool = False, compiled: bool = False):
        self.policy = policy
        amp = AUTOCAST_DTYPES[dtype]
        keep = amp is not None or sharded
        self.copy = frozen(copy.deepcopy(policy)).to(amp or torch.float32) if keep else None
        if compiled:
            compile_decoding(self.policy if self.copy is None else self.copy)

    def __call__(self) -> Transformer:
        if self.copy is None:
            return self.policy
        with torch.no_grad():
            for dst, src in zip(self.copy.parameters(), self.policy.parameters(), strict=True):
                # a sharded parameter is gathered (every rank calls this)
                dst.copy_(full(src))
        return self.copy


# ---------------------------------------------------------------------------------------------------------------------
# scoring


def score(
    reward_fns: Sequence[RewardFn], weights: Sequence[float], rollout: Rollout
) -> tuple[Tensor, list[Tensor]]:
    """r = Σ_k w_k f_k(prompts, completions, answer=..., **columns) per completion (N,), and each function's rewards
    (N,) for the log. Every column of the rows goes to the rewards, as TRL passes dataset columns."""
    names = [k for k in rollout.rows[0] if k not in ("prompt", "prompt_ids")]
    prompts, columns = rollout.column("prompt"), {k: rollout.column(k) for k in names}
    each = [
        torch.tensor(fn(prompts, rollout.completions, **columns), dtype=torch.float64) for fn in reward_fns
    ]
    return sum(w * r for w, r in zip(weights, each, strict=True)), each


def accuracy(each: Sequence[Tensor]) -> float:
    """The share of completions the first reward function (the correctness one) scores 1 or more."""
    return (each[0] >= 1).float().mean().item()
