"""Threads on a shared CPU: decode speed of SmolLM2 on an idle machine and beside one busy process.

    .venv/bin/python bench/bench_threads.py                 # every row -> bench/results/threads.{json,md}
    .venv/bin/python bench/bench_threads.py --rows default,passive-2 --conditions busy   # a few, printed only

Each measurement is a fresh process, because the OpenMP runtime reads its wait policy once, when torch loads it:
it sets up threads the way its row says (`ragseek.runtime.use_threads`, as `ragseek --threads N` does, or plain
environment variables), loads SmolLM2-135M-Instruct (the embedded GGUF; fp32 for ragseek), then decodes greedily
from a 40-token chat prompt for TOKENS tokens or SECONDS seconds, whichever comes first (a collapsed row would take
minutes). tok/s counts the tokens after the first (prefill excluded); cpu is the process's CPU seconds per wall
second over those tokens (2.0 = both cores busy). "busy" runs one `python -c 'while True: pass'` beside it (one
core of competing work, a user's other program); "busy: ragseek" a second ragseek decode (torch's defaults). The
llama.cpp rows (llama-cpp-python built from source by pip, same GGUF, Q4_1 weights) run the same way when it is
installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"
TOKENS, SECONDS, WARMUP = 64, 20.0, 4
QUESTION = "Explain in two sentences why the sky is blue, then name the scientist who first explained it."
SPIN = "while True: pass"
# name -> (what it is, runner, threads (None: left to the runner's default), extra environment)
ROWS: dict[str, tuple[str, str, int | None, dict[str, str]]] = {
    "default": ("torch's defaults (a thread per core, libgomp spins ~300k polls)", "torch", None, {}),
    "spin-1": ("torch, 1 thread (OMP_NUM_THREADS=1)", "torch", None, {"OMP_NUM_THREADS": "1"}),
    "active-2": (
        "torch, 2 threads, OMP_WAIT_POLICY=ACTIVE (spin only)",
        "torch",
        None,
        {"OMP_WAIT_POLICY": "ACTIVE"},
    ),
    "passive-2": (
        "torch, 2 threads, OMP_WAIT_POLICY=PASSIVE (sleep at once)",
        "torch",
        None,
        {"OMP_WAIT_POLICY": "PASSIVE"},
    ),
    "spincount-2": (
        "torch, 2 threads, GOMP_SPINCOUNT=10000 (a short spin, then sleep)",
        "torch",
        None,
        {"GOMP_SPINCOUNT": "10000"},
    ),
    "ragseek-1": ("ragseek --threads 1", "ragseek", 1, {}),
    "ragseek-2": ("ragseek --threads 2", "ragseek", 2, {}),
    "ragseek-auto": ("ragseek (auto)", "ragseek", None, {}),
    "llama-1": ("llama.cpp, 1 thread", "llama", 1, {}),
    "llama-2": ("llama.cpp, 2 threads", "llama", 2, {}),
}
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
    decode = _llama(gguf, threads) if runner == "llama" else _torch(gguf)
    decode(WARMUP, 60.0)
    while forever:
        decode(tokens, seconds)
    t0, c0 = time.perf_counter(), time.process_time()
    times = decode(tokens, seconds)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
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
        "threads": threads,
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

    return decode


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

    return decode


def have_llama() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def run_row(name: str, condition: str, tokens: int, seconds: float) -> dict:
    """One measurement in a fresh process, beside a competitor when `condition` says so."""
    _, runner, threads, extra = ROWS[name]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "RAGSEEK_THREADS")
    }
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    rival = None
    if condition == "busy":
        rival = subprocess.Popen([sys.executable, "-c", SPIN])
    elif condition == "busy: ragseek":
        # a second decode with torch's defaults, long enough to outlast the measured one
        rival = subprocess.Popen(
            [sys.executable, __file__, "--worker", "default", "--forever"],
            env=env, stdout=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
    stat0, load = _cpu_stat(), os.getloadavg()
    try:
        time.sleep(1.0 if rival else 0.0)
        args = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--tokens",
            str(tokens),
            "--seconds",
            str(seconds),
        ]
        out = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
    finally:
        if rival is not None:
            rival.kill()
            rival.wait()
    if out.returncode:
        raise RuntimeError(f"{name} ({condition}) failed:\n{out.stderr[-2000:]}")
    stat1 = _cpu_stat()
    steal = (stat1["steal"] - stat0["steal"]) / max(1, stat1["total"] - stat0["total"])
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "row": name,
        "what": ROWS[name][0],
        "condition": condition,
        "load_1m": load[0],
        "steal": steal,
        **row,
    }


def _cpu_stat() -> dict[str, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return {"steal": fields[7] if len(fields) > 7 else 0, "total": sum(fields)}


def markdown(result: dict) -> str:
    rows = {(r["row"], r["condition"]): r for r in result["rows"]}
    conditions = [c for c in CONDITIONS if any(k[1] == c for k in rows)]
    names = [n for n in ROWS if any(k[0] == n for k in rows)]
    head = "| threads | " + " | ".join(f"{c} tok/s (cpu)" for c in conditions) + " |"
    lines = [head, "|" + "---|" * (len(conditions) + 1)]
    for n in names:
        cells = []
        for c in conditions:
            r = rows.get((n, c))
            cells.append(f"{r['tok_s']:.1f} ({r['cpu']:.1f})" if r else "—")
        lines.append(f"| {ROWS[n][0]} | " + " | ".join(cells) + " |")
    loads = ", ".join(f"{r['load_1m']:.2f}" for r in result["rows"] if r["condition"] == "idle")
    llama = "" if result["llama_cpp"] else f"\n\nllama.cpp: {result['llama_note']}"
    return (
        "## Threads on a shared CPU (decode tok/s, idle and beside a busy process)\n\n"
        "`.venv/bin/python bench/bench_threads.py` — SmolLM2-135M-Instruct (the embedded GGUF; ragseek in fp32), "
        f"greedy decoding after a 40-token prompt, {result['tokens']} tokens or {result['seconds']:.0f} s, one fresh "
        f"process per cell; {result['cores']} cores ({result['cpu']}). busy: one `python -c '{SPIN}'` beside it; "
        "busy: ragseek: a second decode with torch's defaults. cpu: the process's CPU seconds per second. 1-minute "
        f"load average before each idle cell: {loads}.\n\n" + "\n".join(lines) + llama + "\n"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--conditions", default="idle,busy")
    p.add_argument("--forever", action="store_true")
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--seconds", type=float, default=SECONDS)
    a = p.parse_args()
    if a.worker:
        _, runner, threads, _ = ROWS[a.worker]
        print(json.dumps(measure(runner, threads, a.tokens, a.seconds, a.forever)))
        return
    names = [n for n in a.rows.split(",") if ROWS[n][1] != "llama" or have_llama()]
    conditions = [c.strip() for c in a.conditions.split(",")]
    rows = []
    for name in names:
        for condition in conditions:
            rows.append(run_row(name, condition, a.tokens, a.seconds))
            r = rows[-1]
            print(
                f"{name:14s} {condition:14s} {r['tok_s']:6.1f} tok/s  cpu {r['cpu']:.2f}  load {r['load_1m']:.2f}",
                flush=True,
            )
    from ragseek.runtime import cores, resolve_threads

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    result = {
        "tokens": a.tokens,
        "seconds": a.seconds,
        "cores": cores(),
        "cpu": cpu,
        "auto_threads": resolve_threads(),
        "llama_cpp": have_llama(),
        "llama_note": ""
        if have_llama()
        else "llama-cpp-python is not installed (its source build did not finish)",
        "rows": rows,
    }
    if a.rows == ",".join(ROWS) and a.tokens == TOKENS:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "threads.json").write_text(json.dumps(result, indent=2) + "\n")
        (OUT / "threads.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
