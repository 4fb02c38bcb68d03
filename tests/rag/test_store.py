"""The store: idempotent, transactional ingest; a killed ingest completes on the next run; bad files are reported.

Tests taking `store_at` (tests/rag/conftest.py) run once on a SQLite folder and once on a PostgreSQL schema."""

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
from ragseek.rag.pgstore import PgStore
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


def snapshot(spec: str | Path) -> dict:
    """Everything a run leaves in the store at `spec` (either backend), independent of row ids and timestamps."""
    store = Store(spec)
    names = [n for (n,) in store.sql("SELECT DISTINCT embedder FROM embeddings")]
    out = {
        "documents": store.sql(
            "SELECT source, doc_id, content_hash, text FROM documents ORDER BY source, doc_id"
        ),
        "chunks": store.sql(
            'SELECT source, doc_id, ord, start, "end", text FROM chunks ORDER BY source, doc_id, ord'
        ),
        "embeddings": sorted((n, h, v.tobytes()) for n in names for h, v in store.embeddings(n).items()),
    }
    store.close()
    return out


def test_reingest_is_idempotent(tmp_path, store_at):
    write_corpus(tmp_path / "docs", 6)
    store = Store(store_at("store"))
    first = store.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="word2vec"), WORD)
    assert (first.stored, first.skipped, first.failed) == (6, 0, [])
    assert first.embedded == first.chunks > 6
    before, generation = snapshot(store_at("store")), store.generation
    # the same folder named by a str: the same documents, nothing to do
    again = store.ingest([str(tmp_path / "docs")], SPLIT, StoreConfig(embedder="word2vec"), WORD)
    assert (again.stored, again.skipped, again.chunks, again.embedded) == (0, 6, 0, 0)
    assert snapshot(store_at("store")) == before and store.generation == generation


def test_changed_file_replaces_its_chunks_and_deleted_file_is_pruned(tmp_path, store_at):
    paths = write_corpus(tmp_path / "docs", 3)
    store = Store(store_at("store"))
    store.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="none"))
    paths[0].write_text("Completely new text about glaciers.")
    report = store.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="none"))
    assert (report.stored, report.skipped) == (1, 2)
    doc0 = str(paths[0].resolve())
    texts = [t for d, t in store.sql("SELECT doc_id, text FROM chunks") if d == doc0]
    assert texts == ["Completely new text about glaciers."]
    paths[1].unlink()
    report = store.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="none", prune=True))
    assert report.removed == 1
    assert store.info()["documents"] == 2
    assert str(paths[1].resolve()) not in {d for (d,) in store.sql("SELECT DISTINCT doc_id FROM chunks")}


