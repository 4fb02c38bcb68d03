"""SFT steps/s on this CPU at 1 and 2 processes: `python -m ragseek.train.sft` against torchrun (gloo), DDP and FSDP2.

    nice -n 15 .venv/bin/python bench/bench_distributed.py [--steps 12]

SmolLM2-135M-Instruct (fp32) fine-tuned on addition SFT rows (worked solutions), a global batch of 8 rows, max_len
96, the same config in every row: one process with 1 and with 2 torch threads, then `torchrun --nproc-per-node 2`
(one thread per rank: the two cores) under loop.parallel=ddp and fsdp. A step's time is the `dt` of its metrics row
(data, forward, backward, the collectives, AdamW); the first two steps (one-off costs) are left out and the
median of the rest is reported. Each row also gives its largest loss difference from the one-process run: the
runs train the same model on the same global batches. Writes bench/results/distributed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragseek.defaults import smollm2_gguf  # noqa: E402
from ragseek.model.checkpoint import gguf_to_folder  # noqa: E402
from ragseek.train.loop import read_metrics  # noqa: E402
from ragseek.train.tasks.addition import train_problems, write_sft_jsonl  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "runs" / "bench_distributed"
# (name, processes, threads per process, loop.parallel)
ROWS = [
    ("1 process, 1 thread", 1, 1, "ddp"),
    ("1 process, 2 threads", 1, 2, "ddp"),
    ("torchrun 2 processes, DDP", 2, 1, "ddp"),
    ("torchrun 2 processes, FSDP2", 2, 1, "fsdp"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(config: Path, out: Path, procs: int, threads: int, parallel: str) -> dict:
    """One training run as a user starts it; its step times and losses from metrics.jsonl."""
    shutil.rmtree(out, ignore_errors=True)
    launcher = [sys.executable, "-m"]
    if procs > 1:
        launcher += [
            "torch.distributed.run",
            "--nproc-per-node",
            str(procs),
            "--master-port",
            str(free_port()),
            "-m",
        ]
    command = [*launcher, "ragseek.train.sft", "--config", str(config), "--set", f"loop.parallel={parallel}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run([*command, "--out", str(out)], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = read_metrics(out / "metrics.jsonl")
    step_s = statistics.median(r["dt"] for r in rows[2:])
    return {
        "processes": procs,
        "threads": threads,
        "parallel": parallel if procs > 1 else None,
        "step_s": step_s,
        "steps_per_s": 1 / step_s,
        "tokens_per_s": statistics.median(r["seq_tokens"] / r["dt"] for r in rows[2:]),
        "wall_s": wall,
        "losses": [r["loss"] for r in rows],
    }


def write_md(r: dict) -> None:
    base = r["rows"][ROWS[0][0]]
    lines = [
        "## Distributed training: steps/s at 1 and 2 processes (bench_distributed)",
        "",
        f"`{r['command']}` — SFT of SmolLM2-135M-Instruct (fp32) on addition rows, a global batch of "
        f"{r['batch_size']} rows (max_len {r['max_len']}), {r['steps']} steps per row, the median step of steps 3 "
        f"on; this CPU's 2 cores, gloo; niceness {r['niceness']}, load average {r['load_average']:.1f} when it "
        "started (the machine is shared: compare rows, not machines). Every row is the same run: the loss column "
        "is its largest difference from the first row's losses.",
        "",
        "| run | step (s) | steps/s | tokens/s | vs 1 process, 1 thread | max \\|Δ loss\\| | command |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, procs, _, parallel in ROWS:
        x = r["rows"][name]
        dloss = max(abs(a - b) for a, b in zip(x["losses"], base["losses"], strict=True))
        launch = (
            "torchrun --nproc-per-node 2 -m" if procs > 1 else f"OMP_NUM_THREADS={x['threads']} python -m"
        )
        command = f"{launch} ragseek.train.sft --config {r['config']}" + (
            f" --set loop.parallel={parallel}" if procs > 1 else ""
        )
        lines.append(
            f"| {name} | {x['step_s']:.2f} | {x['steps_per_s']:.2f} | {x['tokens_per_s']:,.0f} | "
            f"{base['step_s'] / x['step_s']:.2f}x | {dloss:.1e} | `{command}` |"
        )
    lines += [
        "",
        "Two processes on two cores do the work of one process with two threads, plus an all-reduce (DDP) or an "
        "all-gather and a reduce-scatter per block (FSDP2) of the 135M fp32 gradients and weights through gloo "
        "on this machine's loopback: little speed-up is expected, and the point of the rows is that the same "
        "run trains, with the same losses, at either world size. Commands for GPUs and several nodes: "
        "docs/training-loop.md.",
    ]
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--steps", type=int, default=12, help="optimizer steps per run (the first two are not timed)"
    )
    ap.add_argument("--md-only", action="store_true", help="rewrite distributed.md from distributed.json")
    args = ap.parse_args()
    if args.md_only:
        write_md(json.loads((RESULTS / "distributed.json").read_text()))
        return
    RUNS.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = write_sft_jsonl(RUNS / "addition_sft.jsonl", train_problems(64, seed=11))
    settings = {
        "model": str(gguf_to_folder(smollm2_gguf())),
        "data": str(data),
        "max_len": 96,
        "batch_size": 8,
        "loop": {"lr": 1e-5, "max_steps": args.steps, "ckpt_every": 0, "log_every": 1, "seed": 0},
    }
    config = RUNS / "sft.yaml"
    config.write_text(json.dumps(settings, indent=2))
    result = {
        "command": ".venv/bin/python bench/bench_distributed.py " + " ".join(sys.argv[1:]),
        "load_average": os.getloadavg()[0],
        "niceness": os.nice(0),
        "steps": args.steps,
        "batch_size": settings["batch_size"],
        "max_len": settings["max_len"],
        "config": str(config.relative_to(ROOT)),
        "rows": {},
    }
    result["command"] = result["command"].strip()
    for name, procs, threads, parallel in ROWS:
        result["rows"][name] = run(
            config, RUNS / name.replace(" ", "_").replace(",", ""), procs, threads, parallel
        )
        print(name, {k: v for k, v in result["rows"][name].items() if k != "losses"}, flush=True)
    (RESULTS / "distributed.json").write_text(json.dumps(result, indent=2))
    write_md(result)


if __name__ == "__main__":
    main()
