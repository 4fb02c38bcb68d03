"""Training-loop components that every recipe calls from its own explicit loop (no Trainer, no hooks).

A recipe reads top to bottom:

    cfg = LoopConfig(...); set_seed(cfg.seed)
    optimizer = build_optimizer(model, cfg)
    ckpt = Checkpointer(cfg.out_dir, cfg.ckpt_every, cfg.keep_last)
    resumed = ckpt.load(model, optimizer) if cfg.resume else None   # weights, AdamW moments, RNG restored
    if resumed: sampler.load_state_dict(resumed.data)                 # the data position (epoch, index, seed)
    start = resumed.step if resumed else 0
    log = MetricsLog(Path(cfg.out_dir) / "metrics.jsonl", resume_step=start if resumed else None)
    progress = Progress(cfg.max_steps, start)
    for step in range(start, cfg.max_steps):
        out = train_step(optimizer, micro_batches(batch, cfg.grad_accum), loss_fn, cfg, step)
        progress.update(n_tokens)
        if (step + 1) % cfg.log_every == 0: log.log(step + 1, out); print(progress.line(step + 1, out))
        if ckpt.due(step + 1): ckpt.save(step + 1, model, optimizer, sampler.state_dict(), cfg)

Step numbers: `step` (0-based) is the optimizer step being taken; logs and checkpoints are labelled with the
number of steps done (step + 1), so a checkpoint "step 20" resumes with step index 20.

Checkpoints hold no pickle: weights and optimizer tensors in safetensors, everything else in JSON.
tests/train/_toy_train.py is this loop, complete, on a tiny Transformer.

Under torchrun a recipe passes its `Parallel` (distributed.py: DDP or FSDP2 around the model) to `train_step`, and
its `World` to the Checkpointer: every rank saves and loads full tensors (a sharded model's gathered), rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ragseek.config import config_field as _f
from ragseek.errors import FileError, reading, user_message
from ragseek.train.distributed import (
    World,
    full,
    full_optimizer_state,
    full_state,
    load_full_optimizer_state,
    load_full_state,
)

if TYPE_CHECKING:
    from ragseek.train.distributed import Parallel

Precision = Literal["fp32", "bf16"]
Parallelism = Literal["ddp", "fsdp"]
LossFn = Callable[[Any], tuple[torch.Tensor, Mapping[str, Any]]]

AUTOCAST_DTYPES: dict[Precision, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class LoopConfig:
    """What every recipe's loop needs; recipe configs embed it (a `loop: LoopConfig` field) or extend it."""

    lr: float = _f(3e-4, "peak learning rate, reached at the end of warmup")
    min_lr_ratio: float = _f(0.0, "the cosine decays from lr to lr * min_lr_ratio at max_steps")
    weight_decay: float = _f(
        0.0, "AdamW decoupled weight decay on matrices (never on norms, biases, embeddings)"
    )
    betas: tuple[float, float] = _f((0.9, 0.95), "AdamW (beta1, beta2)")
    warmup_steps: int = _f(0, "linear warmup steps: lr * (step + 1) / warmup_steps")
    max_steps: int = _f(100, "optimizer steps in the whole run (the cosine reaches its floor here)")
    grad_accum: int = _f(1, "micro-batches per optimizer step; the batch is split into this many equal parts")
    max_grad_norm: float = _f(
        1.0, "clip the global gradient L2 norm to this; 0 disables clipping (norm still logged)"
    )
    dtype: Precision = _f("fp32", "fp32, or bf16 autocast (CPU too); weights and optimizer state stay fp32")
    activation_checkpointing: bool = _f(
        False,
        "keep only each transformer block's input and recompute its activations in the backward (less memory, "
        "about one more forward of the blocks)",
    )
    seed: int = _f(0, "seeds python random, numpy and torch (set_seed) and the data shuffle")
    log_every: int = _f(1, "write a metrics line and a progress line every this many steps")
    ckpt_every: int = _f(100, "save a checkpoint every this many steps (0: never)")
    keep_last: int = _f(2, "checkpoints kept on disk; older ones are deleted after each save")
    eval_every: int = _f(0, "run the recipe's evaluation every this many steps (0: never during training)")
    out_dir: str = _f("runs/run", "where checkpoints/, metrics.jsonl, config.json and plots go")
    resume: bool = _f(
        False, "continue from the latest checkpoint in out_dir/checkpoints (after a crash or kill -9)"
    )
    parallel: Parallelism = _f(
        "ddp",
        "under torchrun: ddp (each rank holds the model, gradients all-reduced) or fsdp (FSDP2, fully_shard per "
        "transformer block: weights, gradients and AdamW state sharded); one process ignores it",
    )
    dist_timeout: float = _f(
        1800.0,
        "under torchrun: seconds a rank waits for the others (to meet, at each collective) before it fails",
    )

    def __post_init__(self) -> None:
        if self.dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {sorted(AUTOCAST_DTYPES)}")
        if self.parallel not in get_args(Parallelism):
            raise ValueError(f"parallel={self.parallel!r}: choose one of {list(get_args(Parallelism))}")
        if self.grad_accum < 1 or self.max_steps < 1:
            raise ValueError(f"grad_accum={self.grad_accum}, max_steps={self.max_steps}: both must be >= 1")
        self.betas = tuple(self.betas)  # YAML and JSON give lists


