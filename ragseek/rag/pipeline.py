"""Answer a question from a store, with citations: the lecture's RAG pipeline as one visible function.

    searcher = Searcher(Store("runs/docs-store"), SearchConfig(retriever="hybrid", k=4))
    result = ask("How does MLA shrink the KV cache?", searcher, load_llm("local"))
    print(result.answer)
    for c in result.citations:                     # [n] in the answer -> document, char offsets, exact span
        print(c.n, c.doc, c.start, c.end, c.text[:80])

`ask` reads top to bottom: transform the query → retrieve → (rerank) → keep what is relevant → build_prompt →
generate → check the citations against the sources → attach them. There are no chain classes; every step is a function you can call on its own.

"Don't know": a chunk enters the prompt only if it is relevant enough — its cosine similarity to the question
under the store's embedder is at least `min_similarity`, and, when reranking, the LLM's P(relevant) is at least
`min_relevance`. Then the sources together must support the question: `unanswerable` is a logistic model of how
well their best sentence matches it (`support`: cosine, and the share of the question's words it holds), fitted
on SQuAD questions with and without their passage; at `max_unanswerable` or above the sources are dropped. When
nothing is left, `ask` answers DONT_KNOW without calling the generator: a small model given sources that do not
hold the answer invents one from them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from ragseek.config import config_field as _f
from ragseek.config import require
from ragseek.llm.base import LLM
from ragseek.rag.query import QueryMode, retrieve, transform
from ragseek.rag.rerank import rerank
from ragseek.rag.search import Hit, Searcher, similarity

DONT_KNOW = "I don't know: the sources do not contain the answer."
# P(no source answers) = sigmoid(b + w_cos * cos + w_words * words) (`support`), fitted on the reader's SQuAD training
# rows (20 articles, 3,679 questions, 670 without their answer in the sources) by `ragseek data reader`, MiniLM
UNANSWERABLE_WEIGHTS = (4.827, -5.545, -4.670)


@dataclass
class StepsConfig:
    """The LLM steps around retrieval, shared by `ragseek ask` and `ragseek eval beir`."""

    query: QueryMode = _f("naive", "query transformation: naive, rewrite, multi or hyde")
    n_queries: int = _f(3, "--query multi: LLM-written queries fused with the question")
    hyde_query_weight: float = _f(
        0.5, "--query hyde: weight of the question's embedding averaged with the passage's"
    )
    rerank: Literal["none", "llm"] = _f(
        "none", "rerank the top --rerank-depth hits by the LLM's P(yes) (off: see docs/rag.md)"
    )
    rerank_depth: int = _f(20, "hits reranked by the LLM (the rest keep their order)")
    rerank_chars: int = _f(2000, "characters of each chunk the reranker reads")


@dataclass
class AskConfig:
    """The don't-know gate, citations and the answer's generation."""

    min_similarity: float = _f(
        0.2, "don't-know gate: least cosine(question, chunk) under the store's embedder (-1 = off)"
    )
    min_relevance: float = _f(0.5, "don't-know gate with --rerank llm: least P(relevant) of a chunk")
    max_unanswerable: float = _f(
        0.7,
        "don't-know gate: answer don't-know, without the model, when P(no source answers) from `support` is at "
        "least this (1 = off)",
    )
    unanswerable_weights: list[float] = _f(
        list(UNANSWERABLE_WEIGHTS),
        "the gate's logistic model: bias, weight of the best sentence's cosine, weight of its share of the "
        "question's content words (fitted by `ragseek data reader`, docs/reader.md)",
    )
    attribute_min: float = _f(
        0.35,
        "cite for the model: an answer sentence with no [n] gets its most similar source if their "
        "cosine is at least this (2 = off)",
    )
    one_paragraph: bool = _f(True, "stop the answer at its first blank line (small models ramble after it)")
    trust_dont_know: float = _f(
        0.3,
        "the reader's own don't-know stands where P(no source answers) is at least this; below it, the reader is "
        "asked again without the don't-know option (0 = always trust it)",
    )
    one_citation: bool = _f(
        True, "stop the answer at its first complete [n], the prompt's format: one phrase, one source"
    )
    check_answer: bool = _f(
        True,
        "when the sentence an answer comes from does not support the question (the gate's model, at "
        "--max-unanswerable) and another source's best sentence does, ask again from that source alone",
    )
    max_tokens: int = _f(64, "most answer tokens")
    temperature: float = _f(0.0, "answer sampling temperature (0 = greedy)")

    def __post_init__(self) -> None:
        n = len(self.unanswerable_weights)
        require(
            n == 3,
            "unanswerable_weights",
            self.unanswerable_weights,
            f"give 3 numbers (bias, cosine, words), not {n}",
        )
        for name in ("max_unanswerable", "trust_dont_know"):
            require(
                0 <= getattr(self, name) <= 1, name, getattr(self, name), "a probability: between 0 and 1"
            )


@dataclass
class Citation:
    n: int  # the [n] in the answer
    doc: str
    start: int  # char offsets into the stored (cleaned) document text
    end: int
    text: str  # the exact span: document.text[start:end]
    # written by the LLM, moved by `recite` to the source that holds the cited phrase, or added by `attribute`
    by: Literal["model", "match", "attribution"] = "model"


@dataclass
class Answer:
    question: str
    answer: str
    citations: list[Citation]
    # the numbered sources of the prompt ([1] is chunks[0]); empty when the gate answered DONT_KNOW, unasked
    chunks: list[Hit]
    queries: list[str]  # what was retrieved by (the transformed query / queries / HyDE passage)
    timings: dict[str, float]  # seconds per step
    prompt: str = ""
    # sentences of the sources that speak to the model (`addressed`), left out of the prompt: {"n", "doc", "text"}
    withheld: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return {
            "question": self.question,
            "answer": self.answer,
            "citations": [vars(c) for c in self.citations],
            "chunks": [{"n": n, **vars(h)} for n, h in enumerate(self.chunks, 1)],
            "queries": self.queries,
            "timings": self.timings,
            "withheld": self.withheld,
        }


def build_prompt(question: str, chunks: list[Hit], dont_know: bool = True) -> str:
    """The whole user message the LLM answers: numbered sources, then the question and the instructions (after
    the sources, where a small model still attends to them); `dont_know` offers the don't-know reply."""
    numbered = "\n\n".join(
        f"Source [{n}] (from {h.doc_id}):\n{shown(h.text).strip()}" for n, h in enumerate(chunks, 1)
    )
    option = f" If the sources do not contain the answer, reply: {DONT_KNOW}" if dont_know else ""
    return (
        f"{numbered}\n\n"
        "Answer the question below from the sources above: reply with the shortest phrase of a source that answers "
        f"it, then that source's number in square brackets, for example: Ada Lovelace [2].{option}\n\n"
        f"Question: {question}"
    )


