"""DeepSeekMoE: fine-grained routed experts + shared experts, group-limited routing, aux-loss-free balancing.

DeepSeek-V3 §2.1.2 (eqs. 12-16), for the token u_t (the residual u_t + ... is added by the Block):

    h'_t    = sum_{i<=N_s} FFN^(s)_i(u_t) + sum_{i<=N_r} g_{i,t} FFN^(r)_i(u_t)              (12)
    s_{i,t} = sigmoid(u_t^T e_i)              (V3; softmax over i in V2)                     (15)
    g'_{i,t} = s_{i,t} if s_{i,t} + b_i in TopK({s_{j,t} + b_j}, K_r) else 0                 (16)
    g_{i,t} = route_scale * g'_{i,t} / sum_j g'_{j,t}   (normalised when norm_topk_prob)      (13)

The bias b_i only chooses experts; the weights come from the unbiased s. Between steps, `MoE.update_bias` moves
b_i by gamma * sign(mean load - load_i) (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts"); `MoE.balance_loss` is V3's complementary sequence-wise loss (eqs. 17-20).

Names follow transformers' DeepseekV3MoE (`gate.weight`, `gate.e_score_correction_bias` <-> `gate.bias`,
`experts.{i}.gate_proj.weight` <-> `experts.gate_proj[i]`, `shared_experts`) so checkpoints map by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ragseek.model.config import ModelConfig, ScoreFunc
from ragseek.model.layers import MLP

# Affinity s_{i,t} from the router logits u_t^T e_i, in fp32.
AFFINITY: dict[ScoreFunc, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,  # V3 eq. 15
    "softmax": lambda logits: logits.softmax(dim=-1),  # V2
}


def _top2_sum(grouped: torch.Tensor) -> torch.Tensor:
    return grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)


def _group_max(grouped: torch.Tensor) -> torch.Tensor:
    return grouped.amax(dim=-1)


# Score of each expert group (N, G, E/G) -> (N, G), as in DeepSeek's reference Gate: V3 (sigmoid + bias) sums the
# two best biased scores of the group, V2 (softmax) takes the best one.
GROUP_SCORE: dict[ScoreFunc, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": _top2_sum,
    "softmax": _group_max,
}


class Gate(nn.Module):
    """Router: affinities s (eq. 15), group-limited top-k on s + b (eq. 16), weights from s (eq. 13)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk = cfg.n_activated_experts
        self.n_groups = cfg.n_expert_groups
        self.topk_groups = cfg.n_limited_groups
        self.score_func: ScoreFunc = cfg.score_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.route_scale = cfg.route_scale
        # e_i: the centroid of expert i (eq. 15)
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim).normal_(std=cfg.init_std))
        # b_i of eq. 16 (transformers: e_score_correction_bias); changed by MoE.update_bias, never by gradients.
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, dim) -> weights (N, k) in x's dtype, indices (N, k), scores s (N, E) in fp32."""
        N, E = x.shape[0], self.weight.shape[0]
        scores = AFFINITY[self.score_func](F.linear(x.float(), self.weight.float()))  # (N, E)
        biased = scores + self.bias  # s + b: chooses the experts, never weighs them
        if self.n_groups > 1:
            grouped = biased.view(N, self.n_groups, E // self.n_groups)  # (N, G, E/G)
            group_scores = GROUP_SCORE[self.score_func](grouped)  # (N, G)
            best = group_scores.topk(self.topk_groups, dim=-1).indices  # (N, topk_groups)
            dropped = torch.ones(N, self.n_groups, dtype=torch.bool, device=x.device).scatter_(1, best, False)
            biased = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)  # (N, E)
        indices = biased.topk(self.topk, dim=-1).indices  # (N, k)
        weights = scores.gather(1, indices)  # g'_{i,t} = s_{i,t} of the chosen experts
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.route_scale).type_as(x), indices, scores


# Sorted dispatch pads every expert's token block to the largest one: E * C rows computed for S = N * k needed
# (C / mean load = MaxVio + 1). Past this ratio the routing is far from balanced and the per-expert loop of
# `forward_naive` is cheaper (bench/bench_moe.py, CPU: padded wins ~2x at 1.2-1.8, loses at ~4.6).
MAX_PADDING = 3.0


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """FFN^(r)_i(x) = down_i(silu(gate_i x) * up_i x) with nn.Linear-layout weights; batched over a leading E."""
    return (F.silu(x @ gate.mT) * (x @ up.mT)) @ down.mT


