"""Weight-only int8 for CPU inference: every nn.Linear becomes fbgemm's dynamically quantised linear (`Int8Linear`).

Decoding at batch 1 reads every weight once per token, so on a CPU it is bound by memory bandwidth: int8 weights
(one scale per output channel; activations quantised on the fly, rows of a like peak together: `Int8Linear`) read
4x fewer bytes than fp32.
Inference only; stacked MoE expert weights stay in their dtype. q/k/v and gate/up are first fused into one linear
each (`fuse_projections`): the same outputs, as each output channel keeps its own scale and the activation is
quantised once per input either way, for fewer and larger calls per token.
`Int8Linear` calls torch.ao's op directly, and under torch.compile as one opaque op (decoding.compile_decoding).
"""

from __future__ import annotations

import itertools
import warnings
import weakref

import torch
from torch import nn

from ragseek.model.attention import GQAttention
from ragseek.model.layers import MLP
from ragseek.model.transformer import Transformer


def quantize_weights(model: Transformer, kind: str = "int8") -> Transformer:
    """Quantise the linear layers of `model` in place (the output head included; the embedding stays fp32)."""
    if kind != "int8":
        raise ValueError(f"quantize must be 'int8', got {kind!r}")
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError(
            "int8 weight quantisation starts from an fp32 model: load it with dtype=torch.float32"
        )
    if model.cfg.tie_embeddings:  # the head gets its own quantised copy; the embedding keeps the fp32 one
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    fuse_projections(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        _swap_linears(model)
    return model.eval()


def fuse_projections(model: Transformer) -> Transformer:
    """Inference only: fuse each GQA block's q/k/v and each dense MLP's gate/up projections (LoRA-free models)."""
    for module in model.modules():
        if isinstance(module, (GQAttention, MLP)) and all(type(m) is nn.Linear for m in module.children()):
            module.fuse()
    return model


def _swap_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, Int8Linear(child))
        else:
            _swap_linears(child)


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
