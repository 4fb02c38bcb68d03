"""read_gguf: tiny GGUF files written here with gguf.GGUFWriter (fast), and SmolLM2 against transformers (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from ragseek.defaults import smollm2_gguf
from ragseek.model.gguf import hf_config_from_gguf, read_gguf, read_gguf_header, unpermute_rotary
from ragseek.model.tokenizer import load_tokenizer

F32, F16, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
DIM, HEADS, KV_HEADS, INTER, LAYERS = 64, 4, 2, 96, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute (what its writer applies to q_proj / k_proj)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_vocab() -> tuple[list[str], list[int]]:
    alphabet = [chr(b) for b in range(ord("!"), ord("~") + 1)] + [
        chr(b) for b in range(ord("¡"), ord("¬") + 1)
    ]
    # 256 in all
    alphabet += [chr(b) for b in range(ord("®"), ord("ÿ") + 1)] + [chr(256 + n) for n in range(68)]
    merged = ["".join(m.split(" ")) for m in MERGES]
    tokens = SPECIALS + alphabet + merged + ["<think>"]
    types = [3] * len(SPECIALS) + [1] * (len(alphabet) + len(merged)) + [4]
    return tokens, types


def hf_weights(arch: str, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in transformers' layout and naming."""
    rng = np.random.default_rng(seed)
    vocab = len(tiny_vocab()[0])
    hd = DIM // HEADS

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    out = {"model.embed_tokens.weight": w(vocab, DIM), "model.norm.weight": w(DIM)}
    if not tied:
        out["lm_head.weight"] = w(vocab, DIM)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": w(DIM),
            p + "post_attention_layernorm.weight": w(DIM),
            p + "self_attn.q_proj.weight": w(HEADS * hd, DIM),
            p + "self_attn.k_proj.weight": w(KV_HEADS * hd, DIM),
            p + "self_attn.v_proj.weight": w(KV_HEADS * hd, DIM),
            p + "self_attn.o_proj.weight": w(DIM, HEADS * hd),
            p + "mlp.gate_proj.weight": w(INTER, DIM),
            p + "mlp.up_proj.weight": w(INTER, DIM),
            p + "mlp.down_proj.weight": w(DIM, INTER),
        }
        if arch == "qwen2":
            out |= {
                p + f"self_attn.{x}_proj.bias": w(n * hd)
                for x, n in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS))
            }
    return out


GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    stem, _, suffix = hf.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, i, rest = stem.split(".", 3)
        return f"blk.{i}.{GGUF_NAMES[rest]}.{suffix}"
    return f"{GGUF_NAMES[stem]}.{suffix}"


def write_tiny_gguf(
    path,
    arch: str = "llama",
    tied: bool = False,
    qtype: gguf.GGMLQuantizationType = F32,
    skip: str | None = None,
    extra: dict[str, np.ndarray] | None = None,
    add_bos: bool = False,
) -> dict[str, np.ndarray]:
    """A GGUF as llama.cpp's converter writes one (q/k rows permuted for llama); returns the transformers weights."""
    weights = hf_weights(arch, tied)
    tokens, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(DIM // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    for hf, t in weights.items():
        if hf == skip:
            continue
        if arch == "llama" and ".q_proj." in hf:
            t = llama_cpp_permute(t, HEADS, HEADS)
        elif arch == "llama" and ".k_proj." in hf:
            t = llama_cpp_permute(t, HEADS, KV_HEADS)
        if t.ndim == 2 and qtype == Q8_0:
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(t, Q8_0), raw_dtype=Q8_0)
        else:
            w.add_tensor(gguf_name(hf), t.astype(np.float16) if t.ndim == 2 and qtype == F16 else t)
    for name, t in (extra or {}).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


# --------------------------------------------------------------------------------------------------------------------
# the q/k permutation


def test_unpermute_hand_worked():
    # one head of dim 4: llama.cpp stores rows (0, 2, 1, 3) -- pairs (x_i, x_{i+d/2}) side by side
    rows = torch.arange(4.0).reshape(4, 1)
    assert torch.equal(
        torch.from_numpy(llama_cpp_permute(rows.numpy(), 1)).flatten(), torch.tensor([0.0, 2, 1, 3])
    )
    assert torch.equal(unpermute_rotary(torch.tensor([[0.0], [2], [1], [3]]), 1).flatten(), torch.arange(4.0))


