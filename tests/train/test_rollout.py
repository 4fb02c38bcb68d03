"""`response_logps` (shared prompts, head on the scored rows only) equals the straightforward computation — one
forward over the right-padded rows, log-softmax of every position — in values and parameter gradients; generation
with repeated prompts (prefilled once) and early EOS (rows leave the batch) equals each prompt decoded alone."""

from __future__ import annotations

import pytest
import torch

from ragseek.model import ModelConfig, SamplingConfig, Transformer
from ragseek.model.decoding import generate_ids
from ragseek.train.data import pad_right
from ragseek.train.rollout import response_logps, split_prompts

VOCAB = 61
KINDS = {
    "gqa-tied": {"attention": "gqa", "n_kv_heads": 2},
    "mla-absorbed-moe-untied": {
        "attention": "mla",
        "tie_embeddings": False,
        "n_routed_experts": 4,
        "n_activated_experts": 2,
        "moe_inter_dim": 16,
        "n_shared_experts": 1,
        "n_dense_layers": 1,
    },
}


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=4,
        head_dim=8,
        inter_dim=64,
        max_seq_len=64,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        init_std=0.2,
        **kw,
    )
    return Transformer(cfg)


def rows(pad_id: int = 3) -> dict[str, torch.Tensor]:
    """Groups of completions after uneven prompts, right-padded: a group of 3, a DPO-like pair whose prompt also
    comes back later (not consecutive), a row without a response and a one-token prompt."""
    g = torch.Generator().manual_seed(1)

    def seq(n: int) -> list[int]:
        return torch.randint(4, VOCAB, (n,), generator=g).tolist()

    p1, p2, p3 = seq(7), seq(3), seq(1)
    pairs = [(p1, seq(5)), (p1, seq(2)), (p1, seq(9)), (p2, seq(4)), (p2, seq(1)), (p1, seq(6))]
    pairs += [(seq(5), []), (p3, seq(3)), (p2, seq(7))]
    ids = [p + c for p, c in pairs]
    return {
        "input_ids": pad_right(ids, pad_id),
        "attention_mask": pad_right([[1] * len(s) for s in ids], 0),
        "response_mask": pad_right([[0] * len(p) + [1] * len(c) for p, c in pairs], 0),
    }


def straightforward(model, batch, temperature):
    """The head and an fp64 log-softmax on every position of one forward, then the mask."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])[:, :-1]
    logps = (logits.double() / temperature).log_softmax(-1)
    logps = logps.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["response_mask"][:, 1:]
    return logps * mask, mask


def grads(model, logps, weights):
    model.zero_grad()
    (logps.double() * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logps_equal_the_full_forward_in_values_and_gradients(kind, temperature):
    model = tiny(**KINDS[kind]).train()
    batch = rows()
    weights = torch.randn(batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1, dtype=torch.float64)
    want, want_mask = straightforward(model, batch, temperature)
    want_grads = grads(model, want, weights)
    got, mask = response_logps(model, batch, temperature)
    got_grads = grads(model, got, weights)
    assert torch.equal(mask, want_mask) and got.shape == want.shape
    assert torch.allclose(got.double(), want, atol=1e-5) and (got[mask == 0] == 0).all()
    assert got_grads.keys() == want_grads.keys()
    for name, g in want_grads.items():  # fp32 rounding only: 1e-5 of the gradient's scale
        assert (got_grads[name] - g).abs().max() <= 1e-5 * max(1.0, g.abs().max()), name


def test_split_runs_each_distinct_prompt_once():
    batch = rows()
    split = split_prompts(**batch)
    of = split.prompt_of.tolist()
    assert split.prompt_ids.shape[0] == 4  # p1, p2, p3 and the response-less row (its prompt: the whole row)
    assert of[0] == of[1] == of[2] == of[5] and of[3] == of[4] == of[8] and len(set(of)) == 4
    assert int(split.response.sum()) == int(batch["response_mask"].sum())
    with pytest.raises(ValueError, match="right-padded"):
        split_prompts(batch["input_ids"], batch["attention_mask"].flip(-1), batch["response_mask"])


def test_generation_with_repeated_prompts_and_early_eos_equals_each_prompt_alone():
    """Greedy: rows of a repeated prompt share one prefill; a row that hits EOS leaves the batch without changing
    the others' tokens or logprobs."""
    model = tiny(attention="gqa", n_kv_heads=2).eval()
    prompts = [[5, 6, 7, 8], [9, 10], [5, 6, 7, 8], [11, 12, 13], [9, 10]]
    cfg = SamplingConfig(max_new_tokens=12)
    alone = [generate_ids(model, [p], cfg, eos_ids=set())[0] for p in prompts]
    eos = alone[3].tokens[4]  # one row ends early (maybe others too)
    got = generate_ids(model, prompts, cfg, eos_ids={eos})
    for g, a in zip(got, alone, strict=True):
        n = a.tokens.index(eos) + 1 if eos in a.tokens else len(a.tokens)
        assert g.tokens == a.tokens[:n]
        assert g.finish_reason == ("eos" if eos in a.tokens else "length")
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(a.logprobs[:n]), atol=1e-5)
