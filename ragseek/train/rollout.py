"""Per-token log-probabilities of given responses under a model: what DPO, PPO and GRPO compare between policies.

    logps, mask = response_logps(model, input_ids, attention_mask, response_mask)   # (B, T-1) each

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

from dataclasses import dataclass

import torch
from torch import Tensor

from ragseek.model.transformer import Transformer
from ragseek.train.losses import token_logps


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
    model: Transformer,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """log π(y_t | x, y_<t) for every next token, (B, T-1), 0 where `mask` is 0; and that shifted mask (B, T-1).

    input_ids, attention_mask, response_mask: (B, T), right-padded; response_mask is 1 on the response tokens.
    `temperature` divides the logits first (the sampling distribution of a rollout).
    """
    split = split_prompts(input_ids, attention_mask, response_mask)
    h_prompt, h = shared_prompt_hidden_states(model, split)
    # column j scores continuation token j: the prompt's last state for j = 0, the continuation's state j - 1 after
    scoring = torch.cat([h_prompt[split.prompt_of, -1:], h[:, :-1]], dim=1)
    logits = model.lm_head(model.norm(scoring[split.response]))  # (n, V), n = the response tokens scored
    logps = token_logps(logits[None], split.ids[split.response][None], temperature)[0]
    mask = response_mask[:, 1:]
    return logps.new_zeros(mask.shape).masked_scatter(mask.bool(), logps), mask
