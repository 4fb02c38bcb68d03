"""Threads on a shared CPU: decode speed of SmolLM2 on an idle machine and beside one busy process.

    .venv/bin/python bench/bench_threads.py                 # every row -> bench/results/threads.{json,md}
    .venv/bin/python bench/bench_threads.py --rows default,ragseek-auto --conditions busy --repeats 1   # printed only

Each measurement is a fresh process, because the OpenMP runtime reads its wait policy once, when torch loads it:
it sets up threads the way its row says (`ragseek.runtime.use_threads`, as `ragseek --threads N` does, or plain
environment variables), loads SmolLM2-135M-Instruct (the embedded GGUF; fp32 for ragseek), then decodes greedily
from a 40-token chat prompt for TOKENS tokens or SECONDS seconds, whichever comes first (a collapsed row would take
minutes). tok/s counts the tokens after the first (prefill excluded); cpu is the process's CPU seconds per wall
second over them (2.0 = both cores). "busy" runs one `python -c 'while True: pass'` beside it (one core of
competing work, a user's other program); "busy: ragseek", a second decode with torch's defaults. Rows run in turn,
REPEATS rounds, and each cell is the median of its rounds: load from other processes drifts, and this spreads it
over every row alike. The llama.cpp rows (llama-cpp-python, built from source by pip; the same GGUF at its own
Q4_1 weights, its own thread pool) run the same way when it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"
TOKENS, SECONDS, WARMUP, REPEATS, PREFILL = 64, 15.0, 4, 3, 512
QUESTION = "Explain in two sentences why the sky is blue, then name the scientist who first explained it."
SPIN = "while True: pass"
# name -> (what it is, runner, threads (None: the runner's default), extra environment)
ROWS: dict[str, tuple[str, str, int | None, dict[str, str]]] = {
    "default": ("torch's defaults: a thread per core, libgomp spins before it sleeps (before)", "torch", None, {}),
    "active": ("torch, a thread per core, OMP_WAIT_POLICY=ACTIVE (spin only)", "torch", None, {"OMP_WAIT_POLICY": "ACTIVE"}),
    "ragseek-1": ("ragseek --threads 1", "ragseek", 1, {}),
    "ragseek-2": ("ragseek --threads 2 (idle threads sleep)", "ragseek", 2, {}),
    "ragseek-auto": ("ragseek, no flag (a thread per core, idle threads sleep)", "ragseek", None, {}),
    "llama-1": ("llama.cpp, 1 thread", "llama", 1, {}),
    "llama-2": ("llama.cpp, 2 threads", "llama", 2, {}),
}  # fmt: skip
CONDITIONS = ("idle", "busy", "busy: ragseek")
# thread settings a row starts without, whatever this shell has
CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "RAGSEEK_THREADS")


def measure(runner: str, threads: int | None, tokens: int, seconds: float, forever: bool = False) -> dict:
    """In the worker process: set threads up, load the model, decode; return tok/s and what the process ran with
    (`forever`: decode until killed, a competitor)."""
    if runner == "ragseek":
        from ragseek.runtime import use_threads

        use_threads(threads)
    from ragseek.defaults import smollm2_gguf

    gguf = smollm2_gguf()
    decode, prefill = _llama(gguf, threads) if runner == "llama" else _torch(gguf)
    decode(WARMUP, 60.0)
    while forever:
        decode(tokens, seconds)
    t0, c0 = time.perf_counter(), time.process_time()
    times = decode(tokens, seconds)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    prefill_s = min(prefill(PREFILL) for _ in range(2))
    info = {
        "os_threads": len(os.listdir("/proc/self/task")),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
    }
    if runner != "llama":
        import torch

        info |= {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
    n = len(times) - 1
    return {
        "tok_s": n / (times[-1] - times[0]) if n > 0 else 0.0,
        "tokens": len(times),
        "cpu": cpu / wall,
        "prefill_tok_s": PREFILL / prefill_s,
        **info,
    }


def _torch(gguf: Path):
    from ragseek.model import SamplingConfig, Transformer, load_tokenizer
    from ragseek.model.decoding import decode_steps

    model, tok = Transformer.from_pretrained(gguf).eval(), load_tokenizer(gguf)
    ids = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    )

    def decode(n: int, budget: float) -> list[float]:
        times, start = [], time.perf_counter()
        for _ in decode_steps(model, [ids], SamplingConfig(max_new_tokens=n, temperature=0.0), set()):
            times.append(time.perf_counter())
            if times[-1] - start > budget:
                break
        return times

    def prefill(n: int) -> float:
        long = (ids * (n // len(ids) + 1))[:n]
        t0 = time.perf_counter()
        next(decode_steps(model, [long], SamplingConfig(max_new_tokens=1, temperature=0.0), set()))
        return time.perf_counter() - t0

    return decode, prefill


def _llama(gguf: Path, threads: int | None):
    from llama_cpp import Llama

    n = threads or os.cpu_count()
    llm = Llama(model_path=str(gguf), n_threads=n, n_threads_batch=n, n_ctx=1024, seed=0, verbose=False)
    prompt = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    ids = llm.tokenize(prompt.encode(), special=True)

    def decode(n: int, budget: float) -> list[float]:
        times, start = [], time.perf_counter()
        for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) >= n or times[-1] - start > budget:
                break
        return times

    def prefill(n: int) -> float:
        long = (ids * (n // len(ids) + 1))[:n]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(long)
        return time.perf_counter() - t0

    return decode, prefill


def have_llama() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def run_cell(name: str, condition: str, tokens: int, seconds: float) -> dict:
    """One measurement in a fresh process, beside a competitor when `condition` says so."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **ROWS[name][3]}
    worker = [sys.executable, __file__, "--worker"]
    rival = None
    if condition == "busy":
        rival = subprocess.Popen([sys.executable, "-c", SPIN])
    elif condition == "busy: ragseek":
        # a second decode with torch's defaults, until killed
        rival = subprocess.Popen(
            [*worker, "default", "--forever"], env=env, stdout=subprocess.DEVNULL, cwd=ROOT
        )
    load = os.getloadavg()[0]
    try:
        time.sleep(1.0 if rival else 0.0)
        args = [*worker, name, "--tokens", str(tokens), "--seconds", str(seconds)]
        out = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
    finally:
        if rival is not None:
            rival.kill()
            rival.wait()
    if out.returncode:
        raise RuntimeError(f"{name} ({condition}) failed:\n{out.stderr[-2000:]}")
    return {"load_1m": load, **json.loads(out.stdout.strip().splitlines()[-1])}