def test_bad_files_are_reported_not_fatal(tmp_path, store_at):
    docs = tmp_path / "docs"
    write_corpus(docs, 2)
    (docs / "empty.txt").write_bytes(b"")
    (docs / "binary.md").write_bytes(b"\x7fELF\x00\x00\x01")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.7\n garbage")
    (docs / "latin1.txt").write_bytes("r\u00e9sum\u00e9".encode("latin-1"))
    report = Store(store_at("store")).ingest([docs], SPLIT, StoreConfig(embedder="none"))
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
    docs, root, delay = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    Store(root).ingest(
        [docs], SplitterConfig("recursive", 120, 20), StoreConfig(embedder="word2vec", batch_size=8),
        WordVectorConfig(dim=16, epochs=2, min_count=1), on_progress=lambda *a: time.sleep(delay),
    )
    """
)


def run_child(docs: Path, root: str | Path, delay: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(docs), str(root), str(delay)])


@pytest.mark.parametrize("table, at", [("documents", 25), ("embeddings", 40)])
def test_killed_ingest_then_rerun_equals_uninterrupted(tmp_path, store_at, table, at):
    docs = tmp_path / "docs"
    write_corpus(docs, 60)
    assert run_child(docs, store_at("clean")).wait(timeout=120) == 0

    # opened (so created) before the child starts: it reads the child's commits as they come
    watch = Store(store_at("killed"))
    child = run_child(docs, store_at("killed"), delay=0.01)
    deadline = time.time() + 120
    while (
        watch.sql(f"SELECT COUNT(*) FROM {table}")[0][0] < at
        and child.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    watch.close()
    partial = snapshot(store_at("killed"))
    assert len(partial["embeddings"]) < len(snapshot(store_at("clean"))["embeddings"]), (
        "the kill came too late"
    )
    # what survived the kill is consistent: every stored document has all its chunks
    clean = snapshot(store_at("clean"))
    clean_chunks = {d: [c for c in clean["chunks"] if c[1] == d] for _, d, _, _ in clean["documents"]}
    for _, d, _, _ in partial["documents"]:
        assert [c for c in partial["chunks"] if c[1] == d] == clean_chunks[d]

    assert run_child(docs, store_at("killed")).wait(timeout=120) == 0
    assert snapshot(store_at("killed")) == clean


def test_two_ingests_at_once_store_each_row_once(tmp_path, store_at):
    """Two processes ingesting the same files into one store at the same time: no document or chunk twice, none
    lost, the same rows as one ingest alone: each rereads a document's hash inside its write transaction (PostgreSQL:
    under a per-document advisory lock; SQLite: BEGIN IMMEDIATE, one writer at a time)."""
    docs = tmp_path / "docs"
    write_corpus(docs, 40)
    assert run_child(docs, store_at("clean")).wait(timeout=120) == 0
    Store(store_at("both")).close()
    children = [run_child(docs, store_at("both")) for _ in range(2)]
    assert [c.wait(timeout=240) for c in children] == [0, 0]
    clean = snapshot(store_at("clean"))
    assert snapshot(store_at("both")) == clean
    assert Store(store_at("both")).info()["chunks"] == len(clean["chunks"])


def test_vectors_align_with_chunks_and_import_embeddings(tmp_path, store_at):
    write_corpus(tmp_path / "docs", 4)
    a = Store(store_at("a"))
    a.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="word2vec"), WORD)
    emb = a.embedder("word2vec")
    X = a.vectors(emb.name)
    np.testing.assert_allclose(X, emb.encode(a.chunks().texts), atol=1e-6)
    # from a store of the other backend too
    b = Store(tmp_path / "b") if isinstance(a, PgStore) else Store(store_at("b"))
    b.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="none"))
    assert b.import_embeddings(a) == len(X)
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


def test_a_beir_folder_ingests_its_corpus_and_leaves_out_its_queries(tmp_path, store_at):
    beir = tmp_path / "scifact"
    beir.mkdir()
    (beir / "corpus.jsonl").write_text(
        '{"_id": "d1", "title": "Aspirin", "text": "Aspirin lowers heart attack risk."}\n'
        '{"_id": "d2", "title": "Coffee", "text": "Coffee and mortality."}\n'
    )
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "Does aspirin help?"}\n')
    store = Store(store_at("store"))
    report = store.ingest([beir], SPLIT, StoreConfig(embedder="none"))
    assert report.stored == 2 and report.failed == []
    assert [f["path"] for f in report.left_out] == [str(beir / "queries.jsonl")]
    assert "name the file to ingest it" in report.left_out[0]["reason"]
    named = store.ingest([beir / "queries.jsonl"], SPLIT, StoreConfig(embedder="none"))
    assert named.stored == 1 and named.left_out == []


# --- issue 14: ingest loses nothing and names every failure ------------------------------------------------

NONE = StoreConfig(embedder="none")


def rows(path: Path, ids: list[str], topic: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f'{{"_id": "{i}", "text": "{topic} row {i}."}}\n' for i in ids))
    return path


def test_jsonl_rows_are_keyed_by_source_and_id(tmp_path, store_at):
    a = rows(tmp_path / "a.jsonl", ["1", "2", "3"], "Aspirin")
    b = rows(tmp_path / "b.jsonl", ["1", "2", "3"], "Coffee")
    store = Store(store_at("store"))
    report = store.ingest([a, b], SPLIT, NONE)
    # the same _id in two files is two documents: "stored 6" keeps 6
    assert report.stored == 6 and store.info()["documents"] == 6
    assert store.ingest([a, b], SPLIT, NONE).skipped == 6
    assert store.document("1", str(b.resolve())).text == "Coffee row 1."
    with pytest.raises(LookupError, match="several sources"):
        store.document("1")
    # one file repeating an _id would silently keep one of the two rows: the file fails, naming both lines
    rows(tmp_path / "c.jsonl", ["7", "8", "7"], "Sleep")
    failed = store.ingest([tmp_path / "c.jsonl"], SPLIT, NONE).failed
    assert [f["reason"] for f in failed] == ["line 3: _id '7' repeats line 1: one row per _id"]


def test_sources_are_absolute_and_prune_from_another_folder_removes_only_what_is_gone(
    tmp_path, monkeypatch, store_at
):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    paths = write_corpus(work / "docs", 2)
    rows(work / "rows.jsonl", ["r1", "r2"], "Aspirin")
    (elsewhere / "docs").mkdir(parents=True)  # a folder of the same name, holding other files
    (elsewhere / "docs" / "other.txt").write_text("Another file.")
    store = Store(store_at("store"))
    monkeypatch.chdir(work)
    assert store.ingest([Path("docs"), Path("rows.jsonl")], SPLIT, NONE).stored == 4
    sources = {s for (s,) in store.sql("SELECT source FROM documents")}
    assert sources == {str(p.resolve()) for p in [*paths, work / "rows.jsonl"]}
    monkeypatch.chdir(elsewhere)
    report = store.ingest([Path("docs")], SPLIT, StoreConfig(embedder="none", prune=True))
    # the relative names read from here would all be missing: nothing is, so nothing goes
    assert (report.stored, report.removed, report.not_pruned) == (1, 0, []) and store.info()["documents"] == 5
    paths[0].unlink()
    (work / "rows.jsonl").unlink()
    report = store.ingest([Path("docs")], SPLIT, StoreConfig(embedder="none", prune=True))
    assert report.removed == 3 and store.info()["documents"] == 2


@pytest.fixture
def deny(monkeypatch):
    """deny(folder): reading the folder and anything under it fails with EACCES. As root (who reads every
    folder whatever its mode) the OS's refusal is simulated at os.stat / os.scandir."""
    denied = []

    def deny(folder: Path) -> None:
        if os.geteuid() != 0:
            folder.chmod(0)
            denied.append(folder)
            return
        stat, scandir, name = os.stat, os.scandir, str(folder)

        def refuse(path, inside_only: bool) -> None:
            p = os.fsdecode(os.fspath(path))
            if p.startswith(name + os.sep) or (not inside_only and p == name):
                raise PermissionError(13, "Permission denied", p)

        monkeypatch.setattr(os, "stat", lambda p, *a, **k: (refuse(p, True), stat(p, *a, **k))[1])
        monkeypatch.setattr(os, "scandir", lambda p=".": (refuse(p, False), scandir(p))[1])

    yield deny
    for folder in denied:
        folder.chmod(0o755)