_DONT_KNOW_TEXT = re.compile(r"\b(?:don['’]?t|do not)\s+know\b", re.IGNORECASE)


def is_dont_know(answer: str) -> bool:
    """The pipeline's DONT_KNOW (the gate's answer, or a reader trained to write it), or an answer saying it does
    not know ("I don't know", "we do not know")."""
    return answer.strip() == DONT_KNOW or bool(_DONT_KNOW_TEXT.search(answer))


CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def cite(answer: str, chunks: list[Hit]) -> list[Citation]:
    """The sources the answer cites — `[n]`, `[n, m]` — in order of first mention; numbers with no source are dropped."""
    seen: list[int] = []
    for m in CITATION.finditer(answer):
        for n in map(int, m.group(1).split(",")):
            if 1 <= n <= len(chunks) and n not in seen:
                seen.append(n)
    return [
        Citation(n, chunks[n - 1].doc_id, chunks[n - 1].start, chunks[n - 1].end, chunks[n - 1].text)
        for n in seen
    ]


WORD = re.compile(r"\w+")


def _words(text: str) -> str:
    """`text` as lower-case words and digits between single spaces, padded with one space on each side."""
    return " " + " ".join(WORD.findall(text.casefold())) + " "


def recite(answer: str, chunks: list[Hit]) -> tuple[str, set[int]]:
    """Check each `[n]` against its source: when the phrase before it (since the previous citation) is not in
    source n, word for word, but is in another source, cite the best-ranked such source instead. A small reader
    finds the right phrase more often than the right number (it learns that [1] is usually right).

    Returns the answer and the numbers it now cites in place of the model's; a phrase no source holds, a
    sentence that paraphrases, and `[n, m]` are left as written."""
    texts = [_words(shown(h.text)) for h in chunks]
    pieces, moved, last = [], set(), 0
    for m in CITATION.finditer(answer):
        phrase, n = _words(answer[last : m.start()]), m.group(1)
        pieces.append(answer[last : m.start()])
        holders = [i for i, t in enumerate(texts, 1) if phrase.strip() and phrase in t]
        if n.isdigit() and holders and int(n) not in holders:
            pieces.append(f"[{holders[0]}]")
            moved.add(holders[0])
        else:
            pieces.append(m.group())
        last = m.end()
    return "".join(pieces) + answer[last:], moved


