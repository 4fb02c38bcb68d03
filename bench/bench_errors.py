"""Errors a user can act on (issue 14 §4): every command that reads a broken file, run as a user runs it.

    .venv/bin/python bench/bench_errors.py                       # this checkout ("now")
    .venv/bin/python bench/bench_errors.py --before /tmp/before  # also an older tree (git archive REV ragseek)

Builds, in a temporary folder, one broken file of each kind a command reads: a GGUF cut in half, model folders
whose model.safetensors is cut in half or whose config.json / tokenizer.json is torn, a store.sqlite of random bytes,
one cut in half, one with a damaged index page, a YAML config with an unclosed bracket, and a training run whose newest
checkpoint is cut. Runs `python -m ragseek COMMAND` on each (ask, search, info, ingest, generate, eval qa|beir|math,
train sft, serve) and records the exit code, the lines printed on stderr, a traceback or not, the file named or not.
A row passes when the command exits 2 with one line naming the file (`ragseek serve` prints its limits first); a
resume passes when it resumes from the newest intact checkpoint and says so. Then two `ragseek eval qa` first runs
at once on a fresh cache (both convert SmolLM2's GGUF: ~1 min), and what opening a store of 2,000 chunks costs with
and without SQLite's quick_check. Writes bench/results/errors.json and errors.md; a row not rerun (--only, or the
`before` column without --before) keeps its last result.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SQUAD = ROOT / "tests" / "rag" / "data" / "squad-slice.json"
# what a probe may change (a store it opens, the run it resumes): restored before the --before run
MUTABLE = ("store", "store_cut", "store_garbage", "store_page", "run")


def test_module():
    """tests/test_errors.py: its broken files and the commands that read them are the probes."""
    spec = importlib.util.spec_from_file_location("test_errors", ROOT / "tests" / "test_errors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_files(t, tmp: Path) -> dict[str, Path]:
    """The tests' broken files (`make_broken`) around a tiny random model, and a `ragseek train sft` run whose newest
    checkpoint's weights are cut in half."""
    import torch

    from ragseek.defaults import smollm2_gguf
    from ragseek.model import ModelConfig, Transformer, load_tokenizer

    model = tmp / "model"
    tok = load_tokenizer(smollm2_gguf())
    tok.save(model)
    torch.manual_seed(0)
    cfg = ModelConfig(
        model_type="llama", vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
        inter_dim=64, max_seq_len=512, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
    )  # fmt: skip
    net = Transformer(cfg)
    net.save_pretrained(model)
    (tmp / "broken").mkdir()
    f = t.make_broken(tmp / "broken", model)
    # a real run of two steps with a checkpoint after each, the newest one's weights then cut in half
    f["run"] = tmp / "run"
    argv = [
        *t.fill(f, t.SFT),
        "--set",
        f"model={model}",
        "--set",
        "loop.max_steps=2",
        "--set",
        "loop.ckpt_every=1",
    ]
    trained = run([*argv, "--out", str(f["run"])], None, tmp, tmp / "cache")
    assert trained["exit"] == 0, trained["stderr"][-2000:]
    newest = f["run"] / "checkpoints" / "step_000002" / "model.safetensors"
    t.cut(newest, newest)
    return f


WHAT = {
    "gguf": "GGUF cut in half",
    "safetensors": "model.safetensors cut in half",
    "config": "config.json cut in half",
    "tokenizer": "tokenizer.json cut in half",
    "store_garbage": "store.sqlite of random bytes",
    "store_cut": "store.sqlite cut in half",
    "store_page": "store.sqlite with one damaged index page",
}


def probes(t, f: dict[str, Path]) -> list[tuple[str, str, list[str]]]:
    """(the row's name, the text that names the broken file, ragseek arguments): the tests' commands."""
    out = []
    for kind in t.MODEL_KINDS:
        for command, template in t.MODEL_READERS.items():
            out.append(
                (f"{WHAT[kind]}: `{command}`", str(t.named(f, kind)), t.fill(f, template, MODEL=f[kind]))
            )
    for kind in t.STORE_KINDS:
        for command, template in t.STORE_READERS.items():
            out.append(
                (f"{WHAT[kind]}: `{command}`", str(t.named(f, kind)), t.fill(f, template, STORE=f[kind]))
            )
    for command, template in t.YAML_READERS.items():
        argv = [*t.fill(f, template), "--config", str(f["yaml"])]
        out.append((f"YAML config with an unclosed [: `{command}`", str(f["yaml"]), argv))
    resume = [*t.fill(f, t.SFT), "--set", f"model={f['model']}", "--out", str(f["run"]), "--resume"]
    resume += ["--set", "loop.max_steps=3"]
    out.append(("newest checkpoint's model.safetensors cut: `train sft --resume`", "step_000002", resume))
    return out


