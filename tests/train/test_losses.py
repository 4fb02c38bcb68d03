"""Every loss of ragseek.train.losses against numbers worked independently: small cases worked by hand (the arithmetic
is in the comments, the expected values use only `math`), and larger random cases against a second, deliberately
plain loop implementation written here. Tolerance 1e-6 throughout (fp64 inputs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ragseek.train.losses import (
    bradley_terry_loss,
    chunked_token_logps,
    distill_loss,
    dpo_loss,
    gae,
    grpo_advantages,
    grpo_loss,
    kl_k3,
    kl_penalized_rewards,
    ppo_policy_loss,
    sft_loss,
    token_logps,
    value_loss,
)

ATOL = 1e-6
LN = math.log


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), t(expected), atol=ATOL, rtol=0)


def log_softmax_row(logits: list[float]) -> list[float]:
    """The reference log-softmax: log(e^z_i / Σ_j e^z_j), with math only."""
    total = sum(math.exp(z) for z in logits)
    return [z - math.log(total) for z in logits]


def random_batch(b=3, t_=6, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t_, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (b, t_), generator=g)
    mask = (torch.rand(b, t_, generator=g) < 0.7).double()
    mask[0] = 0.0
    mask[0, -2:] = 1.0  # every row has a counted token
    return logits, labels, mask, g


# ----------------------------------------------------------------------------------------------------------------------
# token_logps


def test_token_logps_hand_worked_and_ignore_index():
    # V = 3, logits [1, 2, 3]: log p(label 2) = 3 − log(e¹ + e² + e³); logits [0, ln 3, 0] : p = [1/5, 3/5, 1/5]
    logits = t([[[1.0, 2.0, 3.0], [0.0, LN(3), 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[2, 1, -100]])
    expected = [[3 - LN(math.e + math.e**2 + math.e**3), LN(3 / 5), 0.0]]
    close(token_logps(logits, labels), expected)
    # temperature 2: logits / 2 = [0.5, 1, 1.5] -> 1.5 − log(e^.5 + e + e^1.5)
    close(
        token_logps(logits[:, :1], labels[:, :1], temperature=2.0),
        [[1.5 - LN(math.exp(0.5) + math.e + math.exp(1.5))]],
    )


def test_token_logps_matches_log_softmax_loop_and_its_gradient():
    logits, labels, _, g = random_batch()
    ours = token_logps(logits, labels)
    for b in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            assert abs(ours[b, i].item() - log_softmax_row(logits[b, i].tolist())[labels[b, i]]) < ATOL
    weights = torch.randn(labels.shape, generator=g, dtype=torch.float64)  # any upstream gradient
    for temperature in (1.0, 0.7):
        a, c = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        (token_logps(a, labels, temperature) * weights).sum().backward()
        reference = F.log_softmax(c / temperature, -1).gather(-1, labels[..., None]).squeeze(-1)
        (reference * weights).sum().backward()
        torch.testing.assert_close(a.grad, c.grad, atol=ATOL, rtol=0)


@pytest.mark.parametrize("chunk", [1, 4, 7, 18, 100])
def test_chunked_token_logps_is_the_head_then_token_logps(chunk):
    """Values and gradients (hidden states and head weight) of the chunked head + log-softmax are those of the
    whole logits, fp32 to 1e-5, for chunks that divide the 3 x 6 = 18 positions, do not, or exceed them."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 6, 8, generator=g)
    weight = torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    upstream = torch.randn(3, 6, generator=g)
    for temperature in (1.0, 0.7):
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ours = chunked_token_logps(h1, w1, labels, chunk, temperature)
        whole = token_logps(F.linear(h2, w2), labels, temperature)
        torch.testing.assert_close(ours, whole, atol=1e-5, rtol=0)
        (ours * upstream).sum().backward()
        (whole * upstream).sum().backward()
        torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=0)
    empty = chunked_token_logps(hidden[:0].requires_grad_(), weight, labels[:0], chunk)
    assert empty.shape == (0, 6) and empty.requires_grad


