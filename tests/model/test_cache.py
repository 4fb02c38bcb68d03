"""KV caches: step-by-step decoding equals one full forward for every attention kind; MLA naive == absorbed;
the latent cache holds exactly (d_c + d_h^R) per token and layer; int8 error measured; left padding is exact;
a packed row (segments) computes each of its examples as if it were alone."""

import pytest
import torch

from ragseek.model import ModelConfig, Transformer

VOCAB = 97


def tiny(attention: str, **kw) -> Transformer:
    n_kv = {"mha": 4, "gqa": 2, "mqa": 1, "mla": 4}[attention]
    cfg = ModelConfig(
        vocab_size=VOCAB,
        dim=48,
        n_layers=2,
        n_heads=4,
        n_kv_heads=n_kv,
        head_dim=12,
        inter_dim=64,
        max_seq_len=64,
        attention=attention,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        q_lora_rank=12,
        init_std=0.2,
        **kw,
    )
    torch.manual_seed(0)
    return Transformer(cfg).eval()


KINDS = [
    ("mha", {}),
    ("gqa", {}),
    ("mqa", {}),
    ("mla", {"mla_impl": "naive"}),
    ("mla", {"mla_impl": "absorbed"}),
    (
        "mla",
        {
            "mla_impl": "absorbed",
            "n_routed_experts": 4,
            "n_activated_experts": 2,
            "moe_inter_dim": 16,
            "n_shared_experts": 1,
            "n_dense_layers": 1,
        },
    ),
]
IDS = ["mha", "gqa", "mqa", "mla-naive", "mla-absorbed", "mla-absorbed-moe"]


@torch.no_grad()
def decode_stepwise(model, tokens, cache, chunks=(5, 1, 3, 1, 1, 1, 4)):
    """Feed tokens in uneven chunks (a prefill, single steps, a multi-token 'verify' chunk) through the cache."""
    out, pos = [], 0
    for n in chunks:
        out.append(model(tokens[:, pos : pos + n], cache, pos))
        pos += n
    return torch.cat(out, dim=1), pos


@pytest.mark.parametrize("attention,kw", KINDS, ids=IDS)
def test_cached_decoding_equals_full_forward(attention, kw):
    model = tiny(attention, **kw)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
    stepped, n = decode_stepwise(model, tokens, model.make_cache(2, 32))
    assert (stepped - full[:, :n]).abs().max().item() < 1e-5


def test_cache_rollback_overwrites_rejected_positions():
    """Speculative decoding writes draft tokens, then resumes from an earlier position: no trace may remain."""
    model = tiny("mla", mla_impl="absorbed")
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    cache = model.make_cache(1, 32)
    with torch.no_grad():
        model(tokens[:, :8], cache, 0)
        model(torch.randint(0, VOCAB, (1, 4)), cache, 8)  # four draft tokens, all rejected
        resumed = model(tokens[:, 8:], cache, 8)
        assert (resumed - model(tokens)[:, 8:]).abs().max().item() < 1e-5


