"""The store, ragseek's system of record. One interface (`Store`), two implementations: a folder holding a SQLite
database (WAL) and the indexes built from it (`SQLiteStore`, the embedded default), or a PostgreSQL schema with
pgvector (`PgStore`, rag/pgstore.py; `Store("postgresql://USER@HOST:PORT/DB?schema=NAME")`). The tables and their
keys are the same in both; what follows describes the SQLite one.

    DIR/store.sqlite   documents (source, id, content hash, cleaned text, raw offsets, metadata),
                       chunks (text, char offsets), embeddings (float32 blobs keyed by (embedder, chunk hash)),
                       meta (splitter, generation, word models), indexes (what was built at which generation)
                       and contexts (LLM-written chunk contexts keyed by (LLM, chunk hash): rag/contextual.py)
    DIR/bm25-*/        bm25s index files;  DIR/hnsw-*.faiss  faiss HNSW graphs;  DIR/models/*.npz  word vectors

Ingest is transactional per document and idempotent: a document whose content hash and splitter are unchanged is
skipped; a changed one has its chunks replaced in the same transaction; embeddings are cached by
(embedder name, chunk content hash), so re-ingesting unchanged text costs nothing. A `kill -9` at any moment leaves
every document either fully stored or absent, and embeddings that are missing are computed by the next run.
Every change bumps `generation`; an index built at an older generation is stale and is rebuilt on use.

A document is keyed by (source, doc_id): its canonical absolute file path, and the path again for a file or the
row's `_id` for a BEIR .jsonl (two files may both hold an `_id` "1"). A store written before that key (layout 1,
keyed by doc_id alone) is migrated when opened, in one transaction (`Store._migrate`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ragseek import progress
from ragseek.config import config_field as _f
from ragseek.config import require
from ragseek.errors import FileError, one_line
from ragseek.rag.documents import (
    Document,
    DocumentError,
    content_hash,
    display,
    find_files,
    load_file,
    source_paths,
)
from ragseek.rag.embedders import (
    Embedder,
    PooledWordEmbedder,
    SentenceTransformerEmbedder,
    WordVectorConfig,
    train_word_embedder,
)
from ragseek.rag.splitters import SplitterConfig, split

if TYPE_CHECKING:
    from ragseek.rag.search import ANNConfig

# PRAGMA user_version. 1 (stored as 0): documents keyed by doc_id alone; 2: by (source, doc_id)
SCHEMA_VERSION = 2
# offsets comes last: a zeroblob in a row's last column is not built in memory (add_document fills it in slices)
DOCUMENTS = """CREATE TABLE IF NOT EXISTS documents (
    source TEXT NOT NULL, doc_id TEXT NOT NULL, content_hash TEXT NOT NULL, splitter TEXT NOT NULL,
    title TEXT NOT NULL, metadata TEXT NOT NULL, added REAL NOT NULL, text TEXT NOT NULL, offsets BLOB,
    PRIMARY KEY (source, doc_id))"""
CHUNKS = """CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, doc_id TEXT NOT NULL, ord INTEGER NOT NULL,
    start INTEGER NOT NULL, "end" INTEGER NOT NULL, text TEXT NOT NULL, content_hash TEXT NOT NULL,
    FOREIGN KEY (source, doc_id) REFERENCES documents(source, doc_id) ON DELETE CASCADE)"""
SCHEMA = f"""
{DOCUMENTS};
{CHUNKS};
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(source, doc_id);
CREATE INDEX IF NOT EXISTS documents_id ON documents(doc_id);
CREATE TABLE IF NOT EXISTS embeddings (
    embedder TEXT NOT NULL, content_hash TEXT NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (embedder, content_hash));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS indexes (name TEXT PRIMARY KEY, generation INTEGER NOT NULL, built REAL NOT NULL);
CREATE TABLE IF NOT EXISTS contexts (
    llm TEXT NOT NULL, content_hash TEXT NOT NULL, context TEXT NOT NULL, PRIMARY KEY (llm, content_hash));