def test_token_logps_bf16_rows_are_upcast():
    logits, labels, _, _ = random_batch()
    low = logits.to(torch.bfloat16).requires_grad_()
    ours = token_logps(low, labels)
    assert ours.dtype == torch.float32
    reference = F.log_softmax(low.detach().double(), -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(ours.double(), reference, atol=1e-5, rtol=0)
    ours.sum().backward()
    exact = (
        torch.softmax(low.detach().double(), -1)
        .neg()
        .scatter_add(-1, labels[..., None], torch.ones(labels.shape + (1,), dtype=torch.float64))
    )
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.double(), exact, atol=1e-2, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# SFT


def test_sft_loss_hand_worked_sequence_and_token_means():
    # V = 2. logits [ln 3, 0] -> p = [3/4, 1/4];  [0, 0] -> p = [1/2, 1/2]
    a, h = [LN(3), 0.0], [0.0, 0.0]
    logits = t([[h, a, h], [a, h, a]])
    labels = torch.tensor([[1, 0, 1], [0, 1, 1]])
    mask = t([[0, 1, 1], [0, 0, 1]])  # first tokens are the prompt
    # row 0 counts p(0 | a) = 3/4 and p(1 | h) = 1/2;  row 1 counts p(1 | a) = 1/4
    row0 = -(LN(3 / 4) + LN(1 / 2)) / 2
    row1 = -LN(1 / 4)
    loss, metrics = sft_loss(logits, labels, mask)
    close(loss, (row0 + row1) / 2)  # the lecture's 1/|y| per sequence, then the batch mean
    close(sft_loss(logits, labels, mask, reduction="token")[0], -(LN(3 / 4) + LN(1 / 2) + LN(1 / 4)) / 3)
    assert metrics["tokens"] == 3


def test_sft_loss_packed_segments_are_sequences():
    # the two rows above packed into one, then a padded position (segment -1)
    a, h = [LN(3), 0.0], [0.0, 0.0]
    logits = t([[h, a, h, a, h, a, h]])
    labels = torch.tensor([[1, 0, 1, 0, 1, 1, 0]])
    mask = t([[0, 1, 1, 0, 0, 1, 0]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, -1]])
    row0, row1 = -(LN(3 / 4) + LN(1 / 2)) / 2, -LN(1 / 4)
    token_mean = -(LN(3 / 4) + LN(1 / 2) + LN(1 / 4)) / 3
    # each packed example is one sequence, as unpacked
    close(sft_loss(logits, labels, mask, segments=segments)[0], (row0 + row1) / 2)
    close(sft_loss(logits, labels, mask, "token", segments)[0], token_mean)
    # without segments the row is one sequence: its mean is the token mean
    close(sft_loss(logits, labels, mask)[0], token_mean)


def test_sft_prompt_tokens_get_no_gradient():
    logits, labels, mask, _ = random_batch()
    logits.requires_grad_()
    sft_loss(logits, labels, mask)[0].backward()
    assert torch.all(logits.grad[mask == 0] == 0)
    assert torch.all(logits.grad[mask == 1].abs().sum(-1) > 0)
    # changing what the model predicts on prompt tokens leaves the loss unchanged
    moved = logits.detach() + 5 * (1 - mask)[..., None] * torch.randn_like(logits)
    close(sft_loss(moved, labels, mask)[0], sft_loss(logits.detach(), labels, mask)[0].item())


def test_sft_loss_matches_loop():
    logits, labels, mask, _ = random_batch(seed=1)
    per_sequence, tokens = [], []
    for b in range(logits.shape[0]):
        nll = [
            -log_softmax_row(logits[b, i].tolist())[labels[b, i]]
            for i in range(logits.shape[1])
            if mask[b, i]
        ]
        per_sequence.append(sum(nll) / len(nll))
        tokens += nll
    close(sft_loss(logits, labels, mask)[0], sum(per_sequence) / len(per_sequence))
    close(sft_loss(logits, labels, mask, reduction="token")[0], sum(tokens) / len(tokens))


# ----------------------------------------------------------------------------------------------------------------------
# Distillation


