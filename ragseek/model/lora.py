"""LoRA adapters on the linear layers of ragseek's Transformer, saved and loaded in PEFT's format.

LoRA (Hu et al. 2021, eq. 3 and §4.1): freeze W0 and learn a rank-r update ΔW = B A, scaled by alpha / r:

    y = W0 x + b + (alpha / r) · B(A(dropout(x)))        A (r, in): Kaiming-uniform,  B (out, r): zeros

so a fresh adapter leaves the model unchanged, and only r·(in + out) numbers per layer are trained.
`merge` folds the update into the weight (W0 + (alpha / r) B A: no extra cost at inference), `unmerge` takes it out.

Target names are the model's own module names, which are transformers' (`q_proj k_proj v_proj o_proj gate_proj
up_proj down_proj`; MLA: `q_a_proj q_b_proj kv_a_proj_with_mqa kv_b_proj`), so the same list works in PEFT.
Only the linears of the n_layers blocks are adapted: never the output head (often tied to the embedding), nor
the MTP modules (transformers has no class that loads them).

Folder format, as `peft.PeftModel.from_pretrained` reads it onto transformers' LlamaForCausalLM (or Qwen2/V3):
    adapter_config.json        peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules, ...
    adapter_model.safetensors  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, ...
The base model's fingerprint (sizes and file name) goes into the safetensors header metadata (`ragseek_base`),
not into adapter_config.json: PEFT warns about any key of adapter_config.json that LoraConfig lacks.

    model = Transformer.from_pretrained(path)
    apply_lora(model, LoRAConfig(r=8, alpha=16))       # only lora_A / lora_B require grad now
    ... train ...
    save_adapter(model, "reader-adapter", base=path)
    load_adapter(Transformer.from_pretrained(path), "reader-adapter")
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ragseek.config import config_field as _f
from ragseek.model.attention import MLAttention
from ragseek.model.checkpoint import hf_to_ragseek, ragseek_to_hf
from ragseek.model.transformer import Transformer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT wraps the transformers model twice: PeftModel.base_model (LoraModel) .model (LlamaForCausalLM)
PEFT_PREFIX = "base_model.model."
# ModelConfig fields an adapter's shapes and meaning depend on; written at save, checked at load
FINGERPRINT = (
    "model_type",
    "vocab_size",
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "inter_dim",
    "attention",
)


@dataclass
class LoRAConfig:
    r: int = _f(8, "rank r of the update B A (A is r x in, B is out x r)")
    alpha: float = _f(16.0, "scale numerator: the update is multiplied by alpha / r")
    dropout: float = _f(0.05, "dropout on the input of the LoRA path only (training mode); 0 disables it")
    target_modules: list[str] | str = _f(
        "all-linear",
        "'all-linear' (every nn.Linear of the blocks) or module names: a leaf name such as q_proj, k_proj, v_proj, "
        "o_proj, gate_proj, up_proj, down_proj (every layer), or a dotted suffix such as layers.0.self_attn.q_proj",
    )

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ValueError(
                f"target_modules={self.target_modules!r}: give 'all-linear' or a list of names such as "
                "['q_proj', 'v_proj']"
            )
        if not self.target_modules:
            raise ValueError(
                "target_modules is empty: give 'all-linear' or a list such as ['q_proj', 'v_proj']"
            )


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight` and `bias` Parameters, same state-dict names) plus lora_A, lora_B.

    Subclassing keeps `.weight`, `.in_features` and the checkpoint names of the base layer where other code
    expects them. A (r, in) is Kaiming-uniform with a = sqrt(5) and B (out, r) is zero, as in PEFT, so the layer
    starts as the base layer. For an fp16/bf16 base the adapter is kept in fp32 (PEFT's autocast_adapter_dtype).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        device, dtype = base.weight.device, base.weight.dtype
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.merged = False
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        a = self.lora_A.weight
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))
        return y + (delta * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) · B A, shape (out, in), in the base weight's dtype."""
        return (self.lora_B.weight @ self.lora_A.weight * self.scaling).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


