"""Rule-based rewards: answer extraction and matching, the think/answer format, and code run in a real sandboxed
subprocess (infinite loop killed, network blocked against a live local server, memory bomb stopped, no new
processes, no early-exit cheating, correct code 1, wrong code 0)."""

from __future__ import annotations

import socket
import threading

import pytest

from ragseek.rag.pipeline import DONT_KNOW
from ragseek.train.rewards import (
    code_reward,
    extract_answer,
    extract_code,
    format_reward,
    netns_available,
    numeric_match_reward,
    reader_citation_reward,
    reader_dont_know_reward,
    reader_f1_reward,
    reader_format_reward,
    resolve_reward,
    run_sandboxed,
)

GUARDS = [
    pytest.param("netns", marks=pytest.mark.skipif(not netns_available(), reason="no user namespaces here")),
    "audit_hook",
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12 + 19 = 31", "31"),
        ("The answer is 1,234.", "1234"),
        ("-7 degrees, then 2.5", "2.5"),
        ("first 3 then \\boxed{42} and later 7", "42"),
        ("\\boxed{\\frac{1}{2}} ... \\boxed{x = 17}", "17"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("<think>2 + 9 = 11, carry 1</think><answer>The sum is 31</answer> (not 30)", "31"),
        ("<answer>5</answer> ... <answer>6</answer>", "6"),
        ("no number here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_numeric_match_reward_takes_trl_style_columns():
    completions = ["so 12 + 19 = 31.", "<answer>30</answer>", "#### 1,000", "I don't know"]
    assert numeric_match_reward(None, completions, answer=["31", 31, "He has #### 1000", 5]) == [
        1.0,
        0.0,
        1.0,
        0.0,
    ]
    conversational = [[{"role": "assistant", "content": "It is \\boxed{0.5}"}]]
    assert numeric_match_reward(None, conversational, answers=[["half", "0.50"]]) == [1.0]
    with pytest.raises(ValueError, match="answer="):
        numeric_match_reward(None, completions)
    with pytest.raises(ValueError, match="one per completion"):
        numeric_match_reward(None, completions, answer=["31"])


def test_format_reward():
    completions = [
        "<think>units first</think><answer>31</answer>",
        "  <think>\nunits\n</think>\n<answer>31</answer>\n",
        "<think>units</think>31",  # no answer block
        "<answer>31</answer>",  # no think block
        "<think>a</think><think>b</think><answer>31</answer>",  # repeated think
        "<think>a</think><answer>31</answer> and more text",
    ]
    assert format_reward(None, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


ADD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]


def test_code_reward_correct_scores_one_wrong_scores_zero_partial_in_between():
    completions = [
        f"Here it is:\n```python\n{ADD}```\nDone.",
        "```python\ndef add(a, b):\n    return a - b\n```",
        "```python\ndef add(a, b):\n    return abs(a) + b\n```",  # passes 2 of 3
        "```python\ndef add(a, b) return\n```",  # syntax error
    ]
    rewards = code_reward(None, completions, tests=[TESTS] * 4, timeout_s=10)
    assert rewards == [1.0, 0.0, pytest.approx(2 / 3), 0.0]
    assert extract_code("no fence, just code") == "no fence, just code"


def test_infinite_loop_is_killed():
    result = run_sandboxed("while True:\n    pass\n", TESTS, timeout_s=1.0)
    assert result.timed_out and result.returncode == -9 and result.score == 0.0


def test_memory_bomb_is_stopped():
    for bomb in (
        "x = bytearray(8 << 30)",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(10 << 20))",
    ):
        result = run_sandboxed(bomb, TESTS, timeout_s=20, memory_mb=256)
        assert not result.timed_out and result.returncode != 0 and result.score == 0.0
        assert "MemoryError" in result.stderr


@pytest.fixture
def local_server():
    """A real TCP server on 127.0.0.1 that answers b"pong": the network works from this process."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"pong")

    threading.Thread(target=serve, daemon=True).start()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        assert client.recv(4) == b"pong"  # control: reachable from outside the sandbox
    yield port
    server.close()


@pytest.mark.parametrize("guard", GUARDS)
def test_network_call_is_blocked(local_server, guard):
    code = (
        "import socket\n"
        f"with socket.create_connection(('127.0.0.1', {local_server}), timeout=3) as s:\n"
        "    got = s.recv(4)\n"
    )
    result = run_sandboxed(code, ["assert got == b'pong'"], timeout_s=10, network_guard=guard)
    assert result.score == 0.0 and result.returncode != 0
    expected = "Network is unreachable" if guard == "netns" else "PermissionError: socket"
    assert expected in result.stderr


def test_no_new_processes_no_early_exit_and_a_clean_temp_dir(monkeypatch):
    spawn = run_sandboxed("import subprocess\nsubprocess.run(['true'])", ["assert True"], timeout_s=10)
    assert spawn.score == 0.0 and "PermissionError: subprocess.Popen" in spawn.stderr
    # exiting with status 0 before the tests run scores nothing
    early = run_sandboxed("import os\nos._exit(0)", ["assert False"], timeout_s=10)
    assert early.returncode == 0 and early.score == 0.0
    # patching exec does not turn failing tests into passes; swallowing stdout does not hide real passes
    patched = run_sandboxed(
        "import builtins\nbuiltins.exec = lambda *a, **k: None", ["assert False"], timeout_s=10
    )
    assert patched.score == 0.0
    quiet = run_sandboxed(f"import io, sys\nsys.stdout = io.StringIO()\n{ADD}", TESTS, timeout_s=10)
    assert quiet.score == 1.0
    probe = "import os\ncwd, env = os.getcwd(), dict(os.environ)"
    monkeypatch.setenv("RAGSEEK_TEST_SECRET", "must not leak")
    tests = [
        "assert 'ragseek-sandbox-' in cwd",
        "assert os.listdir(cwd) == []",
        "assert 'RAGSEEK_TEST_SECRET' not in env",
    ]
    assert run_sandboxed(probe, tests, timeout_s=10).score == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# the grounded reader's rewards


READER_COLUMNS = {
    "answers": [["Denver Broncos"], ["Denver Broncos"], ["1856", "in 1856"], ["Tesla"], ["Tesla"]],
    "gold": [2, 2, 1, 0, 0],
}
READER_COMPLETIONS = [
    "Denver Broncos [2]",
    # F1: pred {the, broncos} after normalisation {broncos} ("the" is an article) vs {denver, broncos}:
    # P = 1/1, R = 1/2, F1 = 2 * 1 * 0.5 / 1.5 = 2/3
    "The Broncos [3]",
    "He was born in 1856.",
    DONT_KNOW,
    "Tesla [1]",
]


def test_reader_f1_reward_by_hand():
    # row 3: pred {he, was, born, in, 1856}, best gold "in 1856" {in, 1856}: P = 2/5, R = 1, F1 = 0.8 / 1.4 = 4/7
    # rows 4-5: no gold source in the prompt, so only the don't-know answer is right
    assert reader_f1_reward([""] * 5, READER_COMPLETIONS, **READER_COLUMNS) == pytest.approx(
        [1.0, 2 / 3, 4 / 7, 1.0, 0.0]
    )


def test_reader_citation_dont_know_and_format_rewards_by_hand():
    # citation: [2] is gold; [3] is not; no [n] where gold is 1; nothing cited where nothing is gold; [1] cited there
    assert reader_citation_reward([""] * 5, READER_COMPLETIONS, **READER_COLUMNS) == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert reader_dont_know_reward([""] * 5, READER_COMPLETIONS, **READER_COLUMNS) == [
        1.0,
        1.0,
        1.0,
        1.0,
        0.0,
    ]
    long = " ".join(["word"] * 13) + " [1]"
    shapes = [
        "Denver Broncos [2]",
        "The Broncos [3]",
        "He was born in 1856.",
        DONT_KNOW,
        long,
        "a\nb [1]",
        "[1]",
    ]
    assert reader_format_reward([""] * 7, shapes) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_reader_rewards_need_their_columns():
    with pytest.raises(ValueError, match="ragseek data reader"):
        reader_f1_reward(["p"], ["Tesla [1]"], answer=["Tesla"])
    assert resolve_reward("reader_f1") is reader_f1_reward
