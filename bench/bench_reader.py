"""The grounded reader: `ragseek eval qa` on the validation articles, for each reader, in each mode.

    ragseek data reader --squad ../shared/data/squad/train.json --out runs/data/reader   # the split + val files
    .venv/bin/python bench/bench_reader.py            # every row (each is saved when done)
    .venv/bin/python bench/bench_reader.py --keep     # only the rows reader.json lacks
    .venv/bin/python bench/bench_reader.py --readers base sft --modes retrieved

Data: runs/data/reader/val_sample.json — every 8th question of the 4 validation articles (held out of training by
article), with all 1,033 paragraphs of the file as the store, so retrieval searches the same paragraphs as the
training rows did. Modes: `retrieved` (ask as a user runs it), `oracle` (the gold paragraph as the only source:
reading alone) and `dropped` (--drop-gold-frac 0.2: a fifth of the questions lose their gold paragraph from the
store; don't-know precision/recall are measured there). These articles were used to pick the recipe's settings:
every figure here is a validation figure.

Time to answer (`latency`): the embedded reader after loading, on the first 20 retrieved-mode questions, through
`ask` itself: retrieval + the don't-know gates, prefill of the prompt (time to the reader's first piece), and the
answer's tokens (the answer stops at its first citation or the end of the model's turn: nothing is generated after
it).
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
DATA = ROOT / "runs" / "data" / "reader" / "val_sample.json"
READERS = {
    "base": ("SmolLM2-135M-Instruct", "local:base"),
    "sft": ("SFT (LoRA r=16, configs/reader_sft.yaml)", "local:runs/reader-sft/final"),
    "grpo": ("SFT + GRPO (configs/reader_grpo.yaml, 40 steps; shipped)", "local"),
}
MODES = {"retrieved": [], "oracle": ["--oracle"], "dropped": ["--drop-gold-frac", "0.2"]}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def eval_row(spec: str, mode: str, n: int | None) -> dict:
    predictions = ROOT / "runs" / "reader-eval" / f"{spec.replace(':', '_').replace('/', '_')}-{mode}.jsonl"
    predictions.parent.mkdir(parents=True, exist_ok=True)
    ragseek = str(ROOT / ".venv" / "bin" / "ragseek")
    cmd = [
        ragseek,
        "eval",
        "qa",
        "--data",
        str(DATA),
        "--llm",
        spec,
        "--json",
        "--predictions",
        str(predictions),
    ]
    cmd += MODES[mode] + (["--n", str(n)] if n else [])
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return {**json.loads(out), "wall_s": time.time() - t0, "command": " ".join(cmd[1:])}


def latency(n: int = 20) -> dict:
    """Per question, after the models are loaded, through `ask` itself: retrieval + gates, prefill (time to the first
    streamed piece), answer tokens (the answer stops at its first citation)."""
    from ragseek.llm.base import load_llm
    from ragseek.rag.evaluate import load_squad, squad_store
    from ragseek.rag.pipeline import ask
    from ragseek.rag.search import SearchConfig, Searcher
    from ragseek.rag.store import Store

    class Timed:
        """The reader, noting when the first piece of each of its answers arrives (the prompt's prefill ends):
        `ask` holds a short answer back until it is checked, so the first piece it streams comes later."""

        def __init__(self, llm):
            self.llm, self.firsts = llm, []

        def __getattr__(self, name):
            return getattr(self.llm, name)

        def stream(self, messages, **kw):
            for i, piece in enumerate(self.llm.stream(messages, **kw)):
                if i == 0:
                    self.firsts.append(time.perf_counter())
                yield piece

    llm = Timed(load_llm("local"))
    searcher = Searcher(Store(squad_store(DATA)), SearchConfig(k=3))
    rows = []
    for item in load_squad(DATA)[:n]:
        llm.firsts = pieces = []
        t0 = time.perf_counter()
        a = ask(item.question, searcher, llm)
        total = time.perf_counter() - t0
        t = a.timings
        found = t["query"] + t["retrieve"] + t["gate"]
        chat = [{"role": "user", "content": a.prompt}]
        rows.append(
            {
                "retrieve_s": found,
                "prefill_s": pieces[0] - t0 - found if a.prompt else 0.0,
                "answer_s": t.get("generate", 0.0),
                "prompt_tokens": len(llm.tokenizer.encode(llm.render(chat))) if a.prompt else 0,
                "answer_tokens": len(llm.tokenizer.encode(a.answer)) if a.prompt else 0,
                "total_s": total,
            }
        )
    p50 = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {
        "n": len(rows),
        "p50": p50,
        "max_total_s": max(r["total_s"] for r in rows),
        "load": os.getloadavg(),
    }


def plot_curves() -> list[str]:
    """docs/img/reader_sft.png (loss per step) and reader_grpo.png (rewards, response length) from the runs."""
    from ragseek.train.loop import plot_metrics

    runs = {
        "reader_sft.png": (ROOT / "runs/reader-sft/metrics.jsonl", ["loss", "grad_norm"]),
        "reader_grpo.png": (
            ROOT / "runs/reader-grpo/metrics.jsonl",
            ["reward_mean", "reward_reader_f1", "reward_reader_citation", "response_length"],
        ),
    }
    return [
        str(plot_metrics(jsonl, ROOT / "docs" / "img" / name, keys).relative_to(ROOT))
        for name, (jsonl, keys) in runs.items()
        if jsonl.exists()
    ]


def write_md(results: dict) -> None:
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}"

    def ratio(x):
        return "–" if x is None else f"{x:.2f}"

    lines = [
        "## The grounded reader: SQuAD questions through `ragseek ask` (validation articles)",
        "",
        "`.venv/bin/python bench/bench_reader.py` — `ragseek eval qa --data runs/data/reader/val_sample.json` "
        "(158 questions, every 8th of the 4 held-out validation articles; the store holds all 1,033 paragraphs). "
        "EM / F1 / citation accuracy in %; don't-know precision / recall on the `--drop-gold-frac 0.2` run "
        "(a fifth of the questions lose their gold paragraph). These articles also chose the recipe's settings: "
        "validation figures, not test figures.",
        "",
        "| reader | EM | F1 | citation acc. | oracle EM | oracle F1 | don't-know P / R | s/question p50 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    stale = []
    for key, (name, _) in READERS.items():
        r, o, d = (results.get(f"{key}/{m}") for m in MODES)
        if r is None:
            continue
        dk = f"{ratio(d['dont_know_precision'])} / {ratio(d['dont_know_recall'])}" if d else "–"
        before = [x["measured_before"] for x in (r, o, d) if x and "measured_before" in x]
        if before:
            name, stale = f"{name} *", [*stale, *before]
        lines.append(
            f"| {name} | {pct(r['em'])} | {pct(r['f1'])} | {pct(r['citation_accuracy'])} | "
            f"{pct(o['em']) if o else '–'} | {pct(o['f1']) if o else '–'} | {dk} | {r['p50_s']:.2f} |"
        )
    if stale:
        lines += ["", f"\\* measured before {stale[0]}; not rerun."]
    if any(f"{key}/{m}" not in results for key in READERS for m in MODES):
        lines += ["", "–: that reader was not run in that mode (`--readers` / `--modes`)."]
    if "latency" in results:
        lat = results["latency"]["p50"]
        lines += [
            "",
            f"Time to answer, the shipped reader after loading (p50 of {results['latency']['n']} questions): "
            f"retrieval + gate {lat['retrieve_s']:.2f} s, prefill of {lat['prompt_tokens']:.0f} prompt tokens "
            f"(first token) {lat['prefill_s']:.2f} s, the whole answer ({lat['answer_tokens']:.0f} tokens, "
            f"stopped at its first citation) {lat['answer_s']:.2f} s; total {lat['total_s']:.2f} s "
            f"(slowest {results['latency']['max_total_s']:.2f} s; load average "
            f"{', '.join(f'{x:.1f}' for x in results['latency'].get('load', []))} during the run).",
        ]
    lines += ["", "Training curves: " + ", ".join(f"[{c}]({c})" for c in results.get("curves", []))]
    (RESULTS / "reader.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--readers", nargs="*", default=list(READERS))
    ap.add_argument("--modes", nargs="*", default=list(MODES))
    ap.add_argument("--n", type=int, default=None, help="the first n questions of the sample")
    ap.add_argument("--keep", action="store_true", help="run only the rows reader.json lacks")
    ap.add_argument("--no-latency", action="store_true")
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(
            f"{DATA} is missing: run `ragseek data reader --squad ../shared/data/squad/train.json` first"
        )
    path = RESULTS / "reader.json"
    results = json.loads(path.read_text()) if args.keep and path.exists() else {}
    for key in args.readers:
        for mode in args.modes:
            if f"{key}/{mode}" in results:
                continue
            log(f"{key} {mode}")
            results[f"{key}/{mode}"] = eval_row(READERS[key][1], mode, args.n)
            log(json.dumps(results[f"{key}/{mode}"]))
            path.write_text(json.dumps(results, indent=1))
    if not args.no_latency and not (args.keep and "latency" in results):
        results["latency"] = latency()
        log(json.dumps(results["latency"]))
        path.write_text(json.dumps(results, indent=1))
    # the training runs are not in the repository: keep the pictures a previous run drew
    results["curves"] = plot_curves() or results.get("curves", [])
    path.write_text(json.dumps(results, indent=1))
    write_md(results)


if __name__ == "__main__":
    main()
