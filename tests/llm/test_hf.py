"""The hf backend (transformers) on a tiny random LlamaForCausalLM, checked by hand and against the local backend,
which loads the same folder into ragseek's own Transformer."""

import pytest
import torch

from ragseek.llm.hf import HFLLM, _stream_until_stop


@pytest.fixture(scope="module")
def hf_llm(tiny_dir):
    return HFLLM.from_path(tiny_dir)


CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["The capital of France is", CHAT, "a b c d e f g h i j k l m n o p", "x"]


def test_batched_complete_equals_one_by_one(hf_llm):
    small_batches = HFLLM(hf_llm.model, hf_llm.tokenizer, "hf", batch_size=3)
    batched = small_batches.complete(PROMPTS, max_tokens=8)
    assert batched == [hf_llm.complete([p], max_tokens=8)[0] for p in PROMPTS]
    assert all(batched)


def test_greedy_text_equals_the_local_backend(hf_llm, local_llm):
    assert hf_llm.complete(PROMPTS, max_tokens=8) == local_llm.complete(PROMPTS, max_tokens=8)


def test_logprobs_equal_hand_computation_and_local(hf_llm, local_llm):
    prompts, conts = ["The capital of France is", CHAT, "Answer:"], [" Paris", "yes", " no"]
    got = hf_llm.logprobs(prompts, conts)
    expected = []
    for p, c in zip(prompts, conts, strict=True):
        p_ids, c_ids = hf_llm.encode(p), hf_llm.tokenizer.encode(c, add_special_tokens=False)
        with torch.no_grad():
            logp = hf_llm.model(torch.tensor([p_ids + c_ids])).logits[0].log_softmax(-1)
        expected.append(sum(float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(c_ids)))
    assert got == pytest.approx(expected, abs=1e-4)
    assert local_llm.logprobs(prompts, conts) == pytest.approx(got, abs=1e-3)
    text = "héllo wörld <|im_end|>"
    (h,), (l,) = hf_llm.token_logprobs([text], top=2), local_llm.token_logprobs([text], top=2)
    assert h.tokens == l.tokens and h.text_offset == l.text_offset and "".join(h.tokens) == text
    assert h.token_logprobs[1:] == pytest.approx(l.token_logprobs[1:], abs=1e-3)


def test_stream_and_stop_strings(hf_llm):
    full = hf_llm.complete(["The answer"], max_tokens=12)[0]
    assert "".join(hf_llm.stream("The answer", max_tokens=12)) == full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = full[: full.find(stop)]
    assert hf_llm.complete(["The answer"], max_tokens=12, stop=[stop]) == [cut]
    assert "".join(hf_llm.stream("The answer", max_tokens=12, stop=[stop])) == cut


def test_stream_until_stop_holds_back_a_split_stop_string():
    pieces = ["Hello wor", "ld. EN", "D and more"]
    # "EN" waited: it could start END
    assert list(_stream_until_stop(pieces, ["END"])) == ["Hello w", "orld. "]
    assert "".join(_stream_until_stop(pieces, [])) == "Hello world. END and more"


def test_hf_spec(tiny_dir):
    from ragseek.llm import load_llm

    llm = load_llm(f"hf:{tiny_dir}")
    assert isinstance(llm, HFLLM) and llm.name == f"hf:{tiny_dir}"
    assert type(llm.model).__name__ == "LlamaForCausalLM"


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="local transformers folder"):
        HFLLM.from_path(tmp_path / "nowhere")


@pytest.mark.slow
def test_smollm2_hf_and_local_agree():
    """The dequantised SmolLM2 folder in transformers and in ragseek: same logprobs, same greedy answer."""
    from ragseek.defaults import smollm2_gguf
    from ragseek.llm.local import LocalLLM
    from ragseek.model.checkpoint import gguf_to_folder

    folder = gguf_to_folder(smollm2_gguf())
    hf, local = HFLLM.from_path(folder), LocalLLM.from_path(folder)
    chats = [
        [{"role": "user", "content": q}] for q in ("What is the capital of France?", "Name a primary colour.")
    ]
    assert hf.complete(chats, max_tokens=16) == local.complete(chats, max_tokens=16)
    conts = [" Paris is the capital.", " Red."]
    assert hf.logprobs(chats, conts) == pytest.approx(local.logprobs(chats, conts), abs=2e-3)
