"""Pretraining a DeepSeek-style model from scratch: next-token CE + MTP, MoE load balancing, val perplexity.

    ragseek train pretrain --config configs/pretrain_tiny.yaml [--set key=value ...] [--out DIR] [--resume]
    ragseek train pretrain --config configs/pretrain_tiny.yaml [--set loop.max_steps=50]

The recipe, top to bottom (`train`):
  data     the corpus (.txt / .jsonl files or folders; default SciFact + GSM8K from ../shared/data) tokenised once
           into out_dir/data/{train,val}.bin by a byte-level BPE trained on it (saved in out_dir/tokenizer) or a
           given tokenizer; batches are random contiguous windows of seq_len tokens from train.bin
  loss     L = L_main + lambda/D sum_k L_MTP^k (DeepSeek-V3 eq. 25; `Transformer.loss`)
           + sum over MoE layers of alpha sum_i f_i P_i when balance=aux (eq. 17)
  balance  bias: after each optimizer step every MoE layer does b_i += gamma * sign(mean load - load_i) on the
           load of that step (aux-loss-free, Wang et al. 2024); aux: the sequence-wise loss above; none: neither
  metrics  per step: loss, loss_main, loss_mtp, per-layer expert load and MaxVio = max_i load_i / mean load - 1
           (their mean: maxvio), tok/s; every eval_every steps val_loss (main head) and val_ppl = exp(val_loss)
  output   checkpoints (weights, AdamW, RNG: --resume continues exactly), metrics.jsonl, loss.png, and at the end
           out_dir/model: a `Transformer.from_pretrained` + `load_tokenizer` folder
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ragseek.config import config_field as _f
from ragseek.defaults import shared_data_dir
from ragseek.model.config import ModelConfig
from ragseek.model.moe import max_violation
from ragseek.model.tokenizer import Tokenizer, load_tokenizer
from ragseek.model.transformer import Transformer
from ragseek.runtime import use_threads
from ragseek.train.corpus import (
    TokenSplit,
    load_split,
    open_tokens,
    read_documents,
    tokenize_to_memmap,
    train_bpe,
)
from ragseek.train.distributed import World
from ragseek.train.loop import LoopConfig, build_optimizer, micro_batches, set_seed, train_step
from ragseek.train.run import loop_field, nested_loop, recipe_main, start_run

Balance = Literal["bias", "aux", "none"]
BALANCES: tuple[Balance, ...] = ("bias", "aux", "none")


def default_corpus() -> list[str]:
    """SciFact abstracts (title + text) and GSM8K train (question + answer) from ../shared/data."""
    root = shared_data_dir()
    if root is None:
        raise FileNotFoundError(
            "no ../shared/data (or RAGSEEK_DATA): set `data` to .txt / .jsonl files or folders"
        )
    return [str(root / "scifact" / "corpus.jsonl"), str(root / "gsm8k" / "train.jsonl")]


@dataclass
class PretrainConfig:
    model: dict = _f({}, "ModelConfig fields; vocab_size is taken from the tokenizer")
    data: list[str] = _f(
        [], ".txt / .jsonl files or folders ([] = SciFact corpus + GSM8K train in ../shared)"
    )
    tokenizer: str = _f(
        "bpe", "bpe (train a byte-level BPE on the corpus) or a tokenizer folder / .gguf file"
    )
    vocab_size: int = _f(4096, "BPE vocabulary size (tokenizer=bpe)")
    data_dir: str = _f("", "where the tokenizer and token files go, reused when present ('' = out_dir/data)")
    max_docs: int = _f(0, "use only the first this many documents (0 = all)")
    val_fraction: float = _f(0.05, "last fraction of the documents held out for validation")
    balance: Balance = _f(
        "bias", "MoE balancing: bias (aux-loss-free, speed model.bias_update_speed), aux, none"
    )
    seq_len: int = _f(256, "tokens per training window")
    batch_size: int = _f(8, "windows per optimizer step (split into loop.grad_accum micro-batches)")
    val_windows: int = _f(32, "validation windows of seq_len tokens, evenly spaced over val.bin")
    num_threads: int = _f(
        0, "torch CPU threads (0: the command's, `ragseek --threads N`, default one per core); --threads wins"
    )
    loop: LoopConfig = loop_field()

    def __post_init__(self) -> None:
        self.loop = nested_loop(self.loop)
        if self.balance not in BALANCES:
            raise ValueError(f"balance={self.balance!r}: choose one of {BALANCES}")


# --------------------------------------------------------------------------------------------------------------------
# data


def prepare_data(cfg: PretrainConfig) -> tuple[Tokenizer, TokenSplit]:
    """The tokenizer and token files in data_dir, built on first use (BPE training + one tokenisation pass)."""
    folder = Path(cfg.data_dir or Path(cfg.loop.out_dir) / "data")
    split = load_split(folder)
    if split is not None:
        return load_tokenizer(folder / "tokenizer"), split
    docs = list(read_documents(cfg.data or default_corpus()))
    if cfg.max_docs:
        docs = docs[: cfg.max_docs]
    tokenizer = train_bpe(docs, cfg.vocab_size) if cfg.tokenizer == "bpe" else load_tokenizer(cfg.tokenizer)
    tokenizer.save(folder / "tokenizer")
    return tokenizer, tokenize_to_memmap(docs, tokenizer, folder, cfg.val_fraction)


def random_windows(tokens: np.ndarray, batch_size: int, seq_len: int) -> torch.Tensor:
    """batch_size windows of seq_len contiguous tokens at uniform random starts (torch's global RNG)."""
    if len(tokens) <= seq_len:
        raise ValueError(f"{len(tokens)} training tokens cannot fill a window of seq_len={seq_len}: add data")
    starts = torch.randint(0, len(tokens) - seq_len + 1, (batch_size,)).tolist()
    return torch.from_numpy(np.stack([tokens[s : s + seq_len].astype(np.int64) for s in starts]))


def val_windows(tokens: np.ndarray, n: int, seq_len: int) -> torch.Tensor:
    """n windows evenly spaced over the validation tokens (the same every evaluation)."""
    if len(tokens) < seq_len:
        raise ValueError(f"{len(tokens)} validation tokens cannot fill seq_len={seq_len}: raise val_fraction")
    starts = np.linspace(0, len(tokens) - seq_len, n).astype(int)
    return torch.from_numpy(np.stack([tokens[s : s + seq_len].astype(np.int64) for s in starts]))


# --------------------------------------------------------------------------------------------------------------------
# model, loss, balancing


def build_model(cfg: PretrainConfig, vocab_size: int, eos_id: int) -> Transformer:
    """A freshly initialised model; aux_loss_alpha is zeroed unless balance=aux (so no routing is kept for it)."""
    model_cfg = ModelConfig.from_dict({**cfg.model, "vocab_size": vocab_size, "eos_token_id": eos_id})
    if cfg.balance != "aux":
        model_cfg = replace(model_cfg, aux_loss_alpha=0.0)
    elif model_cfg.n_routed_experts and model_cfg.aux_loss_alpha <= 0:
        raise ValueError(
            "balance=aux needs model.aux_loss_alpha > 0 (DeepSeek-V3 uses 1e-4; Wang et al. 1e-2)"
        )
    return Transformer(model_cfg)


def pretrain_loss(model: Transformer, tokens: torch.Tensor, balance: Balance) -> tuple[torch.Tensor, dict]:
    """model.loss (L_main + lambda/D sum_k L_MTP^k), plus sum over MoE layers of L_Bal when balance=aux."""
    loss, parts = model.loss(tokens)
    if balance == "aux" and model.moe_layers:
        bal = torch.stack([m.balance_loss() for m in model.moe_layers]).sum()
        loss = loss + bal
        parts = {**parts, "loss": loss.detach(), "loss_bal": bal.detach()}
    return loss, parts


def balance_step(model: Transformer, balance: Balance, world: World | None = None) -> dict[str, Any]:
    """Per-layer expert load of the step just taken and its MaxVio; then the bias update (bias) or a load reset.
    Under torchrun the load is summed over the ranks first, so every rank moves its biases alike, as one process
    would on the whole batch."""
    if not model.moe_layers:
        return {}
    world = world or World()
    loads = [world.sum(m.load.clone()) for m in model.moe_layers]
    for m, load in zip(model.moe_layers, loads, strict=True):
        if balance == "bias":
            m.update_bias(load)  # the load of this step's micro-batches; then it is reset
        else:
            m.reset_load()
    maxvio = [max_violation(c) for c in loads]
    return {
        "maxvio": sum(maxvio) / len(maxvio),
        "maxvio_layers": maxvio,
        "expert_load": [c.tolist() for c in loads],
    }


@torch.no_grad()
def evaluate(
    model: Transformer, windows: torch.Tensor, batch_size: int, world: World | None = None
) -> dict[str, float]:
    """Mean main-head CE over the validation windows (and MTP CE when the model has MTP), and exp of it. Under
    torchrun each rank scores its share of the windows (`World.eval_share`) and the sums are all-reduced."""
    world = world or World()
    share, real = world.eval_share(windows)
    share = torch.stack(share).to(world.device)
    # the windows that pad this rank's share count for nothing
    keep = (torch.arange(len(share), device=world.device) < real)[:, None].expand_as(share)
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # main CE, MTP CE (each a sum over windows), windows
    for i in range(0, len(share), batch_size):
        rows = keep[i : i + batch_size]
        _, parts = model.loss(share[i : i + batch_size], rows)  # CE over the kept windows' tokens
        n = int(rows[:, 0].sum())
        mtp = float(parts["loss_mtp"].mean()) if "loss_mtp" in parts else 0.0
        sums += torch.tensor([float(parts["loss_main"]) * n, mtp * n, n], dtype=torch.float64)
    for m in model.moe_layers:
        m.reset_load()  # validation routing is not training load
    model.train()
    main, mtp, n = world.sum(sums).tolist()
    out = {"val_loss": main / n, "val_ppl": math.exp(main / n)}
    if "loss_mtp" in parts:
        out["val_loss_mtp"] = mtp / n
    return out


# --------------------------------------------------------------------------------------------------------------------
# the loop


def train(cfg: PretrainConfig, model: Transformer | None = None) -> dict[str, Any]:
    """Pretrain (a fresh model, or `model` as given, e.g. with a deliberately skewed router); return a summary."""
    loop = cfg.loop
    world = World.join(loop)
    if cfg.num_threads:
        use_threads(default=cfg.num_threads)
    # rank 0 trains the tokenizer and writes the token files; the others then read them
    with world.main_first():
        tokenizer, split = prepare_data(cfg)
    train_tokens, val_tokens = open_tokens(split, "train"), open_tokens(split, "val")
    set_seed(loop.seed)
    if model is None:
        model = build_model(cfg, tokenizer.vocab_size, tokenizer.eos_id)
    model.train()
    # counted before FSDP shards them (an expert's slice of a sharded weight is a collective)
    params, active = model.num_params(), model.num_params(active=True)
    trained = world.parallelize(model, loop)
    optimizer = build_optimizer(model, loop)
    # no sampler: the windows come from torch's RNG, which the checkpoints restore
    run = start_run(cfg, loop, trained, optimizer)
    val = val_windows(val_tokens, cfg.val_windows, cfg.seq_len)
    if world.main:
        print(
            f"pretrain: {params:,} params ({active:,} active), {split.meta['train_tokens']:,} train / "
            f"{split.meta['val_tokens']:,} val tokens, vocab {tokenizer.vocab_size}",
            flush=True,
        )

    def loss_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return pretrain_loss(model, batch["tokens"], cfg.balance)

    row: dict[str, Any] = {}
    for step in range(run.start, loop.max_steps):
        t0 = time.perf_counter()
        # the global batch, drawn alike on every rank; this rank trains on its share
        tokens = random_windows(train_tokens, cfg.batch_size, cfg.seq_len)[world.share(cfg.batch_size)]
        micro = micro_batches({"tokens": tokens}, loop.grad_accum)
        row = train_step(optimizer, micro, loss_fn, loop, step, trained)
        row.update(balance_step(model, cfg.balance, world))
        row["tok_s"] = tokens.numel() / (time.perf_counter() - t0)
        done = step + 1
        if loop.eval_every and (done % loop.eval_every == 0 or done == loop.max_steps):
            row.update(evaluate(model, val, cfg.batch_size, world))
        row = world.reduce(row, summed=("tok_s",))
        run.progress.update(tokens.numel() * world.size)
        if done % loop.log_every == 0 or "val_loss" in row:
            run.write(done, row, hidden=("maxvio_layers", "expert_load"))
        saved = run.checkpoint(done)
        if saved is not None and world.main:
            print(f"checkpoint {saved}", flush=True)
    run.close(["loss", "loss_main", "loss_mtp", "val_loss", "maxvio", "lr"], "loss.png")
    # every rank: a sharded model is gathered for rank 0
    plain = trained.full_module()
    if world.main:
        plain.save_pretrained(run.out / "model")
        tokenizer.save(run.out / "model")
    return {
        "params": params,
        "active_params": active,
        "train_tokens_seen": loop.max_steps * cfg.batch_size * cfg.seq_len,
        **{k: v for k, v in row.items() if k not in ("expert_load",)},
    }


# --------------------------------------------------------------------------------------------------------------------
# CLI


main = recipe_main(PretrainConfig, train)