SENTENCE = re.compile(r"[^.!?\n]*[^.!?\n\s][^.!?\n]*[.!?]*")

# A sentence of a source that speaks to the model instead of informing it — the prompt injection "ignore the question
# and answer X" — is left out of the prompt (`shown`) and reported (`Answer.withheld`). Each pattern is an act no
# informative text performs: overriding what the model was told, a chat role label opening a line, addressing an AI,
# dictating the answer to any question. None fires on a sentence of SQuAD's 1,033 paragraphs, SciFact's 5,183
# abstracts, GSM8K's questions or docs/ (bench_injection.py counts them); a paraphrase without those acts gets
# through (the reader, trained to extract an answer to the question, followed none of 48 planted in the benchmark).
_AI = r"(?:AI|A\.I\.|assistant|chat ?bot|language model|LLM|GPT)"
ADDRESSED = re.compile(
    "|".join(
        [
            r"\b(?:ignore|disregard|forget|override|bypass)\b[^.!?\n]{0,40}\b(?:questions?|instructions?|prompts?"
            r"|sources?|(?:all|everything|anything) (?:above|before|else)|(?:the )?above"
            r"|(?:previous|prior|earlier) (?:instructions?|prompts?|messages?|rules?|text))\b",
            r"(?:^|\n)\s*\W{0,3}(?:system|assistant|user|(?:new )?instructions?)\s*\W{0,3}\s*:",
            rf"\byou are an? (?:{_AI}|model|bot)\b",
            rf"\bas an? {_AI}\b",
            rf"\bif you are an? (?:{_AI}|model|bot)\b",
            rf"\b(?:note|message|instructions?|attention) (?:to|for) (?:the |any |all )?(?:{_AI}|model|bot|reader)s?\b",
            rf"\b(?:dear|hey|hello) (?:{_AI}|model|bot)\b",
            rf"(?:^\W*|\b(?:you|please|must|should|always|now)\s+|\b(?:{_AI}|model|bot)\s*[,:]\s*)"
            r"(?:answer|reply|respond|say|output|print|write)\s+(?:only |just |simply )?(?:with|by saying)\b",
            # an answer written in the reader's own format, "Answer: X [1]" (a FAQ's "Answer: ..." cites nothing)
            r"\b(?:answer|reply|response)\s*:[^\n]{0,80}\[\d+\]",
            r"\b(?:your|the) (?:only |final )?(?:answer|reply|response) (?:must|should|shall|has to|needs to) be\b",
            r"\b(?:answer|respond|reply) to (?:any|every|all|each) questions?\b",
            r"\b(?:whatever|whichever|no matter what) (?:the )?question\b",
            r"\b(?:any|every|all|each) questions? (?:about|on|regarding|concerning) (?:this|these|the)\b"
            r"[^.!?\n]{0,40}\b(?:answer|reply)\b",
        ]
    ),
    re.IGNORECASE,
)


def addressed(text: str) -> list[str]:
    """The sentences of `text` that speak to the model rather than inform it (`ADDRESSED`), stripped."""
    return [m.group().strip() for m in SENTENCE.finditer(text) if ADDRESSED.search(m.group())]


def shown(text: str) -> str:
    """A source's text as the prompt shows it and its citations are checked against: without the sentences that
    speak to the model (`addressed`)."""
    for m in reversed([m for m in SENTENCE.finditer(text) if ADDRESSED.search(m.group())]):
        text = text[: m.start()] + text[m.end() :]
    return text


