"""Data layer: chat templating, loss masks, truncation, packing, collators, malformed rows, the resumable sampler.

Masking tests run twice: with a tiny byte-level BPE trained here (fast) and with SmolLM2's real tokenizer (slow).
The reference for each mask is the ChatML text written out by hand in the test.
"""

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ragseek.defaults import smollm2_gguf
from ragseek.model.tokenizer import Tokenizer, load_tokenizer
from ragseek.train.data import (
    EpochSampler,
    collate_preference,
    collate_sft,
    load_preference,
    load_prompts,
    load_sft,
    pack_examples,
    tokenize_chat,
)

SMOL_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer() -> Tokenizer:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["What is 12 + 7? The answer is 19.", "system user assistant", "Hello there, how are you today?"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    return Tokenizer(backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)


@pytest.fixture(scope="module", params=["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def tok(request):
    return tiny_tokenizer() if request.param == "tiny" else load_tokenizer(smollm2_gguf())


def system_of(tok) -> str:
    """The default system turn the template adds (SmolLM2's), written out by hand."""
    return SMOL_SYSTEM if "SmolLM" in (tok.chat_template or "") else ""


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def trained_spans(ids, mask) -> list[list[int]]:
    spans, current = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            current.append(i)
        elif current:
            spans, current = [*spans, current], []
    return spans + ([current] if current else [])


# --------------------------------------------------------------------------------------------------------------------
def test_sft_prompt_masked_response_and_end_of_turn_trained(tok, tmp_path):
    path = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": "What is 12 + 7?", "response": "The answer is 19."}]
    )
    [ex] = load_sft(path, tok, max_len=512)
    ids, mask = ex["input_ids"], ex["loss_mask"]
    prompt = system_of(tok) + "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n"
    full = prompt + "The answer is 19.<|im_end|>\n"
    assert ids == tok.encode(full)  # piecewise encoding equals encoding the whole conversation
    n_prompt = len(tok.encode(prompt))
    assert mask[:n_prompt] == [0] * n_prompt  # every prompt position, system prompt and role header included
    assert (
        tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
        == "The answer is 19.<|im_end|>"
    )
    # the "\n" after <|im_end|> is not trained
    assert mask[-1] == 0 and ids[-2] == tok.eos_id and mask[-2] == 1


def test_multi_turn_trains_every_assistant_turn(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hello, how are you?"},
        {"role": "user", "content": "What is 12 + 7?"},
        {"role": "assistant", "content": "19"},
    ]
    ids, mask = tokenize_chat(tok, messages)
    # a system message given: no default one
    full = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
        "Hello, how are you?<|im_end|>\n<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n"
        "19<|im_end|>\n"
    )
    assert ids == tok.encode(full) and len(mask) == len(ids)
    spans = [tok.decode(s, skip_special_tokens=False) for s in trained_spans(ids, mask)]
    assert spans == ["Hello, how are you?<|im_end|>", "19<|im_end|>"]


def test_truncation_keeps_the_start_and_drops_rows_without_response(tok, tmp_path):
    rows = [
        {"prompt": "Hi", "response": "Hello there, how are you today? " * 4},
        {"prompt": "What is 12 + 7? " * 40, "response": "19"},
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    full_len = len(load_sft(path, tok, max_len=10_000)[0]["input_ids"])
    n_prompt = len(tok.encode(system_of(tok) + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"))
    with pytest.warns(UserWarning, match="dropped 1 row"):
        [ex] = load_sft(path, tok, max_len=n_prompt + 3)
    assert len(ex["input_ids"]) == n_prompt + 3 < full_len and sum(ex["loss_mask"]) == 3


def test_pack_examples_hand_worked():
    ex = [{"input_ids": [n] * n, "loss_mask": [1] * n} for n in (3, 4, 2, 5, 6)]
    rows = pack_examples(ex, max_len=7)
    assert [r["input_ids"] for r in rows] == [[3] * 3 + [4] * 4, [2] * 2 + [5] * 5, [6] * 6]
    assert [len(r["loss_mask"]) for r in rows] == [7, 7, 6]
    assert [r["segments"] for r in rows] == [[0] * 3 + [1] * 4, [0] * 2 + [1] * 5, [0] * 6]
    assert ex[0]["input_ids"] == [3] * 3  # inputs untouched


def test_load_sft_packed_keeps_every_token_and_mask(tok, tmp_path):
    rows = [{"prompt": f"What is {a} + 7?", "response": f"The answer is {a + 7}."} for a in range(10, 16)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    plain = load_sft(path, tok, max_len=256)
    packed = load_sft(path, tok, max_len=3 * max(len(e["input_ids"]) for e in plain), pack=True)
    assert len(packed) == 2 and all(
        len(r["input_ids"]) <= 3 * max(len(e["input_ids"]) for e in plain) for r in packed
    )
    for key in ("input_ids", "loss_mask"):
        assert sum((r[key] for r in packed), []) == sum((e[key] for e in plain), [])


def test_collate_sft_right_pads():
    rows = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8], "loss_mask": [1]}]
    batch = collate_sft(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    packed = collate_sft(
        pack_examples(rows, max_len=4) + [{"input_ids": [9], "loss_mask": [1], "segments": [0]}], 0
    )
    assert packed["segments"].tolist() == [[0, 0, 0, 1], [0, -1, -1, -1]]


def test_preference_pairs_and_collator(tok, tmp_path):
    rows = [
        {"prompt": "What is 12 + 7?", "chosen": "19", "rejected": "The answer is 18."},
        {"prompt": "Hello there", "chosen": "Hello, how are you?", "rejected": "No."},
    ]
    pairs = load_preference(write_jsonl(tmp_path / "pref.jsonl", rows), tok, max_len=512)
    for row, pair in zip(rows, pairs, strict=True):
        for side in ("chosen", "rejected"):
            ids, mask = pair[f"{side}_ids"], pair[f"{side}_mask"]
            prompt = system_of(tok) + f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n"
            assert ids == tok.encode(prompt + row[side] + "<|im_end|>\n")
            assert (
                tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
                == row[side] + "<|im_end|>"
            )
    batch = collate_preference(pairs, pad_id=tok.pad_id)
    lengths = [len(p["chosen_ids"]) for p in pairs] + [len(p["rejected_ids"]) for p in pairs]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_ids"][0, : lengths[0]].tolist() == pairs[0]["chosen_ids"]
    assert batch["input_ids"][2, : lengths[2]].tolist() == pairs[0]["rejected_ids"]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_id).all()
    assert (batch["response_mask"] <= batch["attention_mask"]).all()
    assert batch["response_mask"].sum(1).tolist() == [
        sum(p[f"{s}_mask"]) for s in ("chosen", "rejected") for p in pairs
    ]


def test_rl_prompts_keep_the_answer(tok, tmp_path):
    rows = [
        {"question": "What is 12 + 7?", "answer": "12 + 7 = 19\n#### 19"},
        {"prompt": "Hello there"},
        {"prompt": "What is 12 + 7? " * 60},
    ]
    with pytest.warns(UserWarning, match="dropped 1 row"):
        prompts = load_prompts(write_jsonl(tmp_path / "rl.jsonl", rows), tok, max_len=100)
    want = system_of(tok) + "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n"
    assert prompts[0]["prompt_ids"] == tok.encode(want)
    assert [(p["prompt"], p["answer"]) for p in prompts] == [
        ("What is 12 + 7?", "12 + 7 = 19\n#### 19"),
        ("Hello there", None),
    ]


@pytest.mark.parametrize(
    "line, loader, message",
    [
        ('{"prompt": "hi", "response": ', load_sft, "not valid JSON"),
        ('["prompt", "response"]', load_sft, "expected a JSON object"),
        ('{"prompt": "hi"}', load_sft, "needs 'prompt' and 'response', or 'messages'"),
        ('{"prompt": "hi", "response": 3}', load_sft, "'response' must be a string"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', load_sft, "last message must be the assistant"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', load_sft, r"messages\[0\] must be"),
        ('{"prompt": "hi", "chosen": "a"}', load_preference, r"missing \['rejected'\]"),
        ('{"text": "hi"}', load_prompts, "needs 'prompt' or 'question'"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, line, loader, message):
    good = {"prompt": "Hello there", "response": "Hi", "chosen": "Hi", "rejected": "No"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", line])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
        loader(path, tiny_tokenizer(), max_len=64)


@pytest.mark.slow
def test_gsm8k_prompts(shared_data):
    tok = load_tokenizer(smollm2_gguf())
    prompts = load_prompts(shared_data / "gsm8k" / "train.jsonl", tok, max_len=1024)
    assert len(prompts) == 7473
    assert all(p["answer"].rsplit("#### ", 1)[1].strip() for p in prompts)
    assert tok.decode(prompts[0]["prompt_ids"], skip_special_tokens=False).endswith(
        "How many clips did Natalia sell altogether in April and May?<|im_end|>\n<|im_start|>assistant\n"
    )


# --------------------------------------------------------------------------------------------------------------------
def test_epoch_sampler_covers_each_epoch_and_resumes():
    sampler = EpochSampler(n=10, batch_size=4, seed=7)
    stream = [sampler.next_batch() for _ in range(6)]  # 2 batches per epoch (the tail of 2 is skipped)
    for epoch in range(3):
        seen = stream[2 * epoch] + stream[2 * epoch + 1]
        assert seen == sampler.order(epoch)[:8] and len(set(seen)) == 8
    assert sampler.order(0) != sampler.order(1)

    replay = EpochSampler(n=10, batch_size=4, seed=7)
    for _ in range(3):
        replay.next_batch()
    resumed = EpochSampler(n=10, batch_size=4, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(replay.state_dict())))
    assert [resumed.next_batch() for _ in range(3)] == stream[3:]
    with pytest.raises(ValueError, match="same seed"):
        EpochSampler(n=10, batch_size=4, seed=8).load_state_dict(replay.state_dict())
