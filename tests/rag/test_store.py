"""The store: idempotent, transactional ingest; a killed ingest completes on the next run; bad files are reported."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ragseek.rag.embedders import WordVectorConfig
from ragseek.rag.splitters import SplitterConfig
from ragseek.rag.store import Store, StoreConfig

SPLIT = SplitterConfig("recursive", 120, 20)
WORD = WordVectorConfig(dim=16, epochs=2, min_count=1)
TOPICS = [
    "aspirin heart attack risk",
    "vitamin bone fracture",
    "sleep memory recall",
    "coffee mortality study",
]


def write_corpus(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        body = "\n\n".join(
            f"Document {i}, paragraph {p}: a note on {topic}, case {i * 7 + p}." for p in range(3)
        )
        paths.append(folder / f"doc{i:03d}.txt")
        paths[-1].write_text(body)
    return paths


def snapshot(root: Path) -> dict:
    """Everything a run leaves in the store, independent of row ids and timestamps."""
    db = sqlite3.connect(root / "store.sqlite")
    out = {
        "documents": db.execute(
            "SELECT doc_id, content_hash, text FROM documents ORDER BY doc_id"
        ).fetchall(),
        "chunks": db.execute(
            'SELECT doc_id, ord, start, "end", text FROM chunks ORDER BY doc_id, ord'
        ).fetchall(),
        "embeddings": db.execute(
            "SELECT embedder, content_hash, vector FROM embeddings ORDER BY 1, 2"
        ).fetchall(),
    }
    db.close()
    return out


def test_reingest_is_idempotent(tmp_path):
    write_corpus(tmp_path / "docs", 6)
    store = Store(tmp_path / "store")
    first = store.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="word2vec"), WORD)
    assert (first.stored, first.skipped, first.failed) == (6, 0, [])
    assert first.embedded == first.chunks > 6
    before, generation = snapshot(store.root), store.generation
    again = store.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="word2vec"), WORD)
    assert (again.stored, again.skipped, again.chunks, again.embedded) == (0, 6, 0, 0)
    assert snapshot(store.root) == before and store.generation == generation


def test_changed_file_replaces_its_chunks_and_deleted_file_is_pruned(tmp_path):
    paths = write_corpus(tmp_path / "docs", 3)
    store = Store(tmp_path / "store")
    store.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="none"))
    paths[0].write_text("Completely new text about glaciers.")
    report = store.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="none"))
    assert (report.stored, report.skipped) == (1, 2)
    doc0 = str(paths[0].resolve())
    texts = [t for d, t in store.db.execute("SELECT doc_id, text FROM chunks") if d == doc0]
    assert texts == ["Completely new text about glaciers."]
    paths[1].unlink()
    report = store.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="none", prune=True))
    assert report.removed == 1
    assert store.info()["documents"] == 2
    assert str(paths[1].resolve()) not in {
        d for (d,) in store.db.execute("SELECT DISTINCT doc_id FROM chunks")
    }


def test_bad_files_are_reported_not_fatal(tmp_path):
    docs = tmp_path / "docs"
    write_corpus(docs, 2)
    (docs / "empty.txt").write_bytes(b"")
    (docs / "binary.md").write_bytes(b"\x7fELF\x00\x00\x01")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.7\n garbage")
    (docs / "latin1.txt").write_bytes("r\u00e9sum\u00e9".encode("latin-1"))
    report = Store(tmp_path / "store").ingest([docs], SPLIT, StoreConfig(embedder="none"))
    assert report.stored == 2
    reasons = {Path(f["path"]).name: f["reason"] for f in report.failed}
    assert set(reasons) == {"empty.txt", "binary.md", "broken.pdf", "latin1.txt"}
    assert reasons["broken.pdf"].startswith("corrupt PDF")
    assert reasons["binary.md"].startswith("binary file")


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ragseek.rag.embedders import WordVectorConfig
    from ragseek.rag.splitters import SplitterConfig
    from ragseek.rag.store import Store, StoreConfig
    docs, root, delay = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    Store(root).ingest(
        [docs], SplitterConfig("recursive", 120, 20), StoreConfig(embedder="word2vec", batch_size=8),
        WordVectorConfig(dim=16, epochs=2, min_count=1), on_progress=lambda *a: time.sleep(delay),
    )
    """
)


