"""A real training run for the kill -9 / --resume test: a tiny ragseek Transformer memorises 8 toy sequences.

    python tests/train/_toy_train.py --out /tmp/toy                      # uninterrupted
    python tests/train/_toy_train.py --out /tmp/toy --pause-after 13     # prints "paused", waits to be killed
    python tests/train/_toy_train.py --out /tmp/toy --resume             # continues from the latest checkpoint

Every step draws from all three RNGs (python `random` picks the crop start, numpy the crop length, torch a
random 10% of the loss mask), so a resume reproduces the uninterrupted losses only if all three are restored,
along with the weights, the AdamW moments, the schedule and the data position.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch

from ragseek.model.config import ModelConfig
from ragseek.model.transformer import Transformer
from ragseek.train.data import EpochSampler
from ragseek.train.loop import (
    Checkpointer,
    LoopConfig,
    MetricsLog,
    Progress,
    build_optimizer,
    micro_batches,
    plot_metrics,
    save_config,
    set_seed,
    train_step,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--pause-after", type=int, default=0, help="after this step, print 'paused' and wait")
    args = ap.parse_args()
    torch.set_num_threads(1)

    cfg = LoopConfig(
        lr=2e-2,
        warmup_steps=3,
        max_steps=30,
        grad_accum=2,
        max_grad_norm=1.0,
        weight_decay=0.01,
        ckpt_every=10,
        keep_last=2,
        seed=0,
        out_dir=args.out,
        resume=args.resume,
    )
    set_seed(cfg.seed)
    model = Transformer(
        ModelConfig(
            vocab_size=16,
            dim=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=8,
            inter_dim=64,
            max_seq_len=32,
        )
    )
    data = torch.randint(0, 16, (8, 12), generator=torch.Generator().manual_seed(1234))
    sampler = EpochSampler(len(data), batch_size=4, seed=cfg.seed)
    optimizer = build_optimizer(model, cfg)

    ckpt = Checkpointer(cfg.out_dir, cfg.ckpt_every, cfg.keep_last)
    resumed = ckpt.load(model, optimizer) if cfg.resume else None
    start = 0
    if resumed:
        sampler.load_state_dict(resumed.data)
        start = resumed.step
        print(f"resumed from {resumed.path} at step {start}", flush=True)
    save_config(cfg, Path(cfg.out_dir) / "config.json")
    log = MetricsLog(Path(cfg.out_dir) / "metrics.jsonl", resume_step=start if resumed else None)
    progress = Progress(cfg.max_steps, start)

    def loss_fn(batch: dict[str, torch.Tensor]):
        return model.loss(batch["tokens"], batch["loss_mask"])

    for step in range(start, cfg.max_steps):
        first = random.randrange(0, 3)
        length = int(np.random.randint(8, 10))
        tokens = data[sampler.next_batch(), first : first + length]
        loss_mask = (torch.rand(tokens.shape) > 0.1).float()
        out = train_step(
            optimizer,
            micro_batches({"tokens": tokens, "loss_mask": loss_mask}, cfg.grad_accum),
            loss_fn,
            cfg,
            step,
        )
        progress.update(tokens.numel())
        done = step + 1
        if done % cfg.log_every == 0:
            log.log(done, out)
            print(progress.line(done, out), flush=True)
        if ckpt.due(done):
            print(f"checkpoint {ckpt.save(done, model, optimizer, sampler.state_dict(), cfg)}", flush=True)
        if done == args.pause_after:
            print("paused", flush=True)
            time.sleep(600)
    log.close()
    plot_metrics(log.path, Path(cfg.out_dir) / "loss.png", ["loss", "lr", "grad_norm"])


if __name__ == "__main__":
    main()
