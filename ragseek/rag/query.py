"""Query transformation, the lecture's first LLM step of RAG: what is sent to the retriever instead of the question.

- naive: the question as typed.
- rewrite: the LLM turns the question into one search query (drops chit-chat, adds the likely terms).
- multi: the LLM writes `n` alternative queries; each is retrieved and the rankings are fused by RRF with the
  question's own (Raudaschl's RAG-Fusion), so one bad rewrite cannot lose what the question finds.
- hyde (Gao et al. 2022, "Precise Zero-Shot Dense Retrieval without Relevance Labels"): the LLM writes a
  hypothetical passage that answers the question; the dense side retrieves by the passage's embedding, averaged
  with the question's (weight `hyde_query_weight`), since a passage sits nearer passages than a question does.
  BM25 still reads the question: the passage's invented specifics would match unrelated documents by their words.

Each prompt is a plain string builder, so a user can print exactly what the model sees.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np

from ragseek.llm.base import LLM
from ragseek.rag.search import Searcher, rrf

QueryMode = Literal["naive", "rewrite", "multi", "hyde"]


def rewrite_prompt(question: str) -> str:
    return (
        "Rewrite the text below as a short search query for a document search engine. Keep every name, number "
        "and technical term; drop filler words. Answer with the query only.\n\n"
        f"Text: {question}"
    )


def multi_prompt(question: str, n: int) -> str:
    return (
        f"Write {n} different search queries that would find documents about the text below. Vary the wording "
        "and use synonyms. Answer with one query per line and nothing else.\n\n"
        f"Text: {question}"
    )


def hyde_prompt(question: str) -> str:
    return (
        "Write a short passage, as it would appear in a scientific or technical document, that answers or "
        "supports the text below. Answer with the passage only.\n\n"
        f"Text: {question}"
    )


def _lines(text: str, n: int) -> list[str]:
    """Up to n non-empty lines with list markers ("1.", "-", quotes) stripped."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).strip().strip('"').strip()
        if line:
            out.append(line)
    return out[:n]


def transform(
    questions: list[str], mode: QueryMode, llm: LLM | None, n_queries: int = 3, max_tokens: int = 128
) -> list[list[str]]:
    """The texts to retrieve by, per question (the question first for `multi`; the passage for `hyde`).

    Batched: one `llm.complete` call for all questions. An empty answer falls back to the question itself.
    """
    if mode == "naive":
        return [[q] for q in questions]
    if llm is None:
        raise ValueError(f"--query {mode} needs an LLM (--llm local, hf:PATH or openai:MODEL)")
    chats = {"rewrite": rewrite_prompt, "hyde": hyde_prompt, "multi": lambda q: multi_prompt(q, n_queries)}
    if mode not in chats:
        raise ValueError(f"unknown query mode {mode!r}: use naive, rewrite, multi or hyde")
    outs = llm.complete(
        [[{"role": "user", "content": chats[mode](q)}] for q in questions], max_tokens=max_tokens
    )
    if mode == "multi":
        return [list(dict.fromkeys([q, *_lines(o, n_queries)])) for q, o in zip(questions, outs, strict=True)]
    if mode == "rewrite":
        return [[(_lines(o, 1) or [q])[0]] for q, o in zip(questions, outs, strict=True)]
    return [[o.strip() or q] for q, o in zip(questions, outs, strict=True)]


def retrieve(
    searcher: Searcher,
    questions: list[str],
    texts: list[list[str]],
    mode: QueryMode,
    depth: int,
    hyde_query_weight: float = 0.5,
    rrf_k: int = 60,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Chunk rows and scores, best first, per question, for the texts `transform` made."""
    if mode == "hyde":
        if searcher.cfg.retriever == "bm25":
            raise ValueError(
                "--query hyde retrieves by an embedding: use a dense, hybrid, svm or mmr retriever"
            )
        enc = searcher.embedder().encode
        q, p = enc(questions), enc([t[0] for t in texts])
        vectors = hyde_query_weight * q + (1 - hyde_query_weight) * p
        return searcher.rank(questions, depth, vectors)
    if mode != "multi":
        return searcher.rank([t[0] for t in texts], depth)
    flat = [t for ts in texts for t in ts]
    ranked = iter(searcher.rank(flat, depth))
    out = []
    for ts in texts:
        fused = rrf([list(map(int, next(ranked)[0])) for _ in ts], rrf_k)
        rows = sorted(fused, key=lambda r: -fused[r])[:depth]
        out.append((np.array(rows, dtype=np.int64), np.array([fused[r] for r in rows])))
    return out
