"""Retrieval on BEIR SciFact (train qrels, 809 queries): quality per retriever, what each choice is worth, speed.

    .venv/bin/python bench/bench_retrieval.py                    # everything, ANN on 1M synthetic vectors
    .venv/bin/python bench/bench_retrieval.py --synthetic 50000  # a smaller synthetic ANN run (0: none)
    .venv/bin/python bench/bench_retrieval.py --ann-only         # redo only the ANN rows, keep the rest of the results

Stores live in the ragseek cache (`RAGSEEK_CACHE`, default ~/.cache/ragseek/bench-retrieval); MiniLM embeddings are
cached there by (embedder, chunk hash), so only the first run pays for them (~13 docs/s on this machine).
Writes bench/results/retrieval.json and bench/results/retrieval.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragseek.defaults import cache_dir, shared_data_dir  # noqa: E402
from ragseek.rag.documents import load_beir_rows  # noqa: E402
from ragseek.rag.embedders import WordVectorConfig  # noqa: E402
from ragseek.rag.evaluate import load_qrels, load_queries, run_beir  # noqa: E402
from ragseek.rag.search import (  # noqa: E402
    Analyzer,
    ANNConfig,
    BM25Config,
    BM25Index,
    HNSWIndex,
    SearchConfig,
    Searcher,
    exact_knn,
)
from ragseek.rag.splitters import SplitterConfig  # noqa: E402
from ragseek.rag.store import Store  # noqa: E402

COMMAND = ".venv/bin/python bench/bench_retrieval.py" + "".join(f" {a}" for a in sys.argv[1:])
RESULTS = ROOT / "bench" / "results"
# the plain floor: bm25s Lucene k1=1.2 b=0.75
PLAIN_BM25 = BM25Config(stopwords="none", stemmer="none")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def store_for(name: str, corpus: Path, splitter: SplitterConfig, with_title: bool = True) -> Store:
    store = Store(cache_dir() / "bench-retrieval" / f"scifact-{name}")
    t0 = time.time()
    report = store.add_documents(load_beir_rows(corpus, with_title=with_title), splitter)
    log(
        f"store {name}: {store.info()['chunks']} chunks ({report.stored} docs stored now, {time.time() - t0:.1f}s)"
    )
    return store


class CachedEmbedder:
    """Query vectors computed once per (embedder, text) across the many configurations evaluated here."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.dim, self.memo = inner, inner.name, inner.dim, {}

    def encode(self, texts: list[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            self.memo.update(zip(todo, self.inner.encode(todo), strict=True))
        return np.stack([self.memo[t] for t in texts])


EMBEDDERS: dict[tuple[str, str], CachedEmbedder] = {}
ENCODE_QPS: dict[str, float] = {}  # query encoding rate per embedder, measured once


def evaluate(store, queries, qrels, cfg: SearchConfig, bm25=PLAIN_BM25, ann=None) -> dict:
    key = (str(store.root), cfg.embedder)
    if cfg.retriever != "bm25" and key not in EMBEDDERS:
        EMBEDDERS[key] = CachedEmbedder(store.embedder(cfg.embedder))
        qs = [queries[q] for q in qrels]
        _, t = timed(lambda: EMBEDDERS[key].encode(qs))
        ENCODE_QPS[cfg.embedder] = round(len(qs) / t, 1)
    searcher = Searcher(store, cfg, bm25, ann, EMBEDDERS.get(key))
    result = run_beir(searcher, queries, qrels)
    row = {k: round(v, 4) for k, v in result.metrics.items()} | {"qps": round(result.qps, 1)}
    log(f"  {cfg.retriever:7s} {row}")
    return row


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def quality(data: Path, queries, qrels) -> dict:
    out: dict = {}
    corpus = data / "corpus.jsonl"
    doc = store_for("doc", corpus, SplitterConfig("none", 100_000, 0))
    _, t_embed = timed(lambda: doc.embed(doc.embedder("minilm")))
    out["minilm_embed_seconds_if_not_cached"] = round(t_embed, 1)

    # index build times
    texts = doc.chunks().texts
    _, out["build_bm25_plain_s"] = timed(lambda: BM25Index.build(texts, PLAIN_BM25))
    _, out["build_bm25_porter_s"] = timed(lambda: BM25Index.build(texts, BM25Config()))
    # the corpus is small (1.2M words): a 5-word window, words seen 3+ times, 5 epochs (gensim's default)
    # GloVe's batched Adagrad needs more passes: 10 epochs at lr 0.1 (0.18 nDCG@10 at 5 epochs, lr 0.05)
    words = {
        "word2vec": WordVectorConfig(window=5, min_count=3, epochs=5),
        "glove": WordVectorConfig(window=5, min_count=3, epochs=10, lr=0.1),
    }
    out["word_vectors"] = {kind: asdict(cfg) for kind, cfg in words.items()}
    for kind, word in words.items():
        emb, t_train = timed(lambda kind=kind, word=word: doc.train_word_model(kind, word))
        _, t_emb = timed(lambda emb=emb: doc.embed(emb))
        out[f"build_{kind}_train_s"], out[f"build_{kind}_embed_s"] = round(t_train, 1), round(t_emb, 1)
        log(f"{kind}: trained {t_train:.0f}s, embedded {t_emb:.0f}s")

    log("retrievers (plain BM25 analyzer; hybrid weights 0.5)")
    base = SearchConfig(k=10)
    rows = out["retrievers"] = {}
    rows["bm25"] = evaluate(doc, queries, qrels, replace(base, retriever="bm25"))
    rows["dense minilm"] = evaluate(doc, queries, qrels, replace(base, retriever="dense"))
    rows["dense minilm (HNSW)"] = evaluate(
        doc, queries, qrels, replace(base, retriever="dense"), ann=ANNConfig(ann=True)
    )
    rows["dense word2vec (SIF)"] = evaluate(
        doc, queries, qrels, replace(base, retriever="dense", embedder="word2vec")
    )
    rows["dense GloVe (SIF)"] = evaluate(
        doc, queries, qrels, replace(base, retriever="dense", embedder="glove")
    )
    rows["hybrid RRF"] = evaluate(doc, queries, qrels, replace(base, retriever="hybrid", fusion="rrf"))
    for norm in ("minmax", "zscore"):
        rows[f"hybrid convex ({norm})"] = evaluate(
            doc, queries, qrels, replace(base, retriever="hybrid", fusion="convex", norm=norm)
        )
    rows["svm (top-100 negatives)"] = evaluate(doc, queries, qrels, replace(base, retriever="svm"))
    rows["mmr (lambda 0.7)"] = evaluate(doc, queries, qrels, replace(base, retriever="mmr"))

    log("BM25 analyzer and parameters")
    ana = out["bm25_analyzer"] = {}
    for stop in ("none", "en", "en_plus"):
        for stem in ("none", "porter"):
            ana[f"stopwords={stop} stemmer={stem}"] = evaluate(
                doc, queries, qrels, replace(base, retriever="bm25"), BM25Config(stopwords=stop, stemmer=stem)
            )["ndcg@10"]
    best_stop, best_stem = max(
        ((s, m) for s in ("none", "en", "en_plus") for m in ("none", "porter")),
        key=lambda sm: ana[f"stopwords={sm[0]} stemmer={sm[1]}"],
    )
    best = BM25Config(stopwords=best_stop, stemmer=best_stem)
    out["best_analyzer"] = asdict(best)
    kb = out["bm25_k1_b"] = {}
    for k1 in (0.9, 1.2, 1.5):
        for b in (0.5, 0.75, 0.9):
            kb[f"k1={k1} b={b}"] = evaluate(
                doc, queries, qrels, replace(base, retriever="bm25"), replace(best, k1=k1, b=b)
            )["ndcg@10"]

    log("title + text vs text only (BM25)")
    notitle = store_for("doc-notitle", corpus, SplitterConfig("none", 100_000, 0), with_title=False)
    out["title"] = {
        "bm25 title+text": evaluate(doc, queries, qrels, replace(base, retriever="bm25"), best)["ndcg@10"],
        "bm25 text only": evaluate(notitle, queries, qrels, replace(base, retriever="bm25"), best)["ndcg@10"],
    }

    log("fusion with the best analyzer")
    fu = out["fusion"] = {}
    for k in (10, 60):
        fu[f"rrf k={k}"] = evaluate(
            doc, queries, qrels, replace(base, retriever="hybrid", fusion="rrf", rrf_k=k), best
        )
    for norm in ("minmax", "zscore"):
        for w in (0.3, 0.4, 0.5, 0.6, 0.7):
            cfg = replace(base, retriever="hybrid", fusion="convex", norm=norm, dense_weight=w)
            fu[f"convex {norm} w_dense={w}"] = evaluate(doc, queries, qrels, cfg, best)

    log("SVM and MMR settings")
    sv = out["svm_mmr"] = {}
    for c in (0.01, 0.1, 1.0):
        sv[f"svm C={c} top-100"] = evaluate(doc, queries, qrels, replace(base, retriever="svm", svm_c=c))[
            "ndcg@10"
        ]
    sv["svm C=0.1 top-1000"] = evaluate(doc, queries, qrels, replace(base, retriever="svm", candidates=1000))[
        "ndcg@10"
    ]
    for lam in (0.5, 0.7, 0.9):
        sv[f"mmr lambda={lam}"] = evaluate(
            doc, queries, qrels, replace(base, retriever="mmr", mmr_lambda=lam)
        )["ndcg@10"]

    log(
        "chunking long abstracts (recursive, 2000 chars, 200 overlap: only the ~750 abstracts over 2,000 chars are split; a document scores its best chunk)"
    )
    chunked = store_for("chunk2000", corpus, SplitterConfig("recursive", 2000, 200))
    chunked.import_embeddings(doc.root)  # abstracts short enough to be one chunk reuse their vectors
    _, t = timed(lambda: chunked.embed(chunked.embedder("minilm")))
    log(f"  chunk embeddings: {t:.0f}s")
    ch = out["chunking"] = {}
    ch["bm25"] = evaluate(chunked, queries, qrels, replace(base, retriever="bm25"), best)
    ch["dense minilm"] = evaluate(chunked, queries, qrels, replace(base, retriever="dense"))
    best_fusion = max(fu, key=lambda name: fu[name]["ndcg@10"])
    w = float(best_fusion.rsplit("=", 1)[1]) if "convex" in best_fusion else 0.5
    norm = best_fusion.split()[1] if "convex" in best_fusion else "zscore"
    ch[f"hybrid convex {norm} w_dense={w}"] = evaluate(
        chunked,
        queries,
        qrels,
        replace(base, retriever="hybrid", fusion="convex", norm=norm, dense_weight=w),
        best,
    )
    out["best_fusion"] = best_fusion
    return out


def bm25_speed(data: Path, queries: dict, qrels: dict) -> dict:
    """Queries/s over the 809 train queries, top-100: ragseek (analyzer + bm25s scores + argpartition), bm25s alone
    (its tokenizer and retrieve), rank_bm25 (pure Python; timed on the first 100 queries)."""
    import bm25s
    from rank_bm25 import BM25Okapi

    texts = [d.text for d in load_beir_rows(data / "corpus.jsonl")]
    qs = [queries[q] for q in qrels]
    out = {}
    index = BM25Index.build(texts, PLAIN_BM25)
    analyzer = Analyzer(PLAIN_BM25)
    from ragseek.rag.search import top_k

    _, t = timed(lambda: [top_k(index.scores(q), 100) for q in qs])
    out["ragseek bm25"] = round(len(qs) / t, 1)
    model = bm25s.BM25(k1=1.2, b=0.75, method="lucene")
    model.index(bm25s.tokenize(texts, stopwords=None, show_progress=False), show_progress=False)
    _, t = timed(
        lambda: model.retrieve(
            bm25s.tokenize(qs, stopwords=None, show_progress=False), k=100, show_progress=False
        )
    )
    out["bm25s alone"] = round(len(qs) / t, 1)
    ref = BM25Okapi([analyzer(x) for x in texts], k1=1.2, b=0.75)
    _, t = timed(lambda: [np.argsort(-ref.get_scores(analyzer(q)))[:100] for q in qs[:100]])
    out["rank_bm25"] = round(100 / t, 1)
    log(f"bm25 qps {out}")
    return out


def ann_speed(doc_vectors: np.ndarray, query_vectors: np.ndarray, n_synthetic: int | None) -> dict:
    """Exact kNN (one matmul + argpartition, batches of 64 queries) vs faiss HNSW (M=32, efC=200, efS=128)."""
    out = {}
    cfg = ANNConfig(ann=True)

    def measure(name: str, X: np.ndarray, Q: np.ndarray) -> None:
        index, t_build = timed(lambda: HNSWIndex.build(X, cfg))
        exact, t_exact = timed(
            lambda: np.concatenate([exact_knn(Q[s : s + 64], X, 10)[0] for s in range(0, len(Q), 64)])
        )
        approx, t_ann = timed(lambda: index.search(Q, 10, cfg.ef_search)[0])
        recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)]))
        out[name] = {
            "vectors": len(X),
            "dim": X.shape[1],
            "hnsw_build_s": round(t_build, 1),
            "exact_qps": round(len(Q) / t_exact, 1),
            "hnsw_qps": round(len(Q) / t_ann, 1),
            "hnsw_recall@10": round(recall, 4),
        }
        log(f"ann {name}: {out[name]}")

    measure("scifact minilm", doc_vectors, query_vectors)
    if n_synthetic:
        # clustered like real embeddings: 2,000 random centres, points = centre + noise, unit-normalised
        rng = np.random.default_rng(0)
        d = doc_vectors.shape[1]
        centres = rng.normal(size=(2000, d)).astype(np.float32)
        X = np.empty((n_synthetic, d), dtype=np.float32)
        for s in range(0, n_synthetic, 100_000):
            n = min(100_000, n_synthetic - s)
            X[s : s + n] = centres[rng.integers(0, 2000, n)] + 0.7 * rng.normal(size=(n, d)).astype(
                np.float32
            )
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        Q = centres[rng.integers(0, 2000, 500)] + 0.7 * rng.normal(size=(500, d)).astype(np.float32)
        measure(f"synthetic {n_synthetic // 1000}k", X, Q / np.linalg.norm(Q, axis=1, keepdims=True))
    return out


