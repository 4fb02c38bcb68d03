"""Attention: MHA / GQA / MQA (one class, set by n_kv_heads) and MLA (naive and absorbed), with their KV caches.

Every cached tensor is laid out (B, G, S, D): G key/value groups (n_kv_heads for GQA, n_heads for naive MLA,
1 for the MLA latent), S positions, D features. A cache is written at [start, start + T) and read over
[0, start + T): rolling back (speculative decoding) is just calling again with a smaller start.

KV bytes per token and layer (DeepSeek-V2 Table 1, n_h heads of width d_h, n_g groups, latent d_c, rope d_h^R):
  MHA 2·n_h·d_h,  GQA 2·n_g·d_h,  MQA 2·d_h,  MLA (absorbed) d_c + d_h^R  — times the element size.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ragseek.model.config import ModelConfig
from ragseek.model.layers import RMSNorm, apply_rotary, fuse_linears

Quantize = Literal["int8"] | None


class LayerCache:
    """One layer's cache: named (B, G, S, D) tensors, optionally int8 with one fp scale per (b, g, s) vector."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype,
        quantize: Quantize = None,
        device: torch.device | str = "cpu",
    ):
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        self.quantize = quantize
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        store_dtype = torch.int8 if quantize else dtype
        self.data = {
            name: torch.zeros(batch_size, g, max_seq_len, d, dtype=store_dtype, device=device)
            for name, (g, d) in shapes.items()
        }
        self.scale = (
            {
                name: torch.zeros(batch_size, g, max_seq_len, 1, dtype=dtype, device=device)
                for name, (g, _) in shapes.items()
            }
            if quantize
            else {}
        )

    @property
    def nbytes(self) -> int:
        tensors = list(self.data.values()) + list(self.scale.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def update(self, start: int, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write each new (B, G, T, D) tensor at positions [start, start + T); return all of [0, start + T)."""
        end = start + next(iter(new.values())).shape[2]
        if end > self.max_seq_len:
            raise ValueError(
                f"the KV cache holds {self.max_seq_len} positions, {end} needed: make a larger cache"
            )
        out = {}
        for name, x in new.items():
            if self.quantize:
                # symmetric per-vector int8: scale = max|x| / 127 over the feature dim
                scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127.0
                self.data[name][:, :, start:end] = (x / scale).round().clamp(-127, 127).to(torch.int8)
                self.scale[name][:, :, start:end] = scale.to(self.dtype)
                out[name] = self.data[name][:, :, :end].to(self.dtype) * self.scale[name][:, :, :end]
            else:
                self.data[name][:, :, start:end] = x.to(self.dtype)
                out[name] = self.data[name][:, :, :end]
        return out


class Cache:
    """The per-layer caches of one model for one batch (made by `Transformer.make_cache`)."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def max_seq_len(self) -> int:
        return self.layers[0].max_seq_len

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (B',) in that order, repeats allowed: a prompt prefilled once continues as several
        sequences, a finished sequence leaves the batch. `index_select`, so gradients flow back to the kept rows."""
        for layer in self.layers:
            layer.data = {name: t.index_select(0, rows) for name, t in layer.data.items()}
            layer.scale = {name: t.index_select(0, rows) for name, t in layer.scale.items()}


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T · scale + mask) v, where Hq query heads share G key/value groups (Hq = G · rep).

    q (B, Hq, T, D), k (B, G, S, D), v (B, G, S, Dv), mask (B, T, S) bool (True = may attend), or None for plain
    causal attention: the T queries are the last T positions, each seeing the keys up to it (with T = 1, every key).
    The rep query heads of a group are folded into the query length, so K/V are never copied per head
    (MQA and the MLA latent have G = 1: one K/V read serves every head).
    """
    B, Hq, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    if mask is None and T == S > 1:
        # a whole sequence: SDPA's own causal attention skips the masked half of the blocks (1.8x faster than an
        # explicit mask at 1,500 tokens, the same numbers); head h reads group h // rep, as folded below
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if mask is None and T > 1:  # a chunk after cached positions
        keys = torch.arange(S, device=q.device)
        mask = (keys <= keys[S - T :, None]).expand(B, T, S)
    rep = Hq // G
    q = q.reshape(B, G, rep * T, D)  # head h = g·rep + r  ->  row r·T + t of group g
    m = None
    if mask is not None:
        m = mask[:, None, None].expand(B, 1, rep, T, mask.shape[-1]).reshape(B, 1, rep * T, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)  # (B, G, rep·T, Dv)
    return out.reshape(B, Hq, T, v.shape[-1])


class GQAttention(nn.Module):
    """Multi-head attention with n_kv_heads key/value heads: MHA (= n_heads), GQA (divides n_heads), MQA (= 1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = cfg.softmax_scale
        self.interleave = cfg.rope_interleave
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.qkv_proj: nn.Linear | None = None  # set by `fuse`

    def fuse(self) -> None:
        """Inference only: q, k and v as one linear, so each token reads (and int8 quantises) x once."""
        if self.qkv_proj is not None:
            return
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def cache_shapes(self) -> dict[str, tuple[int, int]]:
        return {"k": (self.n_kv_heads, self.head_dim), "v": (self.n_kv_heads, self.head_dim)}

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: LayerCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, G, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(B, T, H + 2 * G, hd)
            qk, v = qkv[:, :, : H + G], qkv[:, :, H + G :]
        else:
            qk = torch.cat([self.q_proj(x).view(B, T, H, hd), self.k_proj(x).view(B, T, G, hd)], dim=2)
            v = self.v_proj(x).view(B, T, G, hd)
        # q and k rotated in one call: (B, H + G, T, hd) -> (B, H, T, hd), (B, G, T, hd)
        q, k = apply_rotary(qk.transpose(1, 2), *rope, self.interleave).split([H, G], dim=1)
        v = v.transpose(1, 2)
        if cache is not None:
            kv = cache.update(start_pos, k=k, v=v)
            k, v = kv["k"], kv["v"]
        out = grouped_attention(q, k, v, mask, self.scale)  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2 §2.1, eqs. 9-19), parameter names as in the released checkpoints.

    c_KV = RMSNorm(W_DKV h)                     kv_a_proj_with_mqa (first kv_lora_rank outputs), kv_a_layernorm
    k_R  = RoPE(W_KR h)                         kv_a_proj_with_mqa (last qk_rope_head_dim outputs), one per token
    [k_C; v_C] = W_UK c_KV, W_UV c_KV           kv_b_proj, per head
    q = W_UQ RMSNorm(W_DQ h)  (or W_Q h)        q_a_proj, q_a_layernorm, q_b_proj  (or q_proj)
    score_{t,s} = q_C·k_C + q_R·k_R

    naive:    cache k = [k_C; k_R] and v_C for every head: 2·n_h·d_h-ish floats per token and layer.
    absorbed: q_C·(W_UK c) = (W_UK^T q_C)·c, so fold W_UK into the query, attend in the latent space against
              [c_KV; k_R] (one group, shared by all heads) and apply W_UV after: only d_c + d_h^R floats per token.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.kv_lora_rank, self.q_lora_rank = cfg.kv_lora_rank, cfg.q_lora_rank
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.scale = cfg.softmax_scale
        self.interleave = cfg.rope_interleave
        self.impl = cfg.mla_impl
        qk_head_dim = self.nope + self.rope_dim
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.dim, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.dim, self.n_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.dim, bias=False)

    def cache_shapes(self) -> dict[str, tuple[int, int]]:
        if self.impl == "absorbed":
            return {"latent": (1, self.kv_lora_rank + self.rope_dim)}
        return {"k": (self.n_heads, self.nope + self.rope_dim), "v": (self.n_heads, self.v_dim)}

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: LayerCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.view(B, T, self.n_heads, self.nope + self.rope_dim).transpose(1, 2)  # (B, H, T, nope + rope)
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)
        q_rope = apply_rotary(q_rope, *rope, self.interleave)

        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv).unsqueeze(1)  # (B, 1, T, d_c)
        k_rope = apply_rotary(k_rope.unsqueeze(1), *rope, self.interleave)  # (B, 1, T, rope)

        # Without a cache (training, scoring) the naive form is the cheaper one: every key is expanded once.
        if cache is not None and self.impl == "absorbed":
            out = self._absorbed(q_nope, q_rope, c_kv, k_rope, mask, cache, start_pos)
        else:
            out = self._naive(q_nope, q_rope, c_kv, k_rope, mask, cache, start_pos)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # out: (B, H, T, v_dim)

    def _naive(self, q_nope, q_rope, c_kv, k_rope, mask, cache, start_pos):
        B, _, T, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv.squeeze(1)).view(B, T, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, H, T, nope), (B, H, T, v_dim)
        k = torch.cat([k_nope, k_rope.expand(-1, self.n_heads, -1, -1)], dim=-1)
        if cache is not None:
            kv_all = cache.update(start_pos, k=k, v=v)
            k, v = kv_all["k"], kv_all["v"]
        q = torch.cat([q_nope, q_rope], dim=-1)
        return grouped_attention(q, k, v, mask, self.scale)

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, mask, cache, start_pos):
        wkv_b = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = wkv_b[:, : self.nope], wkv_b[:, self.nope :]  # (H, nope, d_c), (H, v_dim, d_c)
        q_latent = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # W_UK^T q_C: (B, H, T, d_c)
        # latent: (B, 1, S, d_c + rope)
        latent = cache.update(start_pos, latent=torch.cat([c_kv, k_rope], dim=-1))["latent"]
        q = torch.cat([q_latent, q_rope], dim=-1)
        # out_latent: (B, H, T, d_c)
        out_latent = grouped_attention(q, latent, latent[..., : self.kv_lora_rank], mask, self.scale)
        return torch.einsum("bhtc,hdc->bhtd", out_latent, w_uv)  # W_UV applied after attention


ATTENTION = {"mha": GQAttention, "gqa": GQAttention, "mqa": GQAttention, "mla": MLAttention}
