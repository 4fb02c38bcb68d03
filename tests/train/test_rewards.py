"""Rule-based rewards: answer extraction and matching, the think/answer format, and code run in the bubblewrap
sandbox: correct code 1, wrong code 0; the test split that keeps expected values outside; limits (time, memory,
processes); each escape of issue 14 failing (writes outside tmp, secret files, ctypes system(), fork + setsid
children, Unix sockets, TCP to loopback through ctypes, the parent's environment, a verdict forged through the
runner's frames); fail closed without bubblewrap."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from ragseek.rag.pipeline import DONT_KNOW
from ragseek.train import rewards
from ragseek.train.rewards import (
    SandboxUnavailable,
    code_reward,
    extract_answer,
    extract_code,
    format_reward,
    numeric_match_reward,
    plan_tests,
    reader_citation_reward,
    reader_dont_know_reward,
    reader_f1_reward,
    reader_format_reward,
    resolve_reward,
    run_sandboxed,
)


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
# Every test below that runs code needs bubblewrap. On Linux it is never skipped: where bwrap is missing the sandbox
# raises SandboxUnavailable and the test fails, saying what to install (`make test` installs it on Debian).
needs_bwrap = pytest.mark.skipif(
    sys.platform != "linux", reason="bubblewrap needs Linux namespaces; elsewhere the sandbox fails closed"
)


@needs_bwrap
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


def test_plan_tests_sends_only_what_needs_the_solution():
    solution = "import os\ndef f(x):\n    return x\nclass C: pass\n"
    tests = [
        "assert f(2) == 4",
        "import math\nassert math.isclose(f(2.0), 3.14, rel_tol=0.01)",
        "assert not f(0)",
        "assert set(f([1, 2])) == set([1, 2])",
        "assert abs(f(3) - 3) < 0.1",
        "assert os.listdir(f('/')) == []",  # the solution imports os: its os, evaluated whole
        "assert json.loads(f('[1]')) == [1]",  # a standard module the test uses without importing it: both import it
        "assert isinstance(f(1), C)",  # C is the solution's: the whole call goes to the sandbox
    ]
    planned = [(t.imports, t.check, t.expressions) for t in plan_tests(solution, tests)]
    v = "_ragseek_value_"
    assert planned == [
        ("", f"assert {v}0 == 4", ["f(2)"]),
        ("import math", f"assert math.isclose({v}0, 3.14, rel_tol=0.01)", ["f(2.0)"]),
        ("", f"assert not {v}0", ["f(0)"]),
        ("", f"assert {v}0 == set([1, 2])", ["set(f([1, 2]))"]),
        ("", f"assert abs({v}0 - 3) < 0.1", ["f(3)"]),
        ("", f"assert {v}0 == []", ["os.listdir(f('/'))"]),
        ("import json", f"assert {v}0 == [1]", ["json.loads(f('[1]'))"]),
        ("", f"assert {v}0", ["isinstance(f(1), C)"]),
    ]
    with pytest.raises(ValueError, match="`import` and `assert` statements only"):
        plan_tests(solution, ["x = f(2)\nassert x == 2"])


@needs_bwrap
def test_split_tests_give_the_verdicts_python_gives():
    # f is the identity: run in one namespace, these tests would pass exactly where marked
    solution = "import os\ndef f(x):\n    return x\nclass C: pass\n"
    tests = {
        "assert f(2) == 4": False,
        "import math\nassert math.isclose(f(3.13), 3.14, rel_tol=0.01)": True,
        "assert not f(0)": True,
        "assert set(f([2, 1, 2])) == set([1, 2])": True,
        "assert abs(f(3) - 3) < 0.1": True,
        "assert json.loads(f('[1]')) == [1]": True,
        "assert isinstance(f(C()), C)": True,
        "assert f((1, 2)) == [1, 2]": False,  # a tuple stays a tuple on its way out
        "assert f(1) == 1\nassert f(2) == 3": False,
    }
    result = run_sandboxed(solution, list(tests), timeout_s=10)
    failed = {int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("test ")}
    assert failed == {i for i, passes in enumerate(tests.values()) if not passes}, result.stderr


@needs_bwrap
def test_infinite_loop_is_killed():
    result = run_sandboxed("while True:\n    pass\n", TESTS, timeout_s=1.0)
    assert result.timed_out and result.returncode != 0 and result.score == 0.0


@needs_bwrap
def test_memory_bomb_is_stopped():
    for bomb in (
        "x = bytearray(8 << 30)",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(10 << 20))",
    ):
        result = run_sandboxed(bomb, TESTS, timeout_s=20, memory_mb=256)
        assert not result.timed_out and result.returncode != 0 and result.score == 0.0
        assert "MemoryError" in result.stderr


@needs_bwrap
def test_limits_hold_in_the_child_and_a_fork_bomb_is_capped():
    probe = "import resource\nlimit = lambda name: resource.getrlimit(getattr(resource, name))"
    tests = [
        f"assert limit('RLIMIT_AS') == ({256 << 20}, {256 << 20})",
        "assert limit('RLIMIT_CPU') == (4, 4)",  # ceil(timeout_s) + 1, soft = hard
        f"assert limit('RLIMIT_FSIZE') == ({1 << 20}, {1 << 20})",
    ]
    assert run_sandboxed(probe, tests, timeout_s=3, memory_mb=256).score == 1.0
    bomb = (
        "import os, time\nforked = 0\n"
        "for _ in range(100):\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
        "    forked += 1\n"
    )
    started = time.monotonic()
    result = run_sandboxed(bomb, ["assert 0 < forked < 8"], timeout_s=20, max_processes=8)
    # the children sleep 30 s, but they die with their parent's namespace
    assert result.score == 1.0 and time.monotonic() - started < 10


# ---------------------------------------------------------------------------------------------------------------------
# escapes: each one escaped the sandbox of issue 14; each must fail now


@needs_bwrap
def test_escape_writing_outside_tmp_fails(tmp_path):
    outside = [
        tmp_path / "escaped",
        Path(sys.base_prefix) / "escaped",
        Path("/usr/lib/escaped"),
        Path("/escaped"),
    ]
    host_tmp = Path(tempfile.gettempdir()) / f"ragseek-escape-{secrets.token_hex(4)}"
    code = (
        "wrote = []\n"
        f"for path in {[str(p) for p in [*outside, host_tmp]]!r}:\n"
        "    try:\n        open(path, 'w').write('pwned')\n        wrote.append(path)\n"
        "    except OSError as error:\n        print(path, error)\n"
    )
    result = run_sandboxed(code, ["assert wrote == []"], timeout_s=10)
    assert result.score == 0.0  # it "wrote" only host_tmp: the sandbox's own /tmp
    assert f"[{str(host_tmp)!r}]" in result.stderr
    assert not any(p.exists() for p in [*outside, host_tmp])


@needs_bwrap
def test_escape_reading_secrets_fails(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("ragseek-secret-7f3a")
    code = (
        "read = {}\n"
        f"for path in ['/etc/passwd', '/etc/shadow', {str(secret)!r}, {str(Path.home() / '.bashrc')!r}]:\n"
        "    try:\n        read[path] = open(path).read()\n"
        "    except OSError as error:\n        print(path, type(error).__name__)\n"
    )
    result = run_sandboxed(code, ["assert read != {}"], timeout_s=10)
    assert result.score == 0.0 and "/etc/passwd FileNotFoundError" in result.stdout
    assert "ragseek-secret-7f3a" not in result.stdout + result.stderr


@needs_bwrap
def test_escape_ctypes_system_fails(tmp_path):
    target = tmp_path / "pwned"
    code = (
        "import ctypes\n"
        f"status = ctypes.CDLL(None).system(b'echo pwned > {target}; cat /etc/passwd > {target}')\n"
    )
    result = run_sandboxed(code, ["assert status == 0"], timeout_s=10)
    # no shell in the sandbox (/usr/bin is not mounted); with one, the paths it writes would not exist
    assert result.score == 0.0 and not target.exists()


def _processes_named(name: str) -> list[int]:
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == name:
                found.append(int(comm.parent.name))
    return found


@needs_bwrap
@pytest.mark.parametrize("parent", ["exits", "hangs"])
def test_escape_forked_setsid_children_die_with_the_call(tmp_path, parent):
    marker = f"esc{secrets.token_hex(4)}"  # the children's process name, as the host's /proc shows it
    late = tmp_path / "late"
    code = (
        "import ctypes, os, time\n"
        "libc = ctypes.CDLL(None)\n"
        "for _ in range(3):\n"
        "    if libc.fork() == 0:\n"
        "        libc.setsid()\n"
        f"        libc.prctl(15, {marker.encode()!r}, 0, 0, 0)\n"
        "        time.sleep(3)\n"
        "        for path in ('/tmp/late', " + repr(str(late)) + "):\n"
        "            try:\n                open(path, 'w').write('still alive')\n"
        "            except OSError:\n                pass\n"
        "        os._exit(0)\n"
        # the parent lives on for 0.5 s (long enough to be seen), or forever
        "forked = True\ntime.sleep(0.5)\n" + ("while True:\n    pass\n" if parent == "hangs" else "")
    )
    seen, done = set(), threading.Event()

    def watch():  # the children, as the host sees them while the call runs
        while not done.is_set():
            seen.update(_processes_named(marker))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    result = run_sandboxed(code, ["assert forked"], timeout_s=1.0)
    elapsed = time.monotonic() - started
    done.set()
    watcher.join()
    # the three children were alive during the call; it returned before their 3 s were up, and none is left
    assert len(seen) == 3 and elapsed < 3 and result.timed_out == (parent == "hangs")
    assert _processes_named(marker) == []
    time.sleep(0.5)
    assert _processes_named(marker) == [] and not late.exists()


@needs_bwrap
def test_escape_unix_sockets_fails(tmp_path):
    path, abstract = str(tmp_path / "s.sock"), f"\0ragseek-{secrets.token_hex(4)}"
    servers, accepted = [], []
    for address in (path, abstract):
        server = socket.socket(socket.AF_UNIX)
        server.bind(address)
        server.listen()
        server.settimeout(0.2)
        servers.append(server)
    code = (
        "import socket\nreached = []\n"
        f"for address in ({path!r}, {abstract!r}):\n"
        "    try:\n        socket.socket(socket.AF_UNIX).connect(address)\n        reached.append(address)\n"
        "    except OSError as error:\n        print(repr(address), type(error).__name__)\n"
    )
    result = run_sandboxed(code, ["assert reached == []"], timeout_s=10)
    for server in servers:
        with contextlib.suppress(TimeoutError):
            accepted.append(server.accept())
        server.close()
    assert result.score == 1.0 and accepted == []
    assert "FileNotFoundError" in result.stdout and "ConnectionRefusedError" in result.stdout


@pytest.fixture
def local_server():
    """A real TCP server on 127.0.0.1 that answers b"pong" and counts its connections."""
    server = socket.create_server(("127.0.0.1", 0))
    connections = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            connections.append(conn)
            with conn:
                conn.sendall(b"pong")

    threading.Thread(target=serve, daemon=True).start()
    with socket.create_connection(("127.0.0.1", server.getsockname()[1]), timeout=5) as client:
        assert client.recv(4) == b"pong"  # control: reachable from outside the sandbox
    yield server.getsockname()[1], connections
    server.close()


@needs_bwrap
def test_escape_tcp_to_loopback_fails_with_ctypes_too(local_server):
    port, connections = local_server
    code = (
        "import ctypes, socket, struct\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)\n"
        f"address = struct.pack('=H', socket.AF_INET) + struct.pack('!H', {port}) + bytes([127, 0, 0, 1]) + bytes(8)\n"
        "raw = libc.connect(fd, address, len(address))\n"
        "errno = ctypes.get_errno()\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
        "    plain = 'connected'\n"
        "except OSError as error:\n"
        "    plain = type(error).__name__\n"
    )
    tests = [
        "assert raw == 0",
        "assert plain == 'connected'",
        "import errno as e\nassert errno == e.ECONNREFUSED",
    ]
    result = run_sandboxed(code, tests, timeout_s=10)
    # both connects are refused by the sandbox's own loopback: nothing reached this server
    assert result.passed == 1 and "test 2" not in result.stderr and len(connections) == 1


@needs_bwrap
def test_escape_parent_environment_fails():
    # /proc/<pid>/environ shows a process's environment as it started, so the process that calls the sandbox is
    # started here with the secret in it (os.environ changes made later would not show)
    code = (
        "import glob, os\n"
        "seen = repr(dict(os.environ))\n"
        "for path in [f'/proc/{os.getppid()}/environ', *glob.glob('/proc/*/environ')]:\n"
        "    try:\n        seen += open(path, 'rb').read().decode(errors='replace')\n"
        "    except OSError as error:\n        seen += f'{path}: {type(error).__name__}'\n"
        "print(seen)\n"
    )
    caller = (
        "import json, sys\nfrom ragseek.train.rewards import run_sandboxed\n"
        "r = run_sandboxed(sys.argv[1], ['assert \"hunter2\" in seen'], timeout_s=10)\n"
        "print(json.dumps([r.score, r.stdout + r.stderr]))\n"
    )
    env = {**os.environ, "RAGSEEK_TEST_SECRET": "hunter2-9c1e"}
    ran = subprocess.run(
        [sys.executable, "-c", caller, code], env=env, capture_output=True, text=True, timeout=60
    )
    score, output = json.loads(ran.stdout.splitlines()[-1])
    assert score == 0.0 and "hunter2" not in output and "'HOME': '/tmp'" in output


@needs_bwrap
def test_escape_forging_the_verdict_through_the_runners_frames_fails():
    forger = (
        "import json, os, sys\n"
        "frame = sys._getframe(1)\n"
        "out, tests = frame.f_locals['out'], frame.f_locals['tests']\n"
        "for i in range(10):\n"
        "    for forged in ([i, None], [i, True], [i, ['True'] * 5], [i, ['None']], [i, []]):\n"
        "        os.write(out, (json.dumps(forged) + '\\n').encode())\n"
        "os.write(1, b'passed=10 total=1\\n')\n"
        "os._exit(0)\n"
    )
    result = run_sandboxed(forger, ["assert add(1, 2) == 3", "assert add(10, 5) == 15"], timeout_s=10)
    assert (result.passed, result.total, result.returncode) == (0, 2, 0)
    assert code_reward(None, [forger], tests=[["assert add(1, 2) == 3"]]) == [0.0]
    # exiting with status 0 before the tests, patching builtins, or hiding stdout changes nothing either
    assert run_sandboxed("import os\nos._exit(0)", ["assert True"], timeout_s=10).score == 0.0
    patched = "import builtins\nbuiltins.exec = builtins.eval = lambda *a, **k: None"
    assert run_sandboxed(patched, ["assert False", "assert 1 == 2"], timeout_s=10).score == 0.0
    quiet = run_sandboxed(f"import io, sys\nsys.stdout = io.StringIO()\n{ADD}", TESTS, timeout_s=10)
    assert quiet.score == 1.0


@needs_bwrap
def test_a_clean_private_tmp_and_an_empty_environment():
    probe = "import os\ncwd, env = os.getcwd(), dict(os.environ)"
    tests = [
        "assert cwd == '/tmp'",
        "assert os.listdir(cwd) == []",
        "assert sorted(env) == ['HOME', 'LANG', 'PATH', 'PWD', 'PYTHONHASHSEED', 'TMPDIR']",
        "assert os.listdir('/etc') == ['ld.so.cache']",
    ]
    result = run_sandboxed(probe, tests, timeout_s=10)
    assert result.score == 1.0, result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# no isolation: fail closed; the unisolated mode is opt-in and logged


def test_no_bubblewrap_fails_closed_and_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("RAGSEEK_SANDBOX", raising=False)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        run_sandboxed(ADD, TESTS)
    with pytest.raises(SandboxUnavailable, match="RAGSEEK_SANDBOX=process"):
        code_reward(None, [ADD], tests=[TESTS])
    # a bwrap that cannot build a sandbox (no namespaces here) is refused the same way
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace"):
        run_sandboxed(ADD, TESTS)


def test_process_isolation_is_opt_in_and_logged(monkeypatch, caplog):
    monkeypatch.setenv("RAGSEEK_SANDBOX", "process")
    rewards._warn_unisolated.cache_clear()
    with caplog.at_level(logging.WARNING, logger="ragseek.train.rewards"):
        result = run_sandboxed(ADD, TESTS, timeout_s=10)
    assert (result.score, result.isolation) == (1.0, "process")
    assert "WITHOUT filesystem, network or process isolation" in caplog.text
    with pytest.raises(ValueError, match="use one of"):
        run_sandboxed(ADD, TESTS, isolation="none")


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
