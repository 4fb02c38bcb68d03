"""The reader's training rows: ask's exact prompt, the cited target, don't-know rows, the split by article."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from ragseek.rag.evaluate import load_squad, squad_store
from ragseek.rag.pipeline import DONT_KNOW, AskConfig, StepsConfig, build_prompt, sources
from ragseek.rag.search import Hit, SearchConfig, Searcher
from ragseek.rag.store import Store, StoreConfig
from ragseek.train.tasks.reader import (
    fit_gate,
    fit_logistic,
    mentions,
    reader_row,
    reader_rows,
    split_articles,
    target_answer,
    write_squad,
)

SLICE = Path(__file__).resolve().parents[1] / "rag" / "data" / "squad-slice.json"
NO_GATE = AskConfig(min_similarity=-1, max_unanswerable=1)


@pytest.fixture(scope="module")
def searcher(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGSEEK_CACHE", str(tmp_path_factory.mktemp("cache")))
        store = squad_store(SLICE, store_cfg=StoreConfig(embedder="word2vec"))
    return Searcher(Store(store), SearchConfig(retriever="bm25", k=2))


def test_rows_are_asks_prompt_with_the_cited_answer(searcher):
    items = load_squad(SLICE)
    rows = reader_rows(items, searcher, dont_know=0.0, cfg=NO_GATE)
    assert len(rows) == len(items) and not any(r["dropped"] for r in rows)
    cited = 0
    for item, row in zip(items, rows, strict=True):
        _, chunks, _ = sources(item.question, searcher, None, NO_GATE, StepsConfig())
        assert row["prompt"] == build_prompt(item.question, chunks)
        assert row["answers"] == item.answers
        if row["gold"]:
            cited += 1
            source = chunks[row["gold"] - 1]
            answer = row["response"].removesuffix(f" [{row['gold']}]")
            assert source.doc_id == item.doc_id and answer in source.text and answer in item.answers
        else:  # BM25 missed the gold paragraph: nothing in the prompt holds the answer
            assert row["response"] == DONT_KNOW
            assert item.doc_id not in {c.doc_id for c in chunks}
    assert cited >= len(items) - 2


def test_dropped_rows_never_see_their_gold_paragraph(searcher):
    items = {it.id: it for it in load_squad(SLICE)}
    rows = reader_rows(list(items.values()), searcher, dont_know=1.0, cfg=NO_GATE)
    assert rows
    for row in rows:
        item = items[row["id"]]
        assert row["dropped"] and row["gold"] == 0 and row["response"] == DONT_KNOW
        assert f"(from {item.doc_id})" not in row["prompt"]
        _, chunks, _ = sources(
            item.question, searcher, None, NO_GATE, StepsConfig(), frozenset({item.doc_id})
        )
        assert not mentions(item.answers, chunks)  # the don't-know target is right: no source holds an answer
    # the draw is seeded: the same questions are dropped each time
    half = [r["dropped"] for r in reader_rows(list(items.values()), searcher, dont_know=0.5, cfg=NO_GATE)]
    assert half == [
        r["dropped"] for r in reader_rows(list(items.values()), searcher, dont_know=0.5, cfg=NO_GATE)
    ]
    assert 0 < sum(half) < len(half)


def test_a_dropped_row_whose_answer_another_source_holds_is_left_out(searcher):
    item = next(it for it in load_squad(SLICE) if it.question.startswith("What is the original meaning"))
    assert reader_row(item, searcher, drop_gold=True, cfg=NO_GATE) is not None
    # "France" is also in Normans/0, which the question retrieves: "I don't know" would be a wrong target
    ambiguous = dataclasses.replace(item, answers=["France"])
    _, chunks, _ = sources(item.question, searcher, None, NO_GATE, StepsConfig(), frozenset({item.doc_id}))
    assert mentions(ambiguous.answers, chunks)
    assert reader_row(ambiguous, searcher, drop_gold=True, cfg=NO_GATE) is None


def test_shuffled_rows_cite_the_gold_paragraph_where_it_is_shown(searcher):
    items = {it.id: it for it in load_squad(SLICE)}
    ranked = {r["id"]: r for r in reader_rows(list(items.values()), searcher, dont_know=0.0, cfg=NO_GATE)}
    shuffled = reader_rows(list(items.values()), searcher, dont_know=0.0, cfg=NO_GATE, shuffle=1.0)
    assert {r["id"] for r in shuffled} == set(ranked)
    moved = 0
    for row in shuffled:
        if row["gold"]:
            assert f"Source [{row['gold']}] (from {items[row['id']].doc_id}):" in row["prompt"]
            assert row["response"].endswith(f" [{row['gold']}]")
        moved += row["gold"] != ranked[row["id"]]["gold"]
    assert moved > 0


def test_mentions_matches_whole_words_after_normalisation():
    chunks = [Hit(0, 0, "a", 0, 30, 1.0, "The Normans (Norman: Nourmands) came in 911.")]
    assert mentions(["the normans"], chunks) and mentions(["911"], chunks)
    assert (
        not mentions(["Norma"], chunks) and not mentions(["91"], chunks) and not mentions(["", "a"], chunks)
    )


def test_split_is_by_article_and_the_val_file_keeps_every_paragraph(tmp_path):
    items = load_squad(SLICE)
    train, val = split_articles(items, 1)
    assert sorted(train + val) == ["Nikola_Tesla", "Normans"] and split_articles(items, 1) == (train, val)
    with pytest.raises(ValueError, match="at least one on each side"):
        split_articles(items, 2)
    keep = {it.id for it in items if it.title in val}
    out = load_squad(write_squad(tmp_path / "val.json", SLICE, keep))
    assert {it.id for it in out} == keep and {it.title for it in out} == set(val)
    data = json.loads((tmp_path / "val.json").read_text())
    assert sum(len(a["paragraphs"]) for a in data["data"]) == 4  # the training article's paragraphs stay


def test_target_answer_is_the_most_given_then_the_shortest():
    item = load_squad(SLICE)[0]
    item.answers = ["the Normans", "Normans", "Normans", "Norman people"]
    assert target_answer(item) == "Normans"  # "the Normans" normalises to "normans" too: 3 votes, shortest


def test_fit_logistic_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 2))
    y = rng.random(400) < 1 / (1 + np.exp(-(0.5 - 2.0 * X[:, 0] + 1.0 * X[:, 1])))
    b, *w = fit_logistic(X, y, l2=1e-3)
    # sklearn minimises 1/2 |w|^2 + C * sum(log-loss); ours mean(log-loss) + l2/2 |w|^2: the same at C = 1/(l2 n)
    ref = LogisticRegression(C=1 / (1e-3 * len(y)), tol=1e-10, max_iter=1000).fit(X, y)
    assert b == pytest.approx(ref.intercept_[0], abs=1e-5) and w == pytest.approx(
        ref.coef_[0].tolist(), abs=1e-5
    )


def test_fit_gate_counts_what_it_sends_to_dont_know():
    rows = [{"support": [c, h], "gold": g} for c, h, g in [(0.9, 1.0, 1), (0.8, 0.9, 2), (0.7, 0.8, 1)]]
    rows += [{"support": [0.2, 0.1], "gold": 0}, {"support": [0.3, 0.2], "gold": 0}]
    gate = fit_gate(rows, thresholds=(0.5,))
    _, w_cos, w_words = gate["weights"]
    assert w_cos < 0 and w_words < 0  # weaker support, more likely unanswerable
    assert gate["at"]["0.5"] == {"dont_know": 2, "precision": 1.0, "recall": 1.0, "answerable_lost": 0.0}
    assert (gate["rows"], gate["unanswerable"]) == (5, 2)