@pytest.mark.parametrize(("n_head", "n_kv"), [(4, 4), (4, 2), (9, 3)])
def test_unpermute_inverts_llama_cpp(n_head, n_kv):
    w = np.random.default_rng(0).standard_normal((n_kv * 16, 24)).astype(np.float32)
    back = unpermute_rotary(torch.from_numpy(llama_cpp_permute(w, n_head, n_kv)), n_kv)
    assert torch.equal(back, torch.from_numpy(w))


# --------------------------------------------------------------------------------------------------------------------
# tiny files


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("llama", True), ("qwen2", False)])
def test_f32_weights_come_back_exactly(tmp_path, arch, tied):
    path = tmp_path / "tiny.gguf"
    weights = write_tiny_gguf(path, arch=arch, tied=tied)
    ckpt = read_gguf(path)
    assert set(ckpt.state_dict) == set(weights)
    for name, t in weights.items():
        assert ckpt.state_dict[name].dtype == torch.float32
        assert torch.equal(ckpt.state_dict[name], torch.from_numpy(t)), name
    c = ckpt.hf_config
    assert (c["model_type"], c["tie_word_embeddings"]) == (arch, tied)
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (DIM, INTER, LAYERS)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (
        HEADS,
        KV_HEADS,
        DIM // HEADS,
    )
    assert (c["rope_theta"], c["max_position_embeddings"], c["vocab_size"]) == (
        50000.0,
        256,
        len(tiny_vocab()[0]),
    )
    assert c["rms_norm_eps"] == pytest.approx(1e-6) and c["rope_scaling"] is None
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (1, 2, None)


def test_f16_and_q8_0_dequantise_close(tmp_path):
    # F16 rel. error 2^-11; Q8_0 step = max|w| / 127 per 32 values
    for qtype, tol in ((F16, 2e-3), (Q8_0, 3e-2)):
        path = tmp_path / f"{qtype.name}.gguf"
        weights = write_tiny_gguf(path, qtype=qtype)
        state = read_gguf(path).state_dict
        for name, t in weights.items():
            ref = torch.from_numpy(t)
            err = (state[name] - ref).abs().max().item()
            assert err <= tol * ref.abs().max().item(), (qtype.name, name, err)
            if t.ndim == 2:
                assert err > 0, f"{name} was not quantised"


@pytest.mark.parametrize("qtype", [F32, Q8_0])
def test_header_equals_gguf_reader(tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, arch="qwen2", qtype=qtype)
    reader = gguf.GGUFReader(path)
    ref = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    meta, tensors = read_gguf_header(path)
    assert meta == ref
    assert all(type(meta[k]) is type(ref[k]) for k in ref)
    assert [(t.name, t.qtype, t.start, t.nbytes) for t in tensors] == [
        (r.name, r.tensor_type, r.data_offset, r.n_bytes) for r in reader.tensors
    ]
    assert [t.shape for t in tensors] == [tuple(int(n) for n in reversed(r.shape)) for r in reader.tensors]


def test_tiny_tokenizer_from_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, add_bos=True)
    tok = read_gguf(path).tokenizer
    ids = tok.encode("hello world<|im_end|><think>")
    assert [tok.backend.id_to_token(i) for i in ids] == ["hello", "Ġworld", "<|im_end|>", "<think>"]
    assert tok.encode("hello", add_special_tokens=True) == [1, *tok.encode("hello")]  # add_bos_token
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.special_ids == {0, 1, 2}  # <think> is user-defined: matched whole, but not special
    assert tok.decode(ids) == "hello world<think>"
    assert load_tokenizer(path).encode("hello world") == tok.encode("hello world")


def test_rope_scaling_metadata():
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": 64,
        "llama.attention.head_count": 4,
        "llama.feed_forward_length": 96,
        "llama.block_count": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.context_length": 32768,
        "llama.vocab_size": 10,
        "llama.rope.scaling.type": "yarn",
        "llama.rope.scaling.factor": 4.0,
        "llama.rope.scaling.original_context_length": 8192,
    }
    config = hf_config_from_gguf(meta, [])
    assert config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert config["num_key_value_heads"] == 4 and config["head_dim"] == 16 and config["rope_theta"] == 10000.0
    with pytest.raises(ValueError, match="rope scaling 'longrope' is not supported"):
        hf_config_from_gguf(meta | {"llama.rope.scaling.type": "longrope"}, [])


# --------------------------------------------------------------------------------------------------------------------
# errors


def test_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("hello, I am a text file")
    with pytest.raises(ValueError, match=r"model\.gguf: not a GGUF file"):
        read_gguf(path)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_tokenizer(path)


