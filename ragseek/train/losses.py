"""Every post-training loss of the lecture as a pure function of tensors, named after its formula.

Conventions for every function here:
- per-token tensors are (B, T); `logits[:, t]` is the prediction for `labels[:, t]` (callers shift);
- masks are 1 on the tokens that count (response tokens, right padding 0);
- a *sequence mean* is the mean over one sequence's masked tokens, then the mean over the sequences that have any
  (the lecture's 1/|y| inside E[...]); a *token mean* is one mean over every masked token of the batch;
- a loss returns `(loss, metrics)`: a scalar with gradient, and detached Python floats for logging.

SFT, distillation, Bradley-Terry and DPO are post-training I; GAE, the KL-penalised reward, PPO, the value loss and
GRPO (group advantages, k3, the clipped objective) are post-training II. The docstrings quote the lecture,
Nathanaël Fijalkow's "Large Language Models: Retrieval-Augmented Generation" (its second half, "The DeepSeek
special"; docs/lecture.md), and the paper each formula comes from. The lecture's slides, by title:

    sft_loss               "Option 1: Supervised fine-tuning (SFT)"
    distill_loss           "Option 1 bis: Traditional distillation"
    bradley_terry_loss     "Step 1: Learning a reward model" (the Bradley-Terry model)
    kl_penalized_rewards   the KL-constrained loss of "Option 2: RLHF" (after "Step 1"), per-token KL penalty
    gae                    "Advantage estimates" (GAE)
    ppo_policy_loss        "Step 3: Proximal policy optimization (PPO)", the LLM form of the clipped surrogate
    dpo_loss               "Option 3: Direct preference optimization (DPO)"
    grpo_advantages,       the GRPO slides after "Step 3: PPO" ("can we get rid of the value function?"): the
    kl_k3, grpo_loss       group advantage, the KL estimate added to the loss, and L = −E[(1/G) Σ_i F(x, y_i)];
                           old_logps=None is their "vanilla policy gradient" form ("Vanilla policy gradient")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor
from torch.autograd.function import once_differentiable

Metrics = dict[str, float]
SFTReduction = Literal["sequence", "token"]
AdvantageScale = Literal["group", "batch", "none"]
GRPOLossType = Literal["grpo", "dr_grpo", "dapo"]


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x where the mask is 1, else 0 (a select, not a product: inf or NaN on padding cannot leak in)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _sequence_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(1/B') Σ_b (Σ_t m_bt x_bt) / (Σ_t m_bt), over the B' rows that have a masked token."""
    lengths = mask.to(x.dtype).sum(-1)
    per_sequence = _masked(x, mask).sum(-1) / lengths.clamp(min=1)
    return per_sequence.sum() / (lengths > 0).sum().clamp(min=1)


def _token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Σ m x / Σ m over the whole batch."""
    return _masked(x, mask).sum() / mask.to(x.dtype).sum().clamp(min=1)


def _upcast(x: Tensor) -> Tensor:
    """bf16 / fp16 -> fp32; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """z / τ, upcast; no copy at τ = 1 for fp32 / fp64 rows (this runs once per sequence over V = 49k columns)."""
    logits = _upcast(logits)
    return logits if temperature == 1.0 else logits / temperature


def _check_shapes(**tensors: Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"these per-token tensors must share one (B, T) shape, got {shapes}")


# ---------------------------------------------------------------------------------------------------------------------
# Per-token log-probabilities


