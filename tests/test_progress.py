"""Progress lines (ragseek/progress.py): on a terminal a long phase shows a line with its count, rate and ETA on
stderr; with --json, or when stdout is a pipe, nothing is drawn. Real `ragseek` processes on a pseudo-terminal,
phases drawn from their start (RAGSEEK_PROGRESS_DELAY=0), so nothing here depends on timing."""

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from types import SimpleNamespace

import pytest

from ragseek import progress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


@pytest.fixture(scope="module")
def math_eval(make_tiny_llm, tmp_path_factory):
    """`ragseek eval math` on a tiny model and three questions: a model load, then counted decoding."""
    data = tmp_path_factory.mktemp("math") / "rows.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"{i} + 1 = ?", "answer": str(i + 1)}) + "\n" for i in range(3))
    )
    model = make_tiny_llm("progress-llm", 256)
    return ["eval", "math", "--model", str(model), "--data", str(data), "--max-new-tokens", "6"]


def ragseek(args: list[str], stdout_terminal: bool = True) -> tuple[str, str]:
    """Run `ragseek ARGS` with stderr (and stdout, unless `stdout_terminal` is False) on a pseudo-terminal 160
    columns wide; returns (what the terminal showed, stdout when it was a pipe), escape codes removed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGSEEK_PROGRESS")}
    env |= {"RAGSEEK_PROGRESS_DELAY": "0", "TERM": "xterm", "COLUMNS": "160", "HF_HUB_OFFLINE": "1"}
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    stdout = follower if stdout_terminal else subprocess.PIPE
    proc = subprocess.Popen(
        [sys.executable, "-m", "ragseek", *args], stdin=follower, stdout=stdout, stderr=follower, env=env
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            data = os.read(leader, 1 << 16)
        except OSError:  # the child closed its end
            break
        if not data:
            break
        shown += data
    os.close(leader)
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert proc.wait(timeout=120) == 0, shown.decode(errors="replace")
    return ANSI.sub("", shown.decode(errors="replace")), out


def test_a_terminal_shows_each_phase(math_eval):
    shown, _ = ragseek(math_eval)
    assert "loading " in shown
    # counted phases: done/total and their unit
    assert re.search(r"questions .*\d+/3 q", shown), shown
    assert re.search(r"decode 3 rows .*\d+/6 steps", shown), shown
    assert "accuracy" in shown


def test_json_output_and_a_pipe_draw_nothing(math_eval):
    shown, _ = ragseek([*math_eval, "--json"])
    assert "questions" not in shown and "decode" not in shown and "loading" not in shown
    assert json.loads(shown.strip().splitlines()[-1])["n"] == 3
    shown, out = ragseek(math_eval, stdout_terminal=False)
    assert shown.strip() == "" and "accuracy" in out


def test_a_line_ends_with_rate_and_eta_or_with_the_elapsed_time():
    counted = SimpleNamespace(
        total=64, completed=16, speed=8.0, time_remaining=6, elapsed=2.4, fields={"unit": "tok"}
    )
    assert progress.status(counted) == "16/64 tok  8.0 tok/s  ETA 6s  2s elapsed"
    stage = SimpleNamespace(total=9, completed=3, speed=1.5, time_remaining=4, elapsed=2, fields={"unit": ""})
    assert progress.status(stage) == "3/9  1.5/s  ETA 4s  2s elapsed"
    uncounted = SimpleNamespace(
        total=None, completed=0, speed=None, time_remaining=None, elapsed=75, fields={}
    )
    assert progress.status(uncounted) == "1m15s elapsed"


def test_a_stream_line_closes_before_its_first_piece(monkeypatch):
    monkeypatch.setenv("RAGSEEK_PROGRESS", "1")
    monkeypatch.setenv("RAGSEEK_PROGRESS_DELAY", "0")
    progress.enable(True)
    try:
        seen = []
        for piece in progress.until_first(iter(["a", "b"]), "reading the prompt"):
            seen.append((piece, progress._display.open))
        with progress.stages() as report:
            report("documents", 1, 2)
            assert progress._display.open == 1
            report("documents", 2, 2)
            assert progress._display.open == 0
            report("embeddings", 1, 3)
        assert progress._display.open == 0
    finally:
        monkeypatch.delenv("RAGSEEK_PROGRESS")  # else it overrides the False and the lines stay on for later tests
        progress.enable(False)
    assert progress._display is None
    # the answer streams with no line drawn over it
    assert seen == [("a", 0), ("b", 0)]
