"""Errors a user can act on (ragseek/errors.py): a broken file that any command reads is one line naming the file and
what is wrong, exit code 2; `ragseek --debug` (or RAGSEEK_DEBUG=1) shows the traceback instead."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragseek.cli import app
from ragseek.defaults import smollm2_gguf

runner = CliRunner()
DATA = Path(__file__).parent / "rag" / "data"
SQUAD = DATA / "squad-slice.json"


def cut(src: Path, dst: Path, frac: float = 0.5) -> Path:
    """`dst`: the first `frac` of `src`'s bytes (a download or a copy that stopped half way)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * frac)])
    return dst


def damage_page(db_path: Path, name: str) -> None:
    """Fill the root page of table or index `name` with 0xff bytes (one page a disk or a copy damaged)."""
    db = sqlite3.connect(db_path)
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()
    db.close()
    with open(db_path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * page_size)


def make_broken(tmp: Path, model: Path) -> dict[str, Path]:
    """One broken file of each kind a command reads, beside intact ones to pair them with (a store, the model
    folder `model`, data). bench/bench_errors.py runs the same probes as real processes, before and now."""
    from ragseek.rag.splitters import SplitterConfig
    from ragseek.rag.store import Store, StoreConfig

    f = {"model": model, "gguf": cut(smollm2_gguf(), tmp / "cut.gguf")}
    for kind, name in (
        ("safetensors", "model.safetensors"),
        ("config", "config.json"),
        ("tokenizer", "tokenizer.json"),
    ):
        f[kind] = shutil.copytree(model, tmp / f"{kind}-cut")
        cut(model / name, f[kind] / name)
    docs = tmp / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"d{i}.md").write_text(f"# Note {i}\n\n" + f"Foxes eat berries and mice, note {i}. " * 60)
    f["store"] = tmp / "store"
    st = Store(f["store"])
    st.ingest([docs], SplitterConfig(), StoreConfig(embedder="none"))
    # the last connection writes the WAL back into store.sqlite
    st.close()
    f["store_garbage"] = tmp / "store-garbage"
    f["store_garbage"].mkdir()
    (f["store_garbage"] / "store.sqlite").write_bytes(os.urandom(64 * 1024))
    f["store_cut"] = tmp / "store-cut"
    cut(f["store"] / "store.sqlite", f["store_cut"] / "store.sqlite")
    f["store_page"] = shutil.copytree(f["store"], tmp / "store-page")
    damage_page(f["store_page"] / "store.sqlite", "chunks_doc")
    f["yaml"] = tmp / "bad.yaml"
    f["yaml"].write_text("k: [1, 2\nretriever: bm25\n")
    f["sft_data"] = tmp / "sft.jsonl"
    f["sft_data"].write_text(json.dumps({"prompt": "2+2?", "response": "4"}) + "\n")
    f["math_data"] = tmp / "math.jsonl"
    f["math_data"].write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    f["out"] = tmp / "runs"
    return f


@pytest.fixture(scope="module")
def broken(tmp_path_factory, make_tiny_llm) -> dict[str, Path]:
    return make_broken(tmp_path_factory.mktemp("broken"), make_tiny_llm("errors-model", max_seq_len=512))


