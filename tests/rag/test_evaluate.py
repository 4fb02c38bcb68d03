"""BEIR: metrics against pytrec_eval on a hand-made run; qrels parsing (CRLF, header); max-over-chunks doc scores.
SQuAD: EM / F1 / citation / don't-know metrics against hand-worked values; the v1.1 reader and its errors; the
paragraph store (cache key, reuse, two processes, dropped gold paragraphs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval

from ragseek.rag.evaluate import (
    QAItem,
    cites_gold,
    doc_run,
    drop_gold,
    evaluate,
    exact_match,
    is_dont_know,
    load_qrels,
    load_queries,
    load_squad,
    mrr,
    ndcg,
    normalize_answer,
    qa_metrics,
    squad_store,
    strip_citations,
    token_f1,
)
from ragseek.rag.pipeline import DONT_KNOW
from ragseek.rag.splitters import SplitterConfig
from ragseek.rag.store import Store, StoreConfig

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
    # MRR@10 = RR of the top-10 run
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
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


def test_trec_qrels_read_as_the_beir_ones(tmp_path):
    # trec_eval's format: query-id, iteration (ignored), corpus-id, relevance; spaces or tabs
    trec = tmp_path / "qrels.trec"
    trec.write_text("q1 0 d1 1\nq2 Q0 d3 1\nq3\t0\td5\t2\nq3 0 d4 0\n")
    assert load_qrels(trec) == load_qrels(DATA / "qrels.tsv")


@pytest.mark.parametrize(
    "content, says",
    [
        ("q1,d1,1\nq2,d3,1\n", "qrels.txt:2: expected BEIR"),  # comma-separated: line 1 reads as a header
        ("q1\td1\t1\nq2 0 d3 1\n", "qrels.txt:2: expected 3 columns"),  # BEIR, then a TREC line
        ("q1\td1\t1\nq2\td3\tyes\n", "qrels.txt:2: the score 'yes'"),
        ("query-id\tcorpus-id\tscore\n", "qrels.txt: no judgements"),
    ],
)
def test_qrels_in_another_format_are_refused_naming_the_line(tmp_path, content, says):
    path = tmp_path / "qrels.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=says):
        load_qrels(path)


def test_doc_score_is_max_over_chunks():
    doc_ids = ["a", "a", "b", "c", "b"]
    rows, scores = np.array([1, 2, 0, 4, 3]), np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    assert doc_run(doc_ids, rows, scores, depth=2) == {"a": 0.9, "b": 0.8}


# --- SQuAD v1.1 ---------------------------------------------------------------------------------------------

SLICE = Path(__file__).parent / "data" / "squad-slice.json"  # 4 paragraphs, 11 questions (squad-slice.md)


def test_normalize_answer_follows_the_v11_script():
    # lower -> drop ASCII punctuation ("-" too, so the words join) -> articles become spaces -> collapse spaces
    assert normalize_answer("The  Denver-Broncos, an NFL team!") == "denverbroncos nfl team"
    assert normalize_answer("A theatre") == "theatre"  # "the" inside a word stays (\b)
    assert normalize_answer("“Viking”") == "“viking”"  # string.punctuation is ASCII only, as in the script


def test_exact_match_and_f1_hand_worked():
    assert exact_match("Denver Broncos.", ["x", "denver broncos"]) == 1.0
    assert exact_match("Denver", ["Denver Broncos"]) == 0.0
    # pred "denver broncos won" (3 tokens), gold "denver broncos" (2): common 2, P = 2/3, R = 1,
    # F1 = 2 (2/3)(1) / (2/3 + 1) = (4/3) / (5/3) = 0.8
    assert token_f1("the Denver Broncos won", ["Denver Broncos"]) == pytest.approx(0.8)
    # max over golds: vs "denver broncos" common 1, P = 1, R = 1/2, F1 = 1 / 1.5 = 2/3; vs "carolina panthers" 0
    assert token_f1("Broncos", ["Carolina Panthers", "Denver Broncos"]) == pytest.approx(2 / 3)
    # multiset overlap: pred {new: 2, york: 1}, gold {new: 1, york: 2}: common min(2,1) + min(1,2) = 2,
    # P = R = 2/3, F1 = 2/3
    assert token_f1("new new york", ["new york york"]) == pytest.approx(2 / 3)
    assert token_f1("Paris", ["London"]) == 0.0
    # v1.1: an answer that normalises to nothing EMs an all-article gold ("" == ""), but F1 has no common token: 0
    assert (exact_match("", ["the"]), token_f1("", ["the"])) == (1.0, 0.0)
    with pytest.raises(TypeError, match="list of gold answers"):
        token_f1("France", "France")


def test_citation_and_dont_know_helpers():
    assert strip_citations("Denver Broncos [2].") == "Denver Broncos ."
    assert strip_citations("In 1856 [1, 3][2]") == "In 1856"
    assert cites_gold("The Denver Broncos won.", ["Carolina", "denver broncos"])
    assert not cites_gold("born in 18560", ["1856"])  # normalised tokens, not substrings
    assert is_dont_know(DONT_KNOW) and is_dont_know("I don’t know.") and is_dont_know("We do not know [1].")
    assert not is_dont_know("Tesla knew German [1].")


def test_qa_metrics_hand_worked():
    golds = [["Denver Broncos"], ["1856"], ["cholera"], ["nine months"]]
    items = [QAItem(f"q{i}", "?", g, [0], "T", i, g[0]) for i, g in enumerate(golds)]
    answers = ["Denver Broncos [1]", "He was born in 1856 [2].", DONT_KNOW, "I don't know."]
    cited = ["The Denver Broncos won.", "died in 1943", None, None]
    in_store = [True, True, False, True]  # q2's gold paragraph was removed: it should get don't-know
    m = qa_metrics(items, answers, cited, [1.0, 2.0, 3.0, 10.0], in_store)
    # EM: only q0 ("denver broncos" once its [1] is stripped) -> 1/4
    # F1: q0 1; q1 "he was born in 1856" 5 tokens, 1 common: P = 1/5, R = 1, F1 = 0.4 / 1.2 = 1/3; q2, q3 0
    #     -> (1 + 1/3) / 4 = 1/3
    # citation accuracy, over the questions whose gold is stored (q0, q1, q3): only q0's chunk holds "denver
    #     broncos" -> 1/3
    # don't know: q2 and q3 -> rate 2/4; precision 1 (q2) / 2; recall 1 / 1 (q2 is the only missing gold)
    # seconds [1, 2, 3, 10]: p50 = (2 + 3) / 2 = 2.5; p95 at rank 0.95 * 3 = 2.85: 3 + 0.85 * 7 = 8.95
    assert m == pytest.approx(
        {"em": 0.25, "f1": 1 / 3, "citation_accuracy": 1 / 3, "dont_know_rate": 0.5, "p50_s": 2.5,
         "p95_s": 8.95, "n": 4, "dont_know_precision": 0.5, "dont_know_recall": 1.0, "gold_missing": 1}
    )  # fmt: skip
    unknown = qa_metrics(items, answers, cited, [1.0] * 4)  # no store membership: no don't-know precision
    assert (unknown["dont_know_precision"], unknown["dont_know_recall"]) == (None, None)
    assert unknown["citation_accuracy"] == 0.25


def test_load_squad_slice_in_file_order():
    items = load_squad(SLICE)
    assert len(items) == 11 and [it.doc_id for it in items[:4]] == ["Normans/0"] * 3 + ["Normans/1"]
    first = items[0]
    assert (first.id, first.question, first.answers[0], first.title, first.paragraph) == (
        "56ddde6b9a695914005b9628", "In what country is Normandy located?", "France", "Normans", 0,
    )  # fmt: skip
    for it in items:
        for text, start in zip(it.answers, it.answer_starts, strict=True):
            assert it.context[start : start + len(text)] == text


def _squad(**qa) -> dict:
    ans = {"text": "France", "answer_start": 10}
    return {"data": [{"title": "T", "paragraphs": [{"context": "Normandy, France.", "qas": [
        {"id": "q1", "question": "Where?", "answers": [ans], **qa}]}]}]}  # fmt: skip


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "not JSON"),  # the BEIR corpus .jsonl
        (json.dumps({"version": "1.1"}), 'no top-level "data" list'),
        (
            json.dumps({"data": [{"title": "T", "paragraphs": [{"qas": []}]}]}),
            "data[0].paragraphs[0] has no 'context'",
        ),
        (json.dumps(_squad(answers=[{"text": "Paris", "answer_start": 10}])), "'Paris' is not the span"),
        (json.dumps(_squad(answers=[{"text": "France", "answer_start": "10"}])), "answer_start is a str"),
        (json.dumps(_squad(answers=[])), "answers is empty"),
        (json.dumps(_squad(is_impossible=False)), "SQuAD 2.0"),
    ],
)
def test_load_squad_rejects_other_formats_naming_the_file(tmp_path, content, reason):
    path = DATA / "corpus.jsonl" if content is None else tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as e:
        load_squad(path)
    assert str(path) in str(e.value) and "SQuAD v1.1" in str(e.value) and reason in str(e.value)
    assert '"answer_start": int' in str(e.value)  # it says what shape is expected


def test_squad_store_one_document_per_paragraph_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGSEEK_CACHE", str(tmp_path / "cache"))
    path = squad_store(SLICE, store_cfg=StoreConfig(embedder="none"))
    st = Store(path)
    assert (st.info()["documents"], sorted(set(st.chunks().doc_ids))) == (4, [
        "Nikola_Tesla/0", "Nikola_Tesla/1", "Normans/0", "Normans/1"])  # fmt: skip
    for it in load_squad(SLICE):
        doc = st.document(it.doc_id)
        assert doc.text == it.context and doc.metadata == {"title": it.title, "paragraph": it.paragraph}
    generation = st.generation
    st.close()
    assert squad_store(SLICE, store_cfg=StoreConfig(embedder="none")) == path  # reused, not rebuilt
    assert Store(path).generation == generation and path.parent == tmp_path / "cache" / "squad"
    other = squad_store(SLICE, splitter=SplitterConfig(chunk_size=200, chunk_overlap=0),
                        store_cfg=StoreConfig(embedder="none"))  # fmt: skip
    assert other != path  # the key holds the ingest settings

    dropped = squad_store(SLICE, store_cfg=StoreConfig(embedder="none"), drop=["Normans/1"])
    assert Store(dropped).info()["documents"] == 3 and Store(path).info()["documents"] == 4
    mine = squad_store(SLICE, store=tmp_path / "mine", store_cfg=StoreConfig(embedder="none"))
    assert mine == tmp_path / "mine" and Store(mine).info()["documents"] == 4
    with pytest.raises(ValueError, match="does not have"):
        squad_store(SLICE, drop=["Normans/9"])


def test_squad_store_two_processes_build_once(tmp_path):
    code = (
        "import sys; from ragseek.rag.evaluate import squad_store; from ragseek.rag.store import StoreConfig; "
        f"print(squad_store({str(SLICE)!r}, store_cfg=StoreConfig(embedder='none')))"
    )
    env = {**os.environ, "RAGSEEK_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE) for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].decode().strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs[0] == outs[1]
    folder = tmp_path / "cache" / "squad"
    assert not list(folder.glob("*.tmp-*"))  # no half-built folder left behind
    st = Store(outs[0])
    assert st.info()["documents"] == 4 and st.generation == 4  # one ingest: 4 documents, one bump each


def test_drop_gold_is_deterministic_and_reaches_the_fraction():
    items = load_squad(SLICE)  # 3 + 2 + 3 + 3 questions per paragraph
    picked = drop_gold(items, 0.3)
    lost = sum(it.doc_id in picked for it in items)
    assert drop_gold(items, 0.3) == picked and lost >= 0.3 * 11 and lost - 3 < 0.3 * 11
    assert drop_gold(items, 0.0) == [] and len(drop_gold(items, 1.0)) == 4