def markdown(result: dict) -> str:
    cells = {(c["row"], c["condition"]): c for c in result["cells"]}
    conditions = [c for c in CONDITIONS if any(k[1] == c for k in cells)]
    names = list(dict.fromkeys(c["row"] for c in result["cells"]))

    def table(what: str, cell) -> list[str]:
        lines = [f"| {what} | " + " | ".join(conditions) + " |", "|" + "---|" * (len(conditions) + 1)]
        for name in names:
            row = [cell(cells[name, c]) if (name, c) in cells else "—" for c in conditions]
            lines.append(f"| {ROWS[name][0]} | " + " | ".join(row) + " |")
        return lines

    decode = table("decode tok/s (cpu)", lambda c: f"{c['tok_s']:.1f} ({c['cpu']:.2f})")
    prefill = table(f"prefill tok/s ({PREFILL} tokens)", lambda c: f"{c['prefill_tok_s']:,.0f}")
    loads = [r["load_1m"] for c in result["cells"] for r in c["runs"]]
    llama = (
        ""
        if result["llama_cpp"]
        else "\n\nllama.cpp: llama-cpp-python is not installed here, so no rows for it."
    )
    return (
        "## Threads on a shared CPU (decode tok/s, idle and beside a busy process)\n\n"
        "`.venv/bin/python bench/bench_threads.py` — SmolLM2-135M-Instruct (the embedded GGUF; ragseek in fp32, "
        f"llama.cpp at its Q4_1 weights): greedy decoding after a 40-token prompt, {result['tokens']} tokens or "
        f"{result['seconds']:.0f} s, then a {PREFILL}-token prefill (best of 2); a fresh process per run, the median "
        f"of {result['repeats']} rounds; {result['cores']} cores ({result['cpu']}). busy: one "
        f"`python -c '{SPIN}'` beside it; busy: ragseek: a second SmolLM2 decode with torch's defaults beside it. "
        "cpu: the decoding process's CPU seconds per wall second. The 1-minute load average before each run was "
        f"{min(loads):.1f}–{max(loads):.1f} (median {statistics.median(loads):.1f}): other developers' jobs came and "
        "went in every column, so idle means no competitor of ours.\n\n"
        + "\n".join(decode)
        + "\n\n"
        + "\n".join(prefill)
        + llama
        + "\n"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker")
    p.add_argument("--forever", action="store_true")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--conditions", default=",".join(CONDITIONS))
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--seconds", type=float, default=SECONDS)
    a = p.parse_args()
    if a.worker:
        _, runner, threads, _ = ROWS[a.worker]
        print(json.dumps(measure(runner, threads, a.tokens, a.seconds, a.forever)))
        return
    names = [n for n in a.rows.split(",") if ROWS[n][1] != "llama" or have_llama()]
    conditions = [c.strip() for c in a.conditions.split(",")]
    runs: dict[tuple[str, str], list[dict]] = {(n, c): [] for n in names for c in conditions}
    for _ in range(a.repeats):
        for (name, condition), done in runs.items():
            done.append(run_cell(name, condition, a.tokens, a.seconds))
            r = done[-1]
            print(
                f"{name:13s} {condition:7s} {r['tok_s']:6.1f} tok/s  cpu {r['cpu']:.2f}  load {r['load_1m']:.2f}"
            )
    from ragseek.runtime import cores

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    cells = [
        {
            "row": n,
            "what": ROWS[n][0],
            "condition": c,
            "tok_s": statistics.median(r["tok_s"] for r in done),
            "cpu": statistics.median(r["cpu"] for r in done),
            "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in done),
            "runs": done,
        }
        for (n, c), done in runs.items()
    ]
    result = {
        "tokens": a.tokens,
        "seconds": a.seconds,
        "repeats": a.repeats,
        "cores": cores(),
        "cpu": cpu,
        "llama_cpp": have_llama(),
        "cells": cells,
    }
    text = markdown(result)
    if a.rows == ",".join(ROWS) and a.tokens == TOKENS:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "threads.json").write_text(json.dumps(result, indent=2) + "\n")
        (OUT / "threads.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
