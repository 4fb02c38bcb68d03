"""Retrieval: similarity, exact and approximate kNN, BM25, hybrid fusion, SVM retrieval and MMR.

The array functions (`similarity`, `exact_knn`, `svm_scores`, `mmr`, `rrf`, `convex`) are pure; `Searcher` runs
them over a `Store`, building or loading the persisted indexes (bm25s, faiss HNSW) and rebuilding a stale one.

- similarity: cosine(q, x) = q.x / (|q| |x|), dot q.x, L2 as -|q - x| (higher is closer for all three).
  The lecture's remark: with normalised vectors cosine = dot (and -|q - x|^2 = 2 q.x - 2, the same ranking).
- BM25 (Lucene variant by default): score(q, d) = sum_{t in q} idf(t) tf(t,d) / (tf(t,d) + k1 (1 - b + b |d|/avgdl)),
  idf(t) = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5)); bm25s precomputes every (token, doc) term, a query sums rows.
- Reciprocal-rank fusion: RRF(d) = sum_r 1 / (k + rank_r(d)), ranks from 1, k = 60 (Cormack et al. 2009).
- Convex fusion: w * norm(dense) + (1 - w) * norm(bm25), each normalised by its top-`candidates` statistics.
- SVM retrieval (Karpathy's kNN-vs-SVM note): the query is the one positive, the candidates the negatives; a
  linear SVM is fit and candidates are ranked by their margin w.x + b.
- MMR (Carbonell & Goldstein 1998): pick argmax_d lambda sim(q, d) - (1 - lambda) max_{s in picked} sim(d, s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from ragseek.config import config_field as _f
from ragseek.config import require
from ragseek.rag.contextual import contextual_name, contextual_texts
from ragseek.rag.embedders import Embedder
from ragseek.rag.splitters import words
from ragseek.rag.store import Store

Metric = Literal["cosine", "dot", "l2"]
RetrieverName = Literal["dense", "bm25", "hybrid", "svm", "mmr"]
Fusion = Literal["rrf", "convex"]
Norm = Literal["minmax", "zscore"]

# --- similarity and kNN ---------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


SIMILARITIES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "cosine": lambda q, X: _unit(q) @ _unit(X).T,
    "dot": lambda q, X: q @ X.T,
    "l2": lambda q, X: (
        -np.sqrt(np.maximum((q * q).sum(-1)[:, None] - 2 * q @ X.T + (X * X).sum(-1)[None, :], 0.0))
    ),
}


def similarity(q: np.ndarray, X: np.ndarray, metric: Metric = "cosine") -> np.ndarray:
    """Scores (m, n) of queries q (m, d) against X (n, d); higher is closer for every metric."""
    return SIMILARITIES[metric](np.atleast_2d(q), X)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest scores per row, best first: argpartition, then sort only those k."""
    scores = np.atleast_2d(scores)
    k = min(k, scores.shape[1])
    part = (
        np.argpartition(-scores, k - 1, axis=1)[:, :k]
        if k < scores.shape[1]
        else np.tile(np.arange(k), (len(scores), 1))
    )
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)


