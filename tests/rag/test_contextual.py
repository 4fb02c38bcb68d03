"""Contextual retrieval: Anthropic's prompt, contexts cached by (LLM, chunk hash), resumable after a kill, and
retrieval over context + chunk whose hits keep the chunk's own offsets. A deterministic protocol class for the
cache and kill tests; the tiny random local model through the CLI (text quality irrelevant)."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragseek.cli import app
from ragseek.llm.local import LocalLLM
from ragseek.rag.contextual import context_prompt, contextual_texts, contextualize, document_window
from ragseek.rag.documents import Document, load_beir_rows
from ragseek.rag.embedders import WordVectorConfig
from ragseek.rag.search import BM25Config, SearchConfig, Searcher
from ragseek.rag.splitters import SplitterConfig
from ragseek.rag.store import Store

SPLIT = SplitterConfig("recursive", 60, 0)
TOPICS = ["zebra migration", "glacier melt", "coral bleaching", "owl hearing"]


class FirstLine:
    """A deterministic LLM (the protocol's `complete`): a chunk's context is its document window's first line.
    Records every prompt it is sent."""

    def __init__(self, name: str = "firstline"):
        self.name, self.prompts = name, []

    def complete(self, prompts, max_tokens=256, temperature=0.0, stop=None):
        self.prompts += prompts
        return [f"From: {p[0]['content'].split('<document>')[1].split(chr(10))[1]}" for p in prompts]


def doc(i: int) -> Document:
    """A document whose title line names its topic and whose later paragraphs never do."""
    topic = TOPICS[i % len(TOPICS)]
    body = "\n\n".join(f"Paragraph {p} of report {i}: numbers rose in case {i * 7 + p}." for p in range(3))
    return Document(f"doc{i}", f"Report on {topic}.\n\n{body}", "test")


def make_store(root: Path, n: int) -> Store:
    store = Store(root)
    store.add_documents([doc(i) for i in range(n)], SPLIT)
    return store


def contexts(root: Path) -> list:
    db = sqlite3.connect(f"file:{root / 'store.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT llm, content_hash, context FROM contexts ORDER BY 1, 2").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        db.close()


def test_each_document_of_an_id_two_sources_share_gets_its_own_window(tmp_path):
    """Two .jsonl files may both hold an _id (documents are keyed by source and id): each chunk's context is
    written from its own document, not from whichever row of that id comes first."""
    store = Store(tmp_path / "store")
    store.add_documents(
        [replace(doc(0), source="a.jsonl"), replace(doc(1), doc_id="doc0", source="b.jsonl")], SPLIT
    )
    llm = FirstLine()
    contextualize(store, llm)
    assert {p[0]["content"].split("<document>")[1].split("\n")[1] for p in llm.prompts} == {
        "Report on zebra migration.",
        "Report on glacier melt.",
    }


def test_context_prompt_is_anthropics_and_windows_long_documents():
    assert context_prompt("The whole doc. A chunk.", "A chunk.") == (
        "<document>\nThe whole doc. A chunk.\n</document>\n"
        "Here is the chunk we want to situate within the whole document\n<chunk>\nA chunk.\n</chunk>\n"
        "Please give a short succinct context to situate this chunk within the overall document for the purposes "
        "of improving search retrieval of the chunk. Answer only with the succinct context and nothing else."
    )
    text = " ".join(f"w{i:03d}" for i in range(1000))  # 4,999 chars
    start = text.index("w500")
    window = document_window(text, start, start + 14, 400)
    assert window.startswith("[…] w4") and window.endswith(" […]")
    body = window.removeprefix("[…] ").removesuffix(" […]")
    assert len(body) <= 400 and "w500 w501 w502" in body and body in text
    assert (body.split()[0], body.split()[-1]) == ("w462", "w540")  # centred, cut between words
    assert document_window(text, 0, 14, 400).startswith("w000 ")  # at an end: shifted, no marker on that side
    prompt = context_prompt(text, "w500 w501 w502", max_doc_chars=400)
    assert window in prompt and "w000" not in prompt


def test_cached_rerun_costs_no_call_and_a_changed_chunk_only_its_own(tmp_path):
    store = make_store(tmp_path / "s", 3)
    n = len(set(store.chunks().hashes))
    llm, progress = FirstLine(), []
    counts = contextualize(store, llm, batch_size=4, on_progress=lambda *a: progress.append(a))
    assert (counts["generated"], counts["cached"], len(llm.prompts)) == (n, 0, n)
    assert progress[0] == ("contexts (firstline)", 0, n) and progress[-1] == ("contexts (firstline)", n, n)
    assert len(progress) == 1 + -(-n // 4)
    assert llm.prompts[0] == [
        {"role": "user", "content": context_prompt(doc(0).text, store.chunks().texts[0])}
    ]

    again = FirstLine()
    assert contextualize(store, again)["generated"] == 0 and again.prompts == []

    changed = doc(1)
    changed.text = changed.text.replace("case 9.", "case 9, revised.")
    store.add_document(changed, SPLIT)
    fresh = FirstLine()
    assert contextualize(store, fresh)["generated"] == 1
    assert len(fresh.prompts) == 1 and "<chunk>\nParagraph 2 of report 1" in fresh.prompts[0][0]["content"]

    other = FirstLine("other")  # another LLM's contexts live beside the first's
    assert contextualize(store, other)["generated"] == n
    assert {llm for llm, _, _ in contexts(store.root)} == {"firstline", "other"}


def test_search_over_contexts_keeps_the_chunks_offsets(tmp_path):
    store = make_store(tmp_path / "s", 4)
    bm25 = SearchConfig(retriever="bm25", k=4)
    with pytest.raises(LookupError, match="--contextual --llm firstline"):
        Searcher(store, replace(bm25, contextual="firstline")).search("zebra")
    contextualize(store, FirstLine())
    plain = Searcher(store, bm25).search("zebra")
    assert [(h.doc_id, h.start) for h in plain if h.score > 0] == [("doc0", 0)]  # only the title says zebra
    hits = Searcher(store, replace(bm25, contextual="firstline")).search("zebra")
    assert [h.doc_id for h in hits if h.score > 0] == ["doc0"] * 4  # the title and each paragraph
    for h in hits:
        assert store.document(h.doc_id).text[h.start : h.end] == h.text and "From:" not in h.text

    store.embed(store.embedder("word2vec", word_cfg=WordVectorConfig(dim=8, epochs=1, min_count=1)))
    hybrid = Searcher(store, replace(bm25, retriever="hybrid", embedder="word2vec", contextual="firstline"))
    hits = hybrid.search("zebra")
    assert [h.doc_id for h in hits] == ["doc0"] * 4
    assert all(store.document(h.doc_id).text[h.start : h.end] == h.text for h in hits)
    n, name = len(store.chunks().ids), store.embedder_name("word2vec")
    assert hybrid.vectors_name() == f"{name}+ctx:firstline"
    assert store.info()["embedders"] == {name: n, f"{name}+ctx:firstline": n}  # beside the plain vectors
    table = store.chunks()
    assert contextual_texts(store, "firstline")[:2] == [
        f"From: Report on zebra migration.\n\n{table.texts[0]}",
        f"From: Report on zebra migration.\n\n{table.texts[1]}",
    ]


CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from test_contextual import FirstLine
    from ragseek.rag.contextual import contextualize
    from ragseek.rag.store import Store
    contextualize(Store(sys.argv[2]), FirstLine(), batch_size=2, on_progress=lambda *a: time.sleep(0.05))
    """
)


