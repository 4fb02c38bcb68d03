"""SFT speed on the CPU: tokens/s, peak memory and model-FLOPs utilisation of SmolLM2-135M optimizer steps.

    .venv/bin/python bench/bench_train_speed.py      # -> bench/results/train_speed.{json,md}

One process loads SmolLM2-135M-Instruct (the embedded GGUF, fp32 weights and AdamW state) and takes full SFT
optimizer steps (`recipes.sft.batch_loss` under `loop.train_step`: forward, backward, clipping, fused AdamW) on one
fixed set of examples: the first ROWS GSM8K training problems as chat rows, cut at MAX_LEN tokens, laid out two ways:
- padded: one example per row, right-padded to the longest (at MAX_LEN = 256 no two of these fit in one row);
- packed: the same examples packed into rows of at most PACK_LEN tokens (`data.pack_examples`: each example keeps its
  own positions and attends only to itself, so the loss and gradients are the padded batch's).
The settings (rows of the table) take turns, one step each per round, so drifting load from other processes falls
on every row alike; round 0 is the warm-up, each cell is the median of the later rounds.

- tokens/s: the examples' tokens (padding excluded) over the step's wall time; trained tokens/s: their response
  tokens (loss_mask = 1) over it. Both layouts hold the same tokens, so their rates compare directly.
- MFU: 6·N·tokens/s (N = the model's parameters, the tied embedding once) over the matmul peak of the step's
  precision: a plain torch.mm of two 2048 x 2048 matrices (fp32, and bf16), timed before every round in the same
  process with the same threads, median. bf16 rows run only where the CPU has avx512_bf16 or AMX (elsewhere bf16 is
  emulated and slower); weights and AdamW moments stay fp32 there (autocast).
- peak RSS: the process's resident-memory high-water mark during the step (reset before it through
  /proc/self/clear_refs; freed heap handed back first with malloc_trim), and its rise over the RSS before the step
  (what the step's activations, logits and gradients take; the model and AdamW moments are there before).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
ROWS, MAX_LEN, PACK_LEN, ROUNDS, MM = 8, 256, 512, 3, 2048
# name -> (loop.dtype, SFTConfig.head_chunk, loop.activation_checkpointing, batch layout)
SETTINGS = {
    "fp32, whole logits (before)": ("fp32", 0, False, "padded"),
    "fp32, head in chunks": ("fp32", 256, False, "padded"),
    "fp32, head in chunks + activation checkpointing": ("fp32", 256, True, "padded"),
    "fp32, head in chunks, packed": ("fp32", 256, False, "packed"),
    "bf16, whole logits": ("bf16", 0, False, "padded"),
    "bf16, head in chunks": ("bf16", 256, False, "padded"),
    "bf16, head in chunks + activation checkpointing": ("bf16", 256, True, "padded"),
    "bf16, head in chunks, packed": ("bf16", 256, False, "packed"),
}


def has_bf16() -> bool:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def rss_kb(field: str) -> int:
    """VmRSS (now) or VmHWM (the high-water mark) of this process, in kB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def reset_peak() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def matmul_flops(torch, dtype) -> float:
    a, b = torch.randn(MM, MM, dtype=dtype), torch.randn(MM, MM, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * MM**3 / min(times)


def sft_batches(tokenizer, rows: int, max_len: int, pack_len: int, work: Path) -> dict[str, dict]:
    """{"padded": the first `rows` GSM8K examples one per row, "packed": the same packed into pack_len rows}."""
    from ragseek.train.data import collate_sft, load_sft, pack_examples

    problems = [json.loads(line) for line in GSM8K.read_text().splitlines()[: 4 * rows]]
    data = work / "gsm8k.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p["question"], "response": p["answer"]}) + "\n" for p in problems)
    )
    examples = load_sft(data, tokenizer, max_len)[:rows]
    return {
        "padded": collate_sft(examples, tokenizer.pad_id),
        "packed": collate_sft(pack_examples(examples, pack_len), tokenizer.pad_id),
    }