class _LabelLogSoftmax(torch.autograd.Function):
    """log_softmax(z / τ)[y], one sequence at a time in both passes: the backward recomputes each row's softmax,
    ∂ log p_y / ∂z_v = (1[v = y] − p_v) / τ, so nothing of size (B, T, V) is kept beside the logits and their
    gradient (autograd through log_softmax would save a full fp32 copy)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
        logps = torch.stack(
            [
                F.log_softmax(_scaled(row, temperature), dim=-1).gather(-1, row_targets[:, None]).squeeze(-1)
                for row, row_targets in zip(logits, targets, strict=True)
            ]
        )
        ctx.save_for_backward(logits, targets)
        ctx.temperature = temperature
        return logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps: Tensor) -> tuple[Tensor, None, None]:
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for b in range(logits.shape[0]):
            probs = torch.softmax(_scaled(logits[b], ctx.temperature), dim=-1)  # (T, V), one sequence only
            g = grad_logps[b, :, None].to(probs.dtype) / ctx.temperature
            grad[b] = probs.mul_(-g).scatter_add_(-1, targets[b, :, None], g)
        return grad, None, None


def token_logps(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log π(y_t | x, y_<t) = z_t[y_t] − logsumexp(z_t): logits (B, T, V) and labels (B, T) -> (B, T), fp32 or fp64.

    Computed one sequence at a time (bf16 / fp16 rows upcast to fp32) with a hand-written backward that recomputes
    each row's softmax, so no (B, T, V) fp32 log-softmax copy exists in either pass: with SmolLM2's 49k vocabulary
    that copy is 200 kB per token. `temperature` divides the logits first (the sampling distribution of GRPO
    rollouts). Labels < 0 (the -100 ignore index) give 0 at their position. Same values as TRL's
    `selective_log_softmax` (trl/trainer/utils.py), which loops over rows in the forward pass but lets autograd save
    each row's intermediates for the backward.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: it must be > 0")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: expected (B, T, V) and (B, T)"
        )
    logps = _LabelLogSoftmax.apply(logits, labels.clamp(min=0), temperature)
    return logps.masked_fill(labels < 0, 0.0)


def _chunk_logps(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float) -> Tensor:
    return token_logps(F.linear(hidden, weight)[None], labels[None], temperature)[0]


def chunked_token_logps(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 256, temperature: float = 1.0
) -> Tensor:
    """token_logps(hidden @ weightᵀ, labels) without the logits: hidden (..., d), the head's weight (V, d), labels
    (...) -> logps (...), `chunk` positions at a time (the leading dims flattened).

    Each chunk's head + log-softmax runs under torch.utils.checkpoint: the forward keeps no logits, the backward
    recomputes one chunk's (chunk, V) logits at a time, so at most one chunk of logits and of its gradient exists in
    either pass (8 x 256 positions of SmolLM2's 49k vocabulary are 400 MB of fp32 logits, 256 positions are 50 MB).
    The price is the head's forward matmul once more in the backward.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: it must be >= 1")
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    parts = [
        torch.utils.checkpoint.checkpoint(
            _chunk_logps,
            flat_hidden[i : i + chunk],
            weight,
            flat_labels[i : i + chunk],
            temperature,
            use_reentrant=False,
        )
        for i in range(0, max(1, flat_labels.shape[0]), chunk)  # no position: one empty chunk, still a graph
    ]
    return torch.cat(parts).reshape(labels.shape)


# ---------------------------------------------------------------------------------------------------------------------
# Post-training I: SFT, distillation, Bradley-Terry reward model, DPO

SFT_REDUCTIONS: dict[SFTReduction, Callable[[Tensor, Tensor], Tensor]] = {
    "sequence": _sequence_mean,  # the lecture's 1/|y|: every response weighs the same
    "token": _token_mean,  # every response token weighs the same (long responses weigh more)
}


def sft_loss(
    logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    reduction: SFTReduction = "sequence",
    segments: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """The lecture's SFT loss, L(θ) = −E_{(x,y)~D} [ (1/|y|) Σ_{t=1}^{|y|} log π_θ(y_t | x, y_<t) ].

    `loss_mask` is 1 on response tokens: prompt tokens (and padding) get no loss and so no gradient. The default
    `reduction="sequence"` is the formula above (mean per response, then over the batch); `"token"` is one mean over
    every response token of the batch (what transformers' `CrossEntropyLoss(ignore_index=-100)` computes).
    `segments` (B, T), the labels' example ids in packed rows (`data.pack_examples`), makes each packed example one
    sequence of the sequence mean, as it is unpacked (the token mean is the same either way).
    """
    _check_shapes(labels=labels, loss_mask=loss_mask, segments=segments)
    return sft_loss_from_logps(token_logps(logits, labels), loss_mask, reduction, segments)


def sft_loss_from_logps(
    logps: Tensor, loss_mask: Tensor, reduction: SFTReduction = "sequence", segments: Tensor | None = None
) -> tuple[Tensor, Metrics]:
    """`sft_loss` from the per-token log π_θ(y_t | x, y_<t) (B, T), e.g. `chunked_token_logps`' (no logits)."""
    _check_shapes(logps=logps, loss_mask=loss_mask, segments=segments)
    tokens = float(loss_mask.sum())
    if segments is not None:
        logps, loss_mask = _row_per_segment(logps, segments), _row_per_segment(loss_mask, segments)
    loss = SFT_REDUCTIONS[reduction](-logps, loss_mask)
    return loss, {"loss": loss.item(), "tokens": tokens}


def _row_per_segment(x: Tensor, segments: Tensor) -> Tensor:
    """(B, T) -> (B·K, T), K segments per row: row b·K + k holds x where segments[b] == k and 0 elsewhere, so each
    packed example is a row of its own. Padding (segment -1) goes to its row's segment 0, where its mask is 0."""
    B, T = x.shape
    K = int(segments.max().clamp(min=0)) + 1
    rows = torch.arange(B, device=x.device)[:, None] * K + segments.clamp(min=0)
    return x.new_zeros(B * K, T).index_put((rows, torch.arange(T, device=x.device).expand(B, T)), x)


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    alpha: float = 0.5,
    temperature: float = 2.0,
) -> tuple[Tensor, Metrics]:
    """The lecture's "traditional" distillation: a hard target (the ground truth) and a soft target (the teacher).

        L = α · CE(y, p_S) + (1 − α) · T² · KL(softmax(z_T / T) ‖ softmax(z_S / T))

    (Hinton, Vinyals, Dean 2015, arXiv:1503.02531: the T² keeps the soft term's gradient scale independent of T.)
    Both terms are sequence means over the masked (response) tokens; the teacher gets no gradient. Teacher and
    student must share the tokenizer (same V).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: the weight of the hard target must lie in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: it must be > 0")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} vs teacher logits {tuple(teacher_logits.shape)}: "
            "logit distillation needs the same tokenizer (same vocabulary) and the same token positions"
        )
    _check_shapes(labels=labels, loss_mask=loss_mask)
    ce = -token_logps(student_logits, labels)
    keep = loss_mask.bool()  # only the counted positions go through the full-vocabulary softmax
    log_p_student = F.log_softmax(_upcast(student_logits[keep]) / temperature, dim=-1)  # (N, V)
    log_p_teacher = F.log_softmax(_upcast(teacher_logits[keep].detach()) / temperature, dim=-1)
    kl_kept = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (N,)
    kl = torch.zeros_like(ce).index_put((keep,), kl_kept)
    hard, soft = _sequence_mean(ce, loss_mask), _sequence_mean(kl, loss_mask)
    loss = alpha * hard + (1 - alpha) * temperature**2 * soft
    return loss, {"loss": loss.item(), "ce": hard.item(), "kl": soft.item()}


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> tuple[Tensor, Metrics]:
    """The lecture's reward-model loss, L(φ) = −E_{(x, y_b, y_w)~D} [ log σ(r_φ(x, y_b) − r_φ(x, y_w)) ].

    From the Bradley-Terry model p*(y_1 > y_2 | x) = exp r*(x, y_1) / (exp r*(x, y_1) + exp r*(x, y_2)) (Ouyang et al.
    2022, arXiv:2203.02155, eq. 1). `r_chosen` are the better responses' scores, one per pair.
    """
    _check_shapes(r_chosen=r_chosen, r_rejected=r_rejected)
    margin = r_chosen - r_rejected
    loss = -F.logsigmoid(margin).mean()
    return loss, {
        "loss": loss.item(),
        "accuracy": (margin > 0).float().mean().item(),
        "margin": margin.mean().item(),
        "chosen_reward": r_chosen.mean().item(),
        "rejected_reward": r_rejected.mean().item(),
    }


def _log_ratio(logps: Tensor, ref_logps: Tensor, mask: Tensor, length_normalize: bool) -> Tensor:
    """Σ_t log π_θ/π_ref over a sequence's masked tokens, divided by |y| when length_normalize: (B, T) -> (B,)."""
    total = _masked(logps - ref_logps.detach(), mask).sum(-1)
    return total / mask.to(total.dtype).sum(-1).clamp(min=1) if length_normalize else total


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    beta: float = 0.1,
    length_normalize: bool = True,
) -> tuple[Tensor, Metrics]:
    """The lecture's DPO loss (per-token logps (B, T) in, one pair per row):

        L = −E [ log σ( β (1/|y⁺|) Σ_t log π_θ(y⁺_t|x, y⁺_<t)/π_ref(y⁺_t|x, y⁺_<t)
                      − β (1/|y⁻|) Σ_t log π_θ(y⁻_t|x, y⁻_<t)/π_ref(y⁻_t|x, y⁻_<t) ) ]

    `length_normalize=True` is that formula; `False` drops the 1/|y| and is the original DPO (Rafailov et al. 2023,
    arXiv:2305.18290, eq. 7) and TRL's `loss_type="sigmoid"`. The implicit rewards β·log π_θ/π_ref are the metrics:
    with π_θ = π_ref both are 0 and the loss is log 2 for any β. The reference gets no gradient.
    """
    _check_shapes(
        policy_chosen_logps=policy_chosen_logps, ref_chosen_logps=ref_chosen_logps, chosen_mask=chosen_mask
    )
    _check_shapes(
        policy_rejected_logps=policy_rejected_logps,
        ref_rejected_logps=ref_rejected_logps,
        rejected_mask=rejected_mask,
    )
    chosen = beta * _log_ratio(policy_chosen_logps, ref_chosen_logps, chosen_mask, length_normalize)
    rejected = beta * _log_ratio(policy_rejected_logps, ref_rejected_logps, rejected_mask, length_normalize)
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    return loss, {
        "loss": loss.item(),
        "reward_margin": margin.mean().item(),
        "reward_accuracy": (margin > 0).float().mean().item(),
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Post-training II: RLHF with PPO + GAE


@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16), the lecture's

        δ_t = r_t + γ V(s_{t+1}) − V(s_t),     Â(t, γ, λ) = Σ_{ℓ≥0} (γλ)^ℓ δ_{t+ℓ},     returns R_t = Â_t + V(s_t).

    λ = 0 gives the one-step TD residual δ_t; λ = 1 gives the Monte-Carlo return minus the baseline,
    Σ_ℓ γ^ℓ r_{t+ℓ} − V(s_t). Per-token (B, T) inputs with right padding: the value after the last valid token is
    0 (the episode ends there) and padded positions get 0. Both outputs are training targets, so no gradient.
    """
    _check_shapes(rewards=rewards, values=values, mask=mask)
    rewards, values, mask = _masked(rewards, mask), _masked(values, mask), mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])
    next_advantage = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


@torch.no_grad()
def kl_penalized_rewards(
    score: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, beta: float
) -> Tensor:
    """RLHF per-token rewards: r_t = −β log π_θ(y_t|x, y_<t)/π_ref(y_t|x, y_<t), plus r(x, y) at the last token.

    The lecture's KL-constrained loss −E[r(x, y) − β Σ_t log π_θ/π_ref] spread over tokens (Ziegler et al. 2019,
    arXiv:1909.08593; Ouyang et al. 2022 eq. 2): the reward model's `score` (B,) is sparse, only once y is complete.
    (B, T) out, 0 on padding; no gradient (these are GAE's inputs).
    """
    _check_shapes(logps=logps, ref_logps=ref_logps, mask=mask)
    rewards = _masked(-beta * (logps - ref_logps), mask)
    mask = mask.to(rewards.dtype)
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device, dtype=mask.dtype)
    last = (mask * positions).argmax(-1)  # index of each row's last masked token
    has_tokens = mask.sum(-1) > 0
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows[has_tokens], last[has_tokens]] += score.to(rewards.dtype)[has_tokens]
    return rewards


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref): π_ref/π_θ − log(π_ref/π_θ) − 1 = exp(ref − logp) − (ref − logp) − 1.

    DeepSeekMath (Shao et al. 2024, arXiv:2402.03300) eq. 4; Schulman, "Approximating KL divergence" (2020). With the
    tokens sampled from π_θ, E_{π_θ}[π_ref/π_θ] = Σ π_ref = 1, so E[k3] = E_{π_θ}[log π_θ/π_ref] = KL(π_θ ‖ π_ref):
    unbiased, and every term is ≥ 0 (x − log x − 1 ≥ 0), which the plain log-ratio is not. The lecture's slide writes
    the ratio the other way, ρ − log ρ − 1 with ρ = π_θ/π_ref: under samples from π_θ its mean is
    χ²(π_θ ‖ π_ref) − KL(π_θ ‖ π_ref), not the KL (that form is unbiased for KL(π_ref ‖ π_θ) under samples from π_ref).
    This is TRL's GRPOTrainer `per_token_kl`. At ratio 1 it is 0.
    """
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1


def _clipped_surrogate(
    ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) per token, and where the low / high clip is the active branch."""
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    low = (ratio < 1 - eps_low) & (advantages < 0)
    high = (ratio > 1 + eps_high) & (advantages > 0)
    return torch.minimum(unclipped, clipped), low, high


def _policy_metrics(
    loss: Tensor,
    logps: Tensor,
    old_logps: Tensor,
    low: Tensor,
    high: Tensor,
    mask: Tensor,
) -> Metrics:
    return {
        "loss": loss.item(),
        "clip_low": _token_mean(low.float(), mask).item(),
        "clip_high": _token_mean(high.float(), mask).item(),
        "clip_fraction": _token_mean((low | high).float(), mask).item(),
        # KL(π_old ‖ π_θ) under samples from π_old: k3 with the two policies' roles swapped, r − log r − 1.
        "approx_kl": _token_mean(kl_k3(old_logps.detach(), logps.detach()), mask).item(),
    }


def ppo_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float = 0.2,
) -> tuple[Tensor, Metrics]:
    """The lecture's PPO loss for LLMs (Schulman et al. 2017, arXiv:1707.06347, eq. 7), per-token advantages (B, T):

        L(θ) = −E [ (1/|y|) Σ_t min( r_t · A_t, g(ε, A_t) ) ],   r_t = π_θ(y_t|x, y_<t) / π_old(y_t|x, y_<t),
        g(ε, A) = (1 + ε) A if A ≥ 0 else (1 − ε) A.

    Computed as min(r·A, clip(r, 1−ε, 1+ε)·A), which equals the lecture's form for both signs of A. The π_ref of
    the slide is the rollout policy π_old here (the frozen reference of RLHF enters through the per-token KL reward,
    `kl_penalized_rewards`). Sequence mean (the 1/|y|), then the batch mean. Metrics: clip fractions (low: r < 1−ε
    with A < 0, high: r > 1+ε with A > 0), and approx KL(π_old ‖ π_θ) (k3).
    TRL's PPOTrainer takes one token mean instead of the sequence mean.
    """
    _check_shapes(logps=logps, old_logps=old_logps, advantages=advantages, mask=mask)
    ratio = torch.exp(_masked(logps - old_logps.detach(), mask))  # padding: r = 1, whatever it holds
    objective, low, high = _clipped_surrogate(ratio, advantages.detach(), epsilon, epsilon)
    loss = _sequence_mean(-objective, mask)
    return loss, _policy_metrics(loss, logps, old_logps, low, high, mask)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2
) -> tuple[Tensor, Metrics]:
    """The critic's loss, L_V = ½ · (1/|y|) Σ_t max( (V_t − R_t)², (clip(V_t, V_old,t − c, V_old,t + c) − R_t)² ).

    Regression of V(s_t) on the GAE returns R_t with PPO's value clipping (as OpenAI baselines' PPO2 and TRL's
    PPOTrainer, which take a token mean where we take the sequence mean); `clip=None` is the plain ½ (V − R)².
    """
    _check_shapes(values=values, old_values=old_values, returns=returns, mask=mask)
    returns, old_values = returns.detach(), old_values.detach()
    unclipped = (values - returns) ** 2
    if clip is None:
        per_token, clipped_share = unclipped, torch.zeros_like(unclipped)
    else:
        clipped = (old_values + torch.clamp(values - old_values, -clip, clip) - returns) ** 2
        per_token, clipped_share = torch.maximum(unclipped, clipped), (clipped > unclipped).float()
    loss = 0.5 * _sequence_mean(per_token, mask)
    return loss, {
        "value_loss": loss.item(),
        "value_clip_fraction": _token_mean(clipped_share, mask).item(),
        "value_mean": _token_mean(values.detach(), mask).item(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Post-training II: GRPO


def _group_std(grouped: Tensor) -> Tensor:
    return grouped.std(dim=1, keepdim=True).expand_as(grouped)  # sample std (n − 1), as TRL's nanstd


def _batch_std(grouped: Tensor) -> Tensor:
    return grouped.std().expand_as(grouped)


def _no_std(grouped: Tensor) -> Tensor:
    return torch.zeros_like(grouped)


ADVANTAGE_STD: dict[AdvantageScale, Callable[[Tensor], Tensor]] = {
    "group": _group_std,  # DeepSeekMath / the lecture
    "batch": _batch_std,  # TRL's scale_rewards="batch": the group mean, the whole batch's std
    "none": _no_std,  # Dr. GRPO (Liu et al. 2025, arXiv:2503.20783): no division by the std
}


@torch.no_grad()
def grpo_advantages(
    rewards: Tensor, group_size: int, scale: AdvantageScale = "group", eps: float = 1e-4
) -> Tensor:
    """The lecture's group-relative advantage, A_i = (r_i − mean(r)) / (std(r) + ε), over the G responses of a prompt.

    `rewards` is flat (B·G,), each prompt's G completions consecutive; one advantage per completion (B·G,), which
    `grpo_loss` broadcasts over its tokens (DeepSeekMath §4.1.2, outcome supervision). As TRL's GRPOTrainer
    (`scale_rewards`, trl/trainer/grpo_trainer.py): the std is the sample std (Bessel's n − 1, TRL's `nanstd`) and
    ε = 1e-4 is added to it; "batch" keeps the group mean and divides by the std of all B·G rewards; "none" only
    subtracts the group mean. Differs from TRL: group_size 1 is an error here (TRL sets its std to 0 in evaluation),
    since every advantage would be 0.
    """
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: group advantages need at least 2 completions per prompt")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)}: expected a flat (B·G,) tensor with G={group_size} "
            "consecutive completions per prompt"
        )
    grouped = _upcast(rewards).view(-1, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale != "none":
        centred = centred / (ADVANTAGE_STD[scale](grouped) + eps)
    return centred.reshape(-1)


def _grpo_mean(x: Tensor, mask: Tensor, max_completion_length: int) -> Tensor:
    """DeepSeekMath eq. 3, the lecture's (1/G) Σ_i (1/|y_i|) Σ_t: a sequence mean."""
    return _sequence_mean(x, mask)


