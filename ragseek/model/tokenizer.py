"""Tokenizer: a HuggingFace `tokenizers.Tokenizer` plus the special tokens and the ChatML chat template.

Three ways in, one way out:
    load_tokenizer("folder/")      tokenizer.json + tokenizer_config.json (special_tokens_map.json, config.json)
    load_tokenizer("model.gguf")   the byte-level BPE rebuilt from the GGUF metadata (`tokenizer.ggml.*`)
    tok.save("folder/")            tokenizer.json + tokenizer_config.json, readable by load_tokenizer and AutoTokenizer

The GGUF rebuild follows transformers' `integrations/gguf/gguf_tokenizer_mapping.py` (byte_level_tokenizer,
add_gguf_special_tokens, set_split_regex), so ids match `AutoTokenizer.from_pretrained(dir, gguf_file=name)`.
The chat template is ChatML written by hand: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, the
template's default system prompt when the conversation has none, then `<|im_start|>assistant\\n`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from ragseek.errors import reading

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types (tokenizer.ggml.token_type)

# Split regexes for `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp and transformers' GGUF loader use them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm_split() -> pre_tokenizers.PreTokenizer:
    # SmolLM's own tokenizer.json: digits one by one, then GPT-2's split. Its vocabulary has no multi-digit token,
    # so ids equal those of the plain GPT-2 split that transformers' GGUF loader uses.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _regex_split(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    return lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt2": _gpt2_split,
    "smollm": _smollm_split,
    "llama-bpe": _regex_split(_LLAMA3_SPLIT),
    "llama3": _regex_split(_LLAMA3_SPLIT),
    "qwen2": _regex_split(_QWEN2_SPLIT),
    "deepseek-r1-qwen": _regex_split(_QWEN2_SPLIT),
}

# The default system prompt inside a ChatML template: a string literal '<|im_start|>system\n...<|im_end|>'.
_CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*)<\|im_end\|>")


# Plain ChatML as jinja (no default system prompt): what `save` writes for a tokenizer that came without a template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _chatml_default_system(template: str) -> str | None:
    if "<|im_start|>" not in template or "<|im_end|>" not in template:
        raise ValueError(
            "the chat template is not ChatML (<|im_start|>role ... <|im_end|>), the only format ragseek renders; "
            "pass the prompt as raw text instead"
        )
    m = _CHATML_DEFAULT_SYSTEM.search(template)
    return m[1].replace("\\n", "\n") if m else None


class Tokenizer:
    """Encode/decode with a `tokenizers.Tokenizer`, know the special ids, render ChatML."""

    def __init__(
        self,
        backend: HFTokenizer,
        eos_token: str,
        bos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
    ):
        self.backend = backend
        self.eos_token, self.bos_token, self.pad_token = eos_token, bos_token, pad_token
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template  # the source text, kept for `save`; rendering is by hand below
        for token in (eos_token, bos_token, pad_token):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"special token {token!r} is not in the vocabulary")

    # --- ids
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text (<|im_start|>) are matched whole."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> Callable[[int], str]:
        """An incremental detokenizer: call it with each new id; it returns the text that id completes,
        or "" while a UTF-8 character is still split across tokens (byte-level BPE splits emoji)."""
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        return lambda token_id: stream.step(self.backend, token_id) or ""

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        """The padding id, or the EOS id when the tokenizer names no padding token."""
        return self.eos_id if self.pad_token is None else self.backend.token_to_id(self.pad_token)

    @property
    def special_ids(self) -> set[int]:
        added = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        return added | {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}

    # --- chat
    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, led by the template's default system
        message when the first message is not a system one, and `<|im_start|>assistant\\n` to prompt a reply."""
        if not messages:
            raise ValueError("apply_chat_template needs at least one message (as in transformers)")
        default_system = _chatml_default_system(self.chat_template) if self.chat_template else None
        parts = []
        if messages and messages[0]["role"] != "system" and default_system is not None:
            parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
        parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    # --- files
    def save(self, folder: str | Path) -> None:
        """tokenizer.json + tokenizer_config.json, as transformers writes them (AutoTokenizer reads the folder)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token or self.eos_token,
            "add_bos_token": self.add_bos_token,
            "chat_template": self.chat_template or CHATML_TEMPLATE,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# loading


def load_tokenizer(path: str | Path) -> Tokenizer:
    """From a transformers folder (tokenizer.json, ...) or a .gguf file (its `tokenizer.ggml.*` metadata)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from ragseek.model.gguf import read_gguf_metadata

        return tokenizer_from_gguf_metadata(read_gguf_metadata(path), source=str(path))
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return _from_folder(path)
    raise FileNotFoundError(
        f"{path}: expected a folder with tokenizer.json (a transformers checkpoint) or a .gguf file"
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with reading(path, "valid JSON", "it is truncated or corrupt: save or download the tokenizer again"):
        return json.loads(path.read_text())


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def _from_folder(folder: Path) -> Tokenizer:
    with reading(
        folder / "tokenizer.json", "a readable tokenizer.json", "save or download the tokenizer again"
    ):
        backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    model_config = _read_json(folder / "config.json")

    # a special token is given as "<|im_end|>", {"content": "<|im_end|>", ...}, or the model's token id
    def special(name: str) -> str | None:
        value = config.get(name) or special_map.get(name)
        if isinstance(value, dict):
            value = value["content"]
        token_id = _first(model_config.get(f"{name}_id"))
        return value if value is not None or token_id is None else backend.id_to_token(token_id)

    eos = special("eos_token")
    if eos is None:
        raise ValueError(
            f"{folder}: no eos_token in tokenizer_config.json / special_tokens_map.json / config.json"
        )
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    # transformers >= 4.50 writes it apart
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return Tokenizer(
        backend,
        eos_token=eos,
        bos_token=special("bos_token"),
        pad_token=special("pad_token"),
        chat_template=template,
        add_bos_token=bool(config.get("add_bos_token", False)),
    )


@cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet: ' ' -> 'Ġ', '\\n' -> 'Ċ')."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