def test_mla_naive_and_absorbed_agree():
    naive, absorbed = tiny("mla", mla_impl="naive"), tiny("mla", mla_impl="absorbed")
    absorbed.load_state_dict(naive.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    a, _ = decode_stepwise(naive, tokens, naive.make_cache(2, 32))
    b, _ = decode_stepwise(absorbed, tokens, absorbed.make_cache(2, 32))
    assert (a - b).abs().max().item() < 1e-5


def test_cache_bytes():
    B, S = 3, 40
    absorbed = tiny("mla", mla_impl="absorbed")
    c = absorbed.cfg
    assert absorbed.make_cache(B, S).nbytes == B * S * c.n_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    assert absorbed.make_cache(B, S, dtype=torch.bfloat16).nbytes == B * S * c.n_layers * (16 + 4) * 2
    naive = tiny("mla", mla_impl="naive")
    assert naive.make_cache(B, S).nbytes == B * S * c.n_layers * c.n_heads * (8 + 4 + 8) * 4
    for kind, groups in [("mha", 4), ("gqa", 2), ("mqa", 1)]:
        assert tiny(kind).make_cache(B, S).nbytes == B * S * 2 * 2 * groups * 12 * 4
    # int8: one byte per element plus one fp32 scale per cached vector
    assert absorbed.make_cache(B, S, quantize="int8").nbytes == B * S * 2 * (20 * 1 + 4)


@pytest.mark.parametrize("attention,kw", KINDS[:5], ids=IDS[:5])
def test_int8_cache_error(attention, kw):
    """int8 per-vector quantisation: relative logit error stays under 2% (measured ~0.3-1% on these models)."""
    model = tiny(attention, **kw)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    ref, n = decode_stepwise(model, tokens, model.make_cache(2, 32))
    q8, _ = decode_stepwise(model, tokens, model.make_cache(2, 32, quantize="int8"))
    rel = ((q8 - ref).norm() / ref.norm()).item()
    assert 0 < rel < 2e-2


def test_left_padding_matches_unpadded_rows():
    model = tiny("gqa")
    short = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    long = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask)
        assert (padded[0, 4:] - model(short)[0]).abs().max().item() < 1e-5
        assert (padded[1] - model(long)[0]).abs().max().item() < 1e-5
        # and through the cache, one more token each
        cache = model.make_cache(2, 16)
        model(batch, cache, 0, mask)
        nxt = torch.tensor([[7], [7]])
        step = model(nxt, cache, 9, torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))
        assert (step[0, -1] - model(torch.cat([short, nxt[:1]], 1))[0, -1]).abs().max().item() < 1e-5


def test_a_mask_of_the_wrong_shape_is_refused_even_when_it_masks_nothing():
    """An all-ones attention_mask means plain causal attention (no mask tensor), but only once its shape is
    checked: (B, T) given where a cache's start_pos makes it (B, start_pos + T) is an error, not ignored."""
    model = tiny("gqa")
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, start_pos \+ seq\) = \(1, 7\)"):
        model._positions_and_mask(1, 2, 5, torch.ones(1, 2), torch.device("cpu"))
    positions, mask = model._positions_and_mask(1, 2, 5, torch.ones(1, 7), torch.device("cpu"))
    assert positions.tolist() == [[5, 6]] and mask is None


def test_segments_restart_positions_and_block_attention_hand_worked():
    """Two left pads sharing example 0's segment id, example 0 (3 tokens), example 1 (2 tokens): positions count the
    real tokens of each example from 0; a token sees the earlier real tokens of its own example only."""
    model = tiny("gqa")
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    segments = torch.tensor([[0, 0, 0, 0, 0, 1, 1]])
    positions, mask = model._positions_and_mask(1, 7, 0, attention_mask, torch.device("cpu"), segments)
    assert positions.tolist() == [[0, 0, 0, 1, 2, 0, 1]]
    assert mask[0].int().tolist() == [
        # padding sees only itself
        [1, 0, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1, 1],
    ]
    # continuing example 1 by one cached token: position 2, keys 5..7
    positions, mask = model._positions_and_mask(
        1, 1, 7, None, torch.device("cpu"), torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    )
    assert positions.tolist() == [[2]]
    assert mask[0].int().tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]


