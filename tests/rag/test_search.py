"""Search: kNN against brute force, cosine = dot on unit vectors, BM25 against rank_bm25, RRF / convex / MMR / SVM
on hand-worked cases, HNSW recall and staleness."""

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from ragseek.rag.search import (
    Analyzer,
    ANNConfig,
    BM25Config,
    BM25Index,
    HNSWIndex,
    SearchConfig,
    Searcher,
    convex,
    exact_knn,
    mmr,
    rrf,
    save_whole,
    similarity,
    svm_scores,
)
from ragseek.rag.splitters import SplitterConfig
from ragseek.rag.store import Store, StoreConfig

rng = np.random.default_rng(0)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_exact_knn_equals_brute_force(metric):
    X, q = rng.normal(size=(500, 24)), rng.normal(size=(7, 24))
    idx, scores = exact_knn(q, X, 10, metric)
    for row in range(len(q)):
        if metric == "cosine":
            brute = [X[i] @ q[row] / np.linalg.norm(X[i]) / np.linalg.norm(q[row]) for i in range(len(X))]
        elif metric == "dot":
            brute = [X[i] @ q[row] for i in range(len(X))]
        else:
            brute = [-math.dist(X[i], q[row]) for i in range(len(X))]
        assert list(idx[row]) == sorted(range(len(X)), key=lambda i: -brute[i])[:10]
        np.testing.assert_allclose(scores[row], sorted(brute, reverse=True)[:10], rtol=1e-6, atol=1e-9)


def test_cosine_equals_dot_on_normalised_vectors_and_l2_ranks_the_same():
    X, q = rng.normal(size=(200, 16)), rng.normal(size=(3, 16))
    Xn, qn = X / np.linalg.norm(X, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_allclose(similarity(qn, Xn, "cosine"), similarity(qn, Xn, "dot"), atol=1e-12)
    assert not np.allclose(similarity(q, X, "cosine"), similarity(q, X, "dot"))  # unnormalised: they differ
    # |q - x|^2 = 2 - 2 q.x on the unit sphere: the same ranking
    np.testing.assert_array_equal(exact_knn(qn, Xn, 20, "l2")[0], exact_knn(qn, Xn, 20, "dot")[0])
    np.testing.assert_allclose(similarity(qn, Xn, "l2") ** 2, 2 - 2 * similarity(qn, Xn, "dot"), atol=1e-9)


CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a fox is a small wild canine",
    "dogs and cats are common pets",
    "the dog barked at the mailman all morning",
    "brown bears eat fish in the river",
    "quick sort is a fast sorting algorithm",
    "lazy evaluation delays computation until needed",
    "the river flows quickly past the mill",
    "cats sleep most of the day",
    "a wild fox crossed the road at dawn",
    "pets need food water and care",
    "the mill grinds wheat into flour",
]
QUERIES = ["quick brown fox", "lazy dog", "wild canine pets", "river mill", "cats sleep"]


def test_bm25_matches_rank_bm25():
    cfg = BM25Config(method="robertson", stopwords="none", stemmer="none", k1=1.5, b=0.75)
    ours = BM25Index.build(CORPUS, cfg)
    ref = BM25Okapi([Analyzer(cfg)(t) for t in CORPUS], k1=1.5, b=0.75)
    for q in QUERIES:
        a, r = ours.scores(q), ref.get_scores(Analyzer(cfg)(q))
        # bm25s's Robertson term omits the constant factor (k1 + 1): same ranking, scores within that factor
        np.testing.assert_allclose(a * (1.5 + 1), r, rtol=1e-5)
        assert list(np.argsort(-a, kind="stable")[:10]) == list(np.argsort(-r, kind="stable")[:10])


def test_bm25_lucene_hand_worked():
    cfg = BM25Config(stopwords="none", stemmer="none")  # lucene, k1 1.2, b 0.75
    index = BM25Index.build(CORPUS, cfg)
    docs = [Analyzer(cfg)(t) for t in CORPUS]
    N, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    df = sum("fox" in d for d in docs)
    idf = math.log(1 + (N - df + 0.5) / (df + 0.5))
    for i, d in enumerate(docs):
        tf = d.count("fox")
        assert index.scores("fox")[i] == pytest.approx(
            idf * tf / (tf + 1.2 * (1 - 0.75 + 0.75 * len(d) / avgdl)), rel=1e-5
        )