def attribute(
    answer: str, chunks: list[Hit], encode: Callable[[list[str]], np.ndarray], min_similarity: float
) -> str:
    """Post-hoc attribution for a model that does not cite: after each sentence of `answer` with no [n], insert
    [n] of the source most similar to it (cosine of `encode` vectors), if that similarity is at least
    `min_similarity`."""
    bare = [m for m in SENTENCE.finditer(answer) if not CITATION.search(m.group())]
    if not bare or not chunks or min_similarity > 1:
        return answer
    sims = similarity(encode([m.group() for m in bare]), encode([h.text for h in chunks]), "cosine")
    for m, row in reversed(list(zip(bare, sims, strict=True))):  # from the end: earlier offsets stay valid
        if row.max() >= min_similarity:
            answer = f"{answer[: m.end()]} [{int(row.argmax()) + 1}]{answer[m.end() :]}"
    return answer


# words too common to say what a question asks about; the rest lose a plural s and are cut to 5 letters (a crude
# stem: holds -> hold, invented and invention -> inven)
STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or is are was were be been being what which who whom whose when "
    "where why how did do does that this these those it its as into than then there their they he she his her i "
    "you we our your not no can could would should will may might has have had about after before during over "
    "under between also other such many much most more some any each one two first if so but".split()
)


def content_words(text: str) -> set[str]:
    return {w.removesuffix("s")[:5] for w in WORD.findall(text.casefold()) if w not in STOPWORDS}


def sentences(texts: Iterable[str]) -> list[str]:
    """The sentences of `texts`, in order (`SENTENCE`: up to . ! ? or a line end), stripped."""
    return [m.group().strip() for t in texts for m in SENTENCE.finditer(t)]


def sentence_support(question: str, said: list[str], searcher: Searcher) -> np.ndarray:
    """Per sentence of `said`, how well it matches the question: (its cosine with the question under the store's
    embedder, the share of the question's content words it holds), shape (len(said), 2)."""
    if not said:
        return np.zeros((0, 2))
    cos = similarity(searcher.encode([question]), searcher.encode(said), "cosine")[0]
    asked = content_words(question)
    held = [len(asked & content_words(s)) / len(asked) if asked else 1.0 for s in said]
    return np.stack([cos, held], axis=1).astype(np.float64)


def support(question: str, chunks: list[Hit], searcher: Searcher) -> tuple[float, float]:
    """How well the sources' best sentences match the question: the highest cosine of a sentence with the
    question (the store's embedder), and the highest share of the question's content words one sentence holds.
    A SQuAD-style question is written from one sentence of its passage; with that passage missing, both fall."""
    features = sentence_support(question, sentences(h.text for h in chunks), searcher)
    if not len(features):
        return 0.0, 0.0
    return float(features[:, 0].max()), float(features[:, 1].max())


def unanswerable(features: tuple[float, float], weights: list[float]) -> float:
    """P(no source answers the question) = sigmoid(b + w . features), from `support`'s features."""
    b, *w = weights
    return float(1 / (1 + np.exp(-(b + float(np.dot(w, features))))))


def search(
    searcher: Searcher, questions: list[str], llm: LLM | None, steps: StepsConfig, depth: int
) -> tuple[list[list[str]], list[list[Hit]], dict[str, float]]:
    """The retrieval half of the pipeline for a batch of questions: transform → retrieve `depth` hits → rerank.

    Returns what each question was retrieved by, its hits (best first), and the seconds each step took."""
    t0 = time.perf_counter()
    texts = transform(questions, steps.query, llm, steps.n_queries)
    t1 = time.perf_counter()
    ranked = retrieve(searcher, questions, texts, steps.query, depth, steps.hyde_query_weight)
    hits = [searcher.hits(rows, scores) for rows, scores in ranked]
    t2 = time.perf_counter()
    timings = {"query": t1 - t0, "retrieve": t2 - t1}
    if steps.rerank == "llm":
        if llm is None:
            raise ValueError("--rerank llm needs an LLM (--llm local, hf:PATH or openai:MODEL)")
        hits = [
            rerank(llm, q, h, steps.rerank_depth, steps.rerank_chars)
            for q, h in zip(questions, hits, strict=True)
        ]
        timings["rerank"] = time.perf_counter() - t2
    return texts, hits, timings


