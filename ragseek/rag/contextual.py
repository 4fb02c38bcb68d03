"""Contextual retrieval (Anthropic, "Introducing Contextual Retrieval", 2024): before indexing, an LLM writes for
each chunk a short context that situates it in its whole document; the context + the chunk is what gets embedded
and BM25-indexed, so a chunk like "Its revenue grew 3%" can be found by the company and quarter its document is
about. Hits and citations still point at the original chunk: the context only serves retrieval.

- `context_prompt(document, chunk)` is Anthropic's prompt, sent as one chat user message. A small-context model
  cannot read a long document whole, so the document is cut to a window of `max_doc_chars` characters centred
  on the chunk (snapped to whitespace, "[…]" where text was dropped).
- `contextualize(store, llm)` writes the missing contexts into the store's `contexts` table, keyed by (LLM name,
  chunk content hash): a re-run costs no LLM call, a changed chunk gets a new context (an unchanged chunk keeps
  its own, even when the rest of its document changed), and the contexts of several LLMs live side by side.
  Batched, one transaction per batch, so a killed run loses at most one batch and the next run generates only
  what is missing.
- `contextual_texts(store, llm_name)` is "context + chunk" for every chunk; `embed_contexts` caches their vectors
  in the store's embeddings table under `contextual_name(embedder, llm)` (e.g. `minilm+ctx:local`), beside the
  plain chunks' vectors. `Searcher` uses both when `SearchConfig.contextual` names the LLM.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from ragseek.llm.base import LLM
from ragseek.rag.embedders import Embedder
from ragseek.rag.store import Store

ELIDED = "[…]"


def document_window(document: str, start: int, end: int, max_chars: int) -> str:
    """At most `max_chars` characters of `document` around its span [start, end) (plus the markers): centred on the
    span, shifted to fit at either end of the document, cut at whitespace outside the span, "[…]" marking each side
    where text was dropped. A span longer than `max_chars` keeps its beginning."""
    if len(document) <= max_chars:
        return document
    lo = max(0, min(start - max(0, max_chars - (end - start)) // 2, len(document) - max_chars))
    hi = lo + max_chars
    if lo > 0 and not document[lo - 1].isspace():  # drop the cut word, unless it is the span's
        cut = re.search(r"\s", document[lo : max(lo, start)])
        lo += cut.start() if cut else 0
    if hi < len(document) and not document[hi].isspace():
        tail = document[min(max(lo, end), hi) : hi]
        cut = re.search(r"\s\S*$", tail)
        hi -= len(tail) - cut.start() if cut else 0
    return (
        (f"{ELIDED} " if lo > 0 else "")
        + document[lo:hi].strip()
        + (f" {ELIDED}" if hi < len(document) else "")
    )


def context_prompt(document: str, chunk: str, start: int | None = None, max_doc_chars: int = 4000) -> str:
    """Anthropic's contextual-retrieval prompt for `chunk` of `document` (the text of one chat user message).

    A document longer than `max_doc_chars` characters is truncated to a window around the chunk (see
    `document_window`); `start` is the chunk's offset in the document (default: where its text first occurs).
    """
    if start is None:
        start = max(0, document.find(chunk))
    window = document_window(document, start, start + len(chunk), max_doc_chars)
    return (
        f"<document>\n{window}\n</document>\n"
        "Here is the chunk we want to situate within the whole document\n"
        f"<chunk>\n{chunk}\n</chunk>\n"
        "Please give a short succinct context to situate this chunk within the overall document for the purposes "
        "of improving search retrieval of the chunk. Answer only with the succinct context and nothing else."
    )


def contextualize(
    store: Store,
    llm: LLM,
    batch_size: int = 8,
    max_doc_chars: int = 4000,
    max_tokens: int = 64,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Have `llm` write the contexts the store's chunks do not have yet (greedy, `max_tokens` each), `batch_size`
    prompts per `llm.complete` call, committed after each call. Returns {"generated", "cached", "seconds"}:
    contexts written now, and distinct chunks whose context was already stored."""
    t0 = time.perf_counter()
    have = set(store.contexts(llm.name))
    table = store.chunks()
    unique: dict[str, int] = {}  # chunk hash -> its first row in the table
    for row, h in enumerate(table.hashes):
        unique.setdefault(h, row)
    todo = [(h, row) for h, row in unique.items() if h not in have]
    stage = f"contexts ({llm.name})"
    # from the start: the first batch may take minutes on a CPU
    if on_progress and todo:
        on_progress(stage, 0, len(todo))
    for s in range(0, len(todo), batch_size):
        part = todo[s : s + batch_size]
        keys = {(table.sources[row], table.doc_ids[row]) for _, row in part}
        docs = {(src, d): store.document(d, src).text for src, d in keys}
        prompts = [
            [{"role": "user", "content": context_prompt(
                docs[table.sources[row], table.doc_ids[row]], table.texts[row], int(table.starts[row]),
                max_doc_chars,
            )}]
            for _, row in part
        ]  # fmt: skip
        contexts = llm.complete(prompts, max_tokens=max_tokens, temperature=0.0)
        store.put_contexts(
            llm.name, [(h, " ".join(c.split())) for (h, _), c in zip(part, contexts, strict=True)]
        )
        if on_progress:
            on_progress(stage, s + len(part), len(todo))
    return {"generated": len(todo), "cached": len(unique) - len(todo), "seconds": time.perf_counter() - t0}


def contextual_texts(store: Store, llm_name: str) -> list[str]:
    """What retrieval reads for every chunk of `store.chunks()`, in its order: "context\\n\\nchunk" (the chunk alone
    when its context is empty). LookupError if a chunk has no context from `llm_name`."""
    table = store.chunks()
    want = set(table.hashes)
    found = {h: c for h, c in store.contexts(llm_name).items() if h in want}
    missing = len(want) - len(found)
    if missing:
        raise LookupError(
            f"{missing} chunks have no context from {llm_name!r} in {store.location}: "
            f"run `ragseek ingest PATH --store {store.location} --contextual --llm {llm_name}`"
        )
    return [f"{found[h]}\n\n{t}" if found[h] else t for h, t in zip(table.hashes, table.texts, strict=True)]


def contextual_name(embedder_name: str, llm_name: str) -> str:
    """The embeddings-table key of context + chunk vectors, distinct from the plain chunks' `embedder_name`."""
    return f"{embedder_name}+ctx:{llm_name}"


def embed_contexts(
    store: Store,
    embedder: Embedder,
    llm_name: str,
    batch_size: int = 64,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> int:
    """Embed the context + chunk texts that have no vector yet (see `Store.embed`); returns how many were new."""
    return store.embed(
        embedder,
        batch_size,
        on_progress,
        name=contextual_name(embedder.name, llm_name),
        texts=contextual_texts(store, llm_name),
    )
