"""Evaluation: BEIR-format retrieval (nDCG@10, Recall@k, MRR@10) and SQuAD-format QA (EM, F1, citations).

BEIR: load corpus / queries / qrels, run a retriever, score. Retrieval is at chunk level and a BEIR corpus row is
one document, so a document's score is the max over its chunks (`doc_run`). Metrics follow trec_eval (as
pytrec_eval, which the tests check them against):
    DCG@k  = sum_{i<=k} rel_i / log2(i + 1),  nDCG@k = DCG@k / IDCG@k  (ideal order of the qrels' gains)
    Recall@k = |relevant in top k| / |relevant|,  MRR@k = 1 / rank of the first relevant within k (0 if none)
Relevant means a qrels score > 0.

SQuAD v1.1 QA: `load_squad` reads the official format, `squad_store` ingests one document per paragraph
(`{title}/{i}`), `run_qa` answers every question with `pipeline.ask` and scores it. EM and F1 are the official
v1.1 script's (`evaluate-v1.1.py`), each the max over the gold answers:
    normalize(s) = collapse whitespace(remove articles a|an|the(remove ASCII punctuation(lower(s))))
    EM = [normalize(pred) == normalize(gold)]
    F1 = 2 P R / (P + R),  P = |common| / |pred tokens|,  R = |common| / |gold tokens|  (multiset common tokens;
         0 when nothing is common, so an empty prediction or gold scores 0, as in v1.1, unlike v2.0's 1)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import string
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ragseek.rag.pipeline import CITATION, AskConfig, StepsConfig, ask, is_dont_know
from ragseek.rag.search import Hit, save_whole

if TYPE_CHECKING:
    from ragseek.llm.base import LLM
    from ragseek.rag.search import Searcher
    from ragseek.rag.splitters import SplitterConfig
    from ragseek.rag.store import Store, StoreConfig

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]


def load_queries(path: Path) -> dict[str, str]:
    """BEIR queries.jsonl: `{"_id", "text"}` rows -> {id: text}; a bad row is a ValueError naming its line."""
    queries = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                queries[str(row["_id"])] = row["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f'{path}:{lineno}: expected a BEIR query row {{"_id", "text"}} ({e})') from e
    return queries


QRELS_FORMATS = {
    3: "BEIR 'query-id<TAB>corpus-id<TAB>score'",
    4: "TREC 'query-id iteration corpus-id score'",
}


def load_qrels(path: Path) -> Qrels:
    """BEIR's `query-id<TAB>corpus-id<TAB>score` (a header line accepted) or TREC's `query-id iteration corpus-id
    score` (trec_eval's; the iteration is ignored), told apart by the column count of the first judgement; fields
    split at tabs, or at whitespace on a line without one; CRLF endings accepted. Any other line is an error naming
    it: a qrels file read as empty would score every metric 0."""
    qrels: Qrels = {}
    columns = 0
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            parts = text.split("\t") if "\t" in text else text.split()
            if lineno == 1 and not parts[-1].lstrip("-").isdigit():
                continue  # header
            columns = columns or len(parts)
            if columns not in QRELS_FORMATS:
                raise ValueError(
                    f"{path}:{lineno}: expected {' or '.join(QRELS_FORMATS.values())}, got {line!r}"
                )
            if len(parts) != columns:
                raise ValueError(
                    f"{path}:{lineno}: expected {columns} columns ({QRELS_FORMATS[columns]}, as the first "
                    f"judgement), got {line!r}"
                )
            query, doc, score = parts[0], parts[-2], parts[-1]
            try:
                qrels.setdefault(query, {})[doc] = int(score)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: the score {score!r} is not an integer grade") from e
    if not qrels:
        raise ValueError(f"{path}: no judgements (expected {' or '.join(QRELS_FORMATS.values())} lines)")
    return qrels


def _ranked(scores: dict[str, float]) -> list[str]:
    # trec_eval order: score descending, ties by doc id descending
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def ndcg(ranked: list[str], rels: dict[str, int], k: int) -> float:
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]) if rels.get(d, 0) > 0)
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall(ranked: list[str], rels: dict[str, int], k: int) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mrr(ranked: list[str], rels: dict[str, int], k: int) -> float:
    return next((1.0 / (i + 1) for i, d in enumerate(ranked[:k]) if rels.get(d, 0) > 0), 0.0)


def evaluate(run: Run, qrels: Qrels) -> dict[str, float]:
    """Mean nDCG@10, Recall@10, Recall@100 and MRR@10 over the queries in the qrels (a query with no run scores 0)."""
    rows = []
    for qid, rels in qrels.items():
        ranked = _ranked(run.get(qid, {}))
        rows.append(
            (
                ndcg(ranked, rels, 10),
                recall(ranked, rels, 10),
                recall(ranked, rels, 100),
                mrr(ranked, rels, 10),
            )
        )
    mean = np.mean(rows, axis=0) if rows else np.zeros(4)
    return dict(zip(["ndcg@10", "recall@10", "recall@100", "mrr@10"], map(float, mean), strict=True))


def doc_run(doc_ids: list[str], rows: np.ndarray, scores: np.ndarray, depth: int) -> dict[str, float]:
    """Chunk hits -> document scores, a document scoring the max over its chunks; the best `depth` documents."""
    best: dict[str, float] = {}
    for r, s in zip(rows, scores, strict=True):
        d = doc_ids[r]
        if d not in best or s > best[d]:
            best[d] = float(s)
    return dict(sorted(best.items(), key=lambda kv: -kv[1])[:depth])


@dataclass
class BeirResult:
    metrics: dict[str, float]
    qps: float
    queries: int
    run: Run
    # relevant qrels documents that no chunk of the store holds (one per (query, document) pair, in qrels order):
    # each can only be a miss, so a qrels file for another corpus scores 0 without them
    not_in_corpus: list[str] = field(default_factory=list)
    relevant: int = 0  # relevant (query, document) pairs in the qrels
    queries_without_documents: int = 0  # queries none of whose relevant documents is in the corpus


def run_beir(
    searcher,
    queries: dict[str, str],
    qrels: Qrels,
    depth: int = 100,
    chunk_depth: int | None = None,
    rank: Callable[[list[str], int], list[tuple[np.ndarray, np.ndarray]]] | None = None,
) -> BeirResult:
    """Rank every query in the qrels with `searcher` (a `ragseek.rag.search.Searcher`) and score the run.

    `chunk_depth` chunks are retrieved per query (default 3 x depth when documents have several chunks) and
    folded into the best `depth` documents. `rank` replaces `searcher.rank` (e.g. `pipeline.ranking`, with the
    LLM steps). qps counts query encoding and ranking, not index loading."""
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise KeyError(f"{len(missing)} qrels query ids are not in the queries file (first: {missing[0]!r})")
    table = searcher.store.chunks()
    in_corpus = set(table.doc_ids)
    several = len(in_corpus) < len(table.doc_ids)
    chunk_depth = chunk_depth or (3 * depth if several else depth)
    qids = list(qrels)
    rank = rank or searcher.rank
    rank([queries[qids[0]]], 1)  # load indexes and models outside the timing
    t0 = time.perf_counter()
    ranked = rank([queries[q] for q in qids], chunk_depth)
    seconds = time.perf_counter() - t0
    run = {q: doc_run(table.doc_ids, rows, sc, depth) for q, (rows, sc) in zip(qids, ranked, strict=True)}
    relevant = {q: [d for d, r in rels.items() if r > 0] for q, rels in qrels.items()}
    return BeirResult(
        evaluate(run, qrels), len(qids) / seconds, len(qids), run,
        not_in_corpus=[d for docs in relevant.values() for d in docs if d not in in_corpus],
        relevant=sum(map(len, relevant.values())),
        queries_without_documents=sum(bool(docs) and in_corpus.isdisjoint(docs) for docs in relevant.values()),
    )  # fmt: skip


# --- SQuAD v1.1: metrics --------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalisation: lower case, drop ASCII punctuation, drop the articles a/an/the, collapse
    whitespace (in that order, as `evaluate-v1.1.py`)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _golds(golds: list[str]) -> list[str]:
    if isinstance(golds, str):
        raise TypeError(f"golds is a list of gold answers, got the string {golds!r}: pass [{golds!r}]")
    if not golds:
        raise ValueError("no gold answers to score against: every SQuAD v1.1 question has at least one")
    return golds


def exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _golds(golds)))


def _f1(pred: list[str], gold: list[str]) -> float:
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: list[str]) -> float:
    """The best token F1 of the prediction against any gold answer (normalised tokens, multiset overlap)."""
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(g).split()) for g in _golds(golds))


def strip_citations(answer: str) -> str:
    """The answer without its `[n]` markers, as EM and F1 read it ("Denver Broncos [2]" -> "Denver Broncos")."""
    return " ".join(CITATION.sub(" ", answer).split())


def cites_gold(text: str, golds: list[str]) -> bool:
    """Whether `text` (a cited chunk) contains a gold answer: normalised, on token boundaries."""
    padded = f" {normalize_answer(text)} "
    return any(g and f" {g} " in padded for g in map(normalize_answer, _golds(golds)))


# --- SQuAD v1.1: data -----------------------------------------------------------------------------------------

SQUAD_SHAPE = (
    '{"data": [{"title": str, "paragraphs": [{"context": str, "qas": [{"id": str, "question": str, '
    '"answers": [{"text": str, "answer_start": int}, ...]}, ...]}, ...]}, ...], "version": "1.1"}, every '
    "answer an exact span of its context (context[answer_start:answer_start + len(text)] == text)"
)


@dataclass
class QAItem:
    """One SQuAD question with its gold answers and the paragraph they come from."""

    id: str
    question: str
    answers: list[str]  # the gold answer texts, duplicates kept as in the file
    answer_starts: list[int]  # each answer's char offset into `context`
    title: str  # the article
    paragraph: int  # the paragraph's index within its article
    context: str  # the paragraph, as in the file
    doc_id: str = field(init=False)  # f"{title}/{paragraph}": the paragraph's document id in `squad_store`

    def __post_init__(self) -> None:
        self.doc_id = f"{self.title}/{self.paragraph}"


def _parse_squad(path: Path, data: bytes) -> tuple[list[dict], list[QAItem]]:
    """One BEIR corpus row per paragraph (what `squad_store` ingests) and the questions, in file order."""

    def bad(where: str, what: str) -> ValueError:
        return ValueError(f"{path} is not SQuAD v1.1 format: {where}{what}. Expected {SQUAD_SHAPE}")

    def need(obj: dict, key: str, kind: type | tuple[type, ...], where: str):
        if not isinstance(obj, dict):
            raise bad(where, f" is a {type(obj).__name__}, not an object")
        if key not in obj:
            raise bad(where, f" has no {key!r}")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise bad(f"{where}.{key}", f" is a {type(value).__name__}")
        return value

    try:
        top = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise bad("", f"the file is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise bad("", f"not JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    if not isinstance(top, dict) or not isinstance(top.get("data"), list):
        raise bad("", 'no top-level "data" list')
    rows: list[dict] = []
    items: list[QAItem] = []
    titles: set[str] = set()
    ids: set[str] = set()
    for a, article in enumerate(top["data"]):
        title = need(article, "title", str, f"data[{a}]")
        if title in titles:
            raise bad(f"data[{a}]", f" repeats the title {title!r} (a paragraph's id is title/index)")
        titles.add(title)
        for p, par in enumerate(need(article, "paragraphs", list, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = need(par, "context", str, where)
            if not context.strip():
                raise bad(f"{where}.context", " is empty")
            rows.append({"_id": f"{title}/{p}", "title": "", "text": context,
                         "metadata": {"title": title, "paragraph": p}})  # fmt: skip
            for q, qa in enumerate(need(par, "qas", list, where)):
                at = f"{where}.qas[{q}]"
                if isinstance(qa, dict) and "is_impossible" in qa:
                    raise bad(
                        at,
                        " has is_impossible: that is SQuAD 2.0, and only v1.1 (every question answerable) is read",
                    )
                qid = need(qa, "id", str, at)
                if qid in ids:
                    raise bad(f"{at}.id", f" repeats the question id {qid!r}")
                ids.add(qid)
                question = need(qa, "question", str, at)
                answers = need(qa, "answers", list, at)
                if not answers:
                    raise bad(f"{at}.answers", " is empty")
                texts, starts = [], []
                for k, ans in enumerate(answers):
                    text = need(ans, "text", str, f"{at}.answers[{k}]")
                    start = need(ans, "answer_start", int, f"{at}.answers[{k}]")
                    if context[start : start + len(text)] != text or start < 0:
                        raise bad(
                            f"{at}.answers[{k}]",
                            f" {text!r} is not the span of its context at answer_start {start} "
                            f"(found {context[max(start, 0) : max(start, 0) + len(text)]!r})",
                        )
                    texts.append(text)
                    starts.append(start)
                items.append(QAItem(qid, question, texts, starts, title, p, context))
    return rows, items


def load_squad(path: str | Path) -> list[QAItem]:
    """The questions of a SQuAD v1.1 file, in file order; ValueError (naming the file and the expected shape)
    when it is not that format."""
    path = Path(path)
    return _parse_squad(path, path.read_bytes())[1]


# --- SQuAD v1.1: the store ------------------------------------------------------------------------------------

SQUAD_STORE_VERSION = 1  # bump when the documents `squad_store` writes change


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (flock: released when the holder dies, so a kill never wedges it)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_rows(path: Path, rows: list[dict]) -> Path:
    """The paragraphs as a BEIR corpus .jsonl (what `ragseek ingest` reads), written whole or not at all."""
    if not path.exists():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        save_whole(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def squad_store(
    path: str | Path,
    store: str | Path | None = None,
    splitter: SplitterConfig | None = None,
    store_cfg: StoreConfig | None = None,
    drop: Iterable[str] = (),
    on_progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """A store holding every paragraph of the SQuAD v1.1 file at `path` as one document, id `{title}/{i}`, its
    text the paragraph's context (so an answer's `answer_start` is its offset in the stored text, unless cleaning
    collapsed a double space before it). Returns the store's path.

    The paragraphs go in through `Store.ingest` of a BEIR `.jsonl` (`ragseek ingest`'s code path: clean, split,
    embed), with `splitter` and `store_cfg` (default: `ragseek ingest`'s defaults). Without `store`, the store is
    cached under `cache_dir()/squad`, keyed by the file's content hash and those settings; it is built in a
    temporary folder and renamed into place when complete (with the default BM25 index built), under a file lock,
    so concurrent callers wait for one build and never see a half-built store. `drop` (document ids) leaves those
    paragraphs out: a copy of the full store with them removed, cached under its own key (don't-know evaluation).
    With `store`, the paragraphs are ingested into that folder (idempotent) and `drop` is not allowed."""
    from ragseek.defaults import cache_dir
    from ragseek.rag.search import SearchConfig, Searcher
    from ragseek.rag.splitters import SplitterConfig
    from ragseek.rag.store import Store, StoreConfig

    path = Path(path)
    splitter, store_cfg = splitter or SplitterConfig(), store_cfg or StoreConfig()
    data = path.read_bytes()
    rows, _ = _parse_squad(path, data)
    drop = sorted(set(drop))
    unknown = set(drop) - {r["_id"] for r in rows}
    if unknown:
        raise ValueError(f"drop names paragraphs that {path} does not have: {sorted(unknown)[:3]}")
    digest = hashlib.sha256(data).hexdigest()
    root = cache_dir() / "squad"
    root.mkdir(parents=True, exist_ok=True)
    corpus = _write_rows(root / f"{digest[:16]}.paragraphs.jsonl", rows)

    def build(st: Store) -> None:
        report = st.ingest([corpus], splitter, store_cfg, on_progress=on_progress)
        if report.failed:
            raise ValueError(f"ingesting the paragraphs of {path} failed: {report.failed[0]['reason']}")

    if store is not None:
        if drop:
            raise ValueError("drop builds its own cached store: leave store unset (None) to use it")
        st = Store(store)
        build(st)
        st.close()
        return Path(store)
    settings = {"version": SQUAD_STORE_VERSION, "splitter": asdict(splitter), "embedder": store_cfg.embedder}
    key = hashlib.sha256(f"{digest}|{json.dumps(settings, sort_keys=True)}".encode()).hexdigest()[:12]
    name = f"{path.stem}-{key}"
    if drop:
        name += f"-drop{len(drop)}-" + hashlib.sha256("\n".join(drop).encode()).hexdigest()[:8]
    final = root / name
    if final.is_dir():
        return final
    full = squad_store(path, None, splitter, store_cfg, on_progress=on_progress) if drop else None
    with _locked(root / f"{name}.lock"):
        if final.is_dir():  # another process built it while this one waited
            return final
        for stale in root.glob(f"{name}.tmp-*"):  # left by a killed build (the lock says none is running)
            shutil.rmtree(stale)
        tmp = root / f"{name}.tmp-{os.getpid()}"
        if full is None:
            st = Store(tmp)
            build(st)
        else:  # the full store minus the dropped paragraphs; every vector is already there
            tmp.mkdir()
            src = Store(full)
            src.db.execute("VACUUM INTO ?", (str(tmp / "store.sqlite"),))
            src.close()
            st = Store(tmp)
            st.remove(drop)
            if store_cfg.embedder != "none":  # a word model is retrained on what is left, then embeds
                st.embed(st.embedder(store_cfg.embedder, store_cfg.batch_size), store_cfg.batch_size)
        Searcher(st, SearchConfig()).bm25()
        st.close()
        os.rename(tmp, final)
    return final


def drop_gold(items: list[QAItem], frac: float) -> list[str]:
    """The gold paragraphs to remove so that about `frac` of `items` have none in the store: the items'
    paragraphs in sha256(doc id) order (deterministic, independent of file order), taken until at least
    frac * len(items) questions have lost theirs (whole paragraphs, so the fraction reached can be higher)."""
    if not 0 <= frac <= 1:
        raise ValueError(
            f"the fraction of questions whose gold paragraph is dropped must be in [0, 1], got {frac}"
        )
    per_doc = Counter(it.doc_id for it in items)
    picked, lost = [], 0
    for doc in sorted(per_doc, key=lambda d: hashlib.sha256(d.encode()).hexdigest()):
        if lost >= frac * len(items) or frac == 0:
            break
        picked.append(doc)
        lost += per_doc[doc]
    return picked


# --- SQuAD v1.1: running and scoring --------------------------------------------------------------------------


def oracle_hit(store: Store, item: QAItem) -> Hit:
    """The item's whole gold paragraph as a Hit: the stored document when the store has it (citations then point
    into it), else the cleaned context."""
    from ragseek.rag.documents import clean

    try:
        text = store.document(item.doc_id).text
    except KeyError:
        text = clean(item.context)[0]
    return Hit(row=-1, chunk_id=-1, doc_id=item.doc_id, start=0, end=len(text), score=1.0, text=text)


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def qa_metrics(
    items: list[QAItem],
    answers: list[str],
    first_cited: list[str | None],
    seconds: list[float],
    gold_in_store: list[bool] | None = None,
) -> dict[str, float | int | None]:
    """Scores of the answers to `items` (fractions in [0, 1]; None where undefined).

    em, f1: the official v1.1 metrics (above) of the answer with its `[n]` markers removed, averaged over all
    questions, don't-know answers included (they score against the golds like any answer).
    citation_accuracy: the chunk cited first (`first_cited`, None when nothing is cited) contains a gold answer
    (`cites_gold`), over the questions whose gold paragraph is in the store.
    dont_know_rate: the fraction answered don't-know (`is_dont_know`).
    dont_know_precision / recall: against the questions whose gold paragraph is not in the store (the ones that
    should get don't-know); None without `gold_in_store`, or when the denominator is empty.
    p50_s, p95_s: percentiles of the seconds per question."""
    n = len(items)
    if not n or not len(answers) == len(first_cited) == len(seconds) == n:
        raise ValueError(
            f"qa_metrics needs one answer, citation and time per question, and at least one question: got "
            f"{n} items, {len(answers)} answers, {len(first_cited)} citations, {len(seconds)} times"
        )
    if gold_in_store is not None and len(gold_in_store) != n:
        raise ValueError(f"gold_in_store has {len(gold_in_store)} entries for {n} questions")
    plain = [strip_citations(a) for a in answers]
    dk = [is_dont_know(a) for a in answers]
    present = gold_in_store if gold_in_store is not None else [True] * n
    cited = [t is not None and cites_gold(t, it.answers) for it, t in zip(items, first_cited, strict=True)]
    missing = [not p for p in present]
    hits = sum(d and m for d, m in zip(dk, missing, strict=True))
    known = gold_in_store is not None
    p50, p95 = np.percentile(seconds, [50, 95])
    return {
        "em": _mean([exact_match(a, it.answers) for a, it in zip(plain, items, strict=True)]),
        "f1": _mean([token_f1(a, it.answers) for a, it in zip(plain, items, strict=True)]),
        "citation_accuracy": _mean([c for c, p in zip(cited, present, strict=True) if p]),
        "dont_know_rate": _mean(dk),
        "p50_s": float(p50),
        "p95_s": float(p95),
        "n": n,
        "dont_know_precision": hits / sum(dk) if known and any(dk) else None,
        "dont_know_recall": hits / sum(missing) if known and any(missing) else None,
        "gold_missing": sum(missing) if known else None,
    }


@dataclass
class QAResult:
    metrics: dict[str, float | int | None]  # qa_metrics
    predictions: list[dict]  # per question: {"id", "answer", "citations": [{"doc", "start", "end", "text"}]}
    scores: list[dict]  # per question: {"id", "em", "f1", "cited", "dont_know", "gold_in_store", "seconds"}


def run_qa(
    items: list[QAItem],
    searcher: Searcher,
    llm: LLM,
    ask_cfg: AskConfig | None = None,
    steps: StepsConfig | None = None,
    oracle: bool = False,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> QAResult:
    """Answer every item with `pipeline.ask` (what `ragseek ask` runs, one question at a time, the LLM loaded
    once by the caller) and score the answers (`qa_metrics`).

    Retrieved mode: `searcher` retrieves from its store; a question whose gold paragraph (`doc_id`) is not there
    should get don't-know (when no gold paragraph at all is in the store, its ids are not SQuAD's and don't-know
    precision/recall are not computed). Oracle mode: the gold paragraph is the one source (`ask(chunks=...)` with
    `oracle_hit`), so only reading is measured: no retrieval, query transformation, reranking or don't-know gate;
    the searcher's embedder still attributes uncited sentences."""
    if not items:
        raise ValueError("no questions to evaluate")
    ask_cfg, steps = ask_cfg or AskConfig(), steps or StepsConfig()
    if oracle:
        gold_in_store: list[bool] | None = [True] * len(items)
    else:
        stored = set(searcher.store.chunks().doc_ids)
        gold_in_store = [it.doc_id in stored for it in items]
        gold_in_store = gold_in_store if any(gold_in_store) else None
    answers, seconds = [], []
    for i, item in enumerate(items):
        gold = [oracle_hit(searcher.store, item)] if oracle else None
        t0 = time.perf_counter()
        answers.append(ask(item.question, searcher, llm, ask_cfg, steps, chunks=gold))
        seconds.append(time.perf_counter() - t0)
        if on_progress:
            on_progress("questions", i + 1, len(items))
    first = [a.citations[0].text if a.citations else None for a in answers]
    metrics = qa_metrics(items, [a.answer for a in answers], first, seconds, gold_in_store)
    predictions = [
        {
            "id": it.id,
            "answer": a.answer,
            "citations": [
                {"doc": c.doc, "start": c.start, "end": c.end, "text": c.text} for c in a.citations
            ],
        }
        for it, a in zip(items, answers, strict=True)
    ]
    present = gold_in_store or [None] * len(items)
    scores = [
        {
            "id": it.id,
            "em": exact_match(strip_citations(a.answer), it.answers),
            "f1": token_f1(strip_citations(a.answer), it.answers),
            "cited": t is not None and cites_gold(t, it.answers),
            "dont_know": is_dont_know(a.answer),
            "gold_in_store": p,
            "seconds": s,
        }
        for it, a, t, p, s in zip(items, answers, first, present, seconds, strict=True)
    ]
    return QAResult(metrics, predictions, scores)