@pytest.mark.parametrize("keep", [30, 3000, -100])
def test_truncated(tmp_path, keep):
    full, cut = tmp_path / "full.gguf", tmp_path / "cut.gguf"
    write_tiny_gguf(full)
    data = full.read_bytes()
    cut.write_bytes(data[:keep])  # inside the header, inside the vocabulary, inside the last tensor
    with pytest.raises(ValueError, match=r"cut\.gguf: the GGUF file is truncated or corrupt"):
        read_gguf(cut)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"falcon\.gguf: GGUF architecture 'falcon' is not supported"):
        read_gguf(path)


def test_missing_and_unknown_tensors(tmp_path):
    write_tiny_gguf(tmp_path / "a.gguf", skip="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(
        ValueError, match=r"a\.gguf: missing tensors .*model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        read_gguf(tmp_path / "a.gguf")
    write_tiny_gguf(tmp_path / "b.gguf", extra={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match=r"b\.gguf: tensor 'rope_freqs\.weight'"):
        read_gguf(tmp_path / "b.gguf")


# --------------------------------------------------------------------------------------------------------------------
# against transformers' GGUF loader


def transformers_gguf(path):
    from transformers import AutoModelForCausalLM, GgufConfig

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, quantization_config=GgufConfig(dequantize=True)
    )


CONFIG_FIELDS = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "vocab_size",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
]


def assert_same_as_transformers(path):
    ckpt, model = read_gguf(path), transformers_gguf(path)
    theirs = model.state_dict()
    if ckpt.hf_config["tie_word_embeddings"]:
        theirs.pop("lm_head.weight")  # transformers lists the tied head; a tied checkpoint stores no copy
    assert set(ckpt.state_dict) == set(theirs)
    for name, t in theirs.items():
        assert torch.equal(ckpt.state_dict[name], t), name
    config = model.config
    assert ckpt.hf_config["model_type"] == config.model_type
    for field in CONFIG_FIELDS:
        theirs_value = getattr(config, field, None)
        if field == "head_dim" and theirs_value is None:  # Qwen2Config has none: it is hidden_size // heads
            theirs_value = config.hidden_size // config.num_attention_heads
        assert ckpt.hf_config[field] == theirs_value, field
    assert ckpt.hf_config["rope_theta"] == config.rope_parameters["rope_theta"]
    assert config.rope_parameters["rope_type"] == "default" and ckpt.hf_config["rope_scaling"] is None
    return ckpt


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_q8_0_matches_transformers(tmp_path, arch):
    from transformers import AutoTokenizer

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, arch=arch, qtype=Q8_0, add_bos=arch == "llama")
    tok = assert_same_as_transformers(path).tokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in [
        "hello world",
        "hello  world\n\n 12345 hello's",
        "<|im_start|>hello<|im_end|><think>",
        "é 👋",
    ]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == hf.encode(text), text


@pytest.mark.slow
def test_smollm2_matches_transformers():
    path = smollm2_gguf()
    ckpt = assert_same_as_transformers(path)
    assert ckpt.hf_config["model_type"] == "llama" and ckpt.hf_config["tie_word_embeddings"]
    assert ckpt.chat_template is not None and ckpt.chat_template.startswith("{% for message in messages %}")
    assert len(ckpt.state_dict) == 2 + 30 * 9


# --------------------------------------------------------------------------------------------------------------------
# the conversion cache

CONVERT = """
import os, sys, time
from pathlib import Path
from ragseek.model.checkpoint import gguf_to_folder
Path(sys.argv[2] + f".ready{os.getpid()}").touch()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
print(gguf_to_folder(Path(sys.argv[1])))
"""


def test_first_conversions_at_once_share_one_folder_and_leave_no_temp_files(tmp_path):
    """Six first runs at once with a fresh cache (six `ragseek eval qa` started together): each gets the converted
    folder, none crashes, and the cache holds that folder alone: no temporary folder, no lock file."""

    write_tiny_gguf(tmp_path / "m.gguf")
    env = {**os.environ, "RAGSEEK_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT, str(tmp_path / "m.gguf"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for _ in range(6)
    ]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("go.ready*"))) < len(procs) and time.time() < deadline:
        time.sleep(0.05)
    # all six are past their imports: released together
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err[-1500:] for _, err in outs]
    folders = {out.strip() for out, _ in outs}
    assert len(folders) == 1
    folder = Path(folders.pop())
    assert os.listdir(tmp_path / "cache" / "gguf") == [folder.name]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
