"""BEIR-format evaluation: load corpus / queries / qrels, run a retriever, score nDCG@10, Recall@k, MRR@10.

Retrieval is at chunk level and a BEIR corpus row is one document, so a document's score is the max over its
chunks (`doc_run`). Metrics follow trec_eval (as pytrec_eval, which the tests check them against):
    DCG@k  = sum_{i<=k} rel_i / log2(i + 1),  nDCG@k = DCG@k / IDCG@k  (ideal order of the qrels' gains)
    Recall@k = |relevant in top k| / |relevant|,  MRR@k = 1 / rank of the first relevant within k (0 if none)
Relevant means a qrels score > 0.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]


def load_queries(path: Path) -> dict[str, str]:
    with open(path, encoding="utf-8") as f:
        return {str(row["_id"]): row["text"] for row in map(json.loads, filter(str.strip, f))}


def load_qrels(path: Path) -> Qrels:
    """`query-id<TAB>corpus-id<TAB>score` lines; CRLF endings and a header line are accepted."""
    qrels: Qrels = {}
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) < 3 or not parts[0]:
                continue
            if lineno == 1 and not parts[-1].lstrip("-").isdigit():
                continue  # header
            try:
                qrels.setdefault(parts[0], {})[parts[1]] = int(parts[-1])
            except ValueError as e:
                raise ValueError(
                    f"{path}:{lineno}: expected 'query-id<TAB>corpus-id<TAB>score', got {line!r}"
                ) from e
    return qrels


def _ranked(scores: dict[str, float]) -> list[str]:
    # trec_eval order: score descending, ties by doc id descending
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def ndcg(ranked: list[str], rels: dict[str, int], k: int) -> float:
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]) if rels.get(d, 0) > 0)
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall(ranked: list[str], rels: dict[str, int], k: int) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mrr(ranked: list[str], rels: dict[str, int], k: int) -> float:
    return next((1.0 / (i + 1) for i, d in enumerate(ranked[:k]) if rels.get(d, 0) > 0), 0.0)


def evaluate(run: Run, qrels: Qrels) -> dict[str, float]:
    """Mean nDCG@10, Recall@10, Recall@100 and MRR@10 over the queries in the qrels (a query with no run scores 0)."""
    rows = []
    for qid, rels in qrels.items():
        ranked = _ranked(run.get(qid, {}))
        rows.append(
            (
                ndcg(ranked, rels, 10),
                recall(ranked, rels, 10),
                recall(ranked, rels, 100),
                mrr(ranked, rels, 10),
            )
        )
    mean = np.mean(rows, axis=0) if rows else np.zeros(4)
    return dict(zip(["ndcg@10", "recall@10", "recall@100", "mrr@10"], map(float, mean), strict=True))


def doc_run(doc_ids: list[str], rows: np.ndarray, scores: np.ndarray, depth: int) -> dict[str, float]:
    """Chunk hits -> document scores, a document scoring the max over its chunks; the best `depth` documents."""
    best: dict[str, float] = {}
    for r, s in zip(rows, scores, strict=True):
        d = doc_ids[r]
        if d not in best or s > best[d]:
            best[d] = float(s)
    return dict(sorted(best.items(), key=lambda kv: -kv[1])[:depth])


@dataclass
class BeirResult:
    metrics: dict[str, float]
    qps: float
    queries: int
    run: Run


def run_beir(
    searcher,
    queries: dict[str, str],
    qrels: Qrels,
    depth: int = 100,
    chunk_depth: int | None = None,
    rank: Callable[[list[str], int], list[tuple[np.ndarray, np.ndarray]]] | None = None,
) -> BeirResult:
    """Rank every query in the qrels with `searcher` (a `ragseek.rag.search.Searcher`) and score the run.

    `chunk_depth` chunks are retrieved per query (default 3 x depth when documents have several chunks) and
    folded into the best `depth` documents. `rank` replaces `searcher.rank` (e.g. `pipeline.ranking`, with the
    LLM steps). qps counts query encoding and ranking, not index loading."""
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise KeyError(f"{len(missing)} qrels query ids are not in the queries file (first: {missing[0]!r})")
    table = searcher.store.chunks()
    several = len(set(table.doc_ids)) < len(table.doc_ids)
    chunk_depth = chunk_depth or (3 * depth if several else depth)
    qids = list(qrels)
    rank = rank or searcher.rank
    rank([queries[qids[0]]], 1)  # load indexes and models outside the timing
    t0 = time.perf_counter()
    ranked = rank([queries[q] for q in qids], chunk_depth)
    seconds = time.perf_counter() - t0
    run = {q: doc_run(table.doc_ids, rows, sc, depth) for q, (rows, sc) in zip(qids, ranked, strict=True)}
    return BeirResult(evaluate(run, qrels), len(qids) / seconds, len(qids), run)
