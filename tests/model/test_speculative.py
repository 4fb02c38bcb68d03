"""MTP self-speculative decoding: greedy output is token-identical to plain greedy decoding."""

import pytest
import torch

from ragseek.model import ModelConfig, SamplingConfig, Transformer
from ragseek.model.decoding import generate_ids, speculative_generate


def tiny(depth: int, **kw) -> Transformer:
    torch.manual_seed(0)
    base = dict(
        vocab_size=40,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        inter_dim=64,
        max_seq_len=128,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
    )
    cfg = ModelConfig(**{**base, **kw}, mtp_depth=depth)
    return Transformer(cfg)


def trained(depth: int, **kw) -> Transformer:
    """A model that has learned a periodic sequence, so its MTP drafts are often right."""
    model = tiny(depth, **kw)
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8] * 3)[None]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss, _ = model.loss(pattern)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("depth,kw", [(1, {}), (2, {}), (3, {}), (2, {"attention": "mla", "n_kv_heads": 4})])
def test_speculative_equals_greedy(depth, kw):
    model = trained(depth, **kw)
    for prompt in ([3, 1, 4], [7, 7, 2, 30, 11]):
        plain = generate_ids(model, [prompt], SamplingConfig(max_new_tokens=40), eos_ids=set())[0].tokens
        spec, stats = speculative_generate(model, prompt, 40, eos_ids=set())
        assert spec == plain
    assert stats.accepted[0] > 0 and stats.tokens_per_step > 1


def test_untrained_model_still_exact():
    model = tiny(2).eval()
    plain = generate_ids(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=25), eos_ids=set())[0].tokens
    assert speculative_generate(model, [1, 2, 3], 25, eos_ids=set())[0] == plain


def test_stops_at_eos():
    model = tiny(1).eval()
    plain = generate_ids(model, [[3, 1, 4]], SamplingConfig(max_new_tokens=30), eos_ids=set())[0].tokens
    eos = plain[7]
    spec, _ = speculative_generate(model, [3, 1, 4], 30, eos_ids={eos})
    assert spec == plain[: plain.index(eos) + 1]


def test_needs_mtp():
    with pytest.raises(ValueError, match="mtp_depth=0"):
        speculative_generate(tiny(0), [1], 5, set())