# --------------------------------------------------------------------------------------------------------------------
# seed, optimizer, schedule


def set_seed(seed: int) -> None:
    """Seed python `random`, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices; none on norms, biases (ndim < 2) and embeddings (tied heads too)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicated: a tied head is the embedding's tensor
        if p.requires_grad:
            (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters instead of a loop of small ops: on SmolLM2-135M on CPU the
    optimizer step drops from ≈0.7 s to ≈0.1 s)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, fused=True)


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warmup, then cosine decay to lr_min = lr * min_lr_ratio at max_steps.

    step < W:  lr * (step + 1) / W
    else:      lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2,   p = min(1, (step - W) / (max_steps - W))
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    lr_min = cfg.lr * cfg.min_lr_ratio
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return lr_min + (cfg.lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------------------------------------------------
# one optimizer step: autocast, gradient accumulation, clipping


def autocast(dtype: Precision, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast on `device_type` (CPU included), or nothing for fp32."""
    amp = AUTOCAST_DTYPES[dtype]
    return contextlib.nullcontext() if amp is None else torch.autocast(device_type=device_type, dtype=amp)


def micro_batches(batch: Mapping[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    """Split a batch of tensors (dim 0 = examples) into k equal micro-batches."""
    sizes = {name: t.shape[0] for name, t in batch.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()) or n % k:
        raise ValueError(
            f"cannot split a batch with sizes {sizes} into grad_accum={k} equal micro-batches: "
            f"make the batch size a multiple of grad_accum"
        )
    return [{name: t[i * n // k : (i + 1) * n // k] for name, t in batch.items()} for i in range(k)]


def accumulate_gradients(
    micro: Iterable[Any],
    loss_fn: LossFn,
    dtype: Precision = "fp32",
    device_type: str = "cpu",
    parallel: Parallel | None = None,
) -> dict[str, float]:
    """Backward of (1/k) sum_i L_i over k micro-batches into `.grad`.

    With equal-sized micro-batches and a loss that is a mean over examples (the lecture's sequence mean), this
    is exactly the gradient of the big batch's loss. Returns the mean of each scalar metric (and of "loss").
    With `parallel` (torchrun), each loss runs through it (DDP) and the gradients are averaged over the ranks.
    """
    micro = list(micro)
    totals: dict[str, float] = {}
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        with parallel.sync(last) if parallel is not None else contextlib.nullcontext():
            with autocast(dtype, device_type):
                loss, metrics = parallel.forward(loss_fn, batch) if parallel is not None else loss_fn(batch)
            (loss / len(micro)).backward()
        for name, value in {**metrics, "loss": loss}.items():
            if torch.is_tensor(value) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (int, float)):  # vectors (per-layer stats) are not averaged
                totals[name] = totals.get(name, 0.0) + value / len(micro)
    return totals


def train_step(
    optimizer: torch.optim.Optimizer,
    micro: Iterable[Any],
    loss_fn: LossFn,
    cfg: LoopConfig,
    step: int,
    parallel: Parallel | None = None,
) -> dict[str, float]:
    """Set lr_at(step), accumulate gradients over the micro-batches, clip, step, zero the gradients. `parallel`:
    the model on torchrun's ranks (`World.parallelize`); the metrics are this rank's (`Run.log` averages them)."""
    lr = lr_at(step, cfg)
    set_lr(optimizer, lr)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    metrics = accumulate_gradients(micro, loss_fn, cfg.dtype, params[0].device.type, parallel)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    # FSDP: the norm of sharded gradients is a DTensor; full() gathers it
    grad_norm = full(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**metrics, "lr": lr, "grad_norm": float(grad_norm)}


def train_epochs(
    optimizer: torch.optim.Optimizer,
    batch: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    cfg: LoopConfig,
    step: int,
    epochs: int,
    parallel: Parallel | None = None,
) -> dict[str, float]:
    """`epochs` optimizer steps over one batch (GRPO's μ, PPO's ppo_epochs), each a `train_step` over its
    cfg.grad_accum micro-batches at the lr of `step`; the mean of their metrics."""
    updates = [
        train_step(optimizer, micro_batches(batch, cfg.grad_accum), loss_fn, cfg, step, parallel)
        for _ in range(epochs)
    ]
    return mean_metrics(updates)


def mean_metrics(updates: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each metric's mean over several updates."""
    return {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}


# --------------------------------------------------------------------------------------------------------------------
# config, checkpoints


def config_dict(config: Any) -> dict:
    """A dataclass (nested ones too) or a mapping, as plain JSON-able data."""
    return asdict(config) if is_dataclass(config) else dict(config)


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config (dataclass or dict) as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(config_dict(config), indent=2))
    return path


@dataclass
class Resumed:
    """What Checkpointer.load restores besides weights, optimizer and RNG (those are restored in place)."""

    step: int  # optimizer steps done; the loop continues with step index `step`
    data: dict  # the data position, e.g. {"epoch", "index", "seed"} from a sampler's state_dict()
    config: dict  # the resolved config saved with the checkpoint
    extra: dict  # anything else the recipe saved (JSON)
    path: Path
    # newer checkpoints passed over because a file was missing, truncated or torn: "FILE: what is wrong"
    skipped: list[str] = field(default_factory=list)


class Checkpointer:
    """Save every `every` steps into out_dir/checkpoints/step_XXXXXX, atomically; keep the last `keep_last`.

    A checkpoint folder holds
      model.safetensors       the weights (tied tensors stored once)
      optimizer.safetensors   every optimizer state tensor, keyed state.<param index>.<name>
      optimizer.json          param groups (lr, betas, which params) and non-tensor state
      rng.safetensors         torch CPU (and CUDA) generator states
      state.json              step, data position, python `random` and numpy generator states, extra
      config.json             the resolved config
    It is written into a temporary folder, every file fsync'ed, then renamed into place: a kill at any moment
    leaves either the complete previous checkpoints or the new one too, never a partial one.
    To checkpoint several models (policy + value), wrap them in one nn.ModuleDict.
    Under torchrun (`world`) every rank calls save and load: the tensors are full (an FSDP-sharded model's are
    gathered on save and cut to each rank's shard on load), so any world size resumes; rank 0 alone writes.
    """

    def __init__(self, out_dir: str | Path, every: int, keep_last: int = 2, world: World | None = None):
        self.root = Path(out_dir) / "checkpoints"
        self.every = every
        self.keep_last = max(1, keep_last)
        self.world = world or World()

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary folders of an interrupted save are not listed)."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_")]
        return sorted(done, key=lambda p: int(p.name.removeprefix("step_")))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: Mapping[str, Any],
        config: Any,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        final = self.root / f"step_{step:06d}"
        # every rank: a sharded model's weights and moments are gathered
        weights, aliases = full_state(model)
        moments = full_optimizer_state(optimizer)
        if not self.world.main:
            return final
        tmp = self.root / f".tmp_step_{step:06d}_{os.getpid()}"
        for partial in self.root.glob(".tmp_step_*"):  # left by a kill during an earlier save
            shutil.rmtree(partial)
        tmp.mkdir(parents=True)
        # tied tensors once, the others named in the metadata (safetensors' save_model)
        save_file(weights, str(tmp / "model.safetensors"), metadata=aliases or None)
        opt_tensors, opt_layout = _optimizer_to_files(moments)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_layout))
        rng_tensors, rng_json = _rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = {"step": step, "data": dict(data), "rng": rng_json, "extra": dict(extra or {})}
        (tmp / "state.json").write_text(json.dumps(state))
        (tmp / "config.json").write_text(json.dumps(config_dict(config), indent=2))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if final.exists():  # re-saving a step (a resumed run that checkpoints the step it resumed from)
            old = self.root / f".old_{final.name}_{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync(self.root)
        for stale in self.all()[: -self.keep_last]:
            shutil.rmtree(stale)
        return final

    def load(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, path: str | Path | None = None
    ) -> Resumed:
        """Restore weights, optimizer state and every RNG from `path`, by default from the newest intact checkpoint:
        one with a file missing, truncated or torn (a disk that filled, a copy that stopped) is skipped and named
        in `Resumed.skipped`, and the next older one is loaded, which overwrites whatever the damaged one had
        restored. A FileError when none is intact."""
        if path is not None:
            return self._load(Path(path), model, optimizer)
        found = self.all()
        if not found:
            raise FileNotFoundError(
                f"no checkpoint under {self.root}: run without --resume to start from scratch"
            )
        skipped = []
        for candidate in reversed(found):
            try:
                resumed = self._load(candidate, model, optimizer)
            except (FileError, OSError) as e:
                skipped.append(user_message(e))
                continue
            resumed.skipped = skipped
            return resumed
        raise FileError(
            self.root,
            f"no intact checkpoint ({'; '.join(skipped)})",
            "run without --resume to start from scratch",
        )

    def _load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Resumed:
        names = ["state.json", "config.json", "model.safetensors", "rng.safetensors"]
        names += ["optimizer.json", "optimizer.safetensors"] if optimizer is not None else []
        missing = next((name for name in names if not (path / name).is_file()), None)
        if missing:
            raise FileError(path / missing, "is missing", DAMAGED)
        # state.json first: it is small and says which step the folder holds
        state = _read_json(path / "state.json")
        missing = sorted({"step", "data", "rng", "extra"} - set(state if isinstance(state, dict) else ()))
        if missing:
            raise FileError(path / "state.json", f"torn: the keys {missing} are missing", DAMAGED)
        if path.name.startswith("step_") and state["step"] != int(path.name.removeprefix("step_")):
            raise FileError(path / "state.json", f"holds step {state['step']}, not the folder's", DAMAGED)
        config = _read_json(path / "config.json")
        layout = _read_json(path / "optimizer.json") if optimizer is not None else {}
        # a file that is no safetensors is damage; weights of another model (a RuntimeError) are not
        with reading(path / "model.safetensors", "a readable safetensors file", DAMAGED):
            weights = load_file(str(path / "model.safetensors"))
        load_full_state(model, weights)
        if optimizer is not None:
            with reading(path / "optimizer.safetensors", "a readable safetensors file", DAMAGED):
                moments = load_file(str(path / "optimizer.safetensors"))
            load_full_optimizer_state(optimizer, _optimizer_from_files(moments, layout))
        with reading(path / "rng.safetensors", "a readable safetensors file", DAMAGED):
            rng = load_file(str(path / "rng.safetensors"))
        _set_rng_state(rng, state["rng"])
        return Resumed(step=state["step"], data=state["data"], config=config, extra=state["extra"], path=path)