def test_analyzer_stems_and_drops_stopwords():
    assert Analyzer(BM25Config(stopwords="en", stemmer="porter"))("The dogs were running to the rivers") == [
        "dog", "were", "run", "river",
    ]  # fmt: skip


def test_rrf_hand_worked():
    fused = rrf([[1, 2, 3], [3, 1, 4]], k=60)
    assert fused == pytest.approx({1: 1 / 61 + 1 / 62, 2: 1 / 62, 3: 1 / 63 + 1 / 61, 4: 1 / 63})
    assert sorted(fused, key=lambda i: -fused[i]) == [1, 3, 2, 4]


def test_convex_hand_worked():
    dense, bm25 = np.array([0.9, 0.5, 0.1]), np.array([0.0, 10.0, 5.0])
    # min-max: dense -> [1, .5, 0], bm25 -> [0, 1, .5]
    np.testing.assert_allclose(convex([dense, bm25], [0.3, 0.7], "minmax", 3), [0.3, 0.85, 0.35])
    z = convex([dense, bm25], [0.5, 0.5], "zscore", 3)
    zd, zb = (dense - dense.mean()) / dense.std(), (bm25 - bm25.mean()) / bm25.std()
    np.testing.assert_allclose(z, 0.5 * zd + 0.5 * zb)


def test_mmr_hand_worked():
    q = np.array([1.0, 0.0])
    X = np.array([[1.0, 0.0], [0.99, 0.141], [0.6, 0.8]])  # two near-duplicates, one different
    assert list(mmr(q, X, 3, lam=1.0)[0]) == [0, 1, 2]  # lambda = 1: plain kNN order
    # lambda = 0.3, after picking 0: x1 scores .3 * .99 - .7 * .99 = -.396, x2 .3 * .6 - .7 * .6 = -.24
    picked, scores = mmr(q, X, 3, lam=0.3)
    assert list(picked) == [0, 2, 1]
    np.testing.assert_allclose(scores[:2], [0.3, -0.24], atol=1e-9)


def test_svm_ranks_the_query_duplicate_first():
    X = rng.normal(size=(300, 32))
    q = X[17] + 0.01 * rng.normal(size=32)
    margins = svm_scores(q, X, C=0.1)
    assert int(np.argmax(margins)) == 17


def test_hnsw_recall_and_persistence(tmp_path):
    X, q = rng.normal(size=(3000, 32)).astype(np.float32), rng.normal(size=(50, 32)).astype(np.float32)
    cfg = ANNConfig(ann=True, hnsw_m=16, ef_construction=100, ef_search=64)
    index = HNSWIndex.build(X, cfg)
    idx, _ = index.search(q, 10, cfg.ef_search)
    exact, _ = exact_knn(q, X, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, exact, strict=True)])
    assert recall >= 0.9
    index.save(tmp_path / "x.faiss")
    np.testing.assert_array_equal(HNSWIndex.load(tmp_path / "x.faiss").search(q, 10, cfg.ef_search)[0], idx)


@pytest.mark.parametrize("kind", ["hnsw", "bm25"])
def test_an_index_is_replaced_whole_or_not_at_all(tmp_path, kind):
    """save_whole: a build that dies mid-write leaves the index in place as it was (a faiss file, a bm25s folder)
    and no temporary; a dead build's temporary is removed by the next, a live one's is left to it."""
    cfg = BM25Config(stopwords="none", stemmer="none")
    if kind == "hnsw":
        X = rng.normal(size=(200, 16)).astype(np.float32)
        old, new = HNSWIndex.build(X, ANNConfig()), HNSWIndex.build(X[:100], ANNConfig())
    else:
        old, new = BM25Index.build(CORPUS[:6], cfg), BM25Index.build(CORPUS[:3], cfg)
    path = tmp_path / kind

    def size_at(where: Path) -> int:
        if kind == "hnsw":
            return HNSWIndex.load(where).index.ntotal
        return len(BM25Index.load(where, cfg).scores("fox"))

    def dies_midway(tmp: Path) -> None:
        new.save(tmp)
        raise KeyboardInterrupt

    save_whole(path, old.save)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"{kind}.tmp-{dead.pid}").write_text("left by a killed build")
    (tmp_path / f"{kind}.tmp-1").write_text("a build still running (pid 1)")
    with pytest.raises(KeyboardInterrupt):
        save_whole(path, dies_midway)
    assert size_at(path) == (200 if kind == "hnsw" else 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind, f"{kind}.tmp-1"]
    save_whole(path, new.save)
    assert size_at(path) == (100 if kind == "hnsw" else 3)


