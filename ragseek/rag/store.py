"""The store, ragseek's system of record: one folder holding a SQLite database (WAL) and the indexes built from it.

    DIR/store.sqlite   documents (id, source, content hash, cleaned text, raw offsets, metadata),
                       chunks (text, char offsets), embeddings (float32 blobs keyed by (embedder, chunk hash)),
                       meta (splitter, generation, word models), indexes (what was built at which generation)
                       and contexts (LLM-written chunk contexts keyed by (LLM, chunk hash): rag/contextual.py)
    DIR/bm25-*/        bm25s index files;  DIR/hnsw-*.faiss  faiss HNSW graphs;  DIR/models/*.npz  word vectors

Ingest is transactional per document and idempotent: a document whose content hash and splitter are unchanged is
skipped; a changed one has its chunks replaced in the same transaction; embeddings are cached by
(embedder name, chunk content hash), so re-ingesting unchanged text costs nothing. A `kill -9` at any moment leaves
every document either fully stored or absent, and embeddings that are missing are computed by the next run.
Every change bumps `generation`; an index built at an older generation is stale and is rebuilt on use.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ragseek.config import config_field as _f
from ragseek.config import require
from ragseek.rag.documents import Document, DocumentError, content_hash, find_files, load_file
from ragseek.rag.embedders import (
    Embedder,
    PooledWordEmbedder,
    SentenceTransformerEmbedder,
    WordVectorConfig,
    train_word_embedder,
)
from ragseek.rag.splitters import SplitterConfig, split

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY, source TEXT NOT NULL, content_hash TEXT NOT NULL, splitter TEXT NOT NULL,
    title TEXT NOT NULL, text TEXT NOT NULL, offsets BLOB, metadata TEXT NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, doc_id TEXT NOT NULL REFERENCES documents(doc_id) ON DELETE CASCADE,
    ord INTEGER NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL, text TEXT NOT NULL,
    content_hash TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
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
    # {"path", "reason"}: files that could not be read, and files a folder walk left out on purpose
    failed: list[dict] = field(default_factory=list)
    left_out: list[dict] = field(default_factory=list)
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
    starts: np.ndarray
    ends: np.ndarray
    texts: list[str]
    hashes: list[str]


class Store:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / "store.sqlite", isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a killed process
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self._chunks: tuple[int, ChunkTable] | None = None

    def close(self) -> None:
        self.db.close()

    # --- meta -----------------------------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation", "0"))

    def _bump(self) -> None:
        self._set_meta("generation", str(self.generation + 1))

    def index_is_fresh(self, name: str) -> bool:
        row = self.db.execute("SELECT generation FROM indexes WHERE name = ?", (name,)).fetchone()
        return row is not None and row[0] == self.generation

    def mark_index(self, name: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO indexes(name, generation, built) VALUES (?, ?, ?)",
            (name, self.generation, time.time()),
        )

    # --- documents ------------------------------------------------------------------------------------

    def add_document(self, doc: Document, splitter: SplitterConfig) -> int | None:
        """Store `doc` and its chunks in one transaction; None when it is already stored unchanged, else #chunks."""
        spl = json.dumps(asdict(splitter), sort_keys=True)
        row = self.db.execute(
            "SELECT content_hash, splitter FROM documents WHERE doc_id = ?", (doc.doc_id,)
        ).fetchone()
        if row == (doc.content_hash, spl):
            return None
        chunks = split(doc.doc_id, doc.text, splitter)
        offsets = doc.offsets.astype(np.int32).tobytes() if doc.offsets is not None else None
        with self.db:  # BEGIN ... COMMIT, ROLLBACK on error
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM documents WHERE doc_id = ?", (doc.doc_id,))  # cascades to its chunks
            self.db.execute(
                "INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (doc.doc_id, doc.source, doc.content_hash, spl, doc.title, doc.text, offsets,
                 json.dumps(doc.metadata), time.time()),
            )  # fmt: skip
            self.db.executemany(
                'INSERT INTO chunks(doc_id, ord, start, "end", text, content_hash) VALUES (?, ?, ?, ?, ?, ?)',
                [(doc.doc_id, i, c.start, c.end, c.text, content_hash(c.text)) for i, c in enumerate(chunks)],
            )
            self._bump()
        return len(chunks)

    def remove(self, doc_ids: Iterable[str]) -> int:
        ids = list(doc_ids)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            n = sum(self.db.execute("DELETE FROM documents WHERE doc_id = ?", (d,)).rowcount for d in ids)
            if n:
                self._bump()
        return n

    def prune_missing(self) -> int:
        """Remove documents whose source file is gone (BEIR rows count as present while their .jsonl exists)."""
        sources = self.db.execute("SELECT DISTINCT source FROM documents").fetchall()
        gone = [s for (s,) in sources if not Path(s).exists()]
        ids = [
            d for s in gone for (d,) in self.db.execute("SELECT doc_id FROM documents WHERE source = ?", (s,))
        ]
        return self.remove(ids)

    def document(self, doc_id: str) -> Document:
        row = self.db.execute(
            "SELECT doc_id, text, source, title, metadata, offsets FROM documents WHERE doc_id = ?", (doc_id,)
        ).fetchone()
        if row is None:
            raise KeyError(f"no document {doc_id!r} in {self.root}")
        offsets = np.frombuffer(row[5], dtype=np.int32) if row[5] is not None else None
        return Document(row[0], row[1], row[2], title=row[3], metadata=json.loads(row[4]), offsets=offsets)

    def ingest(
        self,
        paths: list[Path],
        splitter: SplitterConfig,
        cfg: StoreConfig,
        word_cfg: WordVectorConfig | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
    ) -> IngestReport:
        """Store every file under `paths` (one bad file is reported, never fatal), then embed what is missing."""
        t0 = time.time()
        report = IngestReport()
        files, report.left_out = find_files(paths)
        for n, path in enumerate(files):
            try:
                for doc in load_file(path):
                    added = self.add_document(doc, splitter)
                    if added is None:
                        report.skipped += 1
                    else:
                        report.stored += 1
                        report.chunks += added
            except (DocumentError, OSError) as e:
                report.failed.append({"path": str(path), "reason": str(e)})
            # a loader's unexpected error (a library bug on an odd file) must not stop the rest
            except Exception as e:
                report.failed.append({"path": str(path), "reason": f"unreadable ({type(e).__name__}: {e})"})
            if on_progress:
                on_progress("documents", n + 1, len(files))
        if cfg.prune:
            report.removed = self.prune_missing()
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
            rows = self.db.execute(
                'SELECT id, doc_id, start, "end", text, content_hash FROM chunks ORDER BY id'
            ).fetchall()
            table = ChunkTable(
                ids=np.array([r[0] for r in rows], dtype=np.int64),
                doc_ids=[r[1] for r in rows],
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
        return SentenceTransformerEmbedder(None if spec == "minilm" else spec, batch_size=batch_size)

    def embedder_name(self, spec: str) -> str:
        """The name `embedder(spec)` would have, without loading a model (word models: the last one trained here)."""
        if spec in ("word2vec", "glove"):
            stored = json.loads(self.get_meta(f"word-model:{spec}", "null") or "null")
            if stored is None:
                raise LookupError(
                    f"no {spec} model in {self.root}: run `ragseek ingest ... --embedder {spec}`"
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
        emb, key = train_word_embedder(kind, self.chunks().texts, cfg), f"word-model:{kind}"
        path = self.root / "models" / f"{emb.name}.npz"
        path.parent.mkdir(exist_ok=True)
        emb.save(path)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
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

        `texts` (one per chunk, in `chunks()` order) are embedded instead of the chunks' own texts, stored under
        `name` instead of `embedder.name`, still keyed by the chunk's hash (contextual retrieval's context + chunk)."""
        name = name or embedder.name
        have = self._vector_hashes(name)
        table = self.chunks()
        pairs = zip(table.hashes, table.texts if texts is None else texts, strict=True)
        todo = list({h: t for h, t in pairs if h not in have}.items())
        for s in range(0, len(todo), batch_size):
            part = todo[s : s + batch_size]
            vecs = embedder.encode([t for _, t in part])
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.executemany(
                    "INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)",
                    [(name, h, v.astype(np.float32).tobytes()) for (h, _), v in zip(part, vecs, strict=True)],
                )
            if on_progress:
                on_progress(f"embeddings ({name})", s + len(part), len(todo))
        return len(todo)

    def _vector_hashes(self, name: str) -> set[str]:
        return {
            h for (h,) in self.db.execute("SELECT content_hash FROM embeddings WHERE embedder = ?", (name,))
        }

    def missing_vectors(self, embedder_name: str) -> int:
        """How many distinct chunk texts have no vector from `embedder_name` (no model is loaded to tell)."""
        return len(set(self.chunks().hashes) - self._vector_hashes(embedder_name))

    def vectors(self, embedder_name: str) -> np.ndarray:
        """float32 (n_chunks, d), row i for chunk `chunks().ids[i]`; errors if some chunk has no vector yet."""
        table = self.chunks()
        want = set(table.hashes)
        found = {
            h: np.frombuffer(v, dtype=np.float32)
            for h, v in self.db.execute(
                "SELECT content_hash, vector FROM embeddings WHERE embedder = ?", (embedder_name,)
            )
            if h in want
        }
        missing = len(want) - len(found)
        if missing:
            spec = (
                f"PATH/TO/{embedder_name[3:]}"
                if embedder_name.startswith("st:")
                else embedder_name.split("-")[0]
            )
            raise LookupError(
                f"{missing} chunks have no {embedder_name!r} embedding in {self.root}: "
                f"run `ragseek ingest ... --store {self.root} --embedder {spec}`"
            )
        if not table.hashes:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([found[h] for h in table.hashes])

    def import_embeddings(self, other: Path) -> int:
        """Copy another store's cached embeddings (same (embedder, chunk hash) keys) into this one."""
        self.db.execute("ATTACH DATABASE ? AS other", (str(Path(other) / "store.sqlite"),))
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                n = self.db.execute(
                    "INSERT OR IGNORE INTO embeddings SELECT * FROM other.embeddings"
                ).rowcount
        finally:
            self.db.execute("DETACH DATABASE other")
        return n

    def info(self) -> dict:
        count = lambda sql: self.db.execute(sql).fetchone()[0]  # noqa: E731
        embedders = dict(
            self.db.execute("SELECT embedder, COUNT(*) FROM embeddings GROUP BY embedder").fetchall()
        )
        indexes = [
            {"name": n, "generation": g, "fresh": g == self.generation}
            for n, g in self.db.execute("SELECT name, generation FROM indexes ORDER BY name")
        ]
        return {
            "store": str(self.root),
            "documents": count("SELECT COUNT(*) FROM documents"),
            "chunks": count("SELECT COUNT(*) FROM chunks"),
            "generation": self.generation,
            "embedders": embedders,
            "indexes": indexes,
        }