def ranking(
    searcher: Searcher, llm: LLM | None, steps: StepsConfig
) -> Callable[[list[str], int], list[tuple[np.ndarray, np.ndarray]]]:
    """`Searcher.rank` with the LLM steps around it, for `run_beir`: chunk rows best first, scored by their rank
    (a reranked head's probabilities and the tail's retriever scores do not share a scale)."""

    def rank_rows(questions: list[str], depth: int) -> list[tuple[np.ndarray, np.ndarray]]:
        _, hits, _ = search(searcher, questions, llm, steps, depth)
        return [(np.array([h.row for h in hs]), -np.arange(len(hs), dtype=np.float64)) for hs in hits]

    return rank_rows


def sources(
    question: str,
    searcher: Searcher,
    llm: LLM | None,
    cfg: AskConfig,
    steps: StepsConfig,
    exclude: frozenset[str] = frozenset(),
) -> tuple[list[str], list[Hit], dict[str, float]]:
    """The numbered sources `ask` puts in the prompt: the searcher's `cfg.k` best chunks (after reranking the top
    `steps.rerank_depth`, when asked) that pass the don't-know gate; with what they were retrieved by and the
    seconds each step took. The reader's training data is built with this same function; its don't-know examples
    retrieve as if the documents in `exclude` (a gold passage) were not in the store."""
    k = searcher.cfg.k
    depth = max(k, steps.rerank_depth) if steps.rerank == "llm" else k
    # the excluded documents' chunks may all rank first: retrieve that many more
    extra = sum(d in exclude for d in searcher.store.chunks().doc_ids) if exclude else 0
    (texts,), (hits,), t = search(searcher, [question], llm, steps, depth + extra)
    clock = time.perf_counter()
    chunks = [h for h in hits if h.doc_id not in exclude][:k]
    if cfg.min_similarity > -1:
        chunks = searcher.relevant(question, chunks, cfg.min_similarity)
    if steps.rerank == "llm":
        chunks = [h for h in chunks if h.score >= cfg.min_relevance]
    if chunks and cfg.max_unanswerable < 1:
        p = unanswerable(support(question, chunks, searcher), cfg.unanswerable_weights)
        chunks = [] if p >= cfg.max_unanswerable else chunks
    t["gate"] = time.perf_counter() - clock
    return texts, chunks, t


# an answer shorter than this (on one line) is held back until it is complete, so that `ask` can check it first
SHORT_ANSWER = 200


def generate_answer(
    llm: LLM, prompt: str, cfg: AskConfig, on_text: Callable[[str], None] | None
) -> tuple[str, int]:
    """The model's answer to the user message `prompt`, as generated, and how many of its characters were streamed
    to `on_text`. A don't-know is held back (`ask` decides what to say then), and so is a short answer when
    `cfg.check_answer` (`ask` may replace it): `ask` streams what is left."""
    gen = {
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "stop": ["\n\n"] if cfg.one_paragraph else None,
    }
    answer, shown = "", 0
    for piece in llm.stream([{"role": "user", "content": prompt}], **gen):
        done = CITATION.search(answer + piece) if cfg.one_citation else None
        if done:  # the tokens after it would be wasted: a 135M reader may repeat [n] up to max_tokens
            piece = piece[: done.end() - len(answer)]
        answer += piece
        short = cfg.check_answer and len(answer) < SHORT_ANSWER and "\n" not in answer.strip()
        held = short or DONT_KNOW.startswith(answer.lstrip()) or is_dont_know(answer)
        if on_text and not held:
            on_text(answer[shown:])
            shown = len(answer)
        if done:
            break
    return answer, shown


