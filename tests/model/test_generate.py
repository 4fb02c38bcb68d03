"""Generation: cached batched decoding equals a plain argmax loop; logprobs, sampling controls, stop strings, streaming."""

import pytest
import torch

from ragseek.defaults import smollm2_gguf
from ragseek.model import ModelConfig, SamplingConfig, Transformer, generate, load_tokenizer, stream
from ragseek.model.decoding import generate_ids, sample_next


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(smollm2_gguf())


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        inter_dim=64,
        max_seq_len=128,
        init_std=0.5,
    )
    return Transformer(cfg).eval()


def argmax_loop(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_batched_greedy_equals_plain_loop_and_logprobs(model):
    # left padding inside the batch
    prompts = [[5, 17, 300, 42], [9, 8], [1000, 2000, 3000, 4000, 5000, 6000]]
    gens = generate_ids(model, prompts, SamplingConfig(max_new_tokens=10), eos_ids=set())
    for p, g in zip(prompts, gens, strict=False):
        assert g.tokens == argmax_loop(model, p, 10)
        assert g.finish_reason == "length"
        with torch.no_grad():
            logits = model(torch.tensor([p + g.tokens]))[0, len(p) - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(g.tokens)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(g.logprobs), expected, atol=1e-4)


def test_eos_ends_a_row(model):
    first = generate_ids(model, [[5, 6, 7]], SamplingConfig(max_new_tokens=6), eos_ids=set())[0].tokens
    g = generate_ids(model, [[5, 6, 7]], SamplingConfig(max_new_tokens=6), eos_ids={first[2]})[0]
    assert g.tokens == first[:3] and g.finish_reason == "eos"


def test_sampling_seed_top_k_top_p(model, tok):
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3)
    a, b = generate(model, tok, "hello", cfg)[0], generate(model, tok, "hello", cfg)[0]
    assert a.tokens == b.tokens
    greedy = generate(model, tok, "hello", max_new_tokens=8)[0]
    assert (
        generate(model, tok, "hello", max_new_tokens=8, temperature=1.5, top_k=1, seed=1)[0].tokens
        == greedy.tokens
    )
    # top_p: with p(top) = 0.7 >= top_p only the top token survives; with top_p = 0.8 the second may be drawn
    logits = torch.log(torch.tensor([[0.7, 0.25, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.6), g).tolist()) == {0}
    drawn = sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.8), g)
    assert set(drawn.tolist()) == {0, 1} and 0.65 < (drawn == 0).float().mean() < 0.78  # 0.7 / 0.95 = 0.737


def test_stop_strings_and_streaming(model, tok):
    full = generate(model, tok, "The answer", max_new_tokens=12)[0]
    assert "".join(stream(model, tok, "The answer", max_new_tokens=12)) == full.text
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    assume = stop.strip() and stop in full.text
    if not assume:
        pytest.skip("random model produced text without a usable stop string")
    cut = generate(model, tok, "The answer", max_new_tokens=12, stop=[stop])[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    assert "".join(stream(model, tok, "The answer", max_new_tokens=12, stop=[stop])) == cut.text


def test_too_long_is_a_clear_error(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_ids(model, [[1] * 100], SamplingConfig(max_new_tokens=100), eos_ids=set())


def test_compile_decoding_is_never_required(model, monkeypatch, capsys):
    """torch.compile of the decoding step is opt-in: without a C++ compiler it is not turned on, and a step that
    fails to compile warns once and decodes eagerly, with the same tokens."""
    import copy

    from torch._dynamo.exc import TorchDynamoException

    from ragseek.model import decoding

    prompts = [[5, 17, 300, 42], [9, 8]]
    cfg = SamplingConfig(max_new_tokens=6)
    eager = [g.tokens for g in generate_ids(model, prompts, cfg, eos_ids=set())]

    m = copy.deepcopy(model)
    monkeypatch.setattr(decoding.shutil, "which", lambda _: None)
    assert not decoding.compile_decoding(m) and not hasattr(m, "decode_step")
    monkeypatch.undo()

    def broken(*_):
        raise TorchDynamoException("no compiler")

    monkeypatch.setattr(torch, "compile", lambda fn, **_: broken)
    if decoding.compile_decoding(m):  # a machine without a C++ compiler has nothing to fall back from
        assert [g.tokens for g in generate_ids(m, prompts, cfg, eos_ids=set())] == eager
        assert capsys.readouterr().err.count("torch.compile failed") == 1
