"""Read a llama.cpp GGUF checkpoint (llama or qwen2 architecture) as a transformers checkpoint.

    ckpt = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    ckpt.hf_config      # a config.json dict (model_type "llama" / "qwen2")
    ckpt.state_dict     # float32 tensors named as transformers names them (model.layers.0.self_attn.q_proj.weight)
    ckpt.tokenizer      # ragseek.model.tokenizer.Tokenizer, rebuilt from the tokenizer.ggml.* metadata

The header (metadata + tensor table) is parsed here with `struct`; every tensor is dequantised straight from
a memory map with `gguf.quants.dequantize` (numpy, vectorised per tensor). llama.cpp's
convert_hf_to_gguf permutes the rows of a llama q_proj / k_proj so that its rotary kernel can rotate
adjacent pairs (x_2i, x_2i+1); we undo that as transformers' GGUF loader does (LlamaTensorProcessor),
so that rotate_half pairs (x_i, x_i+d/2) again. qwen2 files are written unpermuted.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from ragseek.errors import FileError
from ragseek.model.tokenizer import Tokenizer, tokenizer_from_gguf_metadata

# architecture -> (transformers class, whether llama.cpp permuted the q/k rows)
ARCHITECTURES = {"llama": ("LlamaForCausalLM", True), "qwen2": ("Qwen2ForCausalLM", False)}

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_ROPE_SCALING_KEYS = {  # GGUF rope.scaling.* -> transformers rope_scaling keys
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}


@dataclass
class GGUFCheckpoint:
    hf_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    chat_template: str | None


# GGUF value types (gguf.GGUFValueType): struct formats of the scalars; 8 is a string, 9 an array.
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (rows, cols): GGUF lists the dims innermost first
    qtype: GGMLQuantizationType
    start: int  # byte offset in the file
    nbytes: int


def read_gguf_header(path: str | Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """The metadata (key -> str, int, float, bool or list) and the tensor table of a GGUF v2/v3 file.

    Parsed with `struct`, not gguf.GGUFReader: the reader builds a numpy view per string (a million for a
    49k vocabulary and its merges), which takes seconds; this takes 0.2 s. Errors name the file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise FileError(path, f"not a GGUF file (it starts with {magic!r}, expected b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse_header(buf)
            except (struct.error, UnicodeDecodeError, KeyError, ValueError) as e:
                problem = f"the GGUF file is truncated or corrupt ({type(e).__name__}: {e})"
                raise FileError(path, problem, "download it again") from e


def _parse_header(buf: mmap.mmap) -> tuple[dict[str, Any], list[TensorInfo]]:
    version, n_tensors, n_keys = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
    pos, meta = 24, {}
    for _ in range(n_keys):
        key, pos = _read_string(buf, pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        meta[key], pos = _read_value(buf, pos + 4, kind)
    table = []
    for _ in range(n_tensors):
        name, pos = _read_string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        table.append((name, tuple(reversed(dims)), GGMLQuantizationType(qtype), offset))
        pos += 4 + 8 * n_dims + 12
    align = meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    data_start = -(-pos // align) * align
    tensors = []
    for name, shape, qtype, offset in table:
        block, type_size = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * type_size
        if data_start + offset + nbytes > len(buf):
            raise ValueError(
                f"tensor {name} ends at byte {data_start + offset + nbytes}, past the file's {len(buf)}"
            )
        tensors.append(TensorInfo(name, shape, qtype, data_start + offset, nbytes))
    return meta, tensors


def _read_string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    if pos + 8 + n > len(buf):
        raise ValueError(f"a string of {n} bytes at byte {pos} runs past the end of the file")
    return buf[pos + 8 : pos + 8 + n].decode("utf-8"), pos + 8 + n


def _read_value(buf: mmap.mmap, pos: int, kind: int) -> tuple[Any, int]:
    if kind == _STRING:
        return _read_string(buf, pos)
    if kind != _ARRAY:
        fmt = _SCALAR_FORMATS[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    item_kind, n = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item_kind in _SCALAR_FORMATS:  # one numpy read for e.g. 49k token types
        dtype = np.dtype(_SCALAR_FORMATS[item_kind])
        if pos + n * dtype.itemsize > len(buf):
            raise ValueError(f"an array of {n} values at byte {pos} runs past the end of the file")
        return np.frombuffer(buf, dtype, n, pos).tolist(), pos + n * dtype.itemsize
    items = []
    for _ in range(n):
        item, pos = _read_value(buf, pos, item_kind)
        items.append(item)
    return items, pos


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its value (what a tokenizer is rebuilt from)."""
    return read_gguf_header(path)[0]


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Config, dequantised float32 weights (transformers names), tokenizer and chat template of a GGUF file."""
    path = Path(path)
    meta, tensors = read_gguf_header(path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    config = hf_config_from_gguf(meta, [t.name for t in tensors], path)
    permuted = ARCHITECTURES[arch][1]
    heads = {".attn_q.": config["num_attention_heads"], ".attn_k.": config["num_key_value_heads"]}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    state = {}
    for t in tensors:
        name = _hf_name(t.name)
        if name is None:  # e.g. rope_freqs.weight: Llama 3.1's rope scaling, baked into frequencies
            raise ValueError(
                f"{path}: tensor {t.name!r} has no place in a {arch} transformer (not supported)"
            )
        raw = data[t.start : t.start + t.nbytes].reshape(quant_shape_to_byte_shape(t.shape, t.qtype))
        w = torch.from_numpy(np.array(dequantize(raw, t.qtype), dtype=np.float32))
        part = next((p for p in heads if p in t.name), None)
        if permuted and part:
            w = unpermute_rotary(w, heads[part])
        state[name] = w
    missing = sorted(set(_expected_names(config)) - set(state))
    if missing:
        raise ValueError(f"{path}: missing tensors for a {arch} model ({len(missing)}): {missing[:8]}")
    tokenizer = tokenizer_from_gguf_metadata(meta, source=str(path))
    return GGUFCheckpoint(config, state, tokenizer, meta.get("tokenizer.chat_template"))


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute(w, n_head)`: per head, rows were reordered from halves [x_0..x_d/2 | x_d/2..x_d]
    to interleaved pairs (x_0, x_d/2, x_1, x_d/2+1, ...); view rows as (head, d/2, 2) and swap back to (head, 2, d/2).
    """
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _hf_name(gguf_name: str) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")  # "blk.3.attn_q", "weight" | "bias"
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if m and m[2] in _LAYER_TENSORS:
        return f"model.layers.{m[1]}.{_LAYER_TENSORS[m[2]]}.{suffix}"
    return None


def _expected_names(config: dict[str, Any]) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config["tie_word_embeddings"]:
        names.append("lm_head.weight")
    biases = ("q_proj", "k_proj", "v_proj") if config["model_type"] == "qwen2" else ()
    for i in range(config["num_hidden_layers"]):
        names += [f"model.layers.{i}.{name}.weight" for name in _LAYER_TENSORS.values()]
        names += [f"model.layers.{i}.self_attn.{proj}.bias" for proj in biases]
    return names


def hf_config_from_gguf(
    meta: dict[str, Any], tensor_names: list[str], path: str | Path = "GGUF"
) -> dict[str, Any]:
    """A transformers config.json dict from `{arch}.*` and `tokenizer.ggml.*` metadata."""
    arch = meta["general.architecture"]

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{path}: metadata key {arch}.{name} is missing")
        return value

    hidden, n_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // n_heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(
            f"{path}: rotary on part of each head (rope.dimension_count < head_dim) is not supported"
        )
    config = {
        "architectures": [ARCHITECTURES[arch][0]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": key("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": key("rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(meta, arch, path),
        "max_position_embeddings": key("context_length"),
        "vocab_size": key("vocab_size", len(meta.get("tokenizer.ggml.tokens", []))),
        "tie_word_embeddings": "output.weight" not in tensor_names,  # llama.cpp writes no copy of a tied head
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = False
    return config


def _rope_scaling(meta: dict[str, Any], arch: str, path: str | Path) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"{path}: rope scaling {kind!r} is not supported (supported: none, linear, yarn)")
    scaling: dict[str, Any] = {"rope_type": kind}
    for gguf_key, hf_key in _ROPE_SCALING_KEYS.items():
        if f"{arch}.rope.scaling.{gguf_key}" in meta:
            scaling[hf_key] = meta[f"{arch}.rope.scaling.{gguf_key}"]
    return scaling
