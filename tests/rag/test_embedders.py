"""Word-vector embedders: the co-occurrence counts and the GloVe fit on hand-checkable data; pooling; save/load."""

import numpy as np
import pytest

from ragseek.rag.embedders import (
    PooledWordEmbedder,
    WordVectorConfig,
    cooccurrence,
    glove_grads,
    train_glove,
    train_word_embedder,
)

TEXTS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "cats and dogs are pets",
    "stocks fell as markets slid",
    "markets rose and stocks rallied",
] * 20


def test_cooccurrence_hand_worked():
    # "a b c" with window 2: (a,b) at distance 1, (a,c) at 2, (b,c) at 1; symmetric; texts do not mix
    X = cooccurrence([np.array([0, 1, 2]), np.array([2, 0])], 3, window=2).toarray()
    np.testing.assert_allclose(X, [[0, 1, 0.5 + 1], [1, 0, 1], [1.5, 1, 0]])


def test_glove_gradients_match_autograd():
    import torch

    g = torch.Generator().manual_seed(0)
    w, wc, b, bc = (
        torch.randn(*shape, generator=g, requires_grad=True) for shape in [(6, 4), (6, 4), (6,), (6,)]
    )
    i, j = torch.tensor([0, 1, 1, 5]), torch.tensor([2, 3, 3, 0])
    logx, fx = torch.rand(4, generator=g), torch.rand(4, generator=g)
    loss, gw, gwc, gb = glove_grads(w, wc, b, bc, i, j, logx, fx)
    # J/2 of the module docstring, written out directly
    ref = 0.5 * sum(fx[n] * ((w[i[n]] @ wc[j[n]]) + b[i[n]] + bc[j[n]] - logx[n]) ** 2 for n in range(4))
    assert torch.allclose(loss, ref)
    ref.backward()
    expect_w = torch.zeros(6, 4).index_add_(0, i, gw.detach())
    expect_wc = torch.zeros(6, 4).index_add_(0, j, gwc.detach())
    assert torch.allclose(w.grad, expect_w, atol=1e-6) and torch.allclose(wc.grad, expect_wc, atol=1e-6)
    assert torch.allclose(b.grad, torch.zeros(6).index_add_(0, i, gb.detach()), atol=1e-6)
    assert torch.allclose(bc.grad, torch.zeros(6).index_add_(0, j, gb.detach()), atol=1e-6)


def test_glove_fits_the_log_counts():
    cfg = WordVectorConfig(dim=8, window=2, min_count=1, epochs=300, lr=0.1)
    sentences = [t.split() for t in TEXTS[:5]]
    vocab, vectors, counts = train_glove(sentences, cfg)
    assert vectors.shape == (len(vocab), 8) and counts.sum() == sum(map(len, sentences))
    # with enough capacity the objective drives w_i.w~_j + b_i + b~_j towards log X_ij: words sharing contexts
    # ("cat"/"dog": "the _ sat on") end up closer than words that never share one ("cat"/"stocks")
    v = {w: vectors[i] / np.linalg.norm(vectors[i]) for i, w in enumerate(vocab)}
    assert v["cat"] @ v["dog"] > v["cat"] @ v["stocks"]


@pytest.mark.parametrize("kind", ["word2vec", "glove"])
@pytest.mark.parametrize("pooling", ["mean", "sif"])
def test_word_embedder_encode_save_load(tmp_path, kind, pooling):
    cfg = WordVectorConfig(dim=12, window=3, min_count=1, epochs=5, pooling=pooling)
    emb = train_word_embedder(kind, TEXTS, cfg)
    assert emb.name.startswith(f"{kind}-{pooling}-")
    out = emb.encode(["the cat sat", "markets slid", "zzz unknown"])
    assert out.shape == (3, 12) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out[:2], axis=1), 1, atol=1e-5)
    assert not out[2].any()  # no known word: the zero vector, not NaN
    emb.save(tmp_path / "m.npz")
    np.testing.assert_allclose(
        PooledWordEmbedder.load(tmp_path / "m.npz").encode(["the cat sat"]), out[:1], atol=1e-6
    )
    again = train_word_embedder(kind, TEXTS, cfg)
    assert again.name == emb.name
    # deterministic given the seed
    np.testing.assert_allclose(again.encode(["the cat sat"]), out[:1], atol=1e-6)


def test_mean_pooling_hand_worked():
    vocab, vectors = ["a", "b"], np.array([[1.0, 0.0], [0.0, 2.0]])
    emb = PooledWordEmbedder("t", vocab, vectors, np.array([1.0, 1.0]), WordVectorConfig(pooling="mean"))
    np.testing.assert_allclose(emb.encode(["a b b"]), [[1 / np.sqrt(17), 4 / np.sqrt(17)]], rtol=1e-6)


@pytest.mark.slow
def test_minilm_is_normalised_and_semantic():
    from ragseek.rag.embedders import SentenceTransformerEmbedder

    emb = SentenceTransformerEmbedder()
    v = emb.encode(["A man is eating food.", "Someone eats a meal.", "The stock market crashed."])
    assert v.shape == (3, 384) and emb.name == "minilm"
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > 0.5 > v[0] @ v[2]
