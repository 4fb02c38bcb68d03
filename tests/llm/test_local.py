"""The local backend (ragseek's Transformer): batching changes nothing, logprobs equal a hand computation."""

import pytest
import torch

from ragseek.llm.local import LocalLLM

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [
    "The capital of France is",
    CHAT,
    "a b c d e f g h i j k l m n o p",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    "x",
]


def hand_logprob(llm, prompt_text, continuation):
    """sum_i log softmax(logits)[c_i] from one unpadded forward over prompt + continuation."""
    p, c = llm.tokenizer.encode(prompt_text), llm.tokenizer.encode(continuation)
    with torch.no_grad():
        logp = llm.model(torch.tensor([p + c]))[0].log_softmax(-1)
    return sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c))


def test_batched_complete_equals_one_by_one(local_llm):
    small_batches = LocalLLM(local_llm.model, local_llm.tokenizer, batch_size=2)
    batched = small_batches.complete(PROMPTS, max_tokens=8)
    single = [local_llm.complete([p], max_tokens=8)[0] for p in PROMPTS]
    assert batched == single
    assert all(batched) and len(set(batched)) == len(PROMPTS)


def test_chat_prompts_use_the_chat_template(local_llm):
    from ragseek.model.decoding import generate

    rendered = local_llm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>") and rendered.endswith("<|im_start|>assistant\n")
    assert local_llm.complete([CHAT], max_tokens=6) == [
        generate(local_llm.model, local_llm.tokenizer, rendered, max_new_tokens=6)[0].text
    ]


def test_logprobs_equal_hand_computation(local_llm):
    # one-token continuations of a shared prompt ("yes" / "no" after CHAT) take the one-forward path
    prompts = ["The capital of France is", CHAT, "a b c d e f g h i j k l m n o p q r s t", "Answer:", CHAT]
    conts = [" Paris", "yes", " u v w", " no", "no"]
    # several right-padded batches
    tight = LocalLLM(local_llm.model, local_llm.tokenizer, max_batch_tokens=40)
    got = tight.logprobs(prompts, conts)
    texts = [p if isinstance(p, str) else local_llm.render(p) for p in prompts]
    expected = [hand_logprob(local_llm, t, c) for t, c in zip(texts, conts, strict=True)]
    assert got == pytest.approx(expected, abs=1e-4)
    assert local_llm.logprobs(prompts, conts) == pytest.approx(expected, abs=1e-4)  # one batch, more padding
    with pytest.raises(ValueError, match="one continuation per prompt"):
        local_llm.logprobs(prompts, conts[:2])


def test_token_logprobs_spans_and_values(local_llm):
    text = "héllo wörld 🙂 <|im_start|>x"
    (tl,) = local_llm.token_logprobs([text], top=3)
    assert "".join(tl.tokens) == text
    assert all(text[o : o + len(t)] == t for t, o in zip(tl.tokens, tl.text_offset, strict=True))
    ids = local_llm.tokenizer.encode(text)
    with torch.no_grad():
        logp = local_llm.model(torch.tensor([ids]))[0].log_softmax(-1)
    expected = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert tl.token_logprobs[0] is None and tl.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert tl.top_logprobs[0] is None
    assert [max(t.values()) for t in tl.top_logprobs[1:]] == pytest.approx(
        logp[:-1].max(-1).values.tolist(), abs=1e-4
    )


def test_stream_equals_complete_and_stop_strings(local_llm):
    full = local_llm.complete(["The answer"], max_tokens=12)[0]
    assert "".join(local_llm.stream("The answer", max_tokens=12)) == full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = full[: full.find(stop)]
    assert local_llm.complete(["The answer"], max_tokens=12, stop=[stop]) == [cut]
    assert "".join(local_llm.stream("The answer", max_tokens=12, stop=[stop])) == cut


def test_too_long_is_a_clear_error(local_llm):
    with pytest.raises(ValueError, match="max_seq_len"):
        local_llm.logprobs(["word " * 300], [" end"])
    with pytest.raises(ValueError, match="max_seq_len"):
        local_llm.complete(["word " * 300], max_tokens=4)


@pytest.mark.slow
def test_smollm2_answers_and_scores_the_right_answer_higher():
    """SmolLM2-135M knows this one. (Its P("Yes") vs P("No") for yes/no questions is not informative: it prefers
    "No" by ~1.7 nats whether the statement is true or false, so no yes/no assertion here.)"""
    llm = LocalLLM.from_path("base")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in llm.complete([chat], max_tokens=12)[0]
    paris, london = llm.logprobs(
        [chat, chat], ["The capital of France is Paris.", "The capital of France is London."]
    )
    assert paris > london + 1


def test_an_adapter_folder_loads_onto_its_base_merged(tiny_dir, tmp_path):
    """local:ADAPTER reads base_model_name_or_path, loads the adapter and merges it: the same logits as the
    unmerged LoRA model it was saved from, and different from the base's."""
    from ragseek.llm.base import load_llm
    from ragseek.model import Transformer
    from ragseek.model.lora import LoRAConfig, apply_lora, lora_layers, save_adapter

    torch.manual_seed(0)
    model = apply_lora(Transformer.from_pretrained(tiny_dir), LoRAConfig(r=4, dropout=0.0)).eval()
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    adapter = save_adapter(model, tmp_path / "adapter", base=tiny_dir)
    llm = load_llm(f"local:{adapter}")
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        want, got = model(ids), llm.model(ids)
        base = Transformer.from_pretrained(tiny_dir)(ids)
    assert llm.name == f"local:{adapter}" and not list(lora_layers(llm.model))  # merged into plain linears
    assert (got - want).abs().max() < 1e-4 and (base - want).abs().max() > 1e-3
