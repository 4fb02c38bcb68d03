"""Reading for RAG: SQuAD questions as the exact prompts `ragseek ask` builds, for the reader's SFT and GRPO.

    ragseek data reader --squad ../shared/data/squad/train.json --out runs/data/reader

Each question is retrieved with ragseek's own search over every paragraph of the file (`pipeline.sources`, the
hybrid retriever, `SearchConfig(k=3)` as `ask`), and put in `pipeline.build_prompt`. The target is the short,
extractive answer and the number of the source that holds it, `Denver Broncos [2]`; when no source holds the gold
paragraph — a retrieval miss, or a question drawn (`dont_know`) to be asked as if its paragraph were not in the
store — the target is `pipeline.DONT_KNOW`. Such a question is left out when a gold answer still appears in another
source: there neither target is right. Rows carry what the rewards need: `answers` (every gold answer) and `gold`
(the source number of the gold paragraph, 0 when it is missing).

Retrieval puts the gold paragraph first for most questions (88% of the answerable training rows), so a reader
trained on ranked sources learns to read and cite [1] alone. A `shuffle` fraction of the rows gets its sources
in a random order (numbered as shown): the reader has to find the answer, not its rank.

Validation is by article, never by question (`split_articles`): an article's paragraphs and questions are all in
one side. The validation questions are written back as a SQuAD file with every paragraph of the original kept
(`write_squad`), which `ragseek eval qa --data` scores over the same paragraphs the training rows saw.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ragseek.rag.evaluate import QAItem, load_squad, normalize_answer, squad_store
from ragseek.rag.pipeline import (
    DONT_KNOW,
    AskConfig,
    StepsConfig,
    build_prompt,
    sentences,
    sources,
    support,
    unanswerable,
)
from ragseek.rag.search import Hit, SearchConfig, Searcher
from ragseek.rag.store import Store
from ragseek.train.data import write_jsonl

SPLIT_SEED = 20261204


def split_articles(
    items: Sequence[QAItem], n_val: int, seed: int = SPLIT_SEED
) -> tuple[list[str], list[str]]:
    """(train titles, validation titles): `n_val` articles drawn with `seed` from the sorted titles."""
    titles = sorted({it.title for it in items})
    if not 0 < n_val < len(titles):
        raise ValueError(
            f"n_val={n_val}: the file has {len(titles)} articles; keep at least one on each side"
        )
    val = sorted(random.Random(seed).sample(titles, n_val))
    return [t for t in titles if t not in val], val


def target_answer(item: QAItem) -> str:
    """The gold answer to train on: the one the annotators gave most often (normalised), the shortest on a tie."""
    counts = Counter(normalize_answer(a) for a in item.answers)
    return min(item.answers, key=lambda a: (-counts[normalize_answer(a)], len(a)))


def gold_source(item: QAItem, answer: str, chunks: Sequence[Hit]) -> int:
    """The number [n] of the first source that is a chunk of the gold paragraph holding `answer`, else 0."""
    for n, h in enumerate(chunks, 1):
        if h.doc_id == item.doc_id and answer in h.text:
            return n
    return 0


def mentions(answers: Sequence[str], chunks: Sequence[Hit]) -> bool:
    """Whether a source holds one of `answers` as whole words, after SQuAD's normalisation."""
    texts = [f" {normalize_answer(h.text)} " for h in chunks]
    return any(f" {normalize_answer(a)} " in t for a in answers if normalize_answer(a) for t in texts)


def reader_row(
    item: QAItem,
    searcher: Searcher,
    drop_gold: bool,
    cfg: AskConfig | None = None,
    order: random.Random | None = None,
) -> dict | None:
    """One example: the prompt `ask` would build (without the gold paragraph when `drop_gold`; its sources put in
    a random order drawn from `order`, when given) and its target; None for a question with no right target (the
    gold paragraph missing while another source holds an answer)."""
    exclude = frozenset({item.doc_id}) if drop_gold else frozenset()
    _, chunks, _ = sources(item.question, searcher, None, cfg or AskConfig(), StepsConfig(), exclude)
    features = support(item.question, chunks, searcher) if chunks else (0.0, 0.0)
    if order is not None:
        order.shuffle(chunks)
    answer = target_answer(item)
    gold = gold_source(item, answer, chunks)
    if not gold and mentions(item.answers, chunks):
        return None
    return {
        "id": item.id,
        "prompt": build_prompt(item.question, chunks) if chunks else "",
        "response": f"{answer} [{gold}]" if gold else DONT_KNOW,
        "answers": list(item.answers),
        "gold": gold,
        "dropped": drop_gold,
        "support": list(features),
    }


