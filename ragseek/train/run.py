"""Run setup that every recipe shares (the component behind each recipe's first and last lines): the config
(`RecipeConfig`, `loop_field`) from a YAML file and --set overrides, model loading, frozen copies, preference
micro-batches, the `Run` around the recipe's explicit loop (resume, config.json, metrics log, progress line,
checkpoints, the final model), and the `main` that `ragseek train NAME` calls.

    class SFTConfig(RecipeConfig): ...; loop: LoopConfig = loop_field(lr=2e-5, out_dir="runs/sft")
    cfg = load_config(SFTConfig, "configs/sft.yaml", ["loop.max_steps=20", "batch_size=4"])
    world = World.join(cfg.loop)                                  # torchrun's ranks, or this one process
    trained = world.parallelize(model, cfg.loop)                  # DDP / FSDP2 (distributed.py)
    run = start_run(cfg, cfg.loop, trained, optimizer, sampler)   # resume, config.json, metrics log, progress
    for step in range(run.start, cfg.loop.max_steps): ...; run.end_step(step + 1, metrics, tokens)
    return run.finish(plot_keys, model, tokenizer)                # metrics.png and <out_dir>/final
    main = recipe_main(SFTConfig, train)                          # what `ragseek train sft` calls

The optimiser, schedule, checkpoint files and metrics log themselves are `loop.py`'s; ranks, DDP / FSDP2 and the
full-state checkpoints under torchrun are `distributed.py`'s.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ragseek.config import config_field, load_config
from ragseek.model import Tokenizer, Transformer, load_tokenizer
from ragseek.model.lora import (
    CONFIG_FILE,
    LoRAConfig,
    adapter_base,
    adapter_base_name,
    apply_lora,
    load_adapter,
    lora_layers,
    save_adapter,
)
from ragseek.train.data import EpochSampler, collate_preference
from ragseek.train.distributed import Parallel, World
from ragseek.train.loop import Checkpointer, LoopConfig, MetricsLog, Progress, plot_metrics, save_config

MODEL_HELP = "HF folder or .gguf file (empty: the embedded SmolLM2-135M-Instruct)"


def loop_field(**defaults: Any) -> Any:
    """A recipe config's `loop:` block: a LoopConfig with the recipe's own defaults (its lr, out_dir, ...)."""
    return config_field(
        LoopConfig(**defaults), "optimizer, schedule, steps, checkpoints, eval_every, out_dir, resume"
    )


def nested_loop(loop: LoopConfig | Mapping[str, Any]) -> LoopConfig:
    """The `loop:` block of a config: a LoopConfig, or its fields as a mapping (YAML, JSON)."""
    return LoopConfig(**loop) if isinstance(loop, Mapping) else loop


@dataclass
class RecipeConfig:
    """The base of a post-training recipe's config, whose fields are all the recipe's own (among them `data` and a
    `loop` declared with `loop_field`): once they are set, a `loop:` given as a mapping becomes a LoopConfig, and
    an empty `data` is an error that says what to give (the data field's help). A recipe that checks more extends
    `__post_init__`, calling this one first."""

    def __post_init__(self) -> None:
        self.loop = nested_loop(self.loop)
        if not self.data:
            data = next(f for f in fields(self) if f.name == "data")
            raise ValueError(f"set data: {data.metadata['help']}")


def with_run_flags(cfg: Any, out: str | None = None, resume: bool = False) -> Any:
    """The CLI's --out DIR and --resume, applied last to cfg.loop."""
    if out:
        cfg.loop.out_dir = str(out)
    if resume:
        cfg.loop.resume = True
    return cfg


LORA_HELP = "train a LoRA adapter instead of every weight: {r, alpha, dropout, target_modules} (empty: full)"
EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def load_model(path: str, lora: LoRAConfig | None = None) -> tuple[Transformer, Tokenizer]:
    """A ragseek Transformer and its tokenizer from an HF folder or .gguf file ("" = the embedded SmolLM2); with
    `lora`, LoRA layers on it and every other weight frozen (`apply_lora`). An adapter folder (a LoRA run's
    final/) is its base with that adapter, which goes on training (GRPO after SFT)."""
    from ragseek.defaults import smollm2_gguf

    if path and (Path(path) / CONFIG_FILE).is_file():
        if lora is not None:
            raise ValueError(
                f"{path} is an adapter folder, so that adapter is trained: remove the lora: block"
            )
        return load_adapter(Transformer.from_pretrained(adapter_base(path)), path), load_tokenizer(path)
    source = path or str(smollm2_gguf())
    model = Transformer.from_pretrained(source)
    return (apply_lora(model, lora) if lora is not None else model), load_tokenizer(source)


def frozen(model: nn.Module) -> nn.Module:
    """A model in eval mode with no gradient: a reference or a teacher."""
    return model.eval().requires_grad_(False)


def preference_micro_batches(
    pairs: Sequence[dict], loop: LoopConfig, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """loop.grad_accum equal micro-batches of preference pairs, each collated on its own (`collate_preference`:
    its chosen rows, then its rejected rows), so a pair never straddles two micro-batches."""
    k, n = loop.grad_accum, len(pairs)
    if n % k:
        raise ValueError(f"{n} pairs per step do not split into loop.grad_accum={k} equal micro-batches")
    return [collate_preference(pairs[i * n // k : (i + 1) * n // k], pad_id) for i in range(k)]


@dataclass
class Run:
    """One recipe run's bookkeeping: resumed position, metrics JSONL, progress line, checkpoints. Under torchrun
    every rank keeps one; metrics are reduced over the ranks and rank 0 alone writes and prints."""

    cfg: Any
    loop: LoopConfig
    parallel: Parallel
    optimizer: torch.optim.Optimizer
    sampler: EpochSampler | None  # None: the recipe draws its data from the RNG alone (pretrain's windows)
    start: int
    ckpt: Checkpointer
    metrics: MetricsLog | None  # None on the ranks other than 0
    progress: Progress
    rows: list[dict] = field(default_factory=list)
    # when the previous step ended (or the run started): each row's dt
    last: float = field(default_factory=time.perf_counter)

    @property
    def out(self) -> Path:
        return Path(self.loop.out_dir)

    @property
    def model(self) -> nn.Module:
        return self.parallel.model

    @property
    def world(self) -> World:
        return self.parallel.world

    def log(self, step: int, metrics: Mapping[str, Any], tokens: int) -> dict[str, Any]:
        """Count `tokens` (the step's non-pad tokens, logged as seq_tokens: summed over the ranks, the metrics
        averaged) and the step's wall time (dt, seconds since the previous step ended); every loop.log_every steps
        write a JSONL row and print the progress line. The step's metrics as logged."""
        now = time.perf_counter()
        metrics = {**metrics, "seq_tokens": tokens, "dt": now - self.last}
        self.last = now
        metrics = self.world.reduce(metrics, summed=("seq_tokens",))
        self.progress.update(metrics["seq_tokens"])
        if step % self.loop.log_every == 0:
            self.write(step, metrics)
        return metrics

    def write(self, step: int, metrics: Mapping[str, Any], hidden: Sequence[str] = ()) -> None:
        """Keep a row of this run's metrics; rank 0 writes it and prints the progress line without `hidden` keys."""
        self.rows.append({"step": step, **metrics})
        if self.metrics is not None:
            self.metrics.log(step, metrics)
            print(self.progress.line(step, {k: v for k, v in metrics.items() if k not in hidden}), flush=True)

    def checkpoint(self, step: int) -> Path | None:
        """Save a checkpoint when `step` is due (every loop.ckpt_every steps); its folder, else None."""
        if not self.ckpt.due(step):
            return None
        data = self.sampler.state_dict() if self.sampler is not None else {}
        return self.ckpt.save(step, self.model, self.optimizer, data, self.cfg)

    def end_step(self, step: int, metrics: Mapping[str, Any], tokens: int) -> None:
        """After optimizer step `step` (1-based): `log` its metrics, then `checkpoint` when due."""
        self.log(step, metrics, tokens)
        self.checkpoint(step)

    def close(self, plot_keys: Sequence[str], name: str = "metrics.png") -> None:
        if self.metrics is None:
            return
        self.metrics.close()
        if self.rows or self.start:
            plot_metrics(self.metrics.path, self.out / name, plot_keys)

    def finish(self, plot_keys: Sequence[str], model: nn.Module, tokenizer: Tokenizer) -> list[dict]:
        """Close the log and plot `plot_keys`, save `model` with its tokenizer to <out_dir>/final (`save_final`);
        the metrics rows of this run."""
        self.close(plot_keys)
        # every rank: a sharded model is gathered for rank 0
        plain = self.parallel.full_module(model)
        if plain is not None and self.world.main:
            save_final(plain, tokenizer, self.out / "final", getattr(self.cfg, "model", ""))
        return self.rows


def start_run(
    cfg: Any,
    loop: LoopConfig,
    parallel: Parallel,
    optimizer: torch.optim.Optimizer,
    sampler: EpochSampler | None = None,
) -> Run:
    """Restore the latest checkpoint when loop.resume (weights, AdamW, RNG, data position: every rank), save the
    resolved config `cfg` (whose loop block is `loop`), open the metrics log (truncated to the resumed step); the
    last two on rank 0 alone."""
    out, world = Path(loop.out_dir), parallel.world
    ckpt = Checkpointer(out, loop.ckpt_every, loop.keep_last, world)
    start = 0
    if loop.resume:
        resumed = ckpt.load(parallel.model, optimizer)
        if sampler is not None:
            sampler.load_state_dict(resumed.data)
        start = resumed.step
        for problem in resumed.skipped if world.main else ():
            print(f"warning: skipped a damaged checkpoint: {problem}", file=sys.stderr, flush=True)
        if world.main:
            print(f"resumed from {resumed.path} at step {start}", flush=True)
    log = None
    if world.main:
        save_config(cfg, out / "config.json")
        log = MetricsLog(out / "metrics.jsonl", resume_step=start if loop.resume else None)
    return Run(cfg, loop, parallel, optimizer, sampler, start, ckpt, log, Progress(loop.max_steps, start))


def save_final(model: nn.Module, tokenizer: Tokenizer, folder: Path, base: str = "") -> Path:
    """The trained model (anything with `save_pretrained`) with its tokenizer, a folder `Transformer.from_pretrained`
    (or `load_reward_model`) and `load_tokenizer` read; a model with LoRA layers as a PEFT adapter folder of
    `base` (`save_adapter`; "" = the embedded SmolLM2), which `--llm local:FOLDER` and peft load."""
    if next(lora_layers(model), None) is not None:
        # trained on from an adapter folder: the base it names, as it names it (a hub name stays a hub name)
        if base and (Path(base) / CONFIG_FILE).is_file():
            base = adapter_base_name(base)
        save_adapter(model, folder, base=base or EMBEDDED_BASE)
    else:
        model.save_pretrained(folder)
    tokenizer.save(folder)
    return folder


RecipeMain = Callable[[str | None, list[str], str | None, bool], Any]


def recipe_main(cls: type, train: Callable[[Any], Any]) -> RecipeMain:
    """A recipe's `main(config_path, overrides, out=None, resume=False)`: the config file, then the --set overrides,
    then --out and --resume (`with_run_flags`), then `train(cfg)`: what `ragseek train NAME` calls."""

    def main(
        config_path: str | None, overrides: list[str], out: str | None = None, resume: bool = False
    ) -> Any:
        return train(with_run_flags(load_config(cls, config_path, overrides), out, resume))

    main.__doc__ = (
        f"`ragseek train`: a {cls.__name__} from the config file, --set, --out and --resume; then train."
    )
    return main