def test_a_missing_or_unreadable_path_is_a_named_failure_and_the_rest_goes_on(tmp_path, deny):
    write_corpus(tmp_path / "docs", 2)
    write_corpus(tmp_path / "private", 1)
    deny(tmp_path / "private")
    store = Store(tmp_path / "store")
    paths = [tmp_path / "nope.txt", tmp_path / "docs", tmp_path / "private" / "doc000.txt"]
    report = store.ingest(paths, SPLIT, NONE)
    assert report.stored == 2
    assert {f["path"]: f["reason"] for f in report.failed} == {
        str(tmp_path / "nope.txt"): "no such file or folder",
        str(tmp_path / "private" / "doc000.txt"): "unreadable: Permission denied",
    }


def test_links_and_unreadable_folders_in_a_walk_are_listed_as_failures(tmp_path, deny):
    docs = tmp_path / "docs"
    write_corpus(docs / "sub", 2)
    (docs / "loop").symlink_to(docs)  # a link back to a folder being walked
    (docs / "self.txt").symlink_to(docs / "self.txt")  # a link to itself
    (docs / "gone.md").symlink_to(tmp_path / "deleted.md")
    write_corpus(docs / "locked", 1)
    deny(docs / "locked")
    outside = write_corpus(tmp_path / "outside", 1)
    (docs / "linked").symlink_to(tmp_path / "outside")  # a link to a folder elsewhere is followed
    report = Store(tmp_path / "store").ingest([docs], SPLIT, NONE)
    assert report.stored == 3, report.failed
    assert {f["path"]: f["reason"] for f in report.failed} == {
        str(docs / "loop"): f"symlink loop: back to {docs}",
        str(docs / "self.txt"): "symlink loop",
        str(docs / "gone.md"): f"dangling symlink to {tmp_path / 'deleted.md'}",
        str(docs / "locked"): "unreadable folder: Permission denied",
    }
    assert outside[0].exists()


def test_a_file_name_that_is_not_utf8_is_ingested_searched_and_kept_by_prune(tmp_path, store_at):
    docs = tmp_path / "docs"
    docs.mkdir()
    name = os.fsencode(docs) + b"/caf\xe9 notes.txt"  # Latin-1: not valid UTF-8
    with open(name, "wb") as f:
        f.write(b"Notes about the cafe.")
    store = Store(store_at("store"))
    report = store.ingest([docs], SPLIT, StoreConfig(embedder="none", prune=True))
    assert (report.stored, report.failed, report.removed) == (1, [], 0)
    (doc_id,) = set(store.chunks().doc_ids)
    assert (
        doc_id == str(docs.resolve()) + "/caf\\xe9 notes.txt"
        and store.document(doc_id).title == "caf\\xe9 notes"
    )
    report = store.ingest([docs], SPLIT, StoreConfig(embedder="none", prune=True))
    assert (report.skipped, report.removed) == (1, 0)
    os.unlink(name)
    assert store.ingest([docs], SPLIT, StoreConfig(embedder="none", prune=True)).removed == 1


