"""`ragseek ingest | info | search | ask`, `ragseek eval beir` and `ragseek eval qa`. Flags come from the config dataclasses' fields
(`SplitterConfig`, `StoreConfig`, `WordVectorConfig`, `SearchConfig`, `BM25Config`, `ANNConfig`, `AskConfig`,
`StepsConfig`), whose help is written once, there; each command also reads them from `--config FILE.yaml` and
`--set key=value` (`ragseek.config.with_configs`). Heavy libraries load inside the commands, so `ragseek --help` stays fast."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import typing
from pathlib import Path

import typer

from ragseek import progress
from ragseek.config import with_configs
from ragseek.llm.cli import BASE_URL_HELP, LLM_HELP, load_shown_llm
from ragseek.rag.embedders import WordVectorConfig
from ragseek.rag.search import Searcher
from ragseek.rag.splitters import SplitterConfig

if typing.TYPE_CHECKING:
    from ragseek.rag.pipeline import AskConfig, StepsConfig
    from ragseek.rag.search import ANNConfig, BM25Config, SearchConfig
    from ragseek.rag.store import StoreConfig


def _config_classes() -> dict[str, type]:
    # search.py / store.py / pipeline.py are light (numpy + sqlite); their heavy imports are inside functions
    from ragseek.rag.pipeline import AskConfig, StepsConfig
    from ragseek.rag.search import ANNConfig, BM25Config, SearchConfig
    from ragseek.rag.store import StoreConfig

    classes = (SplitterConfig, StoreConfig, WordVectorConfig, SearchConfig, BM25Config, ANNConfig)
    return {c.__name__: c for c in (*classes, AskConfig, StepsConfig)}


STORE_HELP = "a folder (SQLite) or postgresql://USER@HOST:PORT/DB?schema=NAME (PostgreSQL + pgvector)"
STORE = typer.Option(..., "--store", help=f"the store: {STORE_HELP}; ingest creates it if absent")
PATHS = typer.Argument(..., help="files or folders (.txt .md .html .pdf .jsonl)")
CORPUS = typer.Option(..., "--corpus", help="BEIR corpus.jsonl")
QUERIES = typer.Option(..., "--queries", help="BEIR queries.jsonl")
QRELS = typer.Option(
    ...,
    "--qrels",
    help="qrels: BEIR .tsv (query-id, corpus-id, score; header and CRLF accepted) or TREC (query-id 0 corpus-id score)",
)
BEIR_STORE = typer.Option(
    None, "--store", help=f"the store: {STORE_HELP} (default: a folder per corpus + splitter in the cache)"
)
# `ragseek ask`'s overrides of the config defaults, shared by `ragseek eval qa` so it measures the same pipeline
ASK_DEFAULTS = {"k": 3}
JSON_OUT = typer.Option(None, "--json", help="also write the metrics as JSON to this file ('-': stdout)")


class ShownSearcher(Searcher):
    """A Searcher whose embedding (the question, the don't-know gate's sentences) and retrieval show progress lines
    (ragseek/progress.py); loading the embedder shows its own (`Store.embedder`)."""

    def encode(self, texts):
        with progress.task(f"embed {len(texts)} texts ({self.cfg.embedder})"):
            return super().encode(texts)

    def rank(self, queries, depth, vectors=None):
        with progress.task(f"retrieve ({self.cfg.retriever})"):
            return super().rank(queries, depth, vectors)


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def ingest(
    paths: list[Path] = PATHS,
    store: str = STORE,
    json_: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    contextual: bool = typer.Option(
        False,
        "--contextual",
        help="then have --llm write each chunk's context (contextual retrieval; cached)",
    ),
    llm: str = typer.Option("local", "--llm", help=LLM_HELP + " (for --contextual)"),
    base_url: str = typer.Option(None, "--base-url", help=BASE_URL_HELP),
    splitter: SplitterConfig = None,
    store_cfg: StoreConfig = None,
    word: WordVectorConfig = None,
) -> None:
    """Add documents to a store: clean, split, embed. Unchanged files are skipped; a bad file or path is listed as
    failed with the reason, and never stops the rest."""
    from ragseek.rag.contextual import contextualize, embed_contexts
    from ragseek.rag.documents import display, path_problem
    from ragseek.rag.store import Store

    problems = [f"{display(p)}: {problem}" for p in paths if (problem := path_problem(p))]
    # before the store is created: a typo leaves nothing behind
    if len(problems) == len(paths):
        raise ValueError(f"{'; '.join(problems)}; nothing was ingested")
    st = Store(store)
    model = load_shown_llm(llm, base_url, "contexts") if contextual else None
    with progress.stages() as on_progress:
        report = st.ingest(paths, splitter, store_cfg, word, on_progress=on_progress)
        if model is not None:
            contexts = contextualize(st, model, on_progress=on_progress)
            if store_cfg.embedder != "none":
                embedder = st.embedder(store_cfg.embedder, store_cfg.batch_size, word)
                contexts["embedded"] = embed_contexts(
                    st, embedder, model.name, store_cfg.batch_size, on_progress
                )
    out = report.as_json()
    if model is not None:
        out["contextual"] = {"llm": model.name, **contexts}
    if json_:
        _print_json(out)
        return
    typer.echo(
        f"stored {report.stored}, skipped {report.skipped} (unchanged), failed {len(report.failed)}, "
        f"chunks {report.chunks}, embedded {report.embedded}, removed {report.removed}, {report.seconds:.1f}s"
    )
    if model is not None:
        typer.echo(
            f"contexts ({model.name}): generated {contexts['generated']}, cached {contexts['cached']}, "
            f"embedded {contexts.get('embedded', 0)}, {contexts['seconds']:.1f}s"
        )
    for f in report.failed:
        typer.echo(f"  failed: {f['path']}: {f['reason']}", err=True)
    for f in report.left_out:
        typer.echo(f"  left out: {f['path']}: {f['reason']}", err=True)
    for f in report.not_pruned:
        typer.echo(f"  not pruned: {f['source']}: {f['reason']}", err=True)


def info(
    store: str = STORE,
    json_: bool = typer.Option(False, "--json", help="print as JSON"),
) -> None:
    """Documents, chunks, embedders and indexes in a store."""
    from ragseek.rag.store import open_store

    out = open_store(store).info()
    if json_:
        _print_json(out)
        return
    typer.echo(
        f"{out['store']}: {out['documents']} documents, {out['chunks']} chunks, generation {out['generation']}"
    )
    for name, n in out["embedders"].items():
        typer.echo(f"  embeddings {name}: {n}")
    for ix in out["indexes"]:
        typer.echo(
            f"  index {ix['name']} (generation {ix['generation']}, {'fresh' if ix['fresh'] else 'stale'})"
        )


def search(
    query: str = typer.Argument(..., help="the query text"),
    store: str = STORE,
    json_: bool = typer.Option(False, "--json", help="print the hits as JSON"),
    search_cfg: SearchConfig = None,
    bm25: BM25Config = None,
    ann: ANNConfig = None,
) -> None:
    """Ranked chunks for a query, with document, char offsets and score."""
    from ragseek.rag.store import open_store

    # no chunks, or no vectors for the chosen embedder: a LookupError that says what to run
    hits = ShownSearcher(open_store(store), search_cfg, bm25, ann).search(query)
    if json_:
        _print_json([dataclasses.asdict(h) for h in hits])
        return
    for rank, h in enumerate(hits, 1):
        text = " ".join(h.text.split())
        typer.echo(f"{rank:2d}. {h.score:.4f}  {h.doc_id} [{h.start}:{h.end}]  {text[:160]}")


def ask(
    question: str = typer.Argument(..., help="the question"),
    store: str = STORE,
    llm: str = typer.Option("local", "--llm", help=LLM_HELP),
    base_url: str = typer.Option(None, "--base-url", help=BASE_URL_HELP),
    json_: bool = typer.Option(
        False, "--json", help="print {answer, citations, chunks, queries, timings} as JSON"
    ),
    show_prompt: bool = typer.Option(
        False, "--show-prompt", help="print the prompt the LLM answers (to stderr)"
    ),
    ask_cfg: AskConfig = None,
    steps: StepsConfig = None,
    search_cfg: SearchConfig = None,
    bm25: BM25Config = None,
    ann: ANNConfig = None,
) -> None:
    """Answer a question from a store with citations: query → retrieve → rerank → prompt → generate → [n] spans."""
    from ragseek.rag.pipeline import ask as run_ask
    from ragseek.rag.store import open_store

    searcher = ShownSearcher(open_store(store), search_cfg, bm25, ann)
    searcher.check()  # an empty store or missing vectors fail here, before the LLM loads
    model = load_shown_llm(llm, base_url, f"query: {steps.query}")
    on_text = None if json_ else lambda piece: (sys.stdout.write(piece), sys.stdout.flush())
    result = run_ask(question, searcher, model, ask_cfg, steps, on_text)
    if show_prompt:
        typer.echo(f"--- prompt ---\n{result.prompt}\n--------------", err=True)
    if json_:
        _print_json(result.as_json())
        return
    typer.echo("")
    if result.citations:
        typer.echo("\nSources:")
    for c in result.citations:
        span = " ".join(c.text.split())
        how = {"model": "", "match": " (re-cited: holds the phrase)", "attribution": " (attributed)"}[c.by]
        typer.echo(
            f"  [{c.n}]{how} {c.doc} [{c.start}:{c.end}]  {span[:150]}{'…' if len(span) > 150 else ''}"
        )
    for w in result.withheld:
        typer.echo(
            f"left out of source [{w['n']}] ({w['doc']}), it speaks to the model: {w['text'][:150]}", err=True
        )
    typer.echo("  ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()), err=True)


def beir(
    corpus: Path = CORPUS,
    queries: Path = QUERIES,
    qrels: Path = QRELS,
    store: str = BEIR_STORE,
    json_out: Path = JSON_OUT,
    llm: str = typer.Option("local", "--llm", help=LLM_HELP + " (for --query / --rerank)"),
    base_url: str = typer.Option(None, "--base-url", help=BASE_URL_HELP),
    splitter: SplitterConfig = None,
    search_cfg: SearchConfig = None,
    bm25: BM25Config = None,
    ann: ANNConfig = None,
    word: WordVectorConfig = None,
    steps: StepsConfig = None,
) -> None:
    """Build (or reuse) a store for a BEIR corpus, run every query in the qrels, print nDCG@10, Recall@10/100, MRR@10, qps.

    With --query rewrite|multi|hyde or --rerank llm the LLM steps run around the retriever, as in `ragseek ask`."""
    from ragseek.defaults import cache_dir
    from ragseek.rag.contextual import contextualize, embed_contexts
    from ragseek.rag.documents import load_beir_rows
    from ragseek.rag.evaluate import load_qrels, load_queries, run_beir
    from ragseek.rag.pipeline import StepsConfig, ranking
    from ragseek.rag.store import Store

    # before any store is built: a qrels file in another format is one error line
    judged, questions = load_qrels(qrels), load_queries(queries)
    if store is None:
        key = hashlib.sha256(f"{corpus.resolve()}|{dataclasses.asdict(splitter)}".encode()).hexdigest()[:12]
        store = cache_dir() / "beir" / f"{corpus.parent.name}-{key}"
    st = Store(store)
    st.add_documents(load_beir_rows(corpus), splitter)
    embedder = None
    if search_cfg.retriever != "bm25":
        embedder = st.embedder(search_cfg.embedder, word_cfg=word)
        with progress.stages() as on_progress:
            st.embed(embedder, on_progress=on_progress)
    if search_cfg.contextual:  # the missing contexts (and their vectors) first
        with progress.stages() as on_progress:
            contextualize(
                st, load_shown_llm(search_cfg.contextual, base_url, "contexts"), on_progress=on_progress
            )
            if embedder is not None:
                embed_contexts(st, embedder, search_cfg.contextual, on_progress=on_progress)
    searcher = Searcher(st, search_cfg, bm25, ann, embedder)
    rank = None
    if steps != StepsConfig():
        rank = ranking(searcher, load_shown_llm(llm, base_url, f"query: {steps.query}"), steps)
    result = run_beir(searcher, questions, judged, rank=rank)
    if result.not_in_corpus:
        typer.echo(
            f"warning: {len(result.not_in_corpus)} of {result.relevant} relevant qrels documents are not in the "
            f"corpus (first: {result.not_in_corpus[0]!r}); each counts as a miss, and "
            f"{result.queries_without_documents} queries can only score 0: are {qrels} and {corpus} one dataset?",
            err=True,
        )
    out = {
        **result.metrics,
        "qps": result.qps,
        "queries": result.queries,
        "qrels_not_in_corpus": len(result.not_in_corpus),
        "queries_without_documents": result.queries_without_documents,
        "retriever": search_cfg.retriever,
        "contextual": search_cfg.contextual,
        "query": steps.query,
        "rerank": steps.rerank,
        "store": str(store),
    }
    if json_out is not None:
        text = json.dumps(out, indent=2)
        if str(json_out) == "-":
            _print_json(out)
            return
        json_out.write_text(text + "\n")
    typer.echo("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))


def qa(
    data: Path = typer.Option(
        ..., "--data", help="SQuAD v1.1 .json file (questions, gold answers, paragraphs)"
    ),
    store: str = typer.Option(
        None,
        "--store",
        help=f"the store to retrieve from: {STORE_HELP} (default: one document per paragraph of --data, id "
        "title/i, built with the splitter flags and --embedder, cached)",
    ),
    oracle: bool = typer.Option(
        False, "--oracle", help="the gold paragraph is the only source (no retrieval, no gate): reading alone"
    ),
    llm: str = typer.Option("local", "--llm", help=LLM_HELP),
    base_url: str = typer.Option(None, "--base-url", help=BASE_URL_HELP),
    n: int = typer.Option(None, "--n", help="the first N questions, in file order (default: all)"),
    json_: bool = typer.Option(
        False,
        "--json",
        help='print {"em", "f1", "citation_accuracy", "dont_know_rate", "p50_s", "p95_s", "n", '
        '"dont_know_precision", "dont_know_recall", ...} as JSON',
    ),
    predictions: Path = typer.Option(
        None, "--predictions", help='write one JSON line per question: {"id", "answer", "citations"}'
    ),
    drop_gold_frac: float = typer.Option(
        0.0,
        "--drop-gold-frac",
        help="remove the gold paragraphs of this fraction of the questions from the built store (whole "
        "paragraphs, a fixed choice by hash), to measure don't-know precision / recall",
    ),
    ask_cfg: AskConfig = None,
    steps: StepsConfig = None,
    search_cfg: SearchConfig = None,
    bm25: BM25Config = None,
    ann: ANNConfig = None,
    splitter: SplitterConfig = None,
) -> None:
    """Answer SQuAD questions with the same pipeline as `ragseek ask` (the LLM loaded once); print EM, F1 (SQuAD
    v1.1 normalisation), citation accuracy (the first cited chunk holds a gold answer), don't-know rate,
    precision and recall, and seconds per question (p50, p95)."""
    from ragseek.rag.evaluate import drop_gold, load_squad, run_qa, squad_store
    from ragseek.rag.store import Store, StoreConfig, open_store

    if n is not None and n < 1:
        raise ValueError(f"--n {n}: give a number of questions >= 1, or leave it out for all")
    if store is not None and drop_gold_frac:
        raise ValueError(
            "--drop-gold-frac removes paragraphs from the store it builds from --data: leave out --store"
        )
    if store is not None:
        open_store(store).close()
    items = load_squad(data)[:n]
    drop = drop_gold(items, drop_gold_frac)
    if store is None:
        with progress.stages() as on_progress:
            store = squad_store(
                data, None, splitter, StoreConfig(embedder=search_cfg.embedder), drop, on_progress
            )
    searcher = ShownSearcher(Store(store), search_cfg, bm25, ann)
    searcher.check()  # an empty store or missing vectors fail here, before the LLM loads
    model = load_shown_llm(llm, base_url, f"query: {steps.query}")
    with progress.stages() as on_progress:
        result = run_qa(items, searcher, model, ask_cfg, steps, oracle, on_progress)
    if predictions is not None:
        with open(predictions, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in result.predictions)
    out = {**result.metrics, "oracle": oracle, "llm": model.name, "store": str(store), "dropped": len(drop)}
    if json_:
        _print_json(out)
        return
    typer.echo("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add ingest, info, search and ask to `app`, beir and qa to `eval_app`."""
    classes = _config_classes()
    for fn in (ingest, info, search):
        app.command(fn.__name__)(with_configs(fn, classes))
    app.command("ask")(with_configs(ask, classes, **ASK_DEFAULTS))
    eval_app.command("beir")(with_configs(beir, classes))
    eval_app.command("qa")(with_configs(qa, classes, **ASK_DEFAULTS))  # the sources `ragseek ask` would use