def reader_rows(
    items: Sequence[QAItem],
    searcher: Searcher,
    dont_know: float,
    seed: int = SPLIT_SEED,
    cfg: AskConfig | None = None,
    shuffle: float = 0.0,
) -> list[dict]:
    """Rows for `items`: a `dont_know` fraction of them asked without their gold paragraph, a `shuffle` fraction
    with their sources in a random order (both drawn with `seed`). Questions whose sources all fail the don't-know
    gate are left out (`ask` answers those without the model), and so are those `reader_row` has no target for."""
    rng = random.Random(seed)
    # the support features embed the sources' sentences: every sentence of the store at once, in large batches
    said = sentences(searcher.store.chunks().texts)
    searcher.encode_cache = len(said) + 1024  # every sentence, and the questions on top
    searcher.encode(said)
    rows = []
    for i, it in enumerate(items, 1):
        drop, shuffled = rng.random() < dont_know, rng.random() < shuffle
        rows.append(reader_row(it, searcher, drop, cfg, rng if shuffled else None))
        if i % 500 == 0 or i == len(items):
            print(f"reader rows {i}/{len(items)}", file=sys.stderr, flush=True)
    return [r for r in rows if r is not None and r["prompt"]]


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1e-4, steps: int = 50) -> list[float]:
    """Weights [b, w...] of P(y = 1 | x) = sigmoid(b + w . x) by Newton's method on the mean log-loss (+ l2/2 |w|^2,
    which keeps separable data finite)."""
    A = np.column_stack([np.ones(len(X)), np.asarray(X, np.float64)])
    y = np.asarray(y, np.float64)
    theta = np.zeros(A.shape[1])
    ridge = l2 * np.diag([0.0] + [1.0] * (A.shape[1] - 1))
    for _ in range(steps):
        p = 1 / (1 + np.exp(-A @ theta))
        grad = A.T @ (p - y) / len(y) + ridge @ theta
        hess = (A * (p * (1 - p))[:, None]).T @ A / len(y) + ridge
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return theta.tolist()


def fit_gate(rows: Sequence[dict], thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8)) -> dict:
    """The don't-know gate's logistic model on reader rows (`support` features; positive: no source holds the
    gold paragraph), and at each threshold the rows it sends to don't-know: precision, recall, and the share of
    answerable rows it loses."""
    X = np.array([r["support"] for r in rows])
    y = np.array([r["gold"] == 0 for r in rows])
    weights = fit_logistic(X, y)
    p = np.array([unanswerable(tuple(x), weights) for x in X])
    table = {}
    for t in thresholds:
        sent = p >= t
        table[str(t)] = {
            "dont_know": int(sent.sum()),
            "precision": float((sent & y).sum() / max(1, sent.sum())),
            "recall": float((sent & y).sum() / max(1, y.sum())),
            "answerable_lost": float((sent & ~y).sum() / max(1, (~y).sum())),
        }
    return {"weights": weights, "rows": len(rows), "unanswerable": int(y.sum()), "at": table}


def write_squad(path: str | Path, squad: str | Path, keep: set[str]) -> Path:
    """The SQuAD file `squad` with only the questions whose id is in `keep`, every paragraph kept: `ragseek eval qa
    --data` on it retrieves over the same paragraphs the training rows were retrieved over."""
    data = json.loads(Path(squad).read_text(encoding="utf-8"))
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            paragraph["qas"] = [qa for qa in paragraph["qas"] if qa["id"] in keep]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def build(
    squad: str | Path,
    out: str | Path,
    n_val: int,
    dont_know: float,
    k: int,
    seed: int,
    shuffle: float,
    sample_every: int = 8,
) -> dict:
    """Write `<out>/train.jsonl` (reader rows of the training articles, searched over every paragraph of the file),
    `<out>/val.json` (the validation articles' questions, every paragraph of the file kept), `<out>/val_sample.json`
    (every `sample_every`-th of those questions, all articles in it) and `<out>/split.json`; returns the split."""
    items = load_squad(squad)
    train_titles, val_titles = split_articles(items, n_val, seed)
    searcher = Searcher(Store(squad_store(squad)), SearchConfig(k=k))
    train = [it for it in items if it.title in set(train_titles)]
    val = [it.id for it in items if it.title in set(val_titles)]
    # the gate `support` feeds stays off here: these are the rows the shipped adapter was trained on, and they fit it
    rows = reader_rows(train, searcher, dont_know, seed, AskConfig(max_unanswerable=1.0), shuffle)
    out = Path(out)
    write_jsonl(out / "train.jsonl", rows)
    write_squad(out / "val.json", squad, set(val))
    write_squad(out / "val_sample.json", squad, set(val[::sample_every]))
    summary = {
        "squad": str(squad),
        "train_articles": train_titles,
        "val_articles": val_titles,
        "rows": len(rows),
        "dont_know_rows": sum(r["gold"] == 0 for r in rows),
        "dropped_gold": sum(r["dropped"] for r in rows),
        "left_out": len(train) - len(rows),
        "gold_at": dict(sorted(Counter(r["gold"] for r in rows).items())),
        "val_questions": len(val),
        "val_sample_questions": len(val[::sample_every]),
        "k": k,
        "shuffle": shuffle,
        "seed": seed,
        "dont_know_gate": fit_gate(rows),
    }
    (out / "split.json").write_text(json.dumps(summary, indent=1))
    return summary