ASK = ["ask", "what do foxes eat?", "--retriever", "bm25", "--min-similarity", "-1"]
QA = ["eval", "qa", "--data", str(SQUAD), "--n", "1", "--embedder", "none", "--retriever", "bm25"]
BEIR = ["eval", "beir", "--corpus", str(DATA / "beir" / "corpus.jsonl"), "--retriever", "bm25"]
BEIR += ["--queries", str(DATA / "beir" / "queries.jsonl"), "--qrels", str(DATA / "beir" / "qrels.tsv")]
SFT = ["train", "sft", "--set", "data=@sft_data", "--set", "loop.max_steps=1", "--set", "batch_size=1"]
# (command, the broken file it reads): MODEL is a GGUF cut in half, or a folder whose model.safetensors is cut in
# half, or whose config.json or tokenizer.json is torn; STORE a store.sqlite of random bytes or one cut in half
MODEL_READERS = {
    "generate": ["generate", "hi", "--model", "MODEL", "--max-new-tokens", "2"],
    "ask": [*ASK, "--store", "@store", "--llm", "local:MODEL"],
    "serve": ["serve", "--llm", "local:MODEL"],
    "eval math": ["eval", "math", "--data", "@math_data", "--model", "MODEL"],
    "eval qa": [*QA, "--llm", "local:MODEL"],
    "train sft": [*SFT, "--set", "model=MODEL", "--out", "@out"],
}
STORE_READERS = {
    "search": ["search", "foxes", "--retriever", "bm25", "--store", "STORE"],
    "ask": [*ASK, "--store", "STORE"],
    "info": ["info", "--store", "STORE"],
    "ingest": ["ingest", str(DATA / "beir" / "corpus.jsonl"), "--embedder", "none", "--store", "STORE"],
    "eval qa": [*QA, "--store", "STORE"],
    "eval beir": [*BEIR, "--store", "STORE"],
}
YAML_READERS = {
    "search": ["search", "foxes", "--store", "@store"],
    "ask": [*ASK, "--store", "@store"],
    "ingest": ["ingest", str(DATA / "beir" / "corpus.jsonl"), "--store", "@store"],
    "generate": ["generate", "hi"],
    "serve": ["serve"],
    "eval qa": QA,
    "eval beir": BEIR,
    "eval math": ["eval", "math", "--data", "@math_data"],
    "data reader": ["data", "reader", "--squad", str(SQUAD)],
    "train sft": ["train", "sft"],
}


# what is broken in each: a GGUF cut in half; a model folder whose model.safetensors is cut in half, or whose
# config.json or tokenizer.json is; a store.sqlite of random bytes, cut in half, or with a damaged index page
MODEL_KINDS = {
    "gguf": "",
    "safetensors": "model.safetensors",
    "config": "config.json",
    "tokenizer": "tokenizer.json",
}
STORE_KINDS = ("store_garbage", "store_cut", "store_page")


def named(f: dict[str, Path], kind: str) -> Path:
    """The broken file of `kind`, which the error must name."""
    if kind in STORE_KINDS:
        return f[kind] / "store.sqlite"
    return f[kind] / MODEL_KINDS[kind] if MODEL_KINDS.get(kind) else f[kind]


def fill(f: dict[str, Path], template: list[str], **names: Path) -> list[str]:
    """`template` with @name replaced by the path of broken[name], and each of `names` by its path."""
    names |= {f"@{k}": v for k, v in f.items()}
    out = []
    for a in template:
        for name in sorted(names, key=len, reverse=True):
            a = a.replace(name, str(names[name]))
        out.append(a)
    return out


