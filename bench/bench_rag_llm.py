"""The LLM steps of RAG on BEIR SciFact (train qrels), with SmolLM2-135M-Instruct on this CPU: what each is worth.

    .venv/bin/python bench/bench_rag_llm.py       # 30 queries (rerank rows: the first 15); contextual on their sub-corpus
    .venv/bin/python bench/bench_rag_llm.py --queries 10 --rerank-depths 20 --context-docs 40   # quicker
    .venv/bin/python bench/bench_rag_llm.py --keep    # only the rows rag_llm.json lacks (each row is saved when done)

Rows on the full corpus (5,183 abstracts, recursive chunks of 2,000 chars — the retrieval bench's best store): the
best plain retriever (hybrid convex z-score, Porter BM25 + MiniLM), then + query rewrite, + multi-query (RRF),
+ HyDE, + LLM rerank of the top 20 / 50. Contextual retrieval needs one LLM call per chunk, so it runs on a
sub-corpus: the queries' relevant abstracts plus each query's top hard negatives from the full-corpus retriever,
split into 1,000-char chunks (so a chunk is a part of its document and a context has something to add).

Each row reports nDCG@10 and the top-20 retrieval failure rate (1 - Recall@20, Anthropic's measure), and the time
the LLM step costs per query (or per chunk). Writes bench/results/rag_llm.json and bench/results/rag_llm.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragseek.defaults import cache_dir, shared_data_dir  # noqa: E402
from ragseek.llm.base import load_llm  # noqa: E402
from ragseek.rag.documents import load_beir_rows  # noqa: E402
from ragseek.rag.evaluate import doc_run, evaluate, load_qrels, load_queries  # noqa: E402
from ragseek.rag.pipeline import StepsConfig, search  # noqa: E402
from ragseek.rag.search import SearchConfig, Searcher  # noqa: E402
from ragseek.rag.splitters import SplitterConfig  # noqa: E402
from ragseek.rag.store import Store  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BEST = SearchConfig(retriever="hybrid", fusion="convex", norm="zscore", dense_weight=0.5)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def recall_at(run: dict[str, dict[str, float]], qrels: dict, k: int) -> float:
    out = []
    for q, rels in qrels.items():
        top = sorted(run.get(q, {}), key=lambda d: -run[q][d])[:k]
        relevant = {d for d, r in rels.items() if r > 0}
        out.append(len(relevant & set(top)) / len(relevant))
    return float(np.mean(out))


def score(searcher: Searcher, llm, steps: StepsConfig, queries: dict, qrels: dict, depth: int = 300) -> dict:
    """Run the retrieval half of `ragseek ask` for every query; nDCG@10, failure@20 and seconds per query per step."""
    qids = list(qrels)
    texts, hits, seconds = search(searcher, [queries[q] for q in qids], llm, steps, depth)
    run = {}
    for q, hs in zip(qids, hits, strict=True):
        by_rank = -np.arange(len(hs), dtype=np.float64)  # a reranked head and the tail do not share a scale
        run[q] = doc_run(searcher.store.chunks().doc_ids, np.array([h.row for h in hs]), by_rank, 100)
    m = evaluate(run, qrels)
    row = {
        "ndcg@10": round(m["ndcg@10"], 4),
        "recall@10": round(m["recall@10"], 4),
        "failure@20": round(1 - recall_at(run, qrels, 20), 4),
        "seconds_per_query": {k: round(v / len(qids), 3) for k, v in seconds.items()},
        "example_query": texts[0][:3],
    }
    log(f"  {steps.query:7s} rerank={steps.rerank}/{steps.rerank_depth}: {row}")
    return row


def store_for(name: str, rows, splitter: SplitterConfig) -> Store:
    store = Store(cache_dir() / "bench-retrieval" / name)
    store.add_documents(rows, splitter)
    return store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--queries", type=int, default=30, help="first N train-qrels queries (every row uses them)"
    )
    ap.add_argument("--rerank-depths", default="20,50", help="reranked top-N values, comma-separated")
    ap.add_argument("--rerank-queries", type=int, default=15, help="the first N queries for the rerank rows")
    ap.add_argument(
        "--context-docs", type=int, default=200, help="most documents in the contextual sub-corpus"
    )
    ap.add_argument("--hard-negatives", type=int, default=3, help="top non-relevant docs per query in it")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: query, rerank, contextual")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the rows already in rag_llm.json (same --queries); run the rest",
    )
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    data = shared_data_dir()
    if data is None:
        sys.exit("../shared/data is absent: set RAGSEEK_DATA to a folder with scifact/")
    sci = data / "scifact"
    queries = load_queries(sci / "queries.jsonl")
    all_qrels = load_qrels(sci / "qrels" / "train.tsv")
    qrels = dict(list(all_qrels.items())[: args.queries])
    load = os.getloadavg()[0]
    log(f"{len(qrels)} queries; load average {load:.1f}")
    path = RESULTS / "rag_llm.json"
    out: dict = {"queries": len(qrels), "load_average": round(load, 1), "full": {}, "contextual": {}}
    if args.keep and path.exists():
        out = json.loads(path.read_text())
        if out["queries"] != len(qrels):
            sys.exit(f"--keep: {path} has {out['queries']} queries, not {len(qrels)}")
    out["command"] = " ".join(sys.argv[1:])

    def save() -> None:
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        (RESULTS / "rag_llm.md").write_text(write_md(out))

    def row(part: dict, name: str, make) -> None:
        """part[name] = make(), unless kept from an earlier run; saved at once."""
        if name not in part:
            part[name] = make()
            save()

    full = store_for(
        "scifact-chunk2000", load_beir_rows(sci / "corpus.jsonl"), SplitterConfig("recursive", 2000, 200)
    )
    searcher = Searcher(full, BEST)
    full.embed(searcher.embedder())
    llm = load_llm("local")
    f = out["full"]
    row(f, "hybrid (best plain retriever)", lambda: score(searcher, None, StepsConfig(), queries, qrels))
    if "query" not in skip:
        for mode in ("rewrite", "multi", "hyde"):
            row(
                f,
                f"+ {mode}",
                lambda mode=mode: score(searcher, llm, StepsConfig(query=mode), queries, qrels),
            )
    if "rerank" not in skip:
        few = dict(list(qrels.items())[: args.rerank_queries])
        row(
            f, f"hybrid, first {len(few)} queries", lambda: score(searcher, None, StepsConfig(), queries, few)
        )
        for depth in map(int, args.rerank_depths.split(",")):
            steps = StepsConfig(rerank="llm", rerank_depth=depth)
            row(
                f,
                f"+ LLM rerank top {depth}, first {len(few)} queries",
                lambda steps=steps: score(searcher, llm, steps, queries, few),
            )
    if "contextual" not in skip:
        contextual_rows(sci, searcher, llm, queries, qrels, args, out["contextual"], row)
    save()
    log("wrote bench/results/rag_llm.{json,md}")


def contextual_rows(
    sci: Path, full: Searcher, llm, queries: dict, qrels: dict, args, out: dict, row: Callable
) -> None:
    """Plain vs contextual chunks (dense, BM25, hybrid), and rerank on top, on a sub-corpus with hard negatives;
    each row into `out` through `row` (kept rows are not rerun; the contexts are cached in the sub-corpus store)."""
    from ragseek.rag.contextual import contextualize

    keep: dict[str, None] = {}
    for rels in qrels.values():
        keep.update(dict.fromkeys(d for d, r in rels.items() if r > 0))
    _, hits, _ = search(full, [queries[q] for q in qrels], None, StepsConfig(), 60)
    for q, hs in zip(qrels, hits, strict=True):
        negatives = [h.doc_id for h in hs if h.doc_id not in qrels[q]]
        keep.update(dict.fromkeys(list(dict.fromkeys(negatives))[: args.hard_negatives]))
    docs = list(keep)[: args.context_docs]
    qrels = {q: rels for q, rels in qrels.items() if any(d in docs for d in rels)}
    wanted = set(docs)
    rows = [d for d in load_beir_rows(sci / "corpus.jsonl") if d.doc_id in wanted]
    sub = store_for(f"scifact-sub{len(docs)}-chunk1000", rows, SplitterConfig("recursive", 1000, 100))
    plain = Searcher(sub, BEST)
    sub.embed(plain.embedder())
    n_chunks = len(sub.chunks().ids)
    log(f"contextual sub-corpus: {len(docs)} docs, {n_chunks} chunks, {len(qrels)} queries")
    if "contextualize" not in out:
        t0 = time.perf_counter()
        counts = contextualize(
            sub, llm, on_progress=lambda stage, done, total: log(f"  contexts {done}/{total}")
        )
        seconds = time.perf_counter() - t0
        out.update(docs=len(docs), chunks=n_chunks, queries=len(qrels), contextualize=counts)
        out["seconds_per_chunk"] = round(seconds / counts["generated"], 2) if counts["generated"] else None
    for retriever in ("dense", "bm25", "hybrid"):
        cfg = replace(BEST, retriever=retriever)
        row(out, retriever, lambda cfg=cfg: score(Searcher(sub, cfg), None, StepsConfig(), queries, qrels))
        ctx = Searcher(sub, replace(cfg, contextual=llm.name))
        row(out, f"{retriever} + contextual", lambda ctx=ctx: score(ctx, None, StepsConfig(), queries, qrels))
    ctx = Searcher(sub, replace(BEST, contextual=llm.name))
    rerank = StepsConfig(rerank="llm", rerank_depth=20)
    row(out, "hybrid + contextual + LLM rerank top 20", lambda: score(ctx, llm, rerank, queries, qrels))


def write_md(res: dict) -> str:
    cmd = f".venv/bin/python bench/bench_rag_llm.py {res['command']}".strip()
    lines = [
        "## The LLM steps of RAG on SciFact (SmolLM2-135M-Instruct, CPU)",
        "",
        f"`{cmd}` — the first {res['queries']} train-qrels queries; load average {res['load_average']} on 2 cores "
        "when it started. nDCG@10 and the top-20 failure rate (1 − Recall@20); seconds are per query for the query "
        "and rerank steps, per chunk for contextualisation.",
        "",
        "Full corpus (5,183 abstracts, 2,000-char recursive chunks):",
        "",
        "| pipeline | nDCG@10 | failure@20 | LLM seconds / query | example query sent |",
        "|---|---|---|---|---|",
    ]
    base = res["full"].get("hybrid (best plain retriever)", {})
    for name, m in res["full"].items():
        llm_s = sum(v for k, v in m["seconds_per_query"].items() if k != "retrieve")
        q = " / ".join(x.replace("|", " ").replace("\n", " ")[:80] for x in m["example_query"])
        lines.append(f"| {name} | {m['ndcg@10']:.4f} | {m['failure@20']:.4f} | {llm_s:.2f} | {q} |")
    c = res.get("contextual") or {}
    if c:
        lines += [
            "",
            f"Contextual retrieval on a sub-corpus: {c['docs']} abstracts (the queries' relevant ones + "
            f"hard negatives), {c['chunks']} chunks of ≤1,000 chars, {c['queries']} queries; "
            f"{c['contextualize']['generated']} contexts written in {c['contextualize']['seconds']:.0f} s, "
            f"{c['seconds_per_chunk']} s per chunk.",
            "",
            "| retriever | nDCG@10 | failure@20 |",
            "|---|---|---|",
        ]
        for name, m in c.items():
            if isinstance(m, dict) and "ndcg@10" in m:
                lines.append(f"| {name} | {m['ndcg@10']:.4f} | {m['failure@20']:.4f} |")
    if base:
        lines += ["", f"Anchor (Anthropic, large models): contextual embeddings −35%, + contextual BM25 −49%, + rerank "
                  f"−67% top-20 failures. Baseline failure@20 here: {base['failure@20']:.4f}."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