def tokenizer_from_gguf_metadata(meta: dict[str, Any], source: str = "GGUF") -> Tokenizer:
    """Byte-level BPE from llama.cpp's keys: tokenizer.ggml.{model, pre, tokens, token_type, merges, *_token_id}.

    Tokens spelled outside the byte alphabet are respelled byte by byte; control tokens (type 3) become special
    added tokens and user-defined ones (type 4) plain added tokens, so both are matched whole in text.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') GGUF tokenizers are "
            "supported: load the model's transformers folder (tokenizer.json) instead"
        )
    pre = meta.get("tokenizer.ggml.pre", "gpt2")  # absent in old files: GPT-2's split, as in transformers
    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre {pre!r} is not supported (supported: {sorted(PRE_TOKENIZERS)})"
        )
    if "tokenizer.ggml.merges" not in meta:
        raise ValueError(
            f"{source}: a byte-level BPE tokenizer needs tokenizer.ggml.merges, which the file lacks"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    # a control token spelled outside the byte alphabet is a llama.cpp mislabel: skipped, as transformers does
    control = [t for t, k in zip(tokens, types, strict=True) if k == _CONTROL and set(t) <= alphabet]
    user_defined = [t for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])

    ids = {key: meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding")}
    bos, eos, pad = (None if i is None else tokens[i] for i in ids.values())
    if eos is None:
        raise ValueError(f"{source}: no tokenizer.ggml.eos_token_id in the metadata")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:  # what `add_special_tokens=True` adds
        lead, tail = (f"{bos}:0 " if add_bos else ""), (f" {eos}:0" if add_eos else "")
        specials = [(bos, ids["bos"])] if add_bos else []
        backend.post_processor = processors.TemplateProcessing(
            single=f"{lead}$A:0{tail}",
            pair=f"{lead}$A:0{tail} $B:1",
            special_tokens=specials + ([(eos, ids["eos"])] if add_eos else []),
        )
    return Tokenizer(
        backend,
        eos_token=eos,
        bos_token=bos,
        pad_token=pad,
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=add_bos,
    )