def assert_one_line(result, path: Path) -> None:
    """Exit 2, and on stderr one line, `error: ...`, naming `path`; no traceback. (`ragseek serve` prints its
    limits, `ragseek serve: ...`, before it loads the model.)"""
    assert result.exit_code == 2, (result.exit_code, result.output, repr(result.exception))
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("ragseek serve:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(path) in lines[0] and "Traceback" not in result.output, result.stderr


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
@pytest.mark.parametrize("command", list(MODEL_READERS))
def test_a_broken_model_file_is_one_line_naming_it(broken, monkeypatch, tmp_path, command, kind):
    monkeypatch.setenv("RAGSEEK_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, fill(broken, MODEL_READERS[command], MODEL=broken[kind]))
    assert_one_line(result, named(broken, kind))


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("command", list(STORE_READERS))
def test_a_broken_store_is_one_line_naming_it(broken, monkeypatch, tmp_path, command, kind):
    """A store that is not SQLite, is cut short, or fails quick_check: reported, never searched or written to."""
    monkeypatch.setenv("RAGSEEK_CACHE", str(tmp_path / "cache"))
    store = shutil.copytree(broken[kind], tmp_path / "store")
    result = runner.invoke(app, fill(broken, STORE_READERS[command], STORE=store))
    assert_one_line(result, store / "store.sqlite")


@pytest.mark.parametrize("name", ["chunks", "chunks_doc"])
def test_a_store_that_fails_quick_check_is_reported_not_searched(broken, tmp_path, monkeypatch, name):
    """One damaged page of a table or an index: before, `Store` opened it and a BM25 search answered from the
    readable pages. RAGSEEK_STORE_CHECK=0 skips the check (a store too large to read on every open)."""
    from ragseek.errors import FileError
    from ragseek.rag.store import Store

    store = shutil.copytree(broken["store"], tmp_path / "s")
    damage_page(store / "store.sqlite", name)
    with pytest.raises(FileError, match=r"store\.sqlite: fails SQLite's quick_check \(") as e:
        Store(store)
    assert e.value.path == store / "store.sqlite" and "\n" not in str(e.value)
    monkeypatch.setenv("RAGSEEK_STORE_CHECK", "0")
    Store(store).close()


def test_a_file_that_is_not_sqlite_is_a_file_error_naming_it(broken):
    from ragseek.errors import FileError
    from ragseek.rag.store import Store

    with pytest.raises(
        FileError, match=r"store\.sqlite: not a readable SQLite store \(file is not a database\)"
    ):
        Store(broken["store_garbage"])


@pytest.mark.parametrize("command", list(YAML_READERS))
def test_a_broken_yaml_config_is_one_line_naming_it(broken, monkeypatch, tmp_path, command):
    monkeypatch.setenv("RAGSEEK_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, [*fill(broken, YAML_READERS[command]), "--config", str(broken["yaml"])])
    assert_one_line(result, broken["yaml"])
    # where YAML gave up
    assert "line 2, column 10" in result.stderr


def test_debug_shows_the_traceback(broken):
    store = broken["store_garbage"]
    args = [sys.executable, "-m", "ragseek"]
    search = ["search", "foxes", "--store", str(store)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAGSEEK_DEBUG", None)
    quiet = subprocess.run([*args, *search], capture_output=True, text=True, env=env)
    assert quiet.returncode == 2 and quiet.stderr.count("\n") == 1 and str(store) in quiet.stderr
    for extra, more_env in ((["--debug"], {}), ([], {"RAGSEEK_DEBUG": "1"})):
        loud = subprocess.run(
            [*args, *extra, *search], capture_output=True, text=True, env={**env, **more_env}
        )
        assert loud.returncode == 1 and "Traceback" in loud.stderr and str(store) in loud.stderr, loud.stderr
    # in process: the exception itself comes out
    result = runner.invoke(app, ["--debug", *search])
    assert type(result.exception).__name__ == "FileError" and str(store) in str(result.exception)


def test_a_bug_is_still_a_traceback():
    """Only the errors a user can act on become one line: anything else stays a crash with its traceback."""
    from ragseek.errors import user_message

    assert user_message(KeyError("dim")) is None and user_message(TypeError("x")) is None
    assert user_message(ValueError("--k 0: must be >= 1")) == "--k 0: must be >= 1"
    assert user_message(FileNotFoundError(2, "No such file or directory", "a.yaml")) == (
        "a.yaml: No such file or directory"
    )


def test_a_cut_reward_head_and_a_torn_token_split_name_their_file(tmp_path):
    """The other files a recipe reads back: a reward model's value head (ppo's reward_model) and pretraining's
    tokenized split (meta.json)."""
    import torch

    from ragseek.errors import FileError
    from ragseek.model import ModelConfig, Transformer
    from ragseek.train.corpus import load_split
    from ragseek.train.value_heads import VALUE_HEAD_FILE, RewardModel, load_reward_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, inter_dim=32)
    RewardModel(Transformer(cfg)).save_pretrained(tmp_path / "rm")
    cut(tmp_path / "rm" / VALUE_HEAD_FILE, tmp_path / "rm" / VALUE_HEAD_FILE)
    with pytest.raises(FileError, match=f"{tmp_path / 'rm' / VALUE_HEAD_FILE}: not a readable safetensors"):
        load_reward_model(tmp_path / "rm")
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "meta.json").write_text('{"vocab_size": 51')
    with pytest.raises(FileError, match=r"split/meta\.json: not valid JSON \(line 1, column 18"):
        load_split(tmp_path / "split")