# ---------------------------------------------------------------------------------------------------------------------
# apply, merge, the adapter's own tensors


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(module name, layer) for every LoRALinear of `model`, e.g. ('layers.0.self_attn.q_proj', ...)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _block_linears(model: Transformer) -> dict[str, tuple[nn.Module, str, nn.Linear]]:
    """{full name: (parent, attribute, linear)} for every nn.Linear inside model.layers."""
    out = {}
    for parent_name, parent in model.layers.named_modules(prefix="layers"):
        if isinstance(parent, LoRALinear):
            continue
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear):
                out[f"{parent_name}.{attr}"] = (parent, attr, child)
    return out


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def apply_lora(model: Transformer, cfg: LoRAConfig) -> Transformer:
    """Replace the targeted linears of `model` by LoRALinear in place, freeze every other parameter, return model.

    Raises ValueError for a target name no linear of the blocks has (listing those it has), for a model that already
    has LoRA layers, and for kv_b_proj on an absorbed-MLA model (its cached decoding reads kv_b_proj.weight
    directly, so an unmerged update there would be skipped).
    """
    if any(True for _ in lora_layers(model)):
        raise ValueError(
            "the model already has LoRA layers: apply_lora (or load_adapter) onto a fresh base model"
        )
    linears = _block_linears(model)

    def absorbed_kv_b(name: str) -> bool:
        parent, attr, _ = linears[name]
        return isinstance(parent, MLAttention) and attr == "kv_b_proj" and parent.impl == "absorbed"

    if cfg.target_modules == "all-linear":
        chosen = [n for n in linears if not absorbed_kv_b(n)]
        if len(chosen) < len(linears):
            warnings.warn(
                "LoRA all-linear leaves kv_b_proj out: absorbed MLA decoding reads its weight directly; set "
                "self_attn.impl = 'naive' on every layer before apply_lora to adapt it too",
                stacklevel=2,
            )
    else:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        for target in cfg.target_modules:
            if not any(_matches(n, target) for n in linears):
                raise ValueError(
                    f"LoRA target {target!r} names no nn.Linear of the model's blocks; their names are {leaves}"
                )
        chosen = [n for n in linears if any(_matches(n, t) for t in cfg.target_modules)]
        bad = [n for n in chosen if absorbed_kv_b(n)]
        if bad:
            raise ValueError(
                f"LoRA on {bad[0]}: absorbed MLA decoding reads kv_b_proj.weight directly and would skip the "
                "update; leave kv_b_proj out of target_modules, or set self_attn.impl = 'naive' on every layer"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent, attr, linear = linears[name]
        # a new module is in training mode: keep the mode of the layer it replaces (dropout only in training)
        setattr(parent, attr, LoRALinear(linear, cfg.r, cfg.alpha, cfg.dropout).train(linear.training))
    return model


def merge(model: nn.Module) -> nn.Module:
    """W <- W + (alpha / r) B A in every LoRA layer (idempotent); the forward then skips the LoRA path."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: W <- W - (alpha / r) B A (exact up to float rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: Transformer) -> Transformer:
    """Fold every adapter into its weight and put plain nn.Linear layers back: a base-format model that
    save_pretrained writes and transformers or ragseek load without PEFT. Parameters stay frozen."""
    for name, layer in list(lora_layers(model)):
        layer.merge()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[1], plain)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors, in ragseek names: {'layers.0.self_attn.q_proj.lora_A.weight': (r, in), ...}."""
    out = {}
    for name, layer in lora_layers(model):
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# PEFT folders


def _hf_module(name: str, cfg) -> str:
    """ragseek module name -> transformers' ('layers.0.self_attn.q_proj' -> 'model.layers.0.self_attn.q_proj'),
    through checkpoint.py's mapping of the module's weight name."""
    (key,) = ragseek_to_hf({f"{name}.weight": torch.empty(0)}, cfg)
    return key.removesuffix(".weight")


def _ragseek_module(hf_name: str, cfg) -> str | None:
    mapped = list(hf_to_ragseek({f"{hf_name}.weight": torch.empty(0)}, cfg))
    return mapped[0].removesuffix(".weight") if mapped else None


def _peft_target_modules(model: Transformer) -> list[str]:
    """Leaf names where every linear of that name is adapted (PEFT matches them as suffixes), full transformers
    names otherwise (PEFT matches them exactly)."""
    adapted = {name for name, _ in lora_layers(model)}
    every = set(adapted) | set(_block_linears(model))
    out = []
    for leaf in sorted({n.rsplit(".", 1)[-1] for n in adapted}):
        same_leaf = {n for n in every if n.rsplit(".", 1)[-1] == leaf}
        if same_leaf <= adapted:
            out.append(leaf)
        else:
            out.extend(_hf_module(n, model.cfg) for n in same_leaf & adapted)
    return sorted(out)


def save_adapter(model: Transformer, folder: str | Path, base: str | Path | None = None) -> Path:
    """Write `folder`/adapter_config.json + adapter_model.safetensors (PEFT's LoRA format) and return the folder.

    base: the base model's name or path, written as base_model_name_or_path (what PEFT's AutoPeftModel loads).
    Unmerged weights are saved; a merged model is unmerged for the save and merged again.
    """
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError(
            "the model has no LoRA layers: call apply_lora(model, LoRAConfig(...)) and train first"
        )
    first = next(iter(layers.values()))
    if any((layer.r, layer.alpha) != (first.r, first.alpha) for layer in layers.values()):
        raise ValueError(
            "save_adapter needs one r and alpha for every LoRA layer (PEFT's rank_pattern is not used)"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": _peft_target_modules(model),
        "base_model_name_or_path": None if base is None else str(base),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    merged = [layer for layer in layers.values() if layer.merged]
    for layer in merged:
        layer.unmerge()
    try:
        tensors = {}
        for name, layer in layers.items():
            key = PEFT_PREFIX + _hf_module(name, cfg)
            tensors[f"{key}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
            tensors[f"{key}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
        fingerprint = {k: getattr(cfg, k) for k in FINGERPRINT}
        fingerprint["base_file"] = None if base is None else Path(str(base)).name
        save_file(
            tensors,
            str(folder / WEIGHTS_FILE),
            {"format": "pt", "ragseek_base": json.dumps(fingerprint)},
        )
    finally:
        for layer in merged:
            layer.merge()
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


# PEFT options that change the math; ragseek's LoRA implements their defaults only
_UNSUPPORTED = {
    "use_dora": False,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "trainable_token_indices": None,
}


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-save the adapter with save_adapter") from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: peft_type must be 'LORA', got {got!r}; only LoRA adapters load in ragseek")
    missing = [k for k in ("r", "lora_alpha") if k not in config]
    if missing:
        raise ValueError(f"{path}: missing {missing}; re-save the adapter with save_adapter")
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, [], False):
            raise ValueError(
                f"{path}: {key}={config[key]!r} is not supported by ragseek's LoRA; train the adapter without it"
            )
    return config


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    try:
        with safe_open(str(path), "pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path}: not a readable safetensors file ({e}); re-save the adapter with save_adapter"
        ) from e


def _check_fingerprint(model: Transformer, meta: dict[str, str], path: Path) -> None:
    if "ragseek_base" not in meta:
        return  # an adapter PEFT wrote: the tensor shapes are checked one by one instead
    try:
        saved = json.loads(meta["ragseek_base"])
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: the ragseek_base metadata is not valid JSON ({e}); re-save the adapter"
        ) from e
    wrong = [
        f"{k}={saved[k]!r} (this model: {getattr(model.cfg, k)!r})"
        for k in FINGERPRINT
        if k in saved and saved[k] != getattr(model.cfg, k)
    ]
    if wrong:
        base = saved.get("base_file") or "its base model"
        raise ValueError(
            f"{path}: this adapter was trained on a different base model: {', '.join(wrong)}; "
            f"load it onto {base}"
        )


def adapter_base_name(folder: str | Path) -> str:
    """The base_model_name_or_path an adapter folder records ("" when none): a hub name or a local path."""
    return _read_config(Path(folder) / CONFIG_FILE).get("base_model_name_or_path") or ""


def adapter_base(folder: str | Path) -> Path:
    """The model an adapter folder goes onto: its base_model_name_or_path when that is a local folder or file,
    else the embedded SmolLM2 (a hub name such as HuggingFaceTB/SmolLM2-135M-Instruct is never downloaded);
    `load_adapter` then checks that the sizes match."""
    from ragseek.defaults import smollm2_gguf

    base = adapter_base_name(folder)
    return Path(base) if base and Path(base).exists() else smollm2_gguf()


def load_adapter(model: Transformer, folder: str | Path) -> Transformer:
    """Read a PEFT LoRA folder (from save_adapter, or PEFT itself for a llama/qwen2/V3 model) onto a fresh ragseek
    Transformer: apply_lora on the modules the file has weights for, then load them. Returns the model, unmerged,
    with only the adapter trainable. Bad input raises FileNotFoundError / ValueError naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: not a folder; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE} (see save_adapter)"
        )
    config = _read_config(folder / CONFIG_FILE)
    weights_path = folder / WEIGHTS_FILE
    tensors, meta = _read_weights(weights_path)
    _check_fingerprint(model, meta, weights_path)

    # 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('layers.0.self_attn.q_proj', 'lora_A')
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        stem = key.removeprefix(PEFT_PREFIX)
        hf_module, _, part = stem.rpartition(".lora_")
        if part not in ("A.weight", "B.weight") or not hf_module:
            raise ValueError(
                f"{weights_path}: unexpected tensor {key!r}; only lora_A / lora_B weights load here"
            )
        name = _ragseek_module(hf_module, model.cfg)
        if name is None:
            raise ValueError(
                f"{weights_path}: has weights for {hf_module}, which this model lacks "
                f"(n_layers={model.cfg.n_layers}); load the adapter onto the base model it was trained on"
            )
        state.setdefault(name, {})[f"lora_{part.split('.')[0]}"] = t
    if not state:
        raise ValueError(f"{weights_path}: holds no LoRA tensors; re-save the adapter with save_adapter")

    linears = _block_linears(model)
    r = int(config["r"])
    for name, parts in sorted(state.items()):
        if name not in linears:
            raise ValueError(
                f"{weights_path}: has weights for {name}, which this model lacks (n_layers={model.cfg.n_layers}); "
                "load the adapter onto the base model it was trained on"
            )
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"{weights_path}: {name} has {sorted(parts)} but needs both lora_A and lora_B")
        linear = linears[name][2]
        want = {"lora_A": (r, linear.in_features), "lora_B": (linear.out_features, r)}
        for part, t in parts.items():
            if tuple(t.shape) != want[part]:
                raise ValueError(
                    f"{weights_path}: {name}.{part} is {tuple(t.shape)} but this model needs {want[part]} (r={r}); "
                    "load the adapter onto the base model it was trained on"
                )

    cfg = LoRAConfig(
        r=r, alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0), target_modules=sorted(state)
    )
    apply_lora(model, cfg)
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for name, parts in state.items():
            for part, t in parts.items():
                w = getattr(layers[name], part).weight
                w.copy_(t.to(device=w.device, dtype=w.dtype))
    return model