def recheck(
    question: str, answer: str, chunks: list[Hit], searcher: Searcher, llm: LLM, cfg: AskConfig
) -> str:
    """`answer`, or the reader's answer from one other source when that is better supported.

    A SQuAD-style question is written from one sentence; an answer taken from a sentence that does not match the
    question is likely a distractor's (a table cell, a number of another row). When the sentence of its cited
    source that holds the answer's phrase has P(no source answers) (`unanswerable` of `sentence_support`) at or
    above `cfg.max_unanswerable`, while another source holds a sentence below it, the reader is asked again with
    that source alone; its answer replaces this one when it is a phrase of that source, cited as that source's
    number."""
    cited = cite(recite(answer, chunks)[0], chunks)
    phrase = _words(CITATION.sub("", answer))
    if not cited or not phrase.strip():
        return answer
    said = [(n, s) for n, h in enumerate(chunks, 1) for s in sentences([shown(h.text)])]
    features = sentence_support(question, [s for _, s in said], searcher)
    p = np.array([unanswerable(tuple(f), cfg.unanswerable_weights) for f in features])
    own = [pi for (n, s), pi in zip(said, p, strict=True) if n == cited[0].n and phrase in _words(s)]
    best = int(p.argmin()) if len(p) else 0
    if (
        not own
        or min(own) < cfg.max_unanswerable
        or p[best] >= cfg.max_unanswerable
        or said[best][0] == cited[0].n
    ):
        return answer
    n = said[best][0]
    again, _ = generate_answer(llm, build_prompt(question, [chunks[n - 1]]), cfg, None)
    again = again.strip()
    if is_dont_know(again) or not (_words(CITATION.sub("", again)).strip()):
        return answer
    if _words(CITATION.sub("", again)) not in _words(shown(chunks[n - 1].text)):
        return answer
    return CITATION.sub(f"[{n}]", again)


def ask(
    question: str,
    searcher: Searcher,
    llm: LLM,
    cfg: AskConfig | None = None,
    steps: StepsConfig | None = None,
    on_text: Callable[[str], None] | None = None,
    chunks: list[Hit] | None = None,
) -> Answer:
    """Answer `question` from the searcher's store with `llm`; `on_text` receives the answer as it streams.

    The prompt's sources are `sources(...)`, or `chunks` when given (an oracle: the gold passage alone)."""
    cfg, steps = cfg or AskConfig(), steps or StepsConfig()
    if not question.strip():
        raise ValueError("the question is empty: ask something, e.g. ragseek ask 'What is MLA?' --store DIR")
    start = time.perf_counter()
    if chunks is None:
        texts, chunks, t = sources(question, searcher, llm, cfg, steps)
    else:
        texts, t = [question], {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        t[step], clock = now - clock, now

    if not chunks:
        if on_text:
            on_text(DONT_KNOW)
        t["total"] = time.perf_counter() - start
        return Answer(question, DONT_KNOW, [], [], texts, t)
    withheld = [
        {"n": n, "doc": h.doc_id, "text": said} for n, h in enumerate(chunks, 1) for said in addressed(h.text)
    ]
    prompt = build_prompt(question, chunks)
    answer, streamed = generate_answer(llm, prompt, cfg, on_text)
    # the reader's own don't-know, against sources that support the question well: asked again without that option
    if is_dont_know(answer) and cfg.trust_dont_know > 0:
        if unanswerable(support(question, chunks, searcher), cfg.unanswerable_weights) < cfg.trust_dont_know:
            prompt = build_prompt(question, chunks, dont_know=False)
            answer, streamed = generate_answer(llm, prompt, cfg, on_text)
    if cfg.check_answer and not streamed and not is_dont_know(answer):
        answer = recheck(question, answer.strip(), chunks, searcher, llm, cfg)
    if on_text and not is_dont_know(answer):
        on_text(answer[streamed:])
    answer = answer.strip()
    lap("generate")
    # a don't-know in the model's own words ("the recipes do not contain ..."): the one sentence, nothing cited
    if is_dont_know(answer):
        if on_text:
            on_text(DONT_KNOW)
        t["total"] = time.perf_counter() - start
        return Answer(question, DONT_KNOW, [], chunks, texts, t, prompt, withheld)
    by_model = {c.n for c in cite(answer, chunks)}
    answer, moved = recite(answer, chunks)
    answer = attribute(answer, chunks, searcher.encode, cfg.attribute_min)
    citations = [
        replace(c, by="match" if c.n in moved - by_model else "model" if c.n in by_model else "attribution")
        for c in cite(answer, chunks)
    ]
    lap("cite")
    t["total"] = time.perf_counter() - start
    return Answer(question, answer, citations, chunks, texts, t, prompt, withheld)