def test_killed_contextualize_then_rerun_equals_uninterrupted(tmp_path):
    clean, killed = make_store(tmp_path / "clean", 10), make_store(tmp_path / "killed", 10)
    total = contextualize(clean, FirstLine())["generated"]
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(Path(__file__).parent), str(killed.root)])
    deadline = time.time() + 120
    while len(contexts(killed.root)) < 6 and child.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done = len(contexts(killed.root))
    assert 6 <= done < total, "the kill came too early or too late"
    rerun = contextualize(Store(killed.root), FirstLine())
    assert (rerun["generated"], rerun["cached"]) == (total - done, done)
    assert contexts(killed.root) == contexts(clean.root)


def test_cli_ingest_search_and_beir_with_the_tiny_local_model(tmp_path, make_tiny_llm):
    """Contexts are written in-process, 2 tokens each (the commands' 64-token contexts are slow on a loaded CPU);
    the commands then find them cached under the same --llm spec, embed them and search by them."""
    llm = LocalLLM.from_path(make_tiny_llm("tiny-ctx", max_seq_len=1024))
    spec, docs = llm.name, tmp_path / "docs"
    docs.mkdir()
    (docs / "zebra.md").write_text(doc(0).text)
    store = str(tmp_path / "store")

    def invoke(*args):
        res = CliRunner().invoke(app, list(args))
        assert res.exit_code == 0, res.output + repr(res.exception)
        return json.loads(res.stdout)

    ingest = ["ingest", str(docs), "--store", store, "--chunk-size", "60", "--chunk-overlap", "0", "--json"]
    chunks = invoke(*ingest, "--embedder", "none")["chunks"]
    assert contextualize(Store(store), llm, max_tokens=2)["generated"] == chunks
    out = invoke(*ingest, "--embedder", "word2vec", "--contextual", "--llm", spec)["contextual"]
    assert (out["llm"], out["generated"], out["cached"], out["embedded"]) == (spec, 0, chunks, chunks)
    hits = invoke("search", "zebra", "--store", store, "--retriever", "bm25", "--contextual", spec, "--json")
    st = Store(store)
    assert hits and all(st.document(h["doc_id"]).text[h["start"] : h["end"]] == h["text"] for h in hits)

    beir = Path(__file__).parent / "data" / "beir"
    Store(tmp_path / "b").add_documents(load_beir_rows(beir / "corpus.jsonl"), SplitterConfig())
    contextualize(Store(tmp_path / "b"), llm, max_tokens=2)
    args = ["eval", "beir", "--corpus", str(beir / "corpus.jsonl"), "--queries", str(beir / "queries.jsonl")]
    args += ["--qrels", str(beir / "qrels.tsv"), "--store", str(tmp_path / "b"), "--retriever", "bm25"]
    out = invoke(*args, "--contextual", spec, "--json", "-")
    assert out["contextual"] == spec and 0 <= out["ndcg@10"] <= 1
    indexes = [i["name"] for i in Store(tmp_path / "b").info()["indexes"]]
    assert indexes == [f"bm25-{BM25Config().fingerprint}-ctx-{spec.replace('/', '_')}"]