def describe(batch: dict) -> dict:
    slots = batch["input_ids"].numel()
    tokens = int(batch["attention_mask"].sum())
    return {
        "shape": list(batch["input_ids"].shape),
        "tokens": tokens,
        "response_tokens": int(batch["loss_mask"].sum()),
        "padding": 1 - tokens / slots,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--max-len", type=int, default=MAX_LEN, help="tokens per example (the end is cut)")
    parser.add_argument("--pack-len", type=int, default=PACK_LEN, help="tokens per packed row")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="round 0 warms up, the others are timed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    args = parser.parse_args()
    from ragseek.runtime import use_threads

    threads = use_threads(args.threads)
    import torch

    from ragseek.defaults import smollm2_gguf
    from ragseek.model import Transformer, load_tokenizer
    from ragseek.train.distributed import World
    from ragseek.train.loop import LoopConfig, build_optimizer, train_step
    from ragseek.train.recipes.sft import batch_loss

    bf16 = has_bf16()
    settings = {k: v for k, v in SETTINGS.items() if bf16 or v[0] == "fp32"}
    load_start = os.getloadavg()
    tokenizer, model = load_tokenizer(smollm2_gguf()), Transformer.from_pretrained(smollm2_gguf())
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        batches = sft_batches(tokenizer, args.rows, args.max_len, args.pack_len, Path(tmp))
    batch_info = {layout: describe(batch) for layout, batch in batches.items()}
    tokens, response_tokens = batch_info["padded"]["tokens"], batch_info["padded"]["response_tokens"]
    optimizer = build_optimizer(model, LoopConfig(lr=2e-5))
    peaks = {"fp32": [], "bf16": []}
    steps = {name: [] for name in settings}
    for r in range(args.rounds):
        peaks["fp32"].append(matmul_flops(torch, torch.float32))
        if bf16:
            peaks["bf16"].append(matmul_flops(torch, torch.bfloat16))
        for name, (dtype, head_chunk, recompute, layout) in settings.items():
            loop = LoopConfig(lr=2e-5, dtype=dtype, activation_checkpointing=recompute)
            trained = World().parallelize(model, loop)
            reset_peak()
            before = rss_kb("VmRSS")
            t0 = time.perf_counter()
            loss_fn = partial(batch_loss, model, reduction="sequence", head_chunk=head_chunk)
            out = train_step(optimizer, [batches[layout]], loss_fn, loop, r, trained)
            seconds = time.perf_counter() - t0
            row = {"round": r, "seconds": seconds, "rss_mb": rss_kb("VmHWM") / 1024, "rise_mb": (rss_kb("VmHWM") - before) / 1024, "loss": out["loss"]}  # fmt: skip
            print(f"round {r} {name}: {seconds:.1f} s, {tokens / seconds:.1f} tok/s, peak RSS {row['rss_mb']:.0f} MB (+{row['rise_mb']:.0f})", flush=True)  # fmt: skip
            steps[name].append(row)
    peak = {dtype: statistics.median(v) for dtype, v in peaks.items() if v}
    rows = {}
    for name, (dtype, head_chunk, recompute, layout) in settings.items():
        timed = steps[name][1:] or steps[name]
        seconds = statistics.median(s["seconds"] for s in timed)
        rows[name] = {
            "dtype": dtype,
            "head_chunk": head_chunk,
            "activation_checkpointing": recompute,
            "layout": layout,
            "step_s": seconds,
            "tok_s": tokens / seconds,
            "trained_tok_s": response_tokens / seconds,
            "mfu": 6 * n_params * tokens / seconds / peak[dtype],
            "peak_rss_mb": max(s["rss_mb"] for s in timed),
            "step_rise_mb": max(s["rise_mb"] for s in timed),
            "steps": steps[name],
        }
    results = {
        "model": "SmolLM2-135M-Instruct",
        "params": n_params,
        "examples": args.rows,
        "max_len": args.max_len,
        "pack_len": args.pack_len,
        "batches": batch_info,
        "threads": threads,
        "cpu_bf16": bf16,
        "rounds": args.rounds,
        "matmul_peak_gflops": {k: v / 1e9 for k, v in peak.items()},
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "rows": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "train_speed.md").write_text(markdown(results, args))
    print(markdown(results, args))


def markdown(res: dict, args: argparse.Namespace) -> str:
    load = res["load_average"]
    padded, packed = res["batches"]["padded"], res["batches"]["packed"]
    flags = [f"--rows {args.rows}"] * (args.rows != ROWS) + [f"--max-len {args.max_len}"] * (
        args.max_len != MAX_LEN
    )
    flags += [f"--pack-len {args.pack_len}"] * (args.pack_len != PACK_LEN)
    flags += [f"--rounds {args.rounds}"] * (args.rounds != ROUNDS) + [f"--threads {args.threads}"] * bool(
        args.threads
    )
    peaks = ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in res["matmul_peak_gflops"].items())
    timed = [[s["seconds"] for s in r["steps"][1:] or r["steps"]] for r in res["rows"].values()]
    spread = max(max(t) / min(t) - 1 for t in timed)
    busy = (
        f": other work shared the CPU (load above the run's {res['threads']} threads), so smaller differences "
        "between rows are noise"
        if max(load["start"][0], load["end"][0]) > res["threads"]
        else ""
    )
    bf16 = (
        "The CPU has avx512_bf16: the bf16 rows are autocast steps (weights and AdamW moments fp32)."
        if res["cpu_bf16"]
        else "bf16 not measured: this CPU has neither avx512_bf16 nor AMX, so torch emulates bf16 matmuls in fp32."
    )
    lines = [
        "## SFT training speed: tokens/s, memory and MFU (SmolLM2-135M, CPU)",
        "",
        f"`.venv/bin/python bench/bench_train_speed.py{''.join(' ' + f for f in flags)}`",
        "",
        f"Full SFT optimizer steps (forward, backward, clipping, fused AdamW) on the first {res['examples']} GSM8K "
        f"problems as chat rows cut at {res['max_len']} tokens ({padded['tokens']:,} tokens, "
        f"{padded['response_tokens']:,} of them trained), one example per row padded to the longest ("
        f"{shape(padded)}, {100 * padded['padding']:.0f}% padding) or packed into rows of at most {res['pack_len']} "
        f"tokens ({shape(packed)}, {100 * packed['padding']:.0f}% padding; each example keeps its own positions and "
        "attends only to itself, so the loss and gradients are the padded batch's), "
        f"{res['threads']} threads; the settings take turns, {res['rounds'] - 1} timed round(s) after one warm-up "
        f"round, median. MFU = 6 · {res['params'] / 1e6:.1f}M params · tokens/s over the same precision's "
        f"2048 x 2048 torch.mm peak measured in the same run: {peaks}. {bf16} Peak RSS is the process's high-water "
        "mark during the step (model and AdamW moments included); rise is the step's own growth over the RSS before "
        f"it. Load average {load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end (2 cores, shared); "
        f"the timed steps of one setting differ by up to {100 * spread:.0f}%{busy}.",
        "",
        "| setting | batch | step (s) | tokens/s | trained tokens/s | MFU | peak RSS (MB) | rise in the step (MB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in res["rows"].items():
        lines.append(
            f"| {name} | {shape(res['batches'][r['layout']])} | {r['step_s']:.1f} | {r['tok_s']:.1f} | "
            f"{r['trained_tok_s']:.1f} | {100 * r['mfu']:.1f}% | {r['peak_rss_mb']:,.0f} | {r['step_rise_mb']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def shape(batch: dict) -> str:
    return " x ".join(map(str, batch["shape"]))


if __name__ == "__main__":
    main()
