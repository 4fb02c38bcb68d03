"""Threads (ragseek/runtime.py): `ragseek --threads N`, $RAGSEEK_THREADS and a config's num_threads reach torch
through one setting, and idle OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE)."""

import json
import os
import subprocess
import sys

import pytest

from ragseek.runtime import THREADS_ENV, cores, resolve_threads

# what a command's fresh process has torch compute with once the command line has set threads up
AFTER = """
import json, os, sys
from ragseek.cli import app
app(sys.argv[1:], prog_name="ragseek", standalone_mode=False)
import torch
print(json.dumps({"threads": torch.get_num_threads(), "wait": os.environ.get("OMP_WAIT_POLICY")}))
"""
SETTINGS = (THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


def run(python: list[str], args: list[str], tmp_path, **env) -> subprocess.CompletedProcess:
    # a command that never loads torch itself: torch loads after it, as it would inside any command
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    command = [*args, "data", "addition", "--out", str(tmp_path / "rows.jsonl"), "--n", "1"]
    return subprocess.run(
        [sys.executable, *python, *command], env={**base, **env}, capture_output=True, text=True
    )


def torch_after(args: list[str], tmp_path, **env) -> dict:
    out = run(["-c", AFTER], args, tmp_path, **env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_threads_flag_reaches_torch(tmp_path):
    assert torch_after(["--threads", "1"], tmp_path) == {"threads": 1, "wait": "PASSIVE"}
    # torch keeps a count from the environment to one per core
    assert torch_after(["--threads", "2"], tmp_path)["threads"] == min(2, cores())


def test_the_environment_variable_sets_threads(tmp_path):
    assert torch_after([], tmp_path, RAGSEEK_THREADS="1")["threads"] == 1
    # the flag wins over the variable
    assert torch_after(["--threads", "2"], tmp_path, RAGSEEK_THREADS="1")["threads"] == 2


def test_by_default_a_thread_per_core_that_sleeps_when_idle(tmp_path):
    assert torch_after([], tmp_path) == {"threads": cores(), "wait": "PASSIVE"}
    # a wait policy the user chose is kept
    assert torch_after([], tmp_path, OMP_WAIT_POLICY="ACTIVE")["wait"] == "ACTIVE"


def test_a_bad_thread_count_is_one_error_line(tmp_path):
    out = run(["-m", "ragseek"], ["--threads", "-2"], tmp_path)
    assert out.returncode == 2
    assert "--threads -2: give a number of threads >= 1" in out.stderr


def test_a_config_num_threads_is_the_default_the_flag_overrides(monkeypatch):
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert resolve_threads(None, default=1) == 1
    assert resolve_threads(None, default=0) == cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(None, default=1) == 1
    monkeypatch.setenv(THREADS_ENV, "2")
    assert resolve_threads(None, default=1) == 2
    assert resolve_threads(4, default=1) == 4
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(ValueError, match="RAGSEEK_THREADS many"):
        resolve_threads()


def test_use_threads_after_torch_loaded_sets_its_count():
    code = (
        "import torch\nfrom ragseek.runtime import use_threads\n"
        "use_threads(1)\nprint(torch.get_num_threads())"
    )
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    out = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
