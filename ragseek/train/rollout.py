"""Per-token log-probabilities of given responses under a model: what DPO, PPO and GRPO compare between policies.

    logps, mask = response_logps(model, input_ids, attention_mask, response_mask)   # (B, T-1) each

Position t of the outputs scores token t + 1 of `input_ids` from the logits at t (the shift is done here), so
`mask[:, t] = response_mask[:, t + 1]`: 1 where the scored token is a response token.
"""

from __future__ import annotations

from torch import Tensor, nn

from ragseek.train.losses import token_logps


def response_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """log π(y_t | x, y_<t) for every next token, (B, T-1), 0 where `mask` is 0; and that shifted mask (B, T-1).

    input_ids, attention_mask, response_mask: (B, T), right-padded; response_mask is 1 on the response tokens.
    `temperature` divides the logits first (the sampling distribution of a rollout).
    """
    logits = model(input_ids, attention_mask=attention_mask)[:, :-1]  # (B, T-1, V)
    mask = response_mask[:, 1:]
    logps = token_logps(logits, input_ids[:, 1:], temperature)
    return logps * mask.to(logps.dtype), mask