def run_child(docs: Path, root: Path, delay: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(docs), str(root), str(delay)])


def count(root: Path, table: str) -> int:
    try:
        db = sqlite3.connect(f"file:{root / 'store.sqlite'}?mode=ro", uri=True, timeout=5)
        n = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        db.close()
        return n
    except sqlite3.OperationalError:  # not created yet
        return 0


@pytest.mark.parametrize("table, at", [("documents", 25), ("embeddings", 40)])
def test_killed_ingest_then_rerun_equals_uninterrupted(tmp_path, table, at):
    docs = tmp_path / "docs"
    write_corpus(docs, 60)
    assert run_child(docs, tmp_path / "clean").wait(timeout=120) == 0

    child = run_child(docs, tmp_path / "killed", delay=0.01)
    deadline = time.time() + 120
    while count(tmp_path / "killed", table) < at and child.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    partial = snapshot(tmp_path / "killed")
    assert len(partial["embeddings"]) < len(snapshot(tmp_path / "clean")["embeddings"]), (
        "the kill came too late"
    )
    # what survived the kill is consistent: every stored document has all its chunks
    clean = snapshot(tmp_path / "clean")
    clean_chunks = {d: [c for c in clean["chunks"] if c[0] == d] for d, _, _ in clean["documents"]}
    for d, _, _ in partial["documents"]:
        assert [c for c in partial["chunks"] if c[0] == d] == clean_chunks[d]

    assert run_child(docs, tmp_path / "killed").wait(timeout=120) == 0
    assert snapshot(tmp_path / "killed") == clean


def test_vectors_align_with_chunks_and_import_embeddings(tmp_path):
    write_corpus(tmp_path / "docs", 4)
    a = Store(tmp_path / "a")
    a.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="word2vec"), WORD)
    emb = a.embedder("word2vec")
    X = a.vectors(emb.name)
    np.testing.assert_allclose(X, emb.encode(a.chunks().texts), atol=1e-6)
    b = Store(tmp_path / "b")
    b.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="none"))
    assert b.import_embeddings(a.root) == len(X)
    np.testing.assert_array_equal(b.vectors(emb.name), X)
    with pytest.raises(LookupError, match="no 'minilm' embedding"):
        b.vectors("minilm")


def test_reingest_with_every_vector_present_loads_no_model(tmp_path):
    write_corpus(tmp_path / "docs", 3)
    store = Store(tmp_path / "store")
    store.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="none"))
    spec = str(tmp_path / "no-such-model")  # loading it would fail
    with store.db:
        store.db.executemany(
            "INSERT INTO embeddings VALUES (?, ?, ?)",
            [("st:no-such-model", h, np.ones(4, np.float32).tobytes()) for h in set(store.chunks().hashes)],
        )
    assert store.missing_vectors("st:no-such-model") == 0
    report = store.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder=spec))
    assert (report.stored, report.embedded) == (0, 0)
    write_corpus(tmp_path / "docs", 4)  # a new file: now a vector is missing and the model must load
    with pytest.raises(FileNotFoundError, match="not a sentence-transformers folder"):
        store.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder=spec))


def test_a_beir_folder_ingests_its_corpus_and_leaves_out_its_queries(tmp_path):
    beir = tmp_path / "scifact"
    beir.mkdir()
    (beir / "corpus.jsonl").write_text(
        '{"_id": "d1", "title": "Aspirin", "text": "Aspirin lowers heart attack risk."}\n'
        '{"_id": "d2", "title": "Coffee", "text": "Coffee and mortality."}\n'
    )
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "Does aspirin help?"}\n')
    store = Store(tmp_path / "store")
    report = store.ingest([beir], SPLIT, StoreConfig(embedder="none"))
    assert report.stored == 2 and report.failed == []
    assert [f["path"] for f in report.left_out] == [str(beir / "queries.jsonl")]
    assert "name the file to ingest it" in report.left_out[0]["reason"]
    named = store.ingest([beir / "queries.jsonl"], SPLIT, StoreConfig(embedder="none"))
    assert named.stored == 1 and named.left_out == []