def _dapo_mean(x: Tensor, mask: Tensor, max_completion_length: int) -> Tensor:
    """DAPO (Yu et al. 2025, arXiv:2503.14476): Σ_i Σ_t / Σ_i |y_i|, every token weighs the same."""
    return _token_mean(x, mask)


def _dr_grpo_mean(x: Tensor, mask: Tensor, max_completion_length: int) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, arXiv:2503.20783): Σ_i Σ_t / (B · L_max), a constant, so no length bias."""
    return _masked(x, mask).sum() / (x.shape[0] * max_completion_length)


GRPO_AGGREGATION: dict[GRPOLossType, Callable[[Tensor, Tensor, int], Tensor]] = {
    "grpo": _grpo_mean,
    "dapo": _dapo_mean,
    "dr_grpo": _dr_grpo_mean,
}


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    loss_type: GRPOLossType = "grpo",
    max_completion_length: int | None = None,
) -> tuple[Tensor, Metrics]:
    """The lecture's GRPO loss, L = −E_x [ (1/G) Σ_i F(x, y_i) ], with per token

        ℓ_t = min( r_t · A_i, clip(r_t, 1 − ε, 1 + ε_high) · A_i ) − β · k3_t,   r_t = π_θ(y_t|…) / π_old(y_t|…)

    and F(x, y) = (1/|y|) Σ_t ℓ_t (DeepSeekMath eq. 3, KL term in the loss, not the reward). One advantage per
    sequence, `advantages` (B,). `loss_type` picks the normaliser: "grpo" the sequence mean above, "dapo" one token
    mean over every masked token of the batch, "dr_grpo" the token sum / (B · max_completion_length) (default: the
    mask's T). `epsilon_high=None` clips symmetrically (DAPO's clip-higher sets it above ε). `beta=0` skips the
    reference entirely (`ref_logps` may be None); `old_logps=None` means one update on fresh samples: r = 1 with the
    gradient of log π_θ, the lecture's "vanilla policy gradient" form.

    Same per-token loss and normalisers as TRL's GRPOTrainer `_compute_loss` (loss_type grpo / dapo / dr_grpo,
    token-level importance sampling); differences: TRL's "grpo" counts a row without tokens as 0 in the batch mean
    (here it is left out), and TRL's "dapo" divides by the tokens of the whole generation batch across gradient
    accumulation (here: of this call). Metrics: clip fractions, KL(π_θ ‖ π_ref) (k3 token mean, when β > 0),
    and approx KL(π_old ‖ π_θ).
    """
    _check_shapes(logps=logps, old_logps=old_logps, ref_logps=ref_logps, mask=mask)
    if beta != 0 and ref_logps is None:
        raise ValueError(
            f"beta={beta} needs ref_logps (the frozen reference's per-token logps); pass beta=0 to skip"
        )
    if advantages.shape != logps.shape[:1]:
        raise ValueError(
            f"advantages {tuple(advantages.shape)}: expected one per sequence, ({logps.shape[0]},)"
        )
    old_logps = logps.detach() if old_logps is None else old_logps.detach()
    ratio = torch.exp(_masked(logps - old_logps, mask))  # padding: r = 1, whatever it holds
    eps_high = epsilon if epsilon_high is None else epsilon_high
    objective, low, high = _clipped_surrogate(ratio, advantages.detach()[:, None], epsilon, eps_high)
    kl = kl_k3(_masked(logps, mask), _masked(ref_logps.detach(), mask)) if beta != 0 else None
    per_token = -objective if kl is None else -objective + beta * kl
    loss = GRPO_AGGREGATION[loss_type](per_token, mask, max_completion_length or mask.shape[-1])
    metrics = _policy_metrics(loss, logps, old_logps, low, high, mask)
    if kl is not None:
        metrics["kl"] = _token_mean(kl.detach(), mask).item()
    return loss, metrics
