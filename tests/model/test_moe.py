"""DeepSeekMoE: parity with transformers' DeepseekV3MoE / DeepseekV2Moe, sorted vs naive dispatch, bias routing,
aux-loss-free balancing and the sequence-wise balance loss (hand-worked)."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

import ragseek.model.moe as moe_module
from ragseek.model.config import ModelConfig
from ragseek.model.moe import GROUP_SCORE, Experts, MoE, max_violation, sequence_balance_loss


def _cfg(**kw) -> ModelConfig:
    base = dict(
        dim=32,
        moe_inter_dim=16,
        n_routed_experts=8,
        n_activated_experts=2,
        n_expert_groups=4,
        n_limited_groups=2,
        n_shared_experts=1,
        route_scale=2.5,
        init_std=0.2,
    )
    return ModelConfig(**{**base, **kw})


def _copy_from_hf(moe: MoE, hf: torch.nn.Module, bias: torch.Tensor | None) -> None:
    """transformers 5 fuses the experts: gate_up_proj (E, 2I, H) = cat(gate, up), down_proj (E, H, I)."""
    with torch.no_grad():
        moe.gate.weight.copy_(hf.gate.weight)
        if bias is not None:
            moe.gate.bias.copy_(bias)
        gate, up = hf.experts.gate_up_proj.chunk(2, dim=1)
        moe.experts.gate_proj.copy_(gate)
        moe.experts.up_proj.copy_(up)
        moe.experts.down_proj.copy_(hf.experts.down_proj)
        moe.shared_experts.load_state_dict(hf.shared_experts.state_dict())


def _randomise(hf: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(std=0.3)  # the router weight starts at zero


def _sorted_routing(weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' top-k is unsorted: compare (expert id, weight) pairs in expert-id order."""
    indices, order = indices.sort(dim=-1)
    return weights.gather(1, order), indices