def test_distill_loss_hand_worked():
    # one sequence, position 0 is the prompt, position 1 counts; T = 2, α = 0.3
    # teacher logits [2 ln 3, 0] / T = [ln 3, 0] -> p_T = [3/4, 1/4];  student [0, 0] -> p_S = [1/2, 1/2] at any T
    # KL(p_T ‖ p_S) = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2);  CE(label 0) = −ln 1/2 = ln 2
    student = t([[[9.0, -9.0], [0.0, 0.0]]])
    teacher = t([[[-9.0, 9.0], [2 * LN(3), 0.0]]])
    labels, mask = torch.tensor([[1, 0]]), t([[0, 1]])
    kl = 0.75 * LN(1.5) + 0.25 * LN(0.5)
    loss, metrics = distill_loss(student, teacher, labels, mask, alpha=0.3, temperature=2.0)
    close(loss, 0.3 * LN(2) + 0.7 * 2.0**2 * kl)
    close(metrics["kl"], kl)
    close(metrics["ce"], LN(2))


def test_distill_loss_matches_loop_teacher_frozen_and_alpha_one_is_sft():
    student, labels, mask, g = random_batch(seed=2)
    teacher = torch.randn(student.shape, generator=g, dtype=torch.float64)
    alpha, temp = 0.25, 3.0
    per_sequence = []
    for b in range(student.shape[0]):
        terms = []
        for i in range(student.shape[1]):
            if not mask[b, i]:
                continue
            ce = -log_softmax_row(student[b, i].tolist())[labels[b, i]]
            ls = log_softmax_row((student[b, i] / temp).tolist())
            lt = log_softmax_row((teacher[b, i] / temp).tolist())
            kl = sum(math.exp(q) * (q - p) for p, q in zip(ls, lt, strict=True))
            terms.append(alpha * ce + (1 - alpha) * temp**2 * kl)
        per_sequence.append(sum(terms) / len(terms))
    s, te = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    loss, _ = distill_loss(s, te, labels, mask, alpha=alpha, temperature=temp)
    close(loss, sum(per_sequence) / len(per_sequence))
    loss.backward()
    assert te.grad is None and s.grad is not None
    close(
        distill_loss(student, teacher, labels, mask, alpha=1.0)[0], sft_loss(student, labels, mask)[0].item()
    )


# ----------------------------------------------------------------------------------------------------------------------
# Bradley-Terry, DPO


def test_bradley_terry_hand_worked():
    # margins [2 − 1, 0 − 1] = [1, −1]: −log σ(1) = ln(1 + e⁻¹), −log σ(−1) = ln(1 + e)
    loss, metrics = bradley_terry_loss(t([2.0, 0.0]), t([1.0, 1.0]))
    close(loss, (LN(1 + math.exp(-1)) + LN(1 + math.e)) / 2)
    assert metrics["accuracy"] == 0.5 and metrics["margin"] == 0.0