def exact_knn(
    q: np.ndarray, X: np.ndarray, k: int, metric: Metric = "cosine"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours: one matrix product, top-k by argpartition. Returns (idx, scores), (m, k) each."""
    return top_k(similarity(q, X, metric), k)


@dataclass
class ANNConfig:
    ann: bool = _f(False, "dense search through a faiss HNSW graph instead of exact kNN")
    hnsw_m: int = _f(32, "HNSW neighbours per node (M)")
    ef_construction: int = _f(200, "HNSW build beam width")
    ef_search: int = _f(128, "HNSW query beam width (higher: better recall, slower)")

    def __post_init__(self) -> None:
        require(self.hnsw_m >= 2, "hnsw_m", self.hnsw_m, "must be >= 2 (neighbours per HNSW node)")
        for name in ("ef_construction", "ef_search"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1 (an HNSW beam width)")


class HNSWIndex:
    """faiss HNSW over inner product (vectors unit-normalised for cosine), saved with faiss.write_index."""

    def __init__(self, index) -> None:
        self.index = index

    @classmethod
    def build(cls, X: np.ndarray, cfg: ANNConfig, metric: Metric = "cosine") -> HNSWIndex:
        import faiss

        faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        index = faiss.IndexHNSWFlat(X.shape[1], cfg.hnsw_m, faiss_metric)
        index.hnsw.efConstruction = cfg.ef_construction
        index.add(np.ascontiguousarray(_unit(X) if metric == "cosine" else X, dtype=np.float32))
        return cls(index)

    def search(
        self, q: np.ndarray, k: int, ef_search: int, metric: Metric = "cosine"
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), (m, min(k, n)) each, best first. A row the graph walk could not fill is padded with id -1
        (faiss's convention): drop those before reading ids as rows."""
        k = min(k, self.index.ntotal)
        self.index.hnsw.efSearch = max(ef_search, k)
        q = np.ascontiguousarray(
            _unit(np.atleast_2d(q)) if metric == "cosine" else np.atleast_2d(q), dtype=np.float32
        )
        scores, idx = self.index.search(q, k)
        return idx, (-np.sqrt(np.maximum(scores, 0)) if metric == "l2" else scores)

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path) -> HNSWIndex:
        import faiss

        return cls(faiss.read_index(str(path)))


# --- SVM, MMR, fusion ------------------------------------------------------------------------------------


def svm_scores(q: np.ndarray, X: np.ndarray, C: float = 0.1) -> np.ndarray:
    """Margins of X under a linear SVM trained with q as the only positive and X as negatives (Karpathy)."""
    from sklearn.svm import LinearSVC

    data = np.concatenate([q[None, :], X])
    labels = np.zeros(len(data))
    labels[0] = 1
    clf = LinearSVC(class_weight="balanced", C=C, max_iter=10000, tol=1e-6, dual="auto")
    clf.fit(data, labels)
    return clf.decision_function(X)


def mmr(q: np.ndarray, X: np.ndarray, k: int, lam: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Greedy maximal marginal relevance over the rows of X (cosine); returns picked indices and their MMR scores."""
    Xn = _unit(X)
    rel = Xn @ _unit(q)
    redundancy = np.full(len(X), -np.inf)
    picked, scores = [], []
    available = np.ones(len(X), dtype=bool)
    for _ in range(min(k, len(X))):
        score = lam * rel - (1 - lam) * np.where(np.isinf(redundancy), 0.0, redundancy)
        score[~available] = -np.inf
        i = int(np.argmax(score))
        picked.append(i)
        scores.append(score[i])
        available[i] = False
        redundancy = np.maximum(redundancy, Xn @ Xn[i])
    return np.array(picked, dtype=np.int64), np.array(scores)


def rrf(rankings: Sequence[Sequence[int]], k: int = 60) -> dict[int, float]:
    """Reciprocal-rank fusion: item -> sum over rankings of 1 / (k + rank), rank counted from 1."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return fused


def _minmax(s: np.ndarray, ref: np.ndarray) -> np.ndarray:
    lo, hi = ref.min(), ref.max()
    return (s - lo) / (hi - lo) if hi > lo else s - lo


def _zscore(s: np.ndarray, ref: np.ndarray) -> np.ndarray:
    sd = ref.std()
    return (s - ref.mean()) / sd if sd > 0 else s - ref.mean()


NORMS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"minmax": _minmax, "zscore": _zscore}


def convex(
    score_vectors: Sequence[np.ndarray],
    weights: Sequence[float],
    norm: Norm = "minmax",
    candidates: int = 100,
) -> np.ndarray:
    """sum_i w_i * norm(s_i), each s_i normalised with the statistics of its own top-`candidates` scores."""
    out = np.zeros_like(score_vectors[0], dtype=np.float64)
    for s, w in zip(score_vectors, weights, strict=True):
        ref = top_k(s, candidates)[1][0]
        out += w * NORMS[norm](s.astype(np.float64), ref)
    return out


