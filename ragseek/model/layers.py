"""Building blocks: RMSNorm, the SwiGLU MLP, rotary position embeddings (HF/llama convention, YaRN as in DeepSeek-V3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ragseek.model.config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (as transformers and DeepSeek do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # one fused op; the same bits as the lines below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers, shared experts and each routed expert."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by `fuse`

    def fuse(self) -> None:
        """Inference only: gate and up as one linear, so each token reads (and int8 quantises) x once."""
        if self.gate_up_proj is not None:
            return
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def fuse_linears(*linears: nn.Linear) -> nn.Linear:
    """One nn.Linear whose outputs are those of `linears`, concatenated in order."""
    first = linears[0]
    bias = first.bias is not None
    out = sum(lin.out_features for lin in linears)
    fused = nn.Linear(first.in_features, out, bias=bias, device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if bias:
            fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return fused.requires_grad_(first.weight.requires_grad)


# ---------------------------------------------------------------------------------------------------------------------
# Rotary embeddings


def _yarn_inv_freq(dim: int, base: float, rs: dict) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023) as in DeepSeek-V3 and transformers' `_compute_yarn_parameters`.

    Frequencies that rotate fewer than beta_slow times over the original context are interpolated (divided by
    `factor`), those that rotate more than beta_fast times are kept, with a linear ramp between. Returns the
    frequencies and the attention factor that multiplies cos/sin (1.0 when mscale == mscale_all_dim, as in V3;
    the mscale_all_dim part goes into the softmax scale, see ModelConfig.softmax_scale).
    """
    factor = rs["factor"]
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attention_factor = (
            get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
            if mscale and mscale_all
            else get_mscale(factor)
        )

    def correction_dim(n_rot: float) -> float:
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where the frequency is high enough to keep as is
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rope_dim/2,) and the cos/sin multiplier, for default, linear or YaRN rotary."""
    dim, base, rs = cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling
    if rs and rs["type"] == "yarn":
        return _yarn_inv_freq(dim, base, rs)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if rs and rs["type"] == "linear":
        inv_freq = inv_freq / rs["factor"]
    return inv_freq, 1.0


class Rotary(nn.Module):
    """cos/sin tables for every position up to max_seq_len; `forward(positions)` gathers them per row.

    Positions are a (B, T) tensor so left-padded batches keep each row's own position 0.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, attention_factor = rope_frequencies(cfg)
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)  # (S, rope_dim/2)
        self.register_buffer("cos", angles.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", angles.sin() * attention_factor, persistent=False)
        self.interleave = cfg.rope_interleave

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.max() >= self.cos.shape[0]:
            raise ValueError(
                f"position {int(positions.max())} is past max_seq_len={self.cos.shape[0]}: raise max_seq_len"
            )
        return self.cos[positions], self.sin[positions]  # (B, T, rope_dim/2) each


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x (B, H, T, rope_dim) by position. cos/sin are (B, T, rope_dim/2).

    Halves convention (llama/HF): pairs are (x_i, x_{i+d/2}). Interleaved (DeepSeek weights): pairs are
    (x_{2i}, x_{2i+1}); the result is written in halves layout, which only permutes the rope dims of q and k
    alike and so leaves q·k unchanged (transformers does the same).
    """
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
