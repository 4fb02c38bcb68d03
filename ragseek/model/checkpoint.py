"""from_pretrained / save_pretrained: transformers-style folders (safetensors) and GGUF files.

Folder layout: config.json (a transformers config for llama / qwen2 / deepseek_v3, or {"model_type": "ragseek",
"ragseek": ModelConfig} for combinations transformers has no class for) + model.safetensors (or shards).
Tensor names are transformers' (`model.layers.0.self_attn.q_proj.weight`); ragseek's own modules use the same
names without the `model.` prefix, except that routed experts are stacked into one (E, ...) tensor per projection
and MTP module k is stored as DeepSeek-V3 stores it, as layer n_layers + k.

A .gguf file is dequantised once (ragseek.model.gguf) and cached as such a folder under the user cache dir.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ragseek.defaults import cache_dir, cache_entry
from ragseek.errors import FileError, reading
from ragseek.model.config import ModelConfig
from ragseek.model.transformer import Transformer

_EXPERT = re.compile(
    r"^((?:layers\.\d+|mtp\.\d+\.block)\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
_MTP_OWN = {"enorm", "hnorm", "eh_proj", "shared_head.norm"}
# V3 stores copies of the shared weights
_MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        path = gguf_to_folder(path)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise FileNotFoundError(
            f"{path}: expected a folder with config.json and *.safetensors (a transformers checkpoint) or a .gguf file"
        )
    cfg = _read_config(path / "config.json")
    tensors = _read_safetensors(path)
    # load the MTP modules a V3 checkpoint carries as layers n_layers, n_layers+1..
    if cfg.model_type == "deepseek_v3":
        depth = 0
        while f"model.layers.{cfg.n_layers + depth}.eh_proj.weight" in tensors:
            depth += 1
        cfg.mtp_depth = depth
    with torch.device("meta"):
        model = Transformer(cfg)
    state = hf_to_ragseek(tensors, cfg)
    _check_state(model, state, path)
    model.load_state_dict(state, strict=False, assign=True)
    # buffers are not in the checkpoint: rebuild them off the meta device
    model.rotary = type(model.rotary)(cfg)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for moe in model.moe_layers:
        moe.gate.bias.data = moe.gate.bias.data.float()  # the routing bias stays fp32 (as in transformers)
    return model.to(dtype).eval() if dtype != torch.float32 else model.eval()


def save_model(model: Transformer, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    (path / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
    tensors = ragseek_to_hf(model.state_dict(), cfg)
    save_file(
        {k: v.detach().contiguous() for k, v in tensors.items()},
        str(path / "model.safetensors"),
        {"format": "pt"},
    )


# ---------------------------------------------------------------------------------------------------------------------
# name mapping


def hf_to_ragseek(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        key = _hf_key_to_ragseek(name, cfg)
        if key is None:
            continue
        m = _EXPERT.match(key)
        if m:
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = t
            continue
        out[key] = t
    for (prefix, proj), per_expert in experts.items():
        out[f"{prefix}.{proj}"] = torch.stack([per_expert[i] for i in sorted(per_expert)])
    return out


def _hf_key_to_ragseek(name: str, cfg: ModelConfig) -> str | None:
    if name == "lm_head.weight":
        return None if cfg.tie_embeddings else name
    if not name.startswith("model."):
        return name
    key = name.removeprefix("model.")
    key = key.replace("mlp.gate.e_score_correction_bias", "mlp.gate.bias")
    m = re.match(r"^layers\.(\d+)\.(.*)$", key)
    if m and int(m[1]) >= cfg.n_layers:
        k, rest = int(m[1]) - cfg.n_layers, m[2]
        # a layer beyond num_hidden_layers that is no MTP module stays unexpected: `_check_state` refuses it
        if k >= cfg.mtp_depth:
            return key
        if rest in _MTP_SHARED_COPIES:
            return None
        own = next((o for o in _MTP_OWN if rest.startswith(o + ".")), None)
        if own:
            return f"mtp.{k}.{rest.replace('shared_head.norm', 'norm')}"
        return f"mtp.{k}.block.{rest}"
    return key


def ragseek_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        name = key
        m = re.match(r"^mtp\.(\d+)\.(block\.|norm\.)?(.*)$", key)
        if m:  # MTP module k -> DeepSeek-V3's layer n_layers + k
            part = {"block.": "", "norm.": "shared_head.norm.", None: ""}[m[2]]
            name = f"layers.{cfg.n_layers + int(m[1])}.{part}{m[3]}"
        if name != "lm_head.weight":
            name = "model." + name
        name = name.replace("mlp.gate.bias", "mlp.gate.e_score_correction_bias")
        em = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", name)
        if em:
            for i, w in enumerate(t):
                out[f"{em[1]}.{i}.{em[2]}.weight"] = w
            continue
        out[name] = t
    return out


# what to do about a checkpoint file that is cut short or damaged
DAMAGED = "it is truncated or corrupt: save or download the checkpoint again"


def _read_config(path: Path) -> ModelConfig:
    """The ModelConfig of a checkpoint's config.json (a transformers config, or ragseek's own)."""
    with reading(path, "valid JSON", DAMAGED):
        hf = json.loads(path.read_text())
    if not isinstance(hf, dict):
        raise FileError(path, f"a config.json holds a JSON object, not {type(hf).__name__}", DAMAGED)
    try:
        if hf.get("model_type") == "ragseek":
            return ModelConfig.from_dict(hf["ragseek"])
        return ModelConfig.from_hf_config(hf)
    except KeyError as e:
        raise FileError(path, f"the key {e.args[0]!r} is missing", DAMAGED) from e
    except (TypeError, ValueError) as e:
        raise FileError(path, str(e)) from e


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors file next to config.json")
    tensors = {}
    for f in files:
        with reading(f, "a readable safetensors file", DAMAGED), safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    return tensors


def _check_state(model: Transformer, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(s)}"
        for k, s in expected.items()
        if k in state and state[k].shape != s
    ]
    if missing or unexpected or wrong:
        lines = [f"{path}: the weights do not match config.json"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {missing[:8]}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {unexpected[:8]}")
        extra = sorted({int(m[1]) for k in unexpected if (m := re.match(r"layers\.(\d+)\.", k))})
        if extra:
            lines.append(
                f"  config.json has num_hidden_layers={model.cfg.n_layers} (and {model.cfg.mtp_depth} MTP "
                f"modules) but the weights hold layers {extra[0]}..{extra[-1]} too: every weight must be used, "
                "so set num_hidden_layers to the checkpoint's layer count"
            )
        if wrong:
            lines.append(f"  wrong shape ({len(wrong)}): {wrong[:8]}")
        raise ValueError("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------------
# GGUF


def gguf_to_folder(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into <cache>/gguf/<stem>-<hash>/ (config.json, model.safetensors, tokenizer)."""
    from ragseek.model.gguf import read_gguf

    stat = gguf_path.stat()
    digest = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[
        :12
    ]
    folder = cache_dir() / "gguf" / f"{gguf_path.stem}-{digest}"
    if (folder / "model.safetensors").is_file():
        return folder
    # several first runs at once: one converts while the others wait for its folder (no partial folder, no leftovers)
    with cache_entry(folder) as tmp:
        if tmp is not None:
            ckpt = read_gguf(gguf_path)
            (tmp / "config.json").write_text(json.dumps(ckpt.hf_config, indent=2) + "\n")
            state = {k: v.contiguous() for k, v in ckpt.state_dict.items()}
            save_file(state, str(tmp / "model.safetensors"), {"format": "pt"})
            ckpt.tokenizer.save(tmp)
    return folder