"""

EMBEDDER_KINDS = ("minilm", "word2vec", "glove", "none")


@dataclass
class StoreConfig:
    embedder: str = _f(
        "minilm",
        "minilm | word2vec | glove (trained on the store's chunks) | none | path to a sentence-transformers folder",
    )
    batch_size: int = _f(64, "texts per embedding batch (one transaction each)")
    prune: bool = _f(False, "remove stored documents whose file no longer exists")

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1 (texts per batch)")


@dataclass
class IngestReport:
    stored: int = 0
    skipped: int = 0
    # {"path", "reason"}: paths and files that could not be read, and files a folder walk left out on purpose
    failed: list[dict] = field(default_factory=list)
    left_out: list[dict] = field(default_factory=list)
    # {"source", "reason"}: with --prune, stored sources that could not be checked, so were kept
    not_pruned: list[dict] = field(default_factory=list)
    chunks: int = 0
    removed: int = 0
    embedded: int = 0
    seconds: float = 0.0

    def as_json(self) -> dict:
        return asdict(self)


@dataclass
class ChunkTable:
    """Every chunk, in id order: row i of an embedding matrix is chunk ids[i]."""

    ids: np.ndarray  # int64 (n,)
    doc_ids: list[str]
    sources: list[str]  # with doc_ids[i]: the document's key
    starts: np.ndarray
    ends: np.ndarray
    texts: list[str]
    hashes: list[str]


class Store:
    """The store's one interface. `Store(path)` opens (or creates) the SQLite store in folder `path` (`SQLiteStore`),
    `Store("postgresql://USER@HOST:PORT/DB?schema=NAME")` the PostgreSQL + pgvector store (`PgStore`,
    rag/pgstore.py): the constructor picks the implementation, as `pathlib.Path(...)` gives a PosixPath.

    Everything above the SQL is written once, here: ingest, the content-hash check, generations, embedding what is
    missing, the chunk table, contexts. An implementation supplies the connection, a write transaction (`_write`),
    the statements that differ (a document's rows, how a vector is stored) and, optionally, its own kNN (`knn`).
    SQL here is the dialect both speak: `?` placeholders, `INSERT ... ON CONFLICT`."""

    # the folder of the index files built from the store (BM25, faiss HNSW, word models): the SQLite store's own
    # folder; a local cache folder for PostgreSQL
    root: Path
    # the store as its user names it, in messages: the folder, or the URL without its password
    location: str
    # whether `knn` ranks in the store itself (then dense search never loads every vector)
    ranks_vectors: bool = False

    def __new__(cls, spec: str | Path | None = None, *args, **kwargs) -> Store:
        if cls is Store:
            cls = store_class(spec)
        return super().__new__(cls)

    # --- what an implementation supplies ------------------------------------------------------------------

    def sql(self, query: str, args: Sequence = ()) -> list[tuple]:
        """The rows of a read-only query (`?` placeholders), in either backend."""
        raise NotImplementedError

    def _write(self) -> contextlib.AbstractContextManager[None]:
        """A write transaction: committed when the block ends, rolled back on an error."""
        raise NotImplementedError

    def _exec(self, query: str, args: Sequence = ()) -> int:
        """Run one statement (inside `_write`); returns the rows it changed."""
        raise NotImplementedError

    def _exec_many(self, query: str, rows: Iterable[Sequence]) -> None:
        raise NotImplementedError

    def _replace_document(
        self, doc: Document, splitter: str, chunks: list, offsets: np.ndarray | None
    ) -> bool:
        """In one transaction: delete the stored (doc.source, doc.doc_id) and its chunks, insert `doc` and `chunks`,
        bump the generation. False when another writer stored this very version meanwhile (nothing written)."""
        raise NotImplementedError

    def _upsert_sql(self, table: str, columns: Sequence[str], keys: Sequence[str]) -> str:
        """An INSERT of `columns` (`?` each) into `table` that replaces the row holding the same `keys`."""
        raise NotImplementedError

    def _vector_param(self, v: np.ndarray):
        """A float32 vector as the embeddings table's `vector` column takes it."""
        raise NotImplementedError

    def _vector_value(self, value) -> np.ndarray:
        """The `vector` column's value as a float32 array."""
        raise NotImplementedError

    def knn(
        self, embedder_name: str, q: np.ndarray, k: int, metric: str, ann: ANNConfig | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """(chunk rows of `chunks()`, scores) of the k nearest chunks to each query vector, ranked by the store
        itself; None when it has no vector search of its own (the Searcher ranks `vectors()` with numpy/faiss)."""
        return None

    def close(self) -> None:
        raise NotImplementedError

    # --- meta -----------------------------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        rows = self.sql("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    def _set_meta(self, key: str, value: str) -> None:
        self._exec(self._upsert_sql("meta", ("key", "value"), ("key",)), (key, value))

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation", "0"))

    def _bump(self) -> None:
        """generation + 1, inside a write transaction (where SQLite has no other writer)."""
        self._set_meta("generation", str(self.generation + 1))

    def index_is_fresh(self, name: str) -> bool:
        rows = self.sql("SELECT generation FROM indexes WHERE name = ?", (name,))
        return bool(rows) and rows[0][0] == self.generation

    def mark_index(self, name: str) -> None:
        sql = self._upsert_sql("indexes", ("name", "generation", "built"), ("name",))
        self._exec(sql, (name, self.generation, time.time()))

    def _indexes(self) -> list[tuple[str, int]]:
        return self.sql("SELECT name, generation FROM indexes ORDER BY name")

    # --- documents ------------------------------------------------------------------------------------

    def add_document(self, doc: Document, splitter: SplitterConfig) -> int | None:
        """Store `doc` and its chunks in one transaction; None when it is already stored unchanged, else #chunks.
        The document is (doc.source, doc.doc_id): another file's row with the same `_id` is another document."""
        spl = json.dumps(asdict(splitter), sort_keys=True)
        if self._stored(doc, spl):
            return None
        chunks = split(doc.doc_id, doc.text, splitter)
        offsets = None if doc.offsets is None else np.ascontiguousarray(doc.offsets, dtype=np.int32)
        return len(chunks) if self._replace_document(doc, spl, chunks, offsets) else None

    def _stored(self, doc: Document, splitter: str) -> bool:
        """Whether this very version of `doc` (content hash and splitter) is stored. `_replace_document` asks again
        inside its transaction: another process may have stored it meanwhile, and is not to be replaced."""
        row = self.sql(
            "SELECT content_hash, splitter FROM documents WHERE source = ? AND doc_id = ?",
            (doc.source, doc.doc_id),
        )
        return bool(row) and row[0] == (doc.content_hash, splitter)

    def _chunk_rows(self, doc: Document, chunks: list) -> Iterator[tuple]:
        """The chunks table's rows of `doc` (less the id), for `_replace_document`."""
        for i, c in enumerate(chunks):
            yield doc.source, doc.doc_id, i, c.start, c.end, c.text, content_hash(c.text)

    def remove(self, doc_ids: Iterable[str]) -> int:
        """Delete the documents with these ids (from every source) and their chunks; returns how many."""
        ids = list(doc_ids)
        with self._write():
            n = sum(self._exec("DELETE FROM documents WHERE doc_id = ?", (d,)) for d in ids)
            if n:
                self._bump()
        return n

    def prune_missing(self) -> tuple[int, list[dict]]:
        """Remove the documents whose source file is really gone: no path it may name exists (`source_paths`;
        BEIR rows stay while their .jsonl exists). A source that cannot be checked (no permission on a folder on
        its path, or a relative path stored by an older ragseek) is kept and returned as {"source", "reason"}."""
        gone, kept = [], []
        for (source,) in self.sql("SELECT DISTINCT source FROM documents"):
            if not Path(source).is_absolute():
                reason = (
                    "a relative path, stored by an older ragseek: ingest its file again to store it absolute"
                )
                kept.append({"source": source, "reason": reason})
                continue
            states = [_exists(p) for p in source_paths(source)]
            if all(state is False for state in states):
                gone.append(source)
            elif True not in states:
                kept.append({"source": source, "reason": next(s for s in states if isinstance(s, str))})
        with self._write():
            n = sum(self._exec("DELETE FROM documents WHERE source = ?", (s,)) for s in gone)
            if n:
                self._bump()
        return n, kept

    def document(self, doc_id: str, source: str | None = None) -> Document:
        """The stored document `doc_id` (of `source`, needed only when two sources hold that id)."""
        where, args = (
            ("doc_id = ?", (doc_id,)) if source is None else ("source = ? AND doc_id = ?", (source, doc_id))
        )
        rows = self.sql(
            f"SELECT doc_id, text, source, title, metadata, offsets FROM documents WHERE {where} LIMIT 2",
            args,
        )
        if not rows:
            raise KeyError(f"no document {doc_id!r} in {self.location}")
        if len(rows) > 1:
            raise LookupError(
                f"{doc_id!r} names a document in several sources of {self.location} ({rows[0][2]}, "
                f"{rows[1][2]}, ...): pass its source"
            )
        row = rows[0]
        offsets = np.frombuffer(row[5], dtype=np.int32) if row[5] is not None else None
        return Document(row[0], row[1], row[2], title=row[3], metadata=json.loads(row[4]), offsets=offsets)

    def ingest(
        self,
        paths: list[Path] | list[str],
        splitter: SplitterConfig,
        cfg: StoreConfig,
        word_cfg: WordVectorConfig | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
    ) -> IngestReport:
        """Store every file under `paths` (one bad file is reported, never fatal), then embed what is missing."""
        t0 = time.time()
        report = IngestReport()
        files, report.left_out, report.failed = find_files(paths)
        if on_progress and files:  # the line counts from the first file's start
            on_progress("documents", 0, len(files))
        for n, path in enumerate(files):
            try:
                for doc in load_file(path):
                    added = self.add_document(doc, splitter)
                    if added is None:
                        report.skipped += 1
                    else:
                        report.stored += 1
                        report.chunks += added
            except DocumentError as e:
                report.failed.append({"path": display(path), "reason": str(e)})
            except OSError as e:
                report.failed.append({"path": display(path), "reason": f"unreadable: {e.strerror or e}"})
            # a loader's unexpected error (a library bug on an odd file) must not stop the rest
            except Exception as e:
                report.failed.append(
                    {"path": display(path), "reason": f"unreadable ({type(e).__name__}: {e})"}
                )
            if on_progress:
                on_progress("documents", n + 1, len(files))
        if cfg.prune:
            report.removed, report.not_pruned = self.prune_missing()
        # may need retraining even when no vector is missing
        word_model = cfg.embedder in ("word2vec", "glove")
        if cfg.embedder != "none" and (word_model or self.missing_vectors(self.embedder_name(cfg.embedder))):
            report.embedded = self.embed(
                self.embedder(cfg.embedder, cfg.batch_size, word_cfg), cfg.batch_size, on_progress
            )
        report.seconds = time.time() - t0
        return report

    def add_documents(self, docs: Iterable[Document], splitter: SplitterConfig) -> IngestReport:
        """Like ingest, for documents already loaded (a BEIR corpus); no embedding."""
        report = IngestReport()
        t0 = time.time()
        for doc in docs:
            added = self.add_document(doc, splitter)
            report.skipped += added is None
            report.stored += added is not None
            report.chunks += added or 0
        report.seconds = time.time() - t0
        return report

    # --- chunks and embeddings ------------------------------------------------------------------------

    def chunks(self) -> ChunkTable:
        """All chunks in id order (cached until the next change)."""
        if self._chunks is None or self._chunks[0] != self.generation:
            rows = self.sql(
                'SELECT id, doc_id, start, "end", text, content_hash, source FROM chunks ORDER BY id'
            )
            table = ChunkTable(
                ids=np.array([r[0] for r in rows], dtype=np.int64),
                doc_ids=[r[1] for r in rows],
                sources=[r[6] for r in rows],
                starts=np.array([r[2] for r in rows], dtype=np.int64),
                ends=np.array([r[3] for r in rows], dtype=np.int64),
                texts=[r[4] for r in rows],
                hashes=[r[5] for r in rows],
            )
            self._chunks = (self.generation, table)
        return self._chunks[1]

    def embedder(self, spec: str, batch_size: int = 64, word_cfg: WordVectorConfig | None = None) -> Embedder:
        """`minilm`, a sentence-transformers folder, or `word2vec` / `glove` trained on this store's chunks (reused
        while the chunks are unchanged, retrained when they change or `word_cfg` differs from the stored one)."""
        if spec in ("word2vec", "glove"):
            return self._word_embedder(spec, word_cfg)
        if spec == "none":
            raise ValueError(
                "embedder 'none' stores no vectors: ingest with --embedder minilm|word2vec|glove first"
            )
        with progress.task(f"loading the embedder ({spec})"):
            return SentenceTransformerEmbedder(None if spec == "minilm" else spec, batch_size=batch_size)

    def embedder_name(self, spec: str) -> str:
        """The name `embedder(spec)` would have, without loading a model (word models: the last one trained here)."""
        if spec in ("word2vec", "glove"):
            stored = json.loads(self.get_meta(f"word-model:{spec}", "null") or "null")
            if stored is None:
                raise LookupError(
                    f"no {spec} model in {self.location}: run `ragseek ingest ... --embedder {spec}`"
                )
            return stored["name"]
        return "minilm" if spec == "minilm" else f"st:{Path(spec).resolve().name}"

    def _word_embedder(self, kind: str, cfg: WordVectorConfig | None) -> PooledWordEmbedder:
        key = f"word-model:{kind}"
        stored = json.loads(self.get_meta(key, "null") or "null")
        if stored and (cfg is None or asdict(cfg) == stored["cfg"]):
            path = self.root / "models" / f"{stored['name']}.npz"
            if self.index_is_fresh(key) and path.exists():
                return PooledWordEmbedder.load(path)
        return self.train_word_model(
            kind, cfg or (WordVectorConfig(**stored["cfg"]) if stored else WordVectorConfig())
        )

    def train_word_model(self, kind: str, cfg: WordVectorConfig) -> PooledWordEmbedder:
        """Train `kind` (word2vec, glove) on this store's chunks, save it under DIR/models, make it the current one."""
        texts = self.chunks().texts
        with progress.task(f"training {kind} on {len(texts):,} chunks"):
            emb, key = train_word_embedder(kind, texts, cfg), f"word-model:{kind}"
        path = self.root / "models" / f"{emb.name}.npz"
        path.parent.mkdir(exist_ok=True)
        emb.save(path)
        with self._write():
            self._set_meta(key, json.dumps({"name": emb.name, "cfg": asdict(cfg)}))
            self.mark_index(key)
        return emb

    def embed(
        self,
        embedder: Embedder,
        batch_size: int = 64,
        on_progress: Callable[[str, int, int], None] | None = None,
        name: str | None = None,
        texts: list[str] | None = None,
    ) -> int:
        """Compute the embeddings missing for `embedder` (one transaction per batch); returns how many were new.
        The chunks are read from the database a page at a time (`_missing_chunks`), never all at once.

        `texts` (one per chunk, in `chunks()` order) are embedded instead of the chunks' own texts, stored under
        `name` instead of `embedder.name`, still keyed by the chunk's hash (contextual retrieval's context + chunk)."""
        name = name or embedder.name
        have = self._vector_hashes(name)
        if texts is None:
            total, todo = self.missing_vectors(name), self._missing_chunks(have)
        else:
            pairs = zip(self.chunks().hashes, texts, strict=True)
            missing = {h: t for h, t in pairs if h not in have}
            total, todo = len(missing), iter(missing.items())
        done = 0
        # the line counts from the first batch's start (a model's first call is slow)
        if on_progress and total:
            on_progress(f"embeddings ({name})", 0, total)
        while part := list(itertools.islice(todo, batch_size)):
            vecs = embedder.encode([t for _, t in part])
            with self._write():
                self._exec_many(
                    self._upsert_sql(
                        "embeddings", ("embedder", "content_hash", "vector"), ("embedder", "content_hash")
                    ),
                    [(name, h, self._vector_param(v)) for (h, _), v in zip(part, vecs, strict=True)],
                )
            done += len(part)
            if on_progress:
                on_progress(f"embeddings ({name})", done, total)
        return done

    def _missing_chunks(self, have: set[str], page: int = 4096) -> Iterator[tuple[str, str]]:
        """(hash, text) of each distinct chunk text whose hash is not in `have`, in chunk id order, read `page`
        rows at a time (each page fetched whole, so the batches committed in between never meet an open cursor)."""
        seen, last = set(have), 0
        while rows := self.sql(
            "SELECT id, content_hash, text FROM chunks WHERE id > ? ORDER BY id LIMIT ?", (last, page)
        ):
            for _, h, text in rows:
                if h not in seen:
                    seen.add(h)
                    yield h, text
            last = rows[-1][0]

    def _vector_hashes(self, name: str) -> set[str]:
        return {h for (h,) in self.sql("SELECT content_hash FROM embeddings WHERE embedder = ?", (name,))}

    def missing_vectors(self, embedder_name: str) -> int:
        """How many distinct chunk texts have no vector from `embedder_name` (no model is loaded to tell)."""
        return self.sql(
            "SELECT COUNT(DISTINCT content_hash) FROM chunks WHERE content_hash NOT IN "
            "(SELECT content_hash FROM embeddings WHERE embedder = ?)",
            (embedder_name,),
        )[0][0]

    def vectors(self, embedder_name: str) -> np.ndarray:
        """float32 (n_chunks, d), row i for chunk `chunks().ids[i]`; errors if some chunk has no vector yet."""
        table = self.chunks()
        want = set(table.hashes)
        found = {h: v for h, v in self.embeddings(embedder_name).items() if h in want}
        if len(want) > len(found):
            raise self._no_vectors(embedder_name, len(want) - len(found))
        if not table.hashes:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([found[h] for h in table.hashes])

    def require_vectors(self, embedder_name: str) -> None:
        """The LookupError `vectors` raises when some chunk has no vector, without reading the vectors."""
        missing = self.missing_vectors(embedder_name)
        if missing:
            raise self._no_vectors(embedder_name, missing)

    def _no_vectors(self, embedder_name: str, missing: int) -> LookupError:
        spec = (
            f"PATH/TO/{embedder_name[3:]}" if embedder_name.startswith("st:") else embedder_name.split("-")[0]
        )
        return LookupError(
            f"{missing} chunks have no {embedder_name!r} embedding in {self.location}: "
            f"run `ragseek ingest ... --store {self.location} --embedder {spec}`"
        )

    def embeddings(self, embedder_name: str) -> dict[str, np.ndarray]:
        """Every stored vector of `embedder_name`, by chunk content hash (those of chunks gone included)."""
        return {
            h: self._vector_value(v)
            for h, v in self.sql(
                "SELECT content_hash, vector FROM embeddings WHERE embedder = ?", (embedder_name,)
            )
        }

    def import_embeddings(self, other: str | Path | Store) -> int:
        """Copy another store's cached embeddings (same (embedder, chunk hash) keys; either backend) into this one;
        returns how many were new here."""
        src = other if isinstance(other, Store) else Store(other)
        names = [n for (n,) in src.sql("SELECT DISTINCT embedder FROM embeddings")]
        before = self.sql("SELECT COUNT(*) FROM embeddings")[0][0]
        for name in names:
            with self._write():
                self._exec_many(
                    "INSERT INTO embeddings(embedder, content_hash, vector) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    [(name, h, self._vector_param(v)) for h, v in src.embeddings(name).items()],
                )
        return self.sql("SELECT COUNT(*) FROM embeddings")[0][0] - before

    def contexts(self, llm_name: str) -> dict[str, str]:
        """The chunk contexts `llm_name` wrote (contextual retrieval, rag/contextual.py), by chunk content hash."""
        return dict(self.sql("SELECT content_hash, context FROM contexts WHERE llm = ?", (llm_name,)))

    def put_contexts(self, llm_name: str, contexts: Iterable[tuple[str, str]]) -> None:
        """Store (chunk hash, context) pairs written by `llm_name`, in one transaction."""
        with self._write():
            self._exec_many(
                self._upsert_sql("contexts", ("llm", "content_hash", "context"), ("llm", "content_hash")),
                [(llm_name, h, c) for h, c in contexts],
            )

    def info(self) -> dict:
        count = lambda sql: self.sql(sql)[0][0]  # noqa: E731
        embedders = dict(self.sql("SELECT embedder, COUNT(*) FROM embeddings GROUP BY embedder"))
        indexes = [{"name": n, "generation": g, "fresh": g == self.generation} for n, g in self._indexes()]
        return {
            "store": self.location,
            "documents": count("SELECT COUNT(*) FROM documents"),
            "chunks": count("SELECT COUNT(*) FROM chunks"),
            "generation": self.generation,
            "embedders": embedders,
            "indexes": indexes,
        }


# what to do with a store.sqlite that SQLite cannot read
DAMAGED = "restore it from a backup, or ingest the documents again into a new store"


class SQLiteStore(Store):
    """The embedded store: one folder, one SQLite database (WAL) beside its index files."""

    def __init__(self, root: str | Path, check: bool | None = None) -> None:
        """Open (or create) the store in folder `root`. Unless `check` is False (default: unless
        RAGSEEK_STORE_CHECK=0), SQLite's `PRAGMA quick_check` runs first, so that a damaged database is reported
        (a FileError naming it), never searched or written to: it reads every page, about 7 ms for a store of
        2,000 chunks with MiniLM-sized vectors (13 MB; bench/bench_errors.py)."""
        self.root = Path(root)
        self.location = str(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "store.sqlite"
        if check is None:
            check = os.environ.get("RAGSEEK_STORE_CHECK", "1") != "0"
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        try:
            if check:
                self._quick_check(path)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a killed process
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            self.db.executescript(SCHEMA)
            if self.db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except (sqlite3.DatabaseError, FileError) as e:
            self.db.close()
            # a busy or locked database is no damage (the 30 s timeout ran out): that error goes on as it is
            if isinstance(e, FileError) or e.sqlite_errorname in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                raise
            raise FileError(path, f"not a readable SQLite store ({one_line(e)})", DAMAGED) from e
        self._chunks: tuple[int, ChunkTable] | None = None

    def _quick_check(self, path: Path) -> None:
        """SQLite's quick_check: every page of every table and index read and its structure checked (not that
        an index matches its table: that is integrity_check, no faster on a store). A FileError unless 'ok'."""
        try:
            problems = [row[0] for row in self.db.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as e:
            if e.sqlite_errorname != "SQLITE_CORRUPT":
                raise
            problems = [str(e)]
        if problems != ["ok"]:
            # one problem a line, under a "*** in database main ***" header
            lines = [
                line for row in problems for line in row.splitlines() if line.strip()[:3] not in ("", "***")
            ]
            more = f", and {len(lines) - 1} more" if len(lines) > 1 else ""
            raise FileError(path, f"fails SQLite's quick_check ({one_line(lines[0])}{more})", DAMAGED)

    def _migrate(self) -> None:
        """Bring a store of layout 1 (documents keyed by doc_id alone) to (source, doc_id) keys, in one transaction
        that keeps every document, chunk id and embedding; a store from a newer ragseek is refused."""
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"{self.root / 'store.sqlite'}: written by a newer ragseek (store layout {version}; this one "
                f"reads {SCHEMA_VERSION}): upgrade ragseek"
            )
        old = self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'documents'")
        if version == SCHEMA_VERSION or old.fetchone() is None:
            return
        # the tables are renamed and copied: no cascade meanwhile
        self.db.execute("PRAGMA foreign_keys=OFF")
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                # another process migrated it first
                if self.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                    return
                for sql in (
                    "DROP INDEX IF EXISTS chunks_doc",
                    "ALTER TABLE documents RENAME TO documents_v1",
                    "ALTER TABLE chunks RENAME TO chunks_v1",
                    DOCUMENTS,
                    CHUNKS,
                    "INSERT INTO documents SELECT source, doc_id, content_hash, splitter, title, metadata, added, "
                    "text, offsets FROM documents_v1",
                    'INSERT INTO chunks SELECT c.id, d.source, c.doc_id, c.ord, c.start, c."end", c.text, '
                    "c.content_hash FROM chunks_v1 c JOIN documents_v1 d ON d.doc_id = c.doc_id",
                    "DROP TABLE chunks_v1",
                    "DROP TABLE documents_v1",
                    f"PRAGMA user_version = {SCHEMA_VERSION}",
                ):
                    self.db.execute(sql)
        finally:
            self.db.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        self.db.close()

    def sql(self, query: str, args: Sequence = ()) -> list[tuple]:
        return self.db.execute(query, args).fetchall()

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        # BEGIN ... COMMIT, ROLLBACK on error; IMMEDIATE: the write lock is taken at once, so a writer never fails
        # to upgrade a read lock half-way
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            yield

    def _exec(self, query: str, args: Sequence = ()) -> int:
        return self.db.execute(query, args).rowcount

    def _exec_many(self, query: str, rows: Iterable[Sequence]) -> None:
        self.db.executemany(query, rows)

    def _upsert_sql(self, table: str, columns: Sequence[str], keys: Sequence[str]) -> str:
        return (
            f"INSERT OR REPLACE INTO {table}({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        )

    def _vector_param(self, v: np.ndarray) -> bytes:
        return v.astype(np.float32).tobytes()

    def _vector_value(self, value: bytes) -> np.ndarray:
        return np.frombuffer(value, dtype=np.float32)

    def _replace_document(
        self, doc: Document, splitter: str, chunks: list, offsets: np.ndarray | None
    ) -> bool:
        key = (doc.source, doc.doc_id)
        size = None if offsets is None else offsets.nbytes
        with self._write():
            if self._stored(doc, splitter):
                return False
            # cascades to its chunks
            self.db.execute("DELETE FROM documents WHERE source = ? AND doc_id = ?", key)
            self._drop_relative_twin(doc)
            row_id = self.db.execute(
                "INSERT INTO documents(source, doc_id, content_hash, splitter, title, text, offsets, metadata, "
                "added) VALUES (?1, ?2, ?3, ?4, ?5, ?6, CASE WHEN ?7 IS NULL THEN NULL ELSE zeroblob(?7) END, ?8, ?9)",
                (*key, doc.content_hash, splitter, doc.title, doc.text, size, json.dumps(doc.metadata), time.time()),
            ).lastrowid  # fmt: skip
            # the offsets are written in slices: a large document's map is never copied whole
            if size:
                with self.db.blobopen("documents", "offsets", row_id) as blob:
                    for i in range(0, len(offsets), 1 << 20):
                        blob.write(offsets[i : i + (1 << 20)].tobytes())
            self.db.executemany(
                'INSERT INTO chunks(source, doc_id, ord, start, "end", text, content_hash) '
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                self._chunk_rows(doc, chunks),
            )
            self._bump()
        return True

    def _drop_relative_twin(self, doc: Document) -> None:
        """Delete the row an older ragseek stored for the same document under a relative source (a .jsonl named
        `../data/corpus.jsonl`, now `/abs/data/corpus.jsonl`): the relative path, less its leading `..`, is a tail
        of the new source."""
        rows = self.db.execute(
            "SELECT source FROM documents WHERE doc_id = ? AND source != ?", (doc.doc_id, doc.source)
        ).fetchall()
        for (source,) in rows:
            tail = tuple(itertools.dropwhile(lambda part: part == "..", Path(os.path.normpath(source)).parts))
            if not Path(source).is_absolute() and tail and Path(doc.source).parts[-len(tail) :] == tail:
                self.db.execute("DELETE FROM documents WHERE source = ? AND doc_id = ?", (source, doc.doc_id))


URL = "postgresql://USER@HOST:PORT/DB?schema=NAME"


def store_class(spec: str | Path | None) -> type[Store]:
    """SQLiteStore for a folder, PgStore for a postgresql:// (or postgres://) URL; any other URL is refused."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):/", str(spec))
    if scheme is None:
        return SQLiteStore
    if scheme[1].lower() in ("postgresql", "postgres"):
        from ragseek.rag.pgstore import PgStore

        return PgStore
    raise ValueError(f"{spec}: not a store: give a folder (SQLite), or a PostgreSQL URL {URL}")


def open_store(spec: str | Path) -> Store:
    """The store already at `spec` (a folder or a postgresql:// URL), for the commands that read one: nothing is
    created, and where nothing was ingested yet (a folder without store.sqlite, a schema without the store's
    tables) a LookupError names the `ragseek ingest` to run."""
    if store_class(spec) is SQLiteStore:
        if not (Path(spec) / "store.sqlite").exists():
            raise LookupError(
                f"{spec} is not a store: run `ragseek ingest PATH --store {spec}` first (it has no store.sqlite)"
            )
        return SQLiteStore(spec)
    return Store(spec, create=False)


def _exists(path: Path) -> bool | str:
    """True, False (really gone: missing, or a parent is no folder), or why it cannot be told."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        return f"cannot check it: {e.strerror}"
    return True