class Experts(nn.Module):
    """N_r SwiGLU experts FFN^(r)_i, their nn.Linear weights stacked: gate/up (E, I, dim), down (E, dim, I)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.gate_proj = nn.Parameter(torch.empty(E, I, D).normal_(std=cfg.init_std))
        self.up_proj = nn.Parameter(torch.empty(E, I, D).normal_(std=cfg.init_std))
        self.down_proj = nn.Parameter(torch.empty(E, D, I).normal_(std=cfg.init_std))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_i g_{i,t} FFN^(r)_i(u_t) by sorted dispatch: x (N, dim), indices/weights (N, k) -> (N, dim).

        The S = N*k (token, expert) pairs are sorted by expert and written into one (E, C, dim) block, C the
        largest expert load, so all experts run as three batched matmuls; the weighted outputs are gathered
        back in pair order and summed per token with index_add_. When padding would cost more than MAX_PADDING
        times the real work, it runs `forward_naive` instead.
        """
        (N, D), (E, k) = x.shape, (self.gate_proj.shape[0], indices.shape[1])
        expert_of_pair = indices.flatten()  # (S,)
        order = expert_of_pair.argsort(stable=True)  # (S,) pairs grouped by expert
        expert, token = expert_of_pair[order], order // k  # (S,) expert and token of each sorted pair
        counts = torch.bincount(expert_of_pair, minlength=E)  # (E,)
        capacity = int(counts.max())
        if E * capacity > MAX_PADDING * N * k:
            return self.forward_naive(x, indices, weights)
        first = counts.cumsum(0) - counts  # (E,) position of each expert's first pair in sorted order
        row = torch.arange(N * k, device=x.device) - first[expert]  # (S,) row of each pair in its block
        blocks = x.new_zeros(E, capacity, D)
        blocks[expert, row] = x[token]  # (E, C, dim): expert i's tokens, then zero padding
        out = swiglu(blocks, self.gate_proj, self.up_proj, self.down_proj)[expert, row]  # (S, dim)
        out = out * weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))

    def forward_naive(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Reference for `forward`: for each expert, mask the (token, slot) pairs routed to it."""
        y = torch.zeros_like(x)
        experts = zip(self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0), strict=True)
        for i, (gate, up, down) in enumerate(experts):
            token, slot = torch.where(indices == i)
            if len(token):
                y.index_add_(
                    0, token, (swiglu(x[token], gate, up, down) * weights[token, slot, None]).to(x.dtype)
                )
        return y


class MoE(nn.Module):
    """DeepSeekMoE layer (eq. 12 without the residual): routed experts + shared experts, with load statistics.

    Each forward records per-expert token counts (`last_counts`, accumulated in `load` until `reset_load` or
    `update_bias`); in training with `aux_loss_alpha > 0` it also keeps the routing for `balance_loss`.
    Set `aux_loss_alpha = 0` to train with the bias update alone (DeepSeek-V3 keeps alpha tiny, 1e-4).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        )
        self.bias_update_speed = cfg.bias_update_speed
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.register_buffer(
            "last_counts", torch.zeros(cfg.n_routed_experts, dtype=torch.long), persistent=False
        )
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts, dtype=torch.long), persistent=False)
        self._routing: tuple[torch.Tensor, torch.Tensor] | None = None  # scores (B, T, E), indices (B, T, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        B, T, D = x.shape
        x2d = x.reshape(B * T, D)  # (N, dim)
        weights, indices, scores = self.gate(x2d)
        with torch.no_grad():
            self.last_counts = torch.bincount(indices.flatten(), minlength=self.load.shape[0])
            self.load += self.last_counts
        keep = self.training and self.aux_loss_alpha > 0
        self._routing = (scores.view(B, T, -1), indices.view(B, T, -1)) if keep else None
        y = self.experts(x2d, indices, weights).view(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y

    def reset_load(self) -> None:
        self.load.zero_()

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor | None = None) -> None:
        """Aux-loss-free balancing: b_i <- b_i + gamma * sign(mean_j load_j - load_i), then reset the load.

        counts (E,) defaults to the load accumulated since the last update (pass all-reduced counts when the
        batch is split over processes). Overloaded experts lose bias and underloaded ones gain it.
        """
        load = (self.load if counts is None else counts).float()
        self.gate.bias += self.bias_update_speed * torch.sign(load.mean() - load)
        self.reset_load()

    def balance_loss(self) -> torch.Tensor:
        """`sequence_balance_loss` of the last training forward (see there for the equations)."""
        if self._routing is None:
            raise RuntimeError(
                "balance_loss needs the routing of a forward pass in training mode with aux_loss_alpha > 0: "
                "call model.train(), set aux_loss_alpha and run forward first"
            )
        scores, indices = self._routing
        return sequence_balance_loss(scores, indices, self.aux_loss_alpha)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (eqs. 17-20), averaged over the batch.

        L_Bal  = alpha * sum_i f_i P_i                                              (17)
        f_i    = N_r / (K_r T) * sum_t 1(s_{i,t} in TopK({s_{j,t}}, K_r))           (18)
        s'_{i,t} = s_{i,t} / sum_j s_{j,t}                                          (19)
        P_i    = 1/T * sum_t s'_{i,t}                                               (20)

    scores s (B, T, N_r) are the unbiased affinities, indices (B, T, K_r) the chosen experts. f is a count (no
    gradient); the loss is differentiable through P. A perfectly balanced sequence gives L_Bal = alpha.
    """
    B, T, n_experts = scores.shape
    k = indices.shape[-1]
    chosen = torch.zeros_like(scores).scatter_(-1, indices, 1.0)  # (B, T, N_r): 1(s_{i,t} in TopK)
    f = chosen.sum(dim=1) * n_experts / (k * T)  # (B, N_r)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, N_r)
    return alpha * (f * p).sum(dim=-1).mean()


def max_violation(counts: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean_i load_i - 1 (Wang et al. 2024): 0 when perfectly balanced."""
    load = counts.float()
    if load.sum() <= 0:
        raise ValueError("max_violation needs counts from at least one routed token (all counts are zero)")
    return float(load.max() / load.mean() - 1)