def test_matches_transformers_deepseek_v3_moe():
    torch.manual_seed(0)
    hf_cfg = DeepseekV3Config(
        hidden_size=32,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    hf_cfg._experts_implementation = "eager"
    hf = DeepseekV3MoE(hf_cfg).eval()
    _randomise(hf)
    bias = torch.randn(8) * 0.2
    hf.gate.e_score_correction_bias.copy_(bias)
    moe = MoE(_cfg()).eval()
    _copy_from_hf(moe, hf, bias)
    x = torch.randn(3, 7, 32)

    with torch.no_grad():
        _, hf_w, hf_i = hf.gate(x)
        w, i, scores = moe.gate(x.view(-1, 32))
        torch.testing.assert_close(_sorted_routing(w, i), _sorted_routing(hf_w, hf_i), atol=1e-6, rtol=0)
        # The case must exercise both the bias and the group limit: plain top-k would pick differently.
        chosen = i.sort(-1).values
        assert (chosen != scores.topk(2).indices.sort(-1).values).any()
        assert (chosen != (scores + bias).topk(2).indices.sort(-1).values).any()
        torch.testing.assert_close(moe(x), hf(x), atol=1e-5, rtol=0)


def test_softmax_routing_matches_transformers_deepseek_v2_moe(monkeypatch):
    """V2: softmax affinities, groups scored by their best expert, no renormalisation of the top-k."""
    torch.manual_seed(1)
    hf_cfg = DeepseekV2Config(
        hidden_size=32,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        topk_method="group_limited_greedy",
        n_shared_experts=1,
        routed_scaling_factor=1.5,
    )
    hf_cfg._experts_implementation = "eager"
    hf = DeepseekV2Moe(hf_cfg).eval()
    _randomise(hf)
    moe = MoE(_cfg(score_func="softmax", n_activated_experts=3, norm_topk_prob=False, route_scale=1.5)).eval()
    _copy_from_hf(moe, hf, None)
    x = torch.randn(4, 16, 32)
    with torch.no_grad():
        _, hf_w, hf_i = hf.gate(x)
        w, i, _ = moe.gate(x.view(-1, 32))
        torch.testing.assert_close(_sorted_routing(w, i), _sorted_routing(hf_w, hf_i), atol=1e-6, rtol=0)
        torch.testing.assert_close(moe(x), hf(x), atol=1e-5, rtol=0)
        # The case must tell the group scores apart: V3's top-2 sum would keep other groups for some tokens.
        monkeypatch.setitem(GROUP_SCORE, "softmax", GROUP_SCORE["sigmoid"])
        assert (moe.gate(x.view(-1, 32))[1].sort(-1).values != i.sort(-1).values).any()


def _naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    weights, indices, _ = moe.gate(x.view(-1, x.shape[-1]))
    y = moe.experts.forward_naive(x.view(-1, x.shape[-1]), indices, weights).view_as(x)
    return y if moe.shared_experts is None else y + moe.shared_experts(x)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n_shared", [0, 2])
def test_sorted_dispatch_matches_naive(monkeypatch, score_func, n_shared):
    monkeypatch.setattr(moe_module, "MAX_PADDING", float("inf"))  # always the padded batched path
    torch.manual_seed(2)
    cfg = _cfg(n_routed_experts=16, n_activated_experts=3, score_func=score_func, n_shared_experts=n_shared)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.bias.normal_(std=0.1)
    x = torch.randn(4, 16, 32)  # 192 pairs over 16 experts
    with torch.no_grad():
        torch.testing.assert_close(moe(x), _naive_moe(moe, x), atol=1e-6, rtol=1e-6)
    assert (moe.shared_experts is None) == (n_shared == 0)


def _skewed(moe: MoE) -> None:
    with torch.no_grad():
        moe.gate.bias[:2] = 5.0  # experts 0 and 1 take every token; most others get none


def test_skewed_routing_falls_back_to_the_per_expert_loop(monkeypatch):
    torch.manual_seed(8)
    moe = MoE(_cfg(n_routed_experts=16, n_activated_experts=3, n_expert_groups=1, n_limited_groups=1))
    _skewed(moe)
    x = torch.randn(20, 32)
    w, i, _ = moe.gate(x)
    with torch.no_grad():
        naive = moe.experts.forward_naive(x, i, w)
        monkeypatch.setattr(Experts, "forward_naive", lambda *args: "naive")
        assert moe.experts(x, i, w) == "naive"  # 16 experts * 20 rows > 3 * 60 pairs
        monkeypatch.setattr(moe_module, "MAX_PADDING", float("inf"))
        torch.testing.assert_close(moe.experts(x, i, w), naive, atol=1e-6, rtol=0)  # the padded path
    assert (torch.bincount(i.flatten(), minlength=16) == 0).sum() >= 3  # empty experts are padding only


@pytest.mark.parametrize("skewed", [False, True])
def test_sorted_dispatch_gradients_match_naive(monkeypatch, skewed):
    monkeypatch.setattr(moe_module, "MAX_PADDING", float("inf"))  # always the padded batched path
    torch.manual_seed(3)
    moe = MoE(_cfg(n_routed_experts=16, n_activated_experts=4))
    if skewed:
        _skewed(moe)
    x = torch.randn(3, 6, 32)
    probe = torch.randn(3, 6, 32)

    def grads(forward) -> dict[str, torch.Tensor]:
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        (forward(xi) * probe).sum().backward()
        return {"x": xi.grad, **{n: p.grad.clone() for n, p in moe.named_parameters()}}

    sorted_grads, naive_grads = grads(moe), grads(lambda xi: _naive_moe(moe, xi))
    assert sorted_grads.keys() == naive_grads.keys()
    for name in ("gate.weight", "experts.gate_proj", "experts.up_proj", "experts.down_proj", "x"):
        assert sorted_grads[name].abs().sum() > 0, name
    for name, g in sorted_grads.items():
        torch.testing.assert_close(g, naive_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bias_chooses_experts_but_does_not_weigh_them():
    torch.manual_seed(4)
    moe = MoE(_cfg(n_routed_experts=4, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1))
    gate = moe.gate
    x = torch.randn(6, 32)
    with torch.no_grad():
        s = torch.sigmoid(x @ gate.weight.T)  # (6, 4) unbiased affinities, computed by hand
        loser = int(s.sum(0).argmin())  # an expert that some tokens would not choose
        assert (s.topk(2).indices != loser).all(-1).any()
        gate.bias[loser] = 10.0
        w, i, scores = gate(x)
    torch.testing.assert_close(scores, s)
    assert (i == loser).any(-1).all()  # the bias makes every token choose it
    chosen = s.gather(1, i)
    torch.testing.assert_close(w, 2.5 * chosen / chosen.sum(-1, keepdim=True))  # weights from s, not s + b

    gate.norm_topk_prob = False
    w_raw, _, _ = gate(x)
    torch.testing.assert_close(w_raw, 2.5 * chosen)  # the chosen expert's own weight: 2.5 * s, no bias in it


def _route_and_update(moe: MoE, x: torch.Tensor, steps: int) -> list[float]:
    vio = []
    for _ in range(steps):
        with torch.no_grad():
            moe(x)
        vio.append(max_violation(moe.load))
        moe.update_bias()
    return vio


@pytest.mark.parametrize("speed", [0.0, 0.01])
def test_update_bias_balances_a_skewed_router(speed):
    torch.manual_seed(5)
    moe = MoE(_cfg(n_expert_groups=1, n_limited_groups=1, bias_update_speed=speed)).eval()
    x = torch.randn(4, 64, 32) + 1.0  # tokens share a direction ...
    with torch.no_grad():
        moe.gate.weight[0] = 0.2  # ... that experts 0 and 1 are aligned with: they take every token
        moe.gate.weight[1] = 0.1
    vio = _route_and_update(moe, x, steps=60)
    assert vio[0] == pytest.approx(3.0)  # 2 of 8 experts take all the load: max/mean - 1 = 4 - 1
    assert moe.load.sum() == 0  # update_bias resets the accumulated load
    if speed == 0:
        assert vio == [vio[0]] * len(vio) and (moe.gate.bias == 0).all()
    else:
        # A fixed-size sign step ends in a small oscillation around balance (0.22 <-> 0.36 here).
        assert max(vio[-10:]) < 0.5
        assert moe.gate.bias[0] < 0 and moe.gate.bias[1] < 0  # overloaded experts lost bias


def test_update_bias_step_and_counts():
    moe = MoE(
        _cfg(
            n_routed_experts=4,
            n_activated_experts=1,
            n_expert_groups=1,
            n_limited_groups=1,
            bias_update_speed=0.1,
        )
    )
    moe.update_bias(torch.tensor([5, 1, 3, 3]))  # mean 3: over, under, at, at
    torch.testing.assert_close(moe.gate.bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert max_violation(torch.tensor([5, 1, 3, 3])) == pytest.approx(5 / 3 - 1)
    with pytest.raises(ValueError, match="zero"):
        max_violation(torch.zeros(4))


def test_load_counts_accumulate_and_reset():
    torch.manual_seed(6)
    moe = MoE(_cfg())
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        moe(x)
        moe(x[:1])
        _, i, _ = moe.gate(x[:1].view(-1, 32))
    torch.testing.assert_close(moe.last_counts, torch.bincount(i.flatten(), minlength=8))
    assert moe.load.sum() == (10 + 5) * 2
    assert "load" not in moe.state_dict() and "gate.bias" in moe.state_dict()
    moe.reset_load()
    assert moe.load.sum() == 0


def test_balance_loss_hand_worked():
    """T=2, N_r=4, K_r=2, alpha=1. Token scores [.8,.6,.2,.4] -> top {0,1}; [.1,.9,.6,.4] -> top {1,2}.

    f = N_r/(K_r T) * counts = 1 * [1, 2, 1, 0]; s' rows sum to 2: [.4,.3,.1,.2], [.05,.45,.3,.2];
    P = [.225, .375, .2, .2]; L = .225 + 2 * .375 + .2 = 1.175.
    """
    s = torch.tensor([[[0.8, 0.6, 0.2, 0.4], [0.1, 0.9, 0.6, 0.4]]])
    idx = torch.tensor([[[0, 1], [1, 2]]])
    assert sequence_balance_loss(s, idx, alpha=1.0).item() == pytest.approx(1.175)
    assert sequence_balance_loss(s, idx, alpha=0.01).item() == pytest.approx(0.01175)
    # Per sequence, then the batch mean: a uniform sequence (f = P = 1/4 * ...) scores exactly alpha = 1.
    uniform = torch.full((1, 2, 4), 0.5)
    uniform_idx = torch.tensor([[[0, 1], [2, 3]]])
    batch = sequence_balance_loss(torch.cat([s, uniform]), torch.cat([idx, uniform_idx]), alpha=1.0)
    assert batch.item() == pytest.approx((1.175 + 1.0) / 2)


def test_balance_loss_of_a_training_forward_reaches_the_gate():
    torch.manual_seed(7)
    moe = MoE(_cfg(aux_loss_alpha=0.1)).train()
    x = torch.randn(2, 6, 32)
    moe(x)
    loss = moe.balance_loss()
    w, i, s = moe.gate(x.view(-1, 32))
    torch.testing.assert_close(loss, sequence_balance_loss(s.view(2, 6, 8), i.view(2, 6, 2), 0.1))
    loss.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert moe.experts.gate_proj.grad is None  # the loss depends on the router only

    moe.eval()
    moe(x)
    with pytest.raises(RuntimeError, match="training mode"):
        moe.balance_loss()
