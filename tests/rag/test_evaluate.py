"""Metrics against pytrec_eval on a hand-made run; qrels parsing (CRLF, header); max-over-chunks doc scores."""

from pathlib import Path

import numpy as np
import pytest
import pytrec_eval

from ragseek.rag.evaluate import doc_run, evaluate, load_qrels, load_queries, mrr, ndcg

DATA = Path(__file__).parent / "data" / "beir"

QRELS = {
    "q1": {"d1": 1, "d4": 2, "d9": 1},
    "q2": {"d2": 1},
    "q3": {"d7": 3, "d8": 0},  # d8 judged not relevant
    "q4": {"d5": 1},  # retrieved nowhere
}
RUN = {
    "q1": {f"d{i}": 1.0 - i / 20 for i in range(12)},  # d0 > d1 > ... > d11: no ties
    "q2": {"d3": 0.9, "d8": 0.8, "d2": 0.7, "d1": 0.1},
    "q3": {"d8": 0.95, **{f"x{i}": 0.9 - i / 200 for i in range(120)}, "d7": 0.01},  # d7 at rank 122
    "q4": {"d1": 1.0},
}


def reference(run, qrels):
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recall_10", "recall_100"})
    top10 = {q: dict(sorted(s.items(), key=lambda kv: -kv[1])[:10]) for q, s in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(
        top10
    )  # MRR@10 = RR of the top-10 run
    per = ev.evaluate(run)
    mean = lambda key, res: float(np.mean([res[q][key] for q in qrels]))  # noqa: E731
    return {
        "ndcg@10": mean("ndcg_cut_10", per),
        "recall@10": mean("recall_10", per),
        "recall@100": mean("recall_100", per),
        "mrr@10": mean("recip_rank", rr),
    }


def test_metrics_match_pytrec_eval():
    ours, ref = evaluate(RUN, QRELS), reference(RUN, QRELS)
    assert ours == pytest.approx(ref, abs=1e-9)
    assert 0 < ours["ndcg@10"] < 1 and ours["recall@100"] < 1  # the case is not trivial


def test_metrics_hand_worked():
    ranked = ["d0", "d1", "d2", "d3", "d4"]
    rels = {"d1": 1, "d4": 2, "d9": 1}
    dcg = 1 / np.log2(3) + 2 / np.log2(6)
    idcg = 2 + 1 / np.log2(3) + 1 / np.log2(4)
    assert ndcg(ranked, rels, 10) == pytest.approx(dcg / idcg)
    assert mrr(ranked, rels, 10) == 0.5 and mrr(ranked, rels, 1) == 0.0


def test_qrels_with_crlf_and_header():
    assert load_qrels(DATA / "qrels.tsv") == {"q1": {"d1": 1}, "q2": {"d3": 1}, "q3": {"d5": 2, "d4": 0}}
    assert load_queries(DATA / "queries.jsonl")["q2"] == "does sleep help memory"


def test_doc_score_is_max_over_chunks():
    doc_ids = ["a", "a", "b", "c", "b"]
    rows, scores = np.array([1, 2, 0, 4, 3]), np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    assert doc_run(doc_ids, rows, scores, depth=2) == {"a": 0.9, "b": 0.8}