def _optimizer_to_files(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, param_state in sd["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in layout["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    # JSON turned tuples (betas) into lists
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in layout["param_groups"]
    ]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _set_rng_state(tensors: dict[str, torch.Tensor], states: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, mt, gauss = states["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# what to do about a checkpoint file that is damaged
DAMAGED = "the checkpoint is damaged"


def _read_json(path: Path) -> Any:
    with reading(path, "complete JSON", DAMAGED):
        return json.loads(path.read_text())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    _fsync(tmp)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------------------------
# metrics, progress, plots


def read_metrics(path: str | Path) -> list[dict]:
    """The JSONL rows of a metrics file; a torn last line (killed mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


class MetricsLog:
    """Append one JSON object per logged step to a JSONL file.

    A fresh run (resume_step=None) starts an empty file. A resumed run keeps only the rows with
    step <= resume_step, so the rows a killed run wrote after its last checkpoint are dropped and the
    resumed run continues the same curve with no duplicate steps.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = (
            []
            if resume_step is None
            else [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        )
        _write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": step, **{k: float(v) if torch.is_tensor(v) else v for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Progress:
    """One dense line per log step, nanochat style:

        step 00042/00100 | loss 2.3456 | lr 3.00e-04 | tok/s 12,345 | eta 1m23s | grad_norm 0.8123

    tok/s is measured over the steps since the previous line; the ETA extrapolates this process's mean step time.
    """

    def __init__(self, max_steps: int, start_step: int = 0):
        self.max_steps = max_steps
        self.start_step = start_step
        self.t_start = self.t_last = time.perf_counter()
        self.tokens = 0

    def update(self, tokens: int) -> None:
        """Count the tokens processed by one step."""
        self.tokens += int(tokens)

    def line(self, step: int, metrics: Mapping[str, Any]) -> str:
        now = time.perf_counter()
        tok_s = self.tokens / max(now - self.t_last, 1e-9)
        per_step = (now - self.t_start) / max(step - self.start_step, 1)
        self.t_last, self.tokens = now, 0
        parts = [f"step {step:05d}/{self.max_steps:05d}"]
        if "loss" in metrics:
            parts.append(f"loss {float(metrics['loss']):.4f}")
        if "lr" in metrics:
            parts.append(f"lr {float(metrics['lr']):.2e}")
        parts += [f"tok/s {tok_s:,.0f}", f"eta {format_seconds(per_step * (self.max_steps - step))}"]
        parts += [f"{k} {_fmt(v)}" for k, v in metrics.items() if k not in ("loss", "lr")]
        return " | ".join(parts)


def _fmt(value: Any) -> str:
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_seconds(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def plot_metrics(jsonl_path: str | Path, png_path: str | Path, keys: Iterable[str] = ("loss", "lr")) -> Path:
    """One panel per metric key against step, from a metrics JSONL, saved as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(jsonl_path)
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        raise ValueError(f"{jsonl_path}: none of the requested keys appear in its rows")
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points, strict=True))
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