LAYOUT_1 = """
CREATE TABLE documents (
    doc_id TEXT PRIMARY KEY, source TEXT NOT NULL, content_hash TEXT NOT NULL, splitter TEXT NOT NULL,
    title TEXT NOT NULL, text TEXT NOT NULL, offsets BLOB, metadata TEXT NOT NULL, added REAL NOT NULL);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY, doc_id TEXT NOT NULL REFERENCES documents(doc_id) ON DELETE CASCADE,
    ord INTEGER NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL, text TEXT NOT NULL,
    content_hash TEXT NOT NULL);
CREATE INDEX chunks_doc ON chunks(doc_id);
"""


def test_a_store_keyed_by_doc_id_alone_is_migrated_keeping_everything(tmp_path, monkeypatch):
    """A store written before documents were keyed by (source, doc_id): its rows, chunk ids and embeddings are
    kept; a .jsonl it stored under a relative path, ingested again, replaces its rows instead of doubling them."""
    (tmp_path / "run").mkdir()
    # as the docs run `eval beir --corpus ../shared/data/scifact/corpus.jsonl`
    monkeypatch.chdir(tmp_path / "run")
    write_corpus(tmp_path / "docs", 2)
    rows(tmp_path / "data" / "corpus.jsonl", ["d1", "d2"], "Aspirin")
    new = Store(tmp_path / "new")
    new.ingest(
        [tmp_path / "docs", tmp_path / "data" / "corpus.jsonl"], SPLIT, StoreConfig(embedder="word2vec"), WORD
    )
    old = tmp_path / "old"
    old.mkdir()
    db = sqlite3.connect(old / "store.sqlite")
    db.executescript(LAYOUT_1)
    db.execute("ATTACH DATABASE ? AS new", (str(new.root / "store.sqlite"),))
    with db:  # the same content in layout 1, the .jsonl rows under the relative path ingest used to store
        db.execute(
            "INSERT INTO documents SELECT doc_id, CASE WHEN doc_id LIKE 'd_' THEN '../data/corpus.jsonl' "
            "ELSE source END, content_hash, splitter, title, text, offsets, metadata, added FROM new.documents"
        )
        db.execute(
            'INSERT INTO chunks SELECT id, doc_id, ord, start, "end", text, content_hash FROM new.chunks'
        )
        for table in ("embeddings", "meta", "indexes"):
            db.execute(f"CREATE TABLE {table} AS SELECT * FROM new.{table}")
    db.close()
    store = Store(old)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert store.info()["documents"] == 4 and store.chunks().ids.tolist() == new.chunks().ids.tolist()
    np.testing.assert_array_equal(
        store.vectors(store.embedder_name("word2vec")), new.vectors(new.embedder_name("word2vec"))
    )
    # a relative source cannot be checked from here: --prune keeps it and says so
    report = store.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="none", prune=True))
    assert (report.skipped, report.removed) == (2, 0)
    assert [f["source"] for f in report.not_pruned] == ["../data/corpus.jsonl"]
    report = store.ingest([Path("../data/corpus.jsonl")], SPLIT, NONE)
    assert report.stored == 2 and store.info()["documents"] == 4
    assert snapshot(store.root)["documents"] == snapshot(new.root)["documents"]
    assert Store(old).info()["documents"] == 4  # opening it again migrates nothing


def test_embedding_streams_the_missing_chunks_from_the_database(tmp_path, store_at):
    """Embedding reads the chunks that lack a vector a page at a time, never the whole chunk table (a 50 MB file
    is ~65,000 chunks): the same vectors, batch by batch."""
    write_corpus(tmp_path / "docs", 5)
    ref = Store(tmp_path / "ref")
    ref.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="word2vec"), WORD)
    emb = ref.embedder("word2vec")
    Store(store_at("s")).ingest([tmp_path / "docs"], SPLIT, NONE)
    store, steps = Store(store_at("s")), []
    assert store.missing_vectors(emb.name) == len(set(ref.chunks().hashes))
    n = store.embed(emb, batch_size=4, on_progress=lambda stage, done, total: steps.append((done, total)))
    assert store._chunks is None  # the chunk table was never loaded
    assert steps == [(0, n)] + [(min(i + 4, n), n) for i in range(0, n, 4)]  # the line opens at the start
    np.testing.assert_array_equal(store.vectors(emb.name), ref.vectors(emb.name))
    assert store.embed(emb, batch_size=4) == 0