# --- BM25 ------------------------------------------------------------------------------------------------


@dataclass
class BM25Config:
    k1: float = _f(1.2, "BM25 term-frequency saturation k1")
    b: float = _f(0.75, "BM25 length normalisation b")
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = _f(
        "lucene", "BM25 variant (bm25s): lucene, robertson, atire, bm25l, bm25+"
    )
    stopwords: Literal["none", "en", "en_plus"] = _f(
        "none", "stopword list dropped by the analyzer: none, en (Lucene's 33), en_plus (179)"
    )
    stemmer: Literal["none", "porter"] = _f(
        "porter", "stemmer in the analyzer (porter: gensim's Porter stemmer)"
    )

    def __post_init__(self) -> None:
        require(self.k1 >= 0, "k1", self.k1, "must be >= 0 (0: term frequency ignored)")
        require(0 <= self.b <= 1, "b", self.b, "must be between 0 (no length normalisation) and 1 (full)")

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


class Analyzer:
    """text -> lower-cased word tokens, stopwords dropped, optionally Porter-stemmed (gensim's Porter stemmer)."""

    def __init__(self, cfg: BM25Config) -> None:
        import bm25s.stopwords as sw

        self.stop = {
            "none": frozenset(),
            "en": frozenset(sw.STOPWORDS_EN),
            "en_plus": frozenset(sw.STOPWORDS_EN_PLUS),
        }[cfg.stopwords]
        self.stem = _porter() if cfg.stemmer == "porter" else None

    def __call__(self, text: str) -> list[str]:
        toks = [w for w in words(text) if w not in self.stop]
        return [self.stem(w) for w in toks] if self.stem else toks


def _porter() -> Callable[[str], str]:
    from gensim.parsing.porter import PorterStemmer

    return lru_cache(maxsize=1 << 18)(PorterStemmer().stem)


class BM25Index:
    """bm25s over analyzed chunks; `scores(query)` is the full (n_chunks,) score vector."""

    def __init__(self, model, cfg: BM25Config) -> None:
        self.model, self.cfg, self.analyze = model, cfg, Analyzer(cfg)

    @classmethod
    def build(cls, texts: list[str], cfg: BM25Config) -> BM25Index:
        import bm25s

        self = cls(bm25s.BM25(k1=cfg.k1, b=cfg.b, method=cfg.method), cfg)
        self.model.index([self.analyze(t) for t in texts], show_progress=False)
        return self

    def scores(self, query: str) -> np.ndarray:
        ids = self.model.get_tokens_ids(self.analyze(query))
        if not ids:
            return np.zeros(self.model.scores["num_docs"], dtype=np.float32)
        return self.model.get_scores_from_ids(ids)

    def save(self, path: Path) -> None:
        self.model.save(str(path))

    @classmethod
    def load(cls, path: Path, cfg: BM25Config) -> BM25Index:
        import bm25s

        return cls(bm25s.BM25.load(str(path)), cfg)