def ragseek(args: list[str], pythonpath: str | None, cwd: Path, cache: Path) -> subprocess.Popen:
    """`python -m ragseek ARGS` as a user runs it (no RAGSEEK_DEBUG), on the tree `pythonpath` (None: this one)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAGSEEK_CACHE": str(cache),
    }
    env.pop("RAGSEEK_DEBUG", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-m", "ragseek", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def run(args: list[str], pythonpath: str | None, cwd: Path, cache: Path) -> dict:
    t0 = time.perf_counter()
    proc = ragseek(args, pythonpath, cwd, cache)
    out, err = proc.communicate(timeout=900)
    return {"exit": proc.returncode, "stderr": err, "stdout": out, "seconds": time.perf_counter() - t0}


def verdict(result: dict, names: str, resume: bool) -> dict:
    err = result["stderr"].strip()
    # serve prints its limits before it loads the model
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("ragseek serve:")]
    traceback = "Traceback" in err
    named = names in err
    if resume:
        ok = result["exit"] == 0 and named and "resumed from" in result["stdout"]
    else:
        ok = result["exit"] == 2 and len(lines) == 1 and named and not traceback
    last = lines[-1] if traceback and lines else lines[0] if lines else ""
    return {
        "exit": result["exit"],
        "lines": len(lines),
        "traceback": traceback,
        "names_file": named,
        "ok": ok,
        "says": last[:300],
        "seconds": round(result["seconds"], 1),
    }


def summary(v: dict | None) -> str:
    if not v:
        return "-"
    # the concurrent first runs
    if "runs" in v:
        left = ", ".join(v["leftovers"]) or "no temporary file"
        locks = f"; lock file {', '.join(v['lock_files'])} (empty)" if v.get("lock_files") else ""
        return f"exits {v['runs']}, {left}{locks}"
    if v["exit"] == 0 and v["ok"]:
        return "exit 0, resumed from the newest intact checkpoint, naming the damaged one"
    if v["exit"] == 0:
        return "exit 0, no error: went on with what it could read"
    how = f"{v['lines']}-line traceback" if v["traceback"] else f"{v['lines']} line(s)"
    return f"exit {v['exit']}, {how}, {'names' if v['names_file'] else 'does not name'} the file"


def race(pythonpath: str | None, tmp: Path) -> dict:
    """Two `ragseek eval qa` first runs at once on a fresh cache: exit codes, and what is left in the cache besides
    the converted model and the store: temporary files and folders (with their size), lock files."""
    cache = tmp / f"cache-race-{'before' if pythonpath else 'now'}"
    args = ["eval", "qa", "--data", str(SQUAD), "--n", "1", "--llm", "local:base"]
    procs = [ragseek(args, pythonpath, tmp, cache) for _ in range(2)]
    errs = [p.communicate(timeout=1800)[1] for p in procs]
    leftovers = []
    for p in sorted(cache.rglob("*")):
        if ".tmp" in p.name:
            files = p.rglob("*") if p.is_dir() else [p]
            size = sum(q.stat().st_size for q in files if q.is_file())
            leftovers.append(f"{p.relative_to(cache)} ({size / 1e6:.0f} MB)")
    locks = [str(p.relative_to(cache)) for p in sorted(cache.rglob("*.lock"))]
    codes = [p.returncode for p in procs]
    error = next((e.strip().splitlines()[-1] for e, c in zip(errs, codes, strict=True) if c), "")
    ok = codes == [0, 0] and not leftovers
    return {"runs": codes, "leftovers": leftovers, "lock_files": locks, "says": error[:300], "ok": ok}


def store_open_cost(tmp: Path, chunks: int = 2000) -> dict:
    """Median milliseconds to open a store of `chunks` chunks with 384-d vectors (MiniLM's size), with SQLite's
    quick_check (the default) and without (RAGSEEK_STORE_CHECK=0)."""
    import numpy as np

    from ragseek.rag.splitters import SplitterConfig
    from ragseek.rag.store import Store, StoreConfig

    docs = tmp / "open-cost"
    docs.mkdir()
    rng = np.random.default_rng(0)
    words = np.array("the of a retrieval store chunk vector query answer model token layer cache".split())
    # two chunks a document with the default splitter
    for i in range(chunks // 2):
        (docs / f"d{i}.txt").write_text(
            " ".join(rng.choice(words, 100)) + "\n\n" + " ".join(rng.choice(words, 100))
        )
    st = Store(tmp / "open-cost-store")
    st.ingest([docs], SplitterConfig(), StoreConfig(embedder="none"))
    hashes = [h for (h,) in st.db.execute("SELECT content_hash FROM chunks")]
    rows = [("minilm", h, rng.standard_normal(384).astype(np.float32).tobytes()) for h in hashes]
    with st.db:
        st.db.executemany("INSERT OR IGNORE INTO embeddings VALUES (?, ?, ?)", rows)
    n = st.info()["chunks"]
    st.close()
    ms = {}
    for check in (True, False):
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            Store(tmp / "open-cost-store", check=check).close()
            times.append((time.perf_counter() - t0) * 1000)
        ms["with_check" if check else "without_check"] = round(statistics.median(times), 2)
    size = (tmp / "open-cost-store" / "store.sqlite").stat().st_size
    return {"chunks": n, "mb": round(size / 1e6, 1), **ms}


RACE = "two `ragseek eval qa` first runs at once, fresh cache"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--before", help="a tree holding an older ragseek/: git archive REV ragseek | tar -x -C DIR"
    )
    ap.add_argument("--only", help="rerun only the rows that contain this text (the others are kept)")
    args = ap.parse_args()
    old = json.loads((RESULTS / "errors.json").read_text()) if (RESULTS / "errors.json").exists() else {}
    # probe -> {"probe", "before", "now"}: a row not rerun keeps its last result
    rows = {row["probe"]: row for row in old.get("rows", [])}

    def record(probe: str, now: dict, before: dict | None) -> None:
        rows[probe] = {"probe": probe, "before": before or rows.get(probe, {}).get("before"), "now": now}
        print(
            f"{probe}\n    before: {summary(rows[probe]['before'])}\n    now:    {summary(now)}", flush=True
        )
        print(f"    {now['says']}", flush=True)

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t = test_module()
        files = make_files(t, tmp)
        for name in MUTABLE:
            shutil.copytree(files[name], tmp / "pristine" / name)
        for probe, names, argv in probes(t, files):
            if args.only and args.only not in probe:
                continue
            resume = "--resume" in argv
            now = verdict(run(argv, None, tmp, tmp / "cache"), names, resume)
            before = None
            if args.before:
                for name in MUTABLE:
                    shutil.rmtree(files[name])
                    shutil.copytree(tmp / "pristine" / name, files[name])
                before = verdict(run(argv, args.before, tmp, tmp / "cache-before"), names, resume)
            record(probe, now, before)
        if not args.only or args.only in RACE:
            record(RACE, race(None, tmp), race(args.before, tmp) if args.before else None)
        cost = store_open_cost(tmp)
        print(f"store open: {cost}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = list(rows.values())
    (RESULTS / "errors.json").write_text(json.dumps({"rows": table, "store_open_ms": cost}, indent=2) + "\n")
    passed = sum(r["now"]["ok"] for r in table)
    md = [
        "## Errors a user can act on (Reliability, issue 14 §4)",
        "",
        "`python bench/bench_errors.py [--before DIR]`: each command run on a broken file, as a user runs it. A row",
        "passes when the command exits 2 with one line naming the file (`ragseek --debug` or RAGSEEK_DEBUG=1 shows",
        "the traceback instead); a `--resume` when it resumes from the newest intact checkpoint and says so; the two",
        f"first runs when both finish and leave no temporary file. Now: {passed} of {len(table)} pass.",
        "",
        "| probe | before | now |",
        "|---|---|---|",
    ]
    for r in table:
        fails = "" if r["now"]["ok"] else " **(fails)**"
        md.append(f"| {r['probe']} | {summary(r['before'])} | {summary(r['now'])}{fails} |")
    md += [
        "",
        f"Opening a store checks it with SQLite's `PRAGMA quick_check` (every page read, its structure checked): for "
        f"{cost['chunks']:,} chunks with 384-d vectors ({cost['mb']} MB), {cost['with_check']} ms against "
        f"{cost['without_check']} ms without (median of 30 opens); RAGSEEK_STORE_CHECK=0 skips it.",
    ]
    (RESULTS / "errors.md").write_text("\n".join(md) + "\n")
    print(f"wrote {RESULTS / 'errors.md'}: {passed}/{len(table)} pass")


if __name__ == "__main__":
    main()
