"""Quantised weights for CPU inference: every nn.Linear becomes an `Int8Linear` or an `Int4Linear`.

    int8   fbgemm's dynamically quantised linear: int8 weights, one scale per output channel; activations quantised
           on the fly, rows of a like peak together (8 bits/weight)
    int4   llama.cpp's Q4_1 layout: per group of 32 input weights a scale d and a minimum m, w = q·d + m with
           q in 0..15, run by torch's CPU int4 kernel with bf16 activations (5 bits/weight, as Q4_1)

Decoding at batch 1 reads every weight once per token, so on a CPU it is bound by memory bandwidth: int8 weights
read 4x fewer bytes than fp32, int4 ones 6.4x.
Inference only; stacked MoE expert weights stay in their dtype. q/k/v and gate/up are first fused into one linear
each (`fuse_projections`): the same outputs, as each output channel keeps its own scales and the activation is
quantised (int8) or rounded to bf16 (int4) once per input either way, for fewer and larger calls per token.
`Int8Linear` calls torch.ao's op directly, and under torch.compile as one opaque op (decoding.compile_decoding).
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from typing import Literal

import torch
from torch import nn

from ragseek.model.attention import GQAttention
from ragseek.model.layers import MLP
from ragseek.model.transformer import Transformer

WeightQuant = Literal["int8", "int4"]


def quantize_weights(model: Transformer, kind: WeightQuant = "int8") -> Transformer:
    """Quantise the linear layers of `model` in place (the output head included; the embedding stays fp32)."""
    if kind not in LINEARS:
        raise ValueError(f"quantize must be one of {sorted(LINEARS)}, got {kind!r}")
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError(
            f"{kind} weight quantisation starts from an fp32 model: load it with dtype=torch.float32"
        )
    if model.cfg.tie_embeddings:  # the head gets its own quantised copy; the embedding keeps the fp32 one
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    fuse_projections(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        _swap_linears(model, LINEARS[kind])
    return model.eval()


def fuse_projections(model: Transformer) -> Transformer:
    """Inference only: fuse each GQA block's q/k/v and each dense MLP's gate/up projections (LoRA-free models)."""
    for module in model.modules():
        if isinstance(module, (GQAttention, MLP)) and all(type(m) is nn.Linear for m in module.children()):
            module.fuse()
    return model


# fbgemm's packed weights are a TorchScript object, which torch.compile cannot pass to an op: the compiled graph
# calls `ragseek::int8_linear` with a key into this table instead.
_PACKED: dict[int, torch.ScriptObject] = {}
_KEYS = itertools.count()


@torch.library.custom_op("ragseek::int8_linear", mutates_args=())
def _int8_linear(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, _PACKED[key], reduce_range=True)


@_int8_linear.register_fake
def _(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class Int8Linear(nn.Module):
    """torch.ao's dynamically quantised Linear (fbgemm: int8 weights with one scale per output channel, each
    input quantised per call), without its per-call Python; under torch.compile one op, not a graph break."""

    def __init__(self, linear: nn.Linear):
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        linear.qconfig = per_channel_dynamic_qconfig
        self.packed = DynamicLinear.from_float(linear)._packed_params._packed_params
        self.key = next(_KEYS)
        _PACKED[self.key] = self.packed
        weakref.finalize(self, _PACKED.pop, self.key, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.ragseek.int8_linear(x, self.key, self.out_features)
        rows = x.reshape(-1, x.shape[-1])
        if len(rows) == 1:
            return torch.ops.quantized.linear_dynamic(x, self.packed, reduce_range=True)
        # fbgemm quantises its whole input with one scale, so one row with a large peak (the first token's
        # attention sink is 10-100x the others) leaves the other rows a few levels: rows go in one call per power
        # of two of their peak, each quantised at nearly its own scale
        groups = torch.log2(rows.abs().amax(-1).clamp_min(1e-30)).floor()
        out = rows.new_empty(len(rows), self.out_features)
        for g in groups.unique():
            at = (groups == g).nonzero().squeeze(1)
            out[at] = torch.ops.quantized.linear_dynamic(rows[at], self.packed, reduce_range=True)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


class Int4Linear(nn.Module):
    """4-bit weights as llama.cpp's Q4_1: per group of GROUP weights along the input, q = round((w - m) / d) in
    0..15 with m the group's minimum and d = (max - m) / 15, so w ≈ q·d + m. On a Q4_1 GGUF's dequantised weights
    this gives back each block's q exactly (its minimum is m, its maximum m + 15d).

    torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) computes w = (q - 8)·scale + zero, so zero = m + 8d.
    It is fast with bf16 activations only (with fp32 ones it measured 20-30x slower, fp16 slower still), so x goes
    in as bf16, with d and zero in bf16, and the output (rounded to bf16) comes back in x's dtype. One aten op, so
    torch.compile keeps it whole.
    """

    GROUP = 32

    def __init__(self, linear: nn.Linear):
        super().__init__()
        N, K = self.out_features, self.in_features = linear.out_features, linear.in_features
        if K % self.GROUP or N % 16:
            raise ValueError(
                f"int4 needs in_features divisible by {self.GROUP} and out_features by 16 (torch's int4 CPU "
                f"kernel); a linear here is {K} -> {N}: quantise with 'int8' instead"
            )
        groups = linear.weight.detach().float().reshape(N, K // self.GROUP, self.GROUP)
        m = groups.amin(-1)
        # a constant group gets q = 0 everywhere
        d = ((groups.amax(-1) - m) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        q = ((groups - m[..., None]) / d[..., None]).round().clamp(0, 15).to(torch.int32).reshape(N, K)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # (K / GROUP, N, 2): the kernel's layout
        self.register_buffer(
            "scales_and_zeros", torch.stack([d, m + 8 * d], -1).transpose(0, 1).contiguous().bfloat16()
        )
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).bfloat16()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.GROUP, self.scales_and_zeros)
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 weights (groups of {self.GROUP})"


LINEARS: dict[str, type[nn.Module]] = {"int8": Int8Linear, "int4": Int4Linear}


def _swap_linears(module: nn.Module, quantised: type[nn.Module] = Int8Linear) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, quantised(child))
        else:
            _swap_linears(child, quantised)