@pytest.mark.parametrize("attention,kw", KINDS, ids=IDS)
def test_packed_row_equals_each_example_alone(attention, kw):
    """Three examples packed in one row, a fourth alone in a right-padded row (segment -1): with the segments every
    token's logits are its example's alone, to 1e-5; without them (plain causal attention over the row) the later
    examples' logits differ. Continuing the packed row through the cache continues its last example alone."""
    model = tiny(attention, **kw)
    g = torch.Generator().manual_seed(6)
    examples = [torch.randint(0, VOCAB, (1, n), generator=g) for n in (5, 7, 4)]
    lone = torch.randint(0, VOCAB, (1, 9), generator=g)
    row = torch.cat(examples, 1)
    segments = torch.cat([torch.full_like(e, i) for i, e in enumerate(examples)], 1)
    batch = torch.cat([row, torch.cat([lone, torch.zeros(1, 7, dtype=torch.long)], 1)])
    batch_segments = torch.cat([segments, torch.tensor([[0] * 9 + [-1] * 7])])
    with torch.no_grad():
        alone = torch.cat([model(e) for e in examples], 1)
        packed = model(batch, attention_mask=(batch_segments >= 0).long(), segments=batch_segments)
        assert (packed[0] - alone[0]).abs().max().item() < 1e-5
        assert (packed[1, :9] - model(lone)[0]).abs().max().item() < 1e-5
        crossed = model(row)
        assert (crossed[0, :5] - alone[0, :5]).abs().max().item() < 1e-5
        assert (crossed[0, 5:] - alone[0, 5:]).abs().max().item() > 1e-2
        cache = model.make_cache(1, 32)
        model(row, cache, 0, segments=segments)
        nxt = torch.tensor([[7]])
        step = model(nxt, cache, 16, segments=torch.cat([segments, torch.tensor([[2]])], 1))
        assert (step[0, -1] - model(torch.cat([examples[2], nxt], 1))[0, -1]).abs().max().item() < 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.ao quantized tensors: deprecation notice
@pytest.mark.parametrize("quantize", [False, True], ids=["fp32", "int8"])
def test_fused_projections_give_the_same_outputs(quantize):
    """q/k/v and gate/up fused into one linear each (done by quantize_weights): the same logits, bit for bit,
    for int8 too (per-output-channel weight scales; the activation is quantised once per input either way)."""
    import copy

    from ragseek.model.quant import _swap_linears, fuse_projections, quantize_weights

    model = tiny("gqa")
    fused = copy.deepcopy(model)
    if quantize:
        _swap_linears(model)
        quantize_weights(fused)
    else:
        fuse_projections(fused)
    assert fused.layers[0].self_attn.qkv_proj is not None and fused.layers[0].mlp.gate_up_proj is not None
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(6))
    a, _ = decode_stepwise(model, tokens, model.make_cache(2, 32))
    b, _ = decode_stepwise(fused, tokens, fused.make_cache(2, 32))
    assert torch.equal(a, b) if quantize else (a - b).abs().max().item() < 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.ao quantized tensors: deprecation notice
def test_int8_linear_quantises_rows_of_a_like_peak_together():
    """One row: torch.ao's dynamic linear, bit for bit. Several: one call per octave of the rows' peaks, so a row
    100x larger than the rest (a first token's attention sink) does not take their resolution."""
    from torch import nn
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    from ragseek.model.quant import Int8Linear

    torch.manual_seed(0)
    linear, x = nn.Linear(48, 40), torch.randn(6, 48).clamp(-1.9, 1.9)
    x[0] *= 100
    linear.qconfig = per_channel_dynamic_qconfig
    one_call, int8 = DynamicLinear.from_float(linear), Int8Linear(linear)
    assert torch.equal(int8(x[1:2]), one_call(x[1:2])) and torch.equal(int8(x)[0], one_call(x[:1])[0])
    exact = nn.functional.linear(x, linear.weight, linear.bias)[1:]
    ours, theirs = (int8(x)[1:] - exact).abs().max(), (one_call(x)[1:] - exact).abs().max()
    assert ours < theirs / 10, (ours, theirs)
    assert int8(x.reshape(2, 3, 48)).shape == (2, 3, 40)


def test_config_json_round_trip_and_errors(tmp_path):
    cfg = tiny("mla", mla_impl="absorbed", mtp_depth=1).cfg
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(attention="mqa", n_kv_heads=2)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"dimension": 3})