def ingested(tmp_path, texts: list[str], embedder: str = "word2vec") -> tuple[Store, Path]:
    """A store holding one .txt file per text (ingested from tmp_path/docs), and that folder."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(texts):
        (docs / f"{i}.txt").write_text(text)
    store = Store(tmp_path / "store")
    store.ingest([docs], SplitterConfig(), StoreConfig(embedder=embedder))
    return store, docs


def test_searcher_rebuilds_stale_indexes(tmp_path):
    store, docs = ingested(tmp_path, CORPUS[:6])
    bm25 = BM25Config(stopwords="none", stemmer="none")
    hits = Searcher(store, SearchConfig(retriever="bm25"), bm25).search("river mill")
    assert hits[0].text == CORPUS[4]
    (docs / "new.txt").write_text("the river and the mill")
    store.ingest([docs], SplitterConfig(), StoreConfig(embedder="word2vec"))
    hits = Searcher(store, SearchConfig(retriever="bm25"), bm25).search("river mill")
    assert hits[0].text == "the river and the mill"
    for retriever in ["dense", "hybrid", "svm", "mmr"]:
        hits = Searcher(
            store, SearchConfig(retriever=retriever, embedder="word2vec", k=3), bm25, ANNConfig()
        ).search("fox")
        assert len(hits) == 3 and all(h.text == store.document(h.doc_id).text[h.start : h.end] for h in hits)
    ann = Searcher(store, SearchConfig(retriever="dense", embedder="word2vec", k=7), ann=ANNConfig(ann=True))
    exact = Searcher(store, SearchConfig(retriever="dense", embedder="word2vec", k=7))
    assert [h.chunk_id for h in ann.search("fox")] == [h.chunk_id for h in exact.search("fox")]
    assert all(ix["fresh"] for ix in store.info()["indexes"])


def test_ann_with_k_beyond_the_store_returns_each_chunk_once(tmp_path):
    store, _ = ingested(tmp_path, CORPUS[:3])
    cfg = SearchConfig(retriever="dense", embedder="word2vec", k=10)
    ann = Searcher(store, cfg, ann=ANNConfig(ann=True)).search("fox")
    exact = Searcher(store, cfg).search("fox")
    # faiss pads a short result with id -1: read as a row, that was the last chunk again (a phantom hit)
    assert len(ann) == 3 and sorted(h.chunk_id for h in ann) == sorted(h.chunk_id for h in exact)


@pytest.mark.parametrize(
    "cls, field, value, says",
    [
        (SearchConfig, "k", 0, "--k 0"),
        (SearchConfig, "k", -1, "--k -1"),
        (SearchConfig, "candidates", 0, "--candidates 0"),
        (SearchConfig, "dense_weight", 5.0, "--dense-weight 5.0"),
        (SearchConfig, "dense_weight", -0.5, "--dense-weight -0.5"),
        (SearchConfig, "mmr_lambda", 2.0, "--mmr-lambda 2.0"),
        (SearchConfig, "svm_c", 0.0, "--svm-c 0.0"),
        (SearchConfig, "rrf_k", -1, "--rrf-k -1"),
        (ANNConfig, "ef_search", 0, "--ef-search 0"),
        (ANNConfig, "hnsw_m", 1, "--hnsw-m 1"),
        (BM25Config, "b", 1.5, "--b 1.5"),
        (BM25Config, "k1", -1.0, "--k1 -1.0"),
    ],
)
def test_out_of_range_search_settings_are_refused_naming_the_flag(cls, field, value, says):
    with pytest.raises(ValueError, match=says):
        cls(**{field: value})


def test_search_depth_below_one_is_refused(tmp_path):
    store, _ = ingested(tmp_path, CORPUS[:1], embedder="none")
    searcher = Searcher(store, SearchConfig(retriever="bm25"))
    for k in (0, -1):  # k=0 used to fall back to cfg.k, k=-1 to return n - 1 chunks
        with pytest.raises(ValueError, match="k >= 1"):
            searcher.search("fox", k)