def write_md(res: dict) -> str:
    r = res["retrievers"]
    lines = [
        "## Retrieval on BEIR SciFact (train qrels, 809 queries)",
        "",
        f"`{res.get('command', COMMAND)}` — 5,183 abstracts, title + text, one chunk per abstract unless said; a document scores its best chunk.",
        "BM25 is bm25s Lucene (k1 1.2, b 0.75), plain analyzer (lower-cased words); MiniLM is all-MiniLM-L6-v2 (cosine).",
        "queries/s is ranking only (query vectors precomputed); encoding the queries runs at "
        + ", ".join(f"{k} {v}/s" for k, v in res["query_encode_qps"].items())
        + ".",
        "",
        "| retriever | nDCG@10 | Recall@10 | Recall@100 | MRR@10 | queries/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in r.items():
        lines.append(
            f"| {name} | {m['ndcg@10']:.4f} | {m['recall@10']:.4f} | {m['recall@100']:.4f} | {m['mrr@10']:.4f} | {m['qps']} |"
        )
    lines += ["", "What each choice is worth (nDCG@10):", "", "| choice | nDCG@10 |", "|---|---|"]
    for name, v in res["bm25_analyzer"].items():
        lines.append(f"| BM25 analyzer {name} | {v:.4f} |")
    for name, v in res["bm25_k1_b"].items():
        lines.append(f"| BM25 (best analyzer) {name} | {v:.4f} |")
    for name, v in res["title"].items():
        lines.append(f"| {name} | {v:.4f} |")
    for name, m in res["fusion"].items():
        lines.append(f"| hybrid (best analyzer) {name} | {m['ndcg@10']:.4f} |")
    for name, v in res["svm_mmr"].items():
        lines.append(f"| {name} | {v:.4f} |")
    for name, m in res["chunking"].items():
        lines.append(f"| chunked 2000/200: {name} | {m['ndcg@10']:.4f} |")
    lines += [
        "",
        "Index build (s): "
        + ", ".join(f"{k.removeprefix('build_')} {v:.1f}" for k, v in res.items() if k.startswith("build_")),
        "",
        "BM25 queries/s (809 queries, top-100): "
        + ", ".join(f"{k} {v}" for k, v in res["bm25_qps"].items())
        + " (rank_bm25 timed on 100 queries).",
        "",
        f"ANN rows (`{res.get('ann_command', COMMAND)}`, load average {res.get('ann_load', 'not recorded')} on 2 "
        "cores): faiss HNSW M=32, efConstruction=200, efSearch=128, vs exact kNN (matmul + argpartition), top-10.",
        "",
        "| dense kNN | vectors | HNSW build s | exact q/s | HNSW q/s | HNSW recall@10 |",
        "|---|---|---|---|---|---|",
    ]
    for name, a in res["ann"].items():
        lines.append(
            f"| {name} | {a['vectors']:,} x {a['dim']} | {a['hnsw_build_s']} | {a['exact_qps']} | {a['hnsw_qps']} | {a['hnsw_recall@10']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    data = shared_data_dir()
    if data is None:
        sys.exit("../shared/data is absent: set RAGSEEK_DATA to a folder holding scifact/")
    data = data / "scifact"
    queries, qrels = load_queries(data / "queries.jsonl"), load_qrels(data / "qrels" / "train.tsv")
    if "--ann-only" in sys.argv:
        res = json.loads((RESULTS / "retrieval.json").read_text())
    else:
        res = quality(data, queries, qrels)
        res["command"] = COMMAND
        res["query_encode_qps"] = ENCODE_QPS
        res["bm25_qps"] = bm25_speed(data, queries, qrels)
    doc = Store(cache_dir() / "bench-retrieval" / "scifact-doc")
    qv = doc.embedder("minilm").encode([queries[q] for q in qrels])
    n_synthetic = int(sys.argv[sys.argv.index("--synthetic") + 1]) if "--synthetic" in sys.argv else 1_000_000
    res["ann_command"], res["ann_load"] = COMMAND, round(os.getloadavg()[0], 1)
    res["ann"] = ann_speed(doc.vectors("minilm"), qv, n_synthetic or None)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "retrieval.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "retrieval.md").write_text(write_md(res))
    log("wrote bench/results/retrieval.json and retrieval.md")


if __name__ == "__main__":
    main()
