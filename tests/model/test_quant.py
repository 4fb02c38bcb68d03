"""int4 weights (`Int4Linear`, llama.cpp's Q4_1 layout on torch's CPU int4 kernel) against dequantised fp32
references: exact where every value is exact in bf16, within bf16 rounding on a tiny model in Q4_1 (gguf's own
quantiser)."""

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from torch import nn

from ragseek.model import ModelConfig, Transformer
from ragseek.model.quant import Int4Linear, quantize_weights


def test_int4_linear_is_exact_where_bf16_is():
    """Weights q·d + m with q in 0..15 (each group of 32 holding a 0 and a 15), d a power of two, m a multiple
    of 1/8, and small integer inputs: every product and partial sum is exact in fp32, the weights, scales and
    zeros (m + 8d) exact in bf16, so the one rounding is the output's to bf16, the same as the exact sum's."""
    gen = torch.Generator().manual_seed(0)
    N, K = 48, 96
    q = torch.randint(0, 16, (N, K // 32, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    d = 2.0 ** -torch.randint(1, 4, (N, K // 32, 1), generator=gen).float()
    m = -torch.randint(0, 17, (N, K // 32, 1), generator=gen).float() / 8
    linear = nn.Linear(K, N, bias=False)
    linear.weight.data = (q * d + m).reshape(N, K)
    x = torch.randint(-3, 4, (5, K), generator=gen).float()
    exact = (x.double() @ linear.weight.double().T).bfloat16().float()
    assert torch.equal(Int4Linear(linear)(x), exact)


def test_int4_linear_rejects_shapes_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="in_features divisible by 32"):
        Int4Linear(nn.Linear(48, 32))
    with pytest.raises(ValueError, match="out_features by 16"):
        Int4Linear(nn.Linear(64, 40))


def q4_1(w: torch.Tensor) -> torch.Tensor:
    """w through gguf's own Q4_1 quantiser and back (llama.cpp's reference, in numpy)."""
    blocks = quantize(w.detach().numpy(), GGMLQuantizationType.Q4_1)
    return torch.from_numpy(np.array(dequantize(blocks, GGMLQuantizationType.Q4_1)))


def test_int4_linear_gets_back_every_q4_1_block():
    """Weights already in Q4_1 (a Q4_1 GGUF's, dequantised): each group's min is m and its max m + 15d, so int4
    finds the block's q again; through the identity it gives back w to bf16 rounding, far below one step d
    (which a single wrong q would cost)."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=False)
    linear.weight.data = q4_1(linear.weight)
    groups = linear.weight.reshape(64, 4, 32)
    d = (groups.amax(-1) - groups.amin(-1)) / 15
    columns = Int4Linear(linear)(torch.eye(128)).T.reshape(64, 4, 32)
    assert ((columns - groups).abs().amax(-1) / d).max() < 0.1


def test_int4_model_matches_its_q4_1_weights_in_fp32():
    """A tiny model with Q4_1 linear weights: the int4 model's logits differ from its fp32 ones by bf16 rounding
    only (activations into each linear, scales, outputs: 0.4% of the logits' scale measured), 20x below what
    4-bit weights move them from the original model's (22x measured)."""
    cfg = ModelConfig(
        vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=96, max_seq_len=32
    )
    torch.manual_seed(0)
    original = Transformer(cfg).eval()
    fp32 = copy.deepcopy(original)
    for module in fp32.modules():
        if type(module) is nn.Linear:
            module.weight.data = q4_1(module.weight)
    int4 = quantize_weights(copy.deepcopy(fp32), "int4")
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ours, unquantised = fp32(tokens), int4(tokens), original(tokens)
    err = (ours - ref).abs().max()
    assert err < 1e-2 * ref.abs().max(), (err, ref.abs().max())
    assert err < (unquantised - ref).abs().max() / 20
