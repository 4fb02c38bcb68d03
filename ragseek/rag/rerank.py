"""The LLM reranker: pointwise relevance from the LLM's own next-token probabilities (as in RankGPT's pointwise
baseline and Nogueira et al.'s monoT5, with "yes"/"no" as the relevance words).

For each (query, chunk) the model is asked whether the passage is relevant, and scored by

    s = log P("yes" | prompt) - log P("no" | prompt),      P(relevant) = sigmoid(s) = P(yes) / (P(yes) + P(no))

so the score is calibrated between the two answers only: other continuations ("Yes,", "The passage...") do not
enter. The top `depth` hits of any retriever are reordered by s (ties keep the retriever's order); the rest keep
their place after them. `P(relevant)` is also what the "don't know" gate can threshold.

Every pair is one scored prompt: 2 forwards' worth of tokens per pair through `LLM.logprobs`, batched.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ragseek.llm.base import LLM
from ragseek.rag.search import Hit


def rerank_prompt(query: str, passage: str) -> str:
    return (
        "Does the passage below help answer the query? Answer with yes or no.\n\n"
        f"Query: {query}\n\nPassage: {passage}"
    )


def relevance(llm: LLM, query: str, passages: list[str], max_chars: int = 2000) -> list[float]:
    """log P(yes) - log P(no) for each passage (cut to `max_chars` characters), one batched call."""
    if not passages:
        return []
    chats = [[{"role": "user", "content": rerank_prompt(query, p[:max_chars])}] for p in passages]
    lp = llm.logprobs(chats + chats, ["yes"] * len(chats) + ["no"] * len(chats))
    n = len(chats)
    return [y - no for y, no in zip(lp[:n], lp[n:], strict=True)]


def probability(score: float) -> float:
    """P(relevant) = sigmoid(log P(yes) - log P(no))."""
    return 1 / (1 + math.exp(-score)) if score > -700 else 0.0


def rerank(llm: LLM, query: str, hits: list[Hit], depth: int = 20, max_chars: int = 2000) -> list[Hit]:
    """`hits` with the first `depth` reordered by the LLM's relevance; each reranked Hit's score becomes
    P(relevant). Hits below `depth` keep their retriever order and score after them."""
    head, tail = hits[:depth], hits[depth:]
    scores = relevance(llm, query, [h.text for h in head], max_chars)
    order = sorted(range(len(head)), key=lambda i: -scores[i])
    reranked = [replace(head[i], score=probability(scores[i])) for i in order]
    return reranked + tail