def save_whole(path: Path, save: Callable[[Path], None]) -> None:
    """save(tmp) beside `path` (a file, or a folder such as bm25s writes), then move it into place: a search in
    another process loads the old index or the new one, never a part, and a build killed mid-write leaves `path`
    as it was. Temporaries of builds that died are removed; when two processes build the same index at once, each
    move puts a whole index in place."""
    for stale in [*path.parent.glob(f"{path.name}.tmp-*"), *path.parent.glob(f"{path.name}.old-*")]:
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(stale)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        save(tmp)
        if tmp.is_dir():  # a folder cannot replace a folder in one step: set the old one aside first
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                path.rename(old)
            with contextlib.suppress(OSError):  # another build's whole index is already there
                tmp.rename(path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --- retrieval over a store ------------------------------------------------------------------------------


@dataclass
class SearchConfig:
    retriever: RetrieverName = _f("hybrid", "dense, bm25, hybrid, svm or mmr")
    k: int = _f(10, "results to return")
    embedder: str = _f("minilm", "embedder for dense/hybrid/svm/mmr (as at ingest)")
    metric: Metric = _f("cosine", "dense similarity: cosine, dot or l2")
    fusion: Fusion = _f("convex", "hybrid merge: rrf or convex")
    rrf_k: int = _f(60, "RRF constant k in 1/(k + rank)")
    dense_weight: float = _f(0.5, "convex fusion weight of dense (bm25 gets 1 - w)")
    norm: Norm = _f("zscore", "convex fusion score normalisation: minmax or zscore")
    candidates: int = _f(100, "depth of each list fused / re-ranked (hybrid, svm, mmr)")
    mmr_lambda: float = _f(0.7, "MMR trade-off: 1 = relevance only, 0 = diversity only")
    svm_c: float = _f(0.1, "SVM regularisation C")
    contextual: str | None = _f(
        None,
        "retrieve by LLM context + chunk (hits keep the chunk's offsets): the contexts this LLM wrote, "
        "its --llm spec as given to `ragseek ingest --contextual`",
    )

    def __post_init__(self) -> None:
        require(self.k >= 1, "k", self.k, "must be >= 1 (the number of results to return)")
        require(self.candidates >= 1, "candidates", self.candidates, "must be >= 1 (list depth)")
        require(self.rrf_k >= 0, "rrf_k", self.rrf_k, "must be >= 0 (RRF's constant in 1/(k + rank))")
        need = "must be between 0 and 1 (the weight of dense scores; bm25 gets 1 - w)"
        require(0 <= self.dense_weight <= 1, "dense_weight", self.dense_weight, need)
        need = "must be between 0 (diversity only) and 1 (relevance only)"
        require(0 <= self.mmr_lambda <= 1, "mmr_lambda", self.mmr_lambda, need)
        require(self.svm_c > 0, "svm_c", self.svm_c, "must be > 0 (the SVM's regularisation C)")


@dataclass
class Hit:
    row: int  # the chunk's row in `store.chunks()` (and its chunk vectors); -1 for a passage not in the store
    chunk_id: int
    doc_id: str
    start: int
    end: int
    score: float
    text: str


class Searcher:
    """Runs a retriever over a store; loads each index once, rebuilding it when the store has changed.

    With `cfg.contextual`, BM25 and the chunk vectors read each chunk's LLM context + its text (rag/contextual.py),
    in their own index and embeddings; hits are still the chunks, with their own text and offsets."""

    def __init__(
        self,
        store: Store,
        cfg: SearchConfig,
        bm25: BM25Config | None = None,
        ann: ANNConfig | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        """`embedder` (optional) is an already-loaded query embedder, shared between searchers; its name must be
        the one the store's vectors were computed with."""
        self.store, self.cfg = store, cfg
        self.bm25_cfg, self.ann_cfg = bm25 or BM25Config(), ann or ANNConfig()
        self._embedder = embedder
        self._cache: dict[str, object] = {}
        self._queries: dict[str, np.ndarray] = {}  # query text -> vector: `ask` embeds its question once
        self.encode_cache = 1024  # texts `encode` keeps (the most recent)

    def _cached(self, key: str, make: Callable[[], object]):
        key = f"{key}@{self.store.generation}"
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def bm25(self) -> BM25Index:
        llm = self.cfg.contextual

        def make() -> BM25Index:
            name = f"bm25-{self.bm25_cfg.fingerprint}" + (f"-ctx-{llm.replace('/', '_')}" if llm else "")
            path = self.store.root / name
            if self.store.index_is_fresh(name) and path.exists():
                return BM25Index.load(path, self.bm25_cfg)
            texts = contextual_texts(self.store, llm) if llm else self.store.chunks().texts
            index = BM25Index.build(texts, self.bm25_cfg)
            save_whole(path, index.save)
            self.store.mark_index(name)
            return index

        return self._cached("bm25", make)

    def embedder(self) -> Embedder:
        if self._embedder is not None:
            return self._embedder
        return self._cached(f"embedder:{self.cfg.embedder}", lambda: self.store.embedder(self.cfg.embedder))

    def vectors_name(self) -> str:
        """The embeddings-table key of the chunk vectors dense search compares the query with."""
        name = self._embedder.name if self._embedder else self.store.embedder_name(self.cfg.embedder)
        return contextual_name(name, self.cfg.contextual) if self.cfg.contextual else name

    def matrix(self) -> np.ndarray:
        def make() -> np.ndarray:
            if self.cfg.contextual:  # context + chunk vectors: the missing ones are embedded on first use
                # no contexts: fails before a model loads
                texts = contextual_texts(self.store, self.cfg.contextual)
                self.store.embed(self.embedder(), name=name, texts=texts)
            return self.store.vectors(name)

        name = self.vectors_name()
        return self._cached(f"matrix:{name}", make)

    def hnsw(self) -> HNSWIndex:
        def make() -> HNSWIndex:
            a = self.ann_cfg
            name = f"hnsw-{self.vectors_name().replace('/', '_')}-{self.cfg.metric}-M{a.hnsw_m}-ef{a.ef_construction}"
            path = self.store.root / f"{name}.faiss"
            if self.store.index_is_fresh(name) and path.exists():
                return HNSWIndex.load(path)
            index = HNSWIndex.build(self.matrix(), a, self.cfg.metric)
            save_whole(path, index.save)
            self.store.mark_index(name)
            return index

        return self._cached("hnsw", make)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Query vectors under the store's embedder, each text embedded once per searcher (the last `encode_cache`):
        retrieval, the don't-know gates and attribution all embed the question; the support gate embeds the
        sentences of the sources, which recur when questions share a passage."""
        new = [t for t in dict.fromkeys(texts) if t not in self._queries]
        for t, v in zip(new, self.embedder().encode(new) if new else [], strict=True):
            self._queries[t] = v
        vectors = np.stack([self._queries[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)
        # evicted after reading: a text of this call may be among the oldest
        excess = max(0, len(self._queries) - self.encode_cache)
        for t in list(self._queries)[:excess]:
            del self._queries[t]
        return vectors

    def relevant(self, question: str, hits: list[Hit], min_similarity: float) -> list[Hit]:
        """The don't-know gate: the hits whose chunk vector has cosine >= `min_similarity` with the question's."""
        if not hits:
            return []
        try:
            vectors = self.matrix()[[h.row for h in hits]]
        except LookupError as e:
            raise LookupError(
                f"the don't-know gate compares embeddings ({e}); or pass --min-similarity -1"
            ) from e
        cos = similarity(self.encode([question]), vectors, "cosine")[0]
        return [h for h, c in zip(hits, cos, strict=True) if c >= min_similarity]

    # each ranker: (queries, depth) -> one (chunk rows, scores) pair per query, best first

    def _encode(self, queries: list[str], vectors: np.ndarray | None) -> np.ndarray:
        return self.encode(queries) if vectors is None else np.atleast_2d(vectors)

    def _dense(
        self, queries: list[str], depth: int, vectors: np.ndarray | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        q = self._encode(queries, vectors)
        # a store with vector search of its own (PostgreSQL: pgvector, exact or HNSW) ranks in the database
        ann = self.ann_cfg if self.ann_cfg.ann else None
        ranked = self.store.knn(self.vectors_name(), q, depth, self.cfg.metric, ann)
        if ranked is not None:
            return ranked
        if self.ann_cfg.ann:
            idx, sc = self.hnsw().search(q, depth, self.ann_cfg.ef_search, self.cfg.metric)
            return [(i[i >= 0], s[i >= 0]) for i, s in zip(idx, sc, strict=True)]
        idx, sc = exact_knn(q, self.matrix(), depth, self.cfg.metric)
        return list(zip(idx, sc, strict=True))

    def _bm25(
        self, queries: list[str], depth: int, vectors: np.ndarray | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        index = self.bm25()
        out = []
        for query in queries:
            idx, sc = top_k(index.scores(query), depth)
            out.append((idx[0], sc[0]))
        return out

    def _hybrid(
        self, queries: list[str], depth: int, vectors: np.ndarray | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        c, index = self.cfg, self.bm25()
        dense = similarity(self._encode(queries, vectors), self.matrix(), c.metric)
        out = []
        for query, d in zip(queries, dense, strict=True):
            b = index.scores(query)
            if c.fusion == "rrf":
                lists = [top_k(s, max(c.candidates, depth))[0][0] for s in (d, b)]
                fused = rrf([list(map(int, r)) for r in lists], c.rrf_k)
                items = sorted(fused, key=lambda i: -fused[i])[:depth]
                out.append((np.array(items, dtype=np.int64), np.array([fused[i] for i in items])))
            else:
                idx, sc = top_k(
                    convex([d, b], [c.dense_weight, 1 - c.dense_weight], c.norm, c.candidates), depth
                )
                out.append((idx[0], sc[0]))
        return out

    def _svm(
        self, queries: list[str], depth: int, vectors: np.ndarray | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        X, out = self.matrix(), []
        qv = self._encode(queries, vectors)
        for q, (cand, _) in zip(qv, self._knn(qv, max(self.cfg.candidates, depth)), strict=True):
            margins = svm_scores(q, X[cand], self.cfg.svm_c)
            order = np.argsort(-margins)[:depth]
            out.append((cand[order], margins[order]))
        return out

    def _mmr(
        self, queries: list[str], depth: int, vectors: np.ndarray | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        X, out = self.matrix(), []
        qv = self._encode(queries, vectors)
        for q, (cand, _) in zip(qv, self._knn(qv, max(self.cfg.candidates, depth)), strict=True):
            picked, sc = mmr(q, X[cand], depth, self.cfg.mmr_lambda)
            out.append((cand[picked], sc))
        return out

    def _knn(self, qv: np.ndarray, depth: int):
        idx, sc = exact_knn(qv, self.matrix(), depth, self.cfg.metric)
        return list(zip(idx, sc, strict=True))

    def check(self) -> None:
        """Raise LookupError, saying what to run, when the store has no chunks or no vectors for this retriever's
        embedder: the commands call it before an LLM loads."""
        if not self.store.chunks().texts:
            raise LookupError(
                f"the store {self.store.location} has no chunks: run `ragseek ingest PATH --store ...` first"
            )
        if self.cfg.retriever == "dense" and self.store.ranks_vectors and not self.cfg.contextual:
            # the database ranks: the vectors need not be loaded, only be there
            self.store.require_vectors(self.vectors_name())
        elif self.cfg.retriever != "bm25":
            self.matrix()

    def rank(
        self, queries: list[str], depth: int, vectors: np.ndarray | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Chunk rows (into `store.chunks()`) and scores, best first, for each query.

        `vectors` (len(queries), dim), optional: the dense side's query vectors, used instead of embedding the
        query texts (HyDE retrieves by a hypothetical passage's vector while BM25 still reads the query)."""
        if depth < 1:
            raise ValueError(f"k {depth}: retrieve k >= 1 chunks")
        self.check()
        rankers = {
            "dense": self._dense,
            "bm25": self._bm25,
            "hybrid": self._hybrid,
            "svm": self._svm,
            "mmr": self._mmr,
        }
        return rankers[self.cfg.retriever](queries, depth, vectors)

    def hits(self, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        """The chunks at `rows` of `store.chunks()` as Hits with these scores."""
        table = self.store.chunks()
        return [
            Hit(
                int(r),
                int(table.ids[r]),
                table.doc_ids[r],
                int(table.starts[r]),
                int(table.ends[r]),
                float(s),
                table.texts[r],
            )
            for r, s in zip(rows, scores, strict=True)
        ]

    def search(self, query: str, k: int | None = None) -> list[Hit]:
        return self.hits(*self.rank([query], self.cfg.k if k is None else k)[0])