def dpo_hand_inputs():
    policy_chosen = t([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref_chosen = t([[-1.5, -2.0, -2.0], [-2.0, -1.0, 7.0]])
    chosen_mask = t([[1, 1, 1], [1, 1, 0]])
    policy_rejected = t([[-2.0, -2.0, -2.0], [-1.0, -3.0, -1.0]])
    ref_rejected = t([[-1.0, 5.0, 5.0], [-1.0, -2.0, 0.0]])
    rejected_mask = t([[1, 0, 0], [1, 1, 1]])
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_mask, rejected_mask


def test_dpo_hand_worked_length_normalised_and_original():
    # log π/π_ref per counted token: chosen row 0 [0.5, 0, −1] (sum −0.5, mean −1/6), row 1 [1, 0] (sum 1, mean 1/2)
    #                                rejected row 0 [−1] (sum −1, mean −1), row 1 [0, −1, −1] (sum −2, mean −2/3)
    # β = 0.5. length-normalised margins: 0.5(−1/6 + 1) = 5/12, 0.5(1/2 + 2/3) = 7/12
    # original DPO (sums):              0.5(−0.5 + 1) = 1/4,  0.5(1 + 2) = 3/2;   loss = mean ln(1 + e^−m)
    inputs = dpo_hand_inputs()
    loss, metrics = dpo_loss(*inputs, beta=0.5, length_normalize=True)
    close(loss, (LN(1 + math.exp(-5 / 12)) + LN(1 + math.exp(-7 / 12))) / 2)
    close(metrics["chosen_reward"], 0.5 * (-1 / 6 + 1 / 2) / 2)
    close(metrics["rejected_reward"], 0.5 * (-1 - 2 / 3) / 2)
    close(metrics["reward_margin"], (5 / 12 + 7 / 12) / 2)
    assert metrics["reward_accuracy"] == 1.0
    loss, metrics = dpo_loss(*inputs, beta=0.5, length_normalize=False)
    close(loss, (LN(1 + math.exp(-1 / 4)) + LN(1 + math.exp(-3 / 2))) / 2)
    close(metrics["reward_margin"], (1 / 4 + 3 / 2) / 2)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("length_normalize", [True, False])
def test_dpo_identical_policy_and_reference_is_log_2(beta, length_normalize):
    g = torch.Generator().manual_seed(3)
    chosen, rejected = (
        -torch.rand(4, 7, generator=g, dtype=torch.float64),
        -torch.rand(4, 5, generator=g, dtype=torch.float64),
    )
    mask_c, mask_r = torch.ones(4, 7, dtype=torch.float64), torch.ones(4, 5, dtype=torch.float64)
    loss, metrics = dpo_loss(chosen, rejected, chosen, rejected, mask_c, mask_r, beta, length_normalize)
    close(loss, LN(2))
    assert metrics["reward_margin"] == 0.0


def test_dpo_reference_gets_no_gradient_and_padding_does_not_count():
    inputs = [x.clone().requires_grad_() for x in dpo_hand_inputs()[:4]]
    loss, _ = dpo_loss(*inputs, *dpo_hand_inputs()[4:], beta=0.5)
    loss.backward()
    assert inputs[2].grad is None and inputs[3].grad is None
    assert inputs[0].grad[1, 2] == 0 and torch.all(inputs[1].grad[0, 1:] == 0)


# ----------------------------------------------------------------------------------------------------------------------
# GAE, KL-penalised rewards


def test_gae_hand_worked_with_padding():
    # γ = 0.9, λ = 0.8, γλ = 0.72
    # row 0: r = [0, 0, 1], V = [0.5, 0.6, 0.7];  V after the last token = 0
    #   δ2 = 1 − 0.7 = 0.3;  δ1 = 0.9·0.7 − 0.6 = 0.03;  δ0 = 0.9·0.6 − 0.5 = 0.04
    #   A2 = 0.3;  A1 = 0.03 + 0.72·0.3 = 0.246;  A0 = 0.04 + 0.72·0.246 = 0.21712;  R = A + V
    # row 1: mask [1, 1, 0], r = [0, 2, (5)], V = [1, 1, (9)]
    #   δ1 = 2 + 0 − 1 = 1;  δ0 = 0.9·1 − 1 = −0.1;  A1 = 1;  A0 = −0.1 + 0.72 = 0.62;  padding: 0
    rewards, values = t([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]]), t([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(advantages, [[0.21712, 0.246, 0.3], [0.62, 1.0, 0.0]])
    close(returns, [[0.71712, 0.846, 1.0], [1.62, 2.0, 0.0]])


def random_episode(seed):
    g = torch.Generator().manual_seed(seed)
    rewards, values = (
        torch.randn(4, 9, generator=g, dtype=torch.float64),
        torch.randn(4, 9, generator=g, dtype=torch.float64),
    )
    lengths = [9, 5, 1, 7]
    mask = t([[1] * n + [0] * (9 - n) for n in lengths])
    return rewards, values, mask, lengths


def test_gae_lambda_zero_is_td_residual_and_lambda_one_is_monte_carlo():
    rewards, values, mask, lengths = random_episode(4)
    gamma = 0.95
    td, mc = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        for i in range(n):
            next_value = values[b, i + 1].item() if i + 1 < n else 0.0
            td[b, i] = rewards[b, i] + gamma * next_value - values[b, i]  # δ_t
            mc[b, i] = sum(gamma**k * rewards[b, i + k].item() for k in range(n - i)) - values[b, i]
    close(gae(rewards, values, mask, gamma=gamma, lam=0.0)[0], td.tolist())
    close(gae(rewards, values, mask, gamma=gamma, lam=1.0)[0], mc.tolist())


def test_gae_matches_the_sum_over_future_residuals():
    rewards, values, mask, lengths = random_episode(5)
    gamma, lam = 0.99, 0.9
    expected = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        delta = [
            rewards[b, i].item()
            + gamma * (values[b, i + 1].item() if i + 1 < n else 0.0)
            - values[b, i].item()
            for i in range(n)
        ]
        for i in range(n):
            # Σ_ℓ (γλ)^ℓ δ_{t+ℓ}
            expected[b, i] = sum((gamma * lam) ** k * delta[i + k] for k in range(n - i))
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    close(advantages, expected.tolist())
    close(returns, ((expected + values) * mask).tolist())


def test_kl_penalized_rewards_hand_worked():
    # β = 0.1. row 0: log π/π_ref = [0.5, 0, (−1)], mask [1, 1, 0] -> [−0.05, 0 + score 2, 0]
    #          row 1: log π/π_ref = [−1, 0, 2], mask all -> [0.1, 0, −0.2 + score −1]
    logps, ref = t([[-1.0, -2.0, -3.0], [-2.0, -1.0, 0.0]]), t([[-1.5, -2.0, -2.0], [-1.0, -1.0, -2.0]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    rewards = kl_penalized_rewards(t([2.0, -1.0]), logps, ref, mask, beta=0.1)
    close(rewards, [[-0.05, 2.0, 0.0], [0.1, 0.0, -1.2]])


# ----------------------------------------------------------------------------------------------------------------------
# PPO


def test_ppo_policy_loss_hand_worked_clipping_on_both_sides():
    # ε = 0.2, g(ε, A) = 1.2 A if A ≥ 0 else 0.8 A; per token min(r A, g(ε, A))
    # row 0: r = [1.5, 0.5, 1.1], A = [1, −1, 2]
    #   min(1.5, 1.2) = 1.2 (high clip);  min(−0.5, −0.8) = −0.8 (low clip);  min(2.2, 2.4) = 2.2   mean 2.6/3
    # row 1: r = [0.5, 1.5, (·)], A = [1, −1, (5)], mask [1, 1, 0]
    #   min(0.5, 1.2) = 0.5;  min(−1.5, −0.8) = −1.5 (outside the range, but the unclipped term is smaller)  mean −0.5
    old = t([[-1.0, -2.0, -0.5], [-0.3, -1.0, -2.0]])
    ratio = t([[1.5, 0.5, 1.1], [0.5, 1.5, 3.0]])
    logps = (old + ratio.log()).requires_grad_()
    advantages, mask = t([[1.0, -1.0, 2.0], [1.0, -1.0, 5.0]]), t([[1, 1, 1], [1, 1, 0]])
    loss, metrics = ppo_policy_loss(logps, old, advantages, mask, epsilon=0.2)
    close(loss, -(2.6 / 3 - 0.5) / 2)
    assert metrics["clip_low"] == pytest.approx(1 / 5) and metrics["clip_high"] == pytest.approx(1 / 5)
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)
    # approx KL(π_old ‖ π_θ) = token mean of r − 1 − ln r
    k = [r - 1 - LN(r) for r in (1.5, 0.5, 1.1, 0.5, 1.5)]
    assert metrics["approx_kl"] == pytest.approx(sum(k) / 5, abs=ATOL)
    loss.backward()
    # clipped tokens carry no gradient; the others −A r / (|y| B)
    close(logps.grad, [[0.0, 0.0, -2 * 1.1 / 6], [-0.5 / 4, 1.5 / 4, 0.0]])


def policy_case(seed, b=4, t_=6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t_, generator=g, dtype=torch.float64) * 3
    logps = old + torch.randn(b, t_, generator=g, dtype=torch.float64) * 0.4
    ref = old + torch.randn(b, t_, generator=g, dtype=torch.float64) * 0.4
    mask = t([[1] * n + [0] * (t_ - n) for n in (t_, 2, 5, 1)][:b])
    return logps, old, ref, mask, g


def clipped(r: float, a: float, lo: float, hi: float) -> float:
    """The lecture's min(r·A, g(ε, A)), with g(ε, A) = (1 + ε_high) A if A ≥ 0 else (1 − ε) A."""
    return min(r * a, (1 + hi) * a if a >= 0 else (1 - lo) * a)


def test_ppo_policy_loss_matches_loop():
    logps, old, _, mask, g = policy_case(6)
    advantages = torch.randn(logps.shape, generator=g, dtype=torch.float64)
    per_sequence = []
    for b in range(logps.shape[0]):
        terms = [
            clipped(math.exp(logps[b, i] - old[b, i]), advantages[b, i].item(), 0.1, 0.1)
            for i in range(logps.shape[1])
            if mask[b, i]
        ]
        per_sequence.append(sum(terms) / len(terms))
    close(
        ppo_policy_loss(logps, old, advantages, mask, epsilon=0.1)[0], -sum(per_sequence) / len(per_sequence)
    )


def test_value_loss_hand_worked():
    # c = 0.1; V = [1, 2, 0.5], V_old = [0.8, 2.5, 0.5], R = [1.5, 1, 0]
    # t0: (1 − 1.5)² = 0.25, clipped V = 0.8 + 0.1 = 0.9 -> (0.9 − 1.5)² = 0.36 -> 0.36
    # t1: (2 − 1)² = 1,      clipped V = 2.5 − 0.1 = 2.4 -> (2.4 − 1)² = 1.96 -> 1.96
    # t2: 0.25 both;   loss = ½ (0.36 + 1.96 + 0.25) / 3;   unclipped: ½ (0.25 + 1 + 0.25) / 3
    values, old, returns, mask = (
        t([[1.0, 2.0, 0.5]]),
        t([[0.8, 2.5, 0.5]]),
        t([[1.5, 1.0, 0.0]]),
        t([[1, 1, 1]]),
    )
    loss, metrics = value_loss(values, old, returns, mask, clip=0.1)
    close(loss, 0.5 * (0.36 + 1.96 + 0.25) / 3)
    assert metrics["value_clip_fraction"] == pytest.approx(2 / 3)
    close(value_loss(values, old, returns, mask, clip=None)[0], 0.5 * (0.25 + 1 + 0.25) / 3)


# ----------------------------------------------------------------------------------------------------------------------
# GRPO


def test_grpo_advantages_hand_worked_sample_std():
    # G = 4. group 1: r = [1, 0, 0, 1], mean 1/2, sample std √(4 · 1/4 / 3) = √(1/3)
    #        group 2: r = [1, 1, 1, 0], mean 3/4, sample std √((3 · 1/16 + 9/16) / 3) = 1/2
    rewards = t([1, 0, 0, 1, 1, 1, 1, 0])
    s1, s2, eps = math.sqrt(1 / 3), 0.5, 1e-4
    up, down = 0.5 / (s1 + eps), -0.5 / (s1 + eps)
    close(grpo_advantages(rewards, 4), [up, down, down, up] + [0.25 / (s2 + eps)] * 3 + [-0.75 / (s2 + eps)])
    # batch: group means, std of all 8: mean 5/8, Σ(r − 5/8)² = 5 · (3/8)² + 3 · (5/8)² = 1.875, std √(1.875 / 7)
    sb = math.sqrt(1.875 / 7)
    centred = [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]
    close(grpo_advantages(rewards, 4, scale="batch"), [c / (sb + eps) for c in centred])
    close(grpo_advantages(rewards, 4, scale="none"), centred)
    # a group whose completions all score the same teaches nothing
    close(grpo_advantages(t([1, 1, 0.3, 0.3]), 2), [0, 0, 0, 0])


def test_grpo_advantages_rejects_bad_groups():
    with pytest.raises(ValueError, match="consecutive completions"):
        grpo_advantages(t([1, 0, 1]), 2)
    with pytest.raises(ValueError, match="at least 2"):
        grpo_advantages(t([1, 0]), 1)


def test_kl_k3_hand_worked_zero_at_ratio_one_and_unbiased():
    # π_θ = 1/2, π_ref = 1/4: x = π_ref/π_θ = 1/2 -> x − ln x − 1 = −1/2 + ln 2
    close(kl_k3(t([LN(0.5)]), t([LN(0.25)])), [-0.5 + LN(2)])
    same = -torch.rand(3, 4, dtype=torch.float64)
    assert torch.equal(kl_k3(same, same), torch.zeros_like(same))
    # exact expectation under y ~ π_θ over a 5-token vocabulary: E[k3] = KL(π_θ ‖ π_ref)
    p, q = [0.1, 0.2, 0.3, 0.15, 0.25], [0.3, 0.1, 0.1, 0.25, 0.25]
    expected_k3 = sum(pi * kl_k3(t(LN(pi)), t(LN(qi))).item() for pi, qi in zip(p, q, strict=True))
    kl = sum(pi * LN(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert expected_k3 == pytest.approx(kl, abs=ATOL)
    # the slide's ratio ρ = π_θ/π_ref instead: E[ρ − ln ρ − 1] = χ²(π_θ ‖ π_ref) − KL, not the KL
    slide = sum(pi * (pi / qi - LN(pi / qi) - 1) for pi, qi in zip(p, q, strict=True))
    chi2 = sum(pi * pi / qi for pi, qi in zip(p, q, strict=True)) - 1
    assert slide == pytest.approx(chi2 - kl, abs=ATOL) and abs(slide - kl) > 0.1


def grpo_hand_inputs():
    # ratios row 0 [1.5, 0.7, 1.0] with A = 1;  row 1 [0.5, 1.3, (2)] with A = −2, mask [1, 1, 0];  π_old = 0
    ratio = t([[1.5, 0.7, 1.0], [0.5, 1.3, 2.0]])
    return ratio.log(), torch.zeros(2, 3, dtype=torch.float64), t([1.0, -2.0]), t([[1, 1, 1], [1, 1, 0]])


def test_grpo_loss_hand_worked_loss_types_and_clipping():
    # ε = 0.2. row 0 (A = 1):  min(1.5, 1.2) = 1.2 (high clip), min(0.7, 1.2) = 0.7, 1.0   -> sum 2.9
    #          row 1 (A = −2): min(−1.0, 0.8·−2 = −1.6) = −1.6 (low clip), min(−2.6, −2.4) = −2.6  -> sum −4.2
    logps, old, advantages, mask = grpo_hand_inputs()
    loss, metrics = grpo_loss(logps, old, None, advantages, mask, epsilon=0.2)
    close(loss, -(2.9 / 3 + -4.2 / 2) / 2)  # grpo: (1/G) Σ_i (1/|y_i|) Σ_t
    assert metrics["clip_low"] == pytest.approx(1 / 5) and metrics["clip_high"] == pytest.approx(1 / 5)
    assert "kl" not in metrics
    close(grpo_loss(logps, old, None, advantages, mask, loss_type="dapo")[0], -(2.9 - 4.2) / 5)  # Σ / Σ|y_i|
    # B · T
    close(grpo_loss(logps, old, None, advantages, mask, loss_type="dr_grpo")[0], -(2.9 - 4.2) / (2 * 3))
    dr = grpo_loss(logps, old, None, advantages, mask, loss_type="dr_grpo", max_completion_length=8)[0]
    close(dr, -(2.9 - 4.2) / (2 * 8))
    # padding may hold anything (here π_old = e^-10000, so r = inf): neither the loss nor the gradient sees it
    garbage = logps.clone().requires_grad_()
    old_garbage, ref_garbage = old.clone(), old.clone()
    old_garbage[1, 2], ref_garbage[1, 2] = -1e4, 1e4
    loss = grpo_loss(garbage, old_garbage, ref_garbage, advantages, mask, epsilon=0.2, beta=0.1)[0]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(garbage.grad).all() and garbage.grad[1, 2] == 0
    # clip-higher ε_high = 0.6: row 0 t0 min(1.5, 1.6) = 1.5 -> sum 3.2; row 1 t1 clip(1.3) = 1.3 stays -> −4.2
    close(grpo_loss(logps, old, None, advantages, mask, epsilon_high=0.6)[0], -(3.2 / 3 + -4.2 / 2) / 2)


def test_grpo_loss_hand_worked_with_k3():
    # β = 0.1, π_ref/π_θ = [1, 2, 0.5] on row 0 and 1 on row 1: k3 = [0, 1 − ln 2, −0.5 + ln 2], sum 0.5
    # per token ℓ = objective − β k3  ->  row 0: (2.9 − 0.1 · 0.5) / 3;  row 1 unchanged: −4.2 / 2
    logps, old, advantages, mask = grpo_hand_inputs()
    ref = logps + t([[0.0, LN(2), LN(0.5)], [0.0, 0.0, 0.0]])
    loss, metrics = grpo_loss(logps, old, ref, advantages, mask, epsilon=0.2, beta=0.1)
    close(loss, -((2.9 - 0.05) / 3 + -4.2 / 2) / 2)
    close(metrics["kl"], 0.5 / 5)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, None, advantages, mask, beta=0.1)


def test_grpo_single_update_is_vanilla_policy_gradient():
    # old_logps=None: r = 1, loss = −(1/B) Σ_i A_i, gradient on log π of token t of row i: −A_i / (|y_i| B)
    logps, _, advantages, mask = grpo_hand_inputs()
    logps.requires_grad_()
    loss, metrics = grpo_loss(logps, None, None, advantages, mask)
    close(loss, -(1.0 - 2.0) / 2)
    loss.backward()
    close(logps.grad, [[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.5, 0.0]])
    assert metrics["clip_fraction"] == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_loss_matches_loop(loss_type):
    logps, old, ref, mask, g = policy_case(7)
    advantages = torch.randn(logps.shape[0], generator=g, dtype=torch.float64)
    eps, eps_high, beta = 0.1, 0.3, 0.05
    rows, total, count = [], 0.0, 0
    for b in range(logps.shape[0]):
        terms = []
        for i in range(logps.shape[1]):
            if not mask[b, i]:
                continue
            r = math.exp(logps[b, i] - old[b, i])
            x = math.exp(ref[b, i] - logps[b, i])
            terms.append(clipped(r, advantages[b].item(), eps, eps_high) - beta * (x - LN(x) - 1))
        rows.append(sum(terms) / len(terms))
        total, count = total + sum(terms), count + len(terms)
    expected = {
        "grpo": -sum(rows) / len(rows),
        "dapo": -total / count,
        "dr_grpo": -total / (logps.shape[0] * logps.shape[1]),
    }[loss_type]
    loss, _ = grpo_loss(logps, old, ref, advantages, mask, eps, eps_high, beta, loss_type)
    close(loss, expected)


@pytest.mark.slow
def test_std_and_logps_match_trl():
    """TRL's own helpers (importing trl takes ~30 s here, hence slow): nanstd, selective_log_softmax, and the
    advantage formula of GRPOTrainer._generate_and_score_completions."""
    from trl.trainer.utils import nanstd, selective_log_softmax

    g = torch.Generator().manual_seed(8)
    rewards = torch.rand(6 * 4, generator=g)
    grouped = rewards.view(-1, 4)
    mean = grouped.mean(dim=1).repeat_interleave(4)
    trl_group = (rewards - mean) / (nanstd(grouped, dim=1).repeat_interleave(4) + 1e-4)
    trl_batch = (rewards - mean) / (nanstd(rewards).expand_as(rewards) + 1e-4)
    torch.testing.assert_close(grpo_advantages(rewards, 4), trl_group, atol=ATOL, rtol=0)
    torch.testing.assert_close(grpo_advantages(rewards, 4, scale="batch"), trl_batch, atol=ATOL, rtol=0)
    logits, labels, _, _ = random_batch(seed=9)
    logits = logits.float()
    torch.testing.assert_close(
        token_logps(logits, labels), selective_log_softmax(logits, labels), atol=ATOL, rtol=0
    )
