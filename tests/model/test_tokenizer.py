"""Tokenizer: SmolLM2's GGUF tokenizer against transformers' (ids, decode, ChatML), save/load round trips."""

from __future__ import annotations

import json

import pytest

from ragseek.defaults import smollm2_gguf
from ragseek.model.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "Hello, world!",
    "hello world",
    " leading space",
    "trailing space ",
    "multiple    spaces   here",
    "tabs\tand\nnewlines\r\nand\n\n\nblank lines",
    "",
    " ",
    "\n",
    "1234567890 3.14159 -42 1e-5 0x1F",
    "Order #12345 costs $1,299.99 (20% off)",
    "naïve café résumé Zürich",
    "日本語のテキストです。中文也可以。",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "👋🏽 🤖🚀 👨‍👩‍👧‍👦 ❤️",
    "e\u0301 combining accent, \u200b zero width",
    "def f(x):\n    return x ** 2  # square\n",
    'print("hi")\nfor i in range(10):\n\tpass',
    "<html><body class='x'>Hi</body></html>",
    "SELECT * FROM docs WHERE id = 7;",
    "I'm sure they've said they'd go, we'll see",
    "CamelCaseIdentifier snake_case_name kebab-case",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after EOS",
    "<repo_name>ragseek<file_sep>README.md",
    "a<|im_end|>b<|im_start|>c",
    "The quick brown fox jumps over the lazy dog." * 3,
    "¡Hola! ¿Qué tal? — “quotes” and ‘single’ … ellipsis",
    "∑_{i=1}^{n} x_i² ≤ ∞ ≠ ∅",
    "URL: https://example.com/path?q=1&r=2#frag",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is RAG?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?\nThink step by step."},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "café 👋"},
        {"role": "assistant", "content": "Bonjour."},
    ],
    [{"role": "assistant", "content": "I start."}],
]

SMOLLM_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(smollm2_gguf())


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# --------------------------------------------------------------------------------------------------------------------
# fast: SmolLM2's GGUF tokenizer on its own


def test_special_ids(tok):
    # <|im_start|>, <|im_end|>, padding id 2 in the file
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.special_ids == set(range(17))  # <|endoftext|> ... <empty_output>: the 17 control tokens
    assert tok.vocab_size == 49152
    assert tok.token_to_id("<|im_end|>") == 2 and tok.token_to_id("no-such-token") is None


def test_pinned_ids(tok):
    # ids from transformers 5.23 AutoTokenizer(gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf)
    text = "<|im_start|>user\nHi 123 café 👋🏽<|im_end|>\n"
    assert tok.encode(text) == [
        1,
        4093,
        198,
        26843,
        216,
        33,
        34,
        35,
        37366,
        15107,
        235,
        229,
        10813,
        233,
        138,
        2,
        198,
    ]
    # the file says add_bos_token = False
    assert tok.encode(text, add_special_tokens=True) == tok.encode(text)


def test_round_trip_and_batch(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.decode(tok.encode("a<|im_end|>b<|im_start|>c")) == "abc"
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_chat_template_hand_worked(tok):
    user = [{"role": "user", "content": "Hi"}]
    assert (
        tok.apply_chat_template(user)
        == SMOLLM_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    own = [{"role": "system", "content": "Be brief."}, *user]
    assert tok.apply_chat_template(own, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    with pytest.raises(ValueError, match="at least one message"):
        tok.apply_chat_template([])


def test_non_chatml_template_raises(tok):
    llama3 = Tokenizer(tok.backend, eos_token="<|im_end|>", chat_template="{{ '<|start_header_id|>' }}")
    with pytest.raises(ValueError, match="not ChatML"):
        llama3.apply_chat_template([{"role": "user", "content": "hi"}])


def test_decode_stream_waits_for_whole_characters(tok):
    text = "Hi 👋🏽 café 日本"
    ids = tok.encode(text)
    step = tok.decode_stream()
    pieces = [step(i) for i in ids]
    assert "".join(pieces) == text
    assert "" in pieces  # an emoji spans several byte tokens: nothing is emitted until it is complete
    assert not any("\ufffd" in p for p in pieces)
    step = tok.decode_stream()
    assert "".join(step(i) for i in tok.encode("<|im_start|>hi<|im_end|>")) == "hi"  # specials skipped


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert (back.bos_id, back.eos_id, back.pad_id, back.special_ids) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
        tok.special_ids,
    )
    assert back.chat_template == tok.chat_template
    for conv in CONVERSATIONS:
        assert back.apply_chat_template(conv) == tok.apply_chat_template(conv)


def test_folder_special_tokens_from_other_files(tok, tmp_path):
    """special_tokens_map.json ({"content": ...} form), config.json ids, chat_template.jinja beside the config."""
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [0, 2]}))
    (tmp_path / "chat_template.jinja").write_text(tok.chat_template)
    back = load_tokenizer(tmp_path)
    assert (back.bos_id, back.eos_id, back.pad_id) == (0, 2, 2)
    assert back.apply_chat_template(CONVERSATIONS[0]) == tok.apply_chat_template(CONVERSATIONS[0])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a folder with tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"GGUF")  # a file not named .gguf is not guessed at
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "x.bin")


# --------------------------------------------------------------------------------------------------------------------
# slow: against transformers' tokenizer built from the same GGUF


@pytest.mark.slow
def test_ids_match_transformers(tok, hf_tok):
    for text in TEXTS:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == hf_tok.encode(text), text
        ids = tok.encode(text)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(
                ids, skip_special_tokens=skip
            ), text
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        hf_tok.bos_token_id,
        hf_tok.eos_token_id,
        hf_tok.pad_token_id,
    )
    assert set(hf_tok.all_special_ids) <= tok.special_ids  # bos, eos, unk, pad
    # what decode skips
    assert tok.special_ids == {i for i, t in hf_tok.added_tokens_decoder.items() if t.special}


@pytest.mark.slow
def test_chat_template_matches_transformers(tok, hf_tok):
    for conv in CONVERSATIONS:
        for gen in (True, False):
            theirs = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(conv, add_generation_prompt=gen) == theirs


@pytest.mark.slow
def test_saved_folder_reads_in_transformers(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
        assert hf.encode(text) == tok.encode(text, add_special_tokens=True), text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    # no template: plain ChatML, saved as CHATML_TEMPLATE
    plain = Tokenizer(tok.backend, eos_token="<|im_end|>")
    plain.save(tmp_path / "plain")
    hf_plain = AutoTokenizer.from_pretrained(str(tmp_path / "plain"))
    for conv in CONVERSATIONS:
        for gen in (True, False):
            theirs = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(conv, add_generation_prompt=gen) == theirs
            theirs = hf_plain.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert plain.apply_chat_template(conv, add_generation_prompt=gen) == theirs
