"""Weight-only int8 for CPU inference: every nn.Linear becomes fbgemm's dynamically quantised Linear.

Decoding at batch 1 reads every weight once per token, so on a CPU it is bound by memory bandwidth: int8 weights
(one scale per output channel; activations quantised on the fly) read 4x fewer bytes than fp32.
Inference only; stacked MoE expert weights stay in their dtype. q/k/v and gate/up are first fused into one linear
each (`fuse_projections`): the same outputs, as each output channel keeps its own scale and the activation is
quantised once per input either way, for fewer and larger calls per token.
"""

from __future__ import annotations

import warnings

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
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    for name, child in module.named_children():
        if type(child) is nn.Linear:
            child.qconfig = per_channel_dynamic_qconfig
            setattr(module, name, DynamicLinear.from_float(child))
        else:
            _swap_linears(child)
