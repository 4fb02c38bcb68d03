"""Rule-based rewards: plain callables `(prompts, completions, **kw) -> list[float]`, TRL's reward-function signature.

The lecture's GRPO rests on them: "we can evaluate the final result (but not the reasoning!)", a number for maths,
tests that pass for code. Ground truth arrives as keyword arguments named after dataset columns, one value per
completion, as TRL's GRPOTrainer passes them (`answer=[...]`, `tests=[...]`). A completion is a string or a
conversational list of messages (`[{"role": "assistant", "content": ...}]`), as in TRL.

- `numeric_match_reward`: 1.0 when the completion's final number equals the ground truth (`extract_answer`:
  `<answer>…</answer>`, then `\\boxed{…}`, then `#### N`, then the last number in the text).
- `format_reward`: 1.0 for exactly `<think>…</think><answer>…</answer>`.
- `code_reward`: the share of tests that model-written Python passes, run by `run_sandboxed` in a separate process
  (never in this one) with a timeout, a memory limit, no network, a temp dir and a clean environment.

- `reader_f1_reward`, `reader_citation_reward`, `reader_dont_know_reward`, `reader_format_reward`: the grounded
  reader's answer "phrase [n]" scored against SQuAD gold answers and the gold source's number.

`REWARDS` names them for the configs (`rewards: [numeric_match, format]`); `resolve_reward` also takes any
"package.module:function" with the same signature.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import IO, Any, Literal

Completion = str | list[dict[str, str]]


def completion_text(completion: Completion) -> str:
    """The text of a completion: the string itself, or the last message's content of a conversational one."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return completion[-1]["content"]
    raise TypeError(
        f"a completion is a str or a list of {{'role', 'content'}} messages, got {completion!r:.80}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Numeric answers

_NUMBER = re.compile(r"-?\d+(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")
_TAGGED = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_HASHES = re.compile(r"####\s*([^\n]*)")
_BOXED = "\\boxed{"


def _boxed_contents(text: str) -> list[str]:
    """The contents of every \\boxed{...}, braces balanced (\\boxed{\\frac{1}{2}} keeps its inner braces)."""
    found, start = [], text.find(_BOXED)
    while start != -1:
        depth, i = 1, start + len(_BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append(text[start + len(_BOXED) : i - 1])
        start = text.find(_BOXED, i)
    return found


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a response, as a string without thousands separators, or None.

    The first of these that is present wins, and within it the last number: the last `<answer>…</answer>`, the last
    `\\boxed{…}`, the last `#### N` (GSM8K's answer line), then the whole text. "The answer is 1,234." -> "1234".
    """
    for candidates in (_TAGGED.findall(text), _boxed_contents(text), _HASHES.findall(text)):
        if candidates:
            return _last_number(candidates[-1])
    return _last_number(text)


def parse_number(text: str | int | float) -> Fraction | None:
    """An exact number from an int, a float or a numeric string ("1,234", "-0.5", "12"); None if there is none."""
    if isinstance(text, bool):
        return None
    if isinstance(text, int | float):
        return Fraction(text) if math.isfinite(text) else None
    value = extract_answer(text)
    return None if value is None else Fraction(value)


def numbers_match(completion: str, truth: str | int | float) -> bool:
    """True when the completion's final answer equals the ground truth (itself a number or a text such as GSM8K's
    "… #### 72", read with the same `extract_answer`)."""
    expected, got = parse_number(truth), parse_number(completion)
    return expected is not None and got is not None and got == expected


def _ground_truth(kw: dict[str, Any], n: int) -> list[Any]:
    for key in ("answer", "answers"):
        if kw.get(key) is not None:
            truth = list(kw[key])
            if len(truth) != n:
                raise ValueError(
                    f"{len(truth)} values in `{key}` for {n} completions: pass one per completion"
                )
            return truth
    raise ValueError(
        "numeric_match_reward needs the ground truth: pass answer=[...] (or answers=[...]), one per completion"
    )


def numeric_match_reward(prompts: Sequence[Any], completions: Sequence[Completion], **kw: Any) -> list[float]:
    """1.0 when the completion's final number (`extract_answer`) equals the ground truth, else 0.0.

    The ground truth comes in `answer` (or `answers`), one per completion: a number, a numeric string, a GSM8K
    answer "… #### N", or a list of any of these when several answers are accepted.
    """
    rewards = []
    for completion, truth in zip(completions, _ground_truth(kw, len(completions)), strict=True):
        accepted = truth if isinstance(truth, list | tuple) else [truth]
        text = completion_text(completion)
        rewards.append(float(any(numbers_match(text, t) for t in accepted)))
    return rewards


_THINK_ANSWER = re.compile(
    r"\s*<think>(?:(?!<think>|<answer>).)*</think>\s*<answer>(?:(?!<answer>).)*</answer>\s*", re.DOTALL
)


def format_reward(prompts: Sequence[Any], completions: Sequence[Completion], **kw: Any) -> list[float]:
    """1.0 when the whole completion is `<think>…</think><answer>…</answer>` (whitespace around the blocks allowed,
    no nested or repeated tags), else 0.0: the R1-Zero template's format reward (DeepSeek-R1, arXiv:2501.12948, §2.2.2).
    """
    return [float(_THINK_ANSWER.fullmatch(completion_text(c)) is not None) for c in completions]


# ---------------------------------------------------------------------------------------------------------------------
# Grounded reading with citations (the reader: tasks/reader.py rows, `ragseek ask`'s answer format "phrase [n]")
#
# Columns, one per completion: `answers` (the gold answer texts) and `gold` (the number of the source that is the
# gold paragraph in the prompt, 0 when none is: a retrieval miss or a dropped paragraph, where the right answer is
# pipeline.DONT_KNOW). Each reward is in [0, 1]; `reader_rewards` names the mix GRPO trains the reader with.

_FIRST_CITATION = re.compile(r"\[(\d+)")
READER_MAX_WORDS = 12


def _reader_columns(kw: dict[str, Any], n: int) -> tuple[list[list[str]], list[int]]:
    answers, gold = kw.get("answers"), kw.get("gold")
    if answers is None or gold is None or len(answers) != n or len(gold) != n:
        raise ValueError(
            "the reader rewards need answers=[[gold texts], ...] and gold=[source number or 0, ...], one per "
            "completion: train on rows written by `ragseek data reader`"
        )
    return [list(a) for a in answers], [int(g) for g in gold]


def reader_f1_reward(prompts: Sequence[Any], completions: Sequence[Completion], **kw: Any) -> list[float]:
    """SQuAD token F1 of the answer (its [n] removed) against the gold answers, where the prompt holds the gold
    paragraph; where it does not, 1.0 for the don't-know answer and 0.0 for anything else (no answer is right)."""
    from ragseek.rag.evaluate import strip_citations, token_f1
    from ragseek.rag.pipeline import is_dont_know

    answers, gold = _reader_columns(kw, len(completions))
    out = []
    for c, a, g in zip(completions, answers, gold, strict=True):
        text = completion_text(c)
        out.append(token_f1(strip_citations(text), a) if g else float(is_dont_know(text)))
    return out


def reader_citation_reward(
    prompts: Sequence[Any], completions: Sequence[Completion], **kw: Any
) -> list[float]:
    """1.0 when the first source the answer cites is the gold paragraph's number; where the prompt has no gold
    paragraph, 1.0 when nothing is cited."""
    _, gold = _reader_columns(kw, len(completions))
    out = []
    for c, g in zip(completions, gold, strict=True):
        m = _FIRST_CITATION.search(completion_text(c))
        out.append(float(int(m.group(1)) == g) if m else float(g == 0))
    return out


def reader_dont_know_reward(
    prompts: Sequence[Any], completions: Sequence[Completion], **kw: Any
) -> list[float]:
    """1.0 when the answer says it does not know exactly when the prompt lacks the gold paragraph."""
    from ragseek.rag.pipeline import is_dont_know

    _, gold = _reader_columns(kw, len(completions))
    return [
        float(is_dont_know(completion_text(c)) == (g == 0)) for c, g in zip(completions, gold, strict=True)
    ]


def reader_format_reward(prompts: Sequence[Any], completions: Sequence[Completion], **kw: Any) -> list[float]:
    """1.0 for `ask`'s answer shape: one line, a phrase of at most READER_MAX_WORDS words then one [n]; or the
    don't-know sentence alone. 0.0 otherwise (a sentence that rambles on, no citation, two lines)."""
    from ragseek.rag.pipeline import DONT_KNOW

    out = []
    for c in completions:
        text = completion_text(c).strip()
        phrase, sep, rest = text.rpartition(" [")
        cited = bool(sep) and re.fullmatch(r"\d+\]", rest) is not None and "\n" not in phrase
        out.append(float(text == DONT_KNOW or (cited and 0 < len(phrase.split()) <= READER_MAX_WORDS)))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Code execution: model-written code runs inside bubblewrap; the verdict is computed outside it
#
# The lecture's "tests that pass for code" reward is only a reward if the code cannot reach past the tests. So:
#
# - Isolation (`run_sandboxed`, isolation "bwrap", the default): Debian's bubblewrap gives the child its own mount,
#   PID, network, IPC and UTS namespaces. Its filesystem is an empty root, read-only, holding only the shared
#   libraries (/usr/lib*, /etc/ld.so.cache), the interpreter's own prefix and a private 64 MB tmpfs at /tmp (its cwd
#   and HOME): no /etc/passwd, no /home, no project, no socket file of the host. The network namespace has a loopback of its own and nothing
#   else (no TCP to the host's 127.0.0.1, no abstract Unix socket). The command is PID 2 of its namespace under
#   bwrap's init: when it exits, is killed or times out, the kernel kills every descendant (fork + setsid included).
#   The environment is empty but for PATH, HOME, TMPDIR, LANG, PYTHONHASHSEED (and bwrap's PWD); bwrap itself
#   starts with no environment at all.
#   Limits, soft = hard, set before the model's code runs: address space (memory_mb), CPU seconds, 1 MB per file
#   written, no core dumps, 256 files, `max_processes` processes and threads. RLIMIT_NPROC counts per user, and root
#   is exempt, so as the host's root the child first drops to a fresh random uid (kept only by this sandbox, no
#   capabilities left); as anyone else bwrap's user namespace keeps the count per sandbox and refuses nested user
#   namespaces.
# - The verdict (`plan_tests`): each test `assert EXPR` is split, before anything runs, into the parts that need the
#   solution (`f(2)` in `assert f(2) == 4`) and the rest (`_ragseek_value_0 == 4`). The sandboxed solution only
#   evaluates its parts and sends back their repr(); a second sandboxed process that holds no model code reads those
#   as plain literals (`ast.literal_eval`) and runs the assertions. The solution never sees an expected value, a
#   token or a verdict: exiting early, patching builtins, reading the runner's frames or writing fake result lines
#   can only send values, and the score is the share of tests whose assertion held, in [0, 1].
# - Fail closed: without a working bwrap, `run_sandboxed` raises `SandboxUnavailable`, naming what to install.
#   `isolation="process"` (or RAGSEEK_SANDBOX=process) runs the same two steps as plain child processes with the
#   same limits, an empty environment and a temp dir, but no namespaces: opt-in, for code you trust, and logged.

Isolation = Literal["bwrap", "process"]
ISOLATIONS: tuple[Isolation, ...] = ("bwrap", "process")
SANDBOX_ENV = "RAGSEEK_SANDBOX"
_INSTALL = (
    "install bubblewrap 0.8 or newer (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install "
    "bubblewrap`; `make test` installs it as root on Debian)"
)
_VALUE = "_ragseek_value_"
# bytes kept of stdout / stderr / results; RLIMIT_FSIZE stops a child that writes more
_OUTPUT_LIMIT = 1 << 20
# the sandbox's private /tmp
_TMP_BYTES = 64 << 20
# as root, the child runs as a random uid from this range, used by nothing else
_UIDS = (1 << 30, 1 << 31)

log = logging.getLogger(__name__)


class SandboxUnavailable(RuntimeError):
    """No isolation for model-written code here, so none of it runs (fail closed). The message says what to do."""


# The child's program, the same in both roles. Trusted steps first (read the job, set the limits, as root drop to
# the sandbox uid), then either the solution and the expressions its tests need ("solution": values out, one JSON
# line per test) or the assertions on those values ("check": one line per test, null when it held).
_CHILD = r"""
import ast, json, os, resource, sys

def _enter(limits, uid):
    for name, value in limits:
        resource.setrlimit(getattr(resource, name), (value, value))
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)

def _solution(solution, tests, out):
    scope = {"__name__": "solution"}
    exec(compile(solution, "solution.py", "exec"), scope)
    for i, (imports, expressions) in enumerate(tests):
        try:
            exec(imports, scope)
            values = [repr(eval(expression, scope)) for expression in expressions]
        except Exception as error:
            print(f"test {i}: {type(error).__name__}: {error}", file=sys.stderr)
        else:
            os.write(out, (json.dumps([i, values]) + "\n").encode())

def _check(tests, out):
    for i, imports, check, values in tests:
        try:
            scope = {}
            exec(imports, scope)
            scope.update((f"_ragseek_value_{k}", ast.literal_eval(v)) for k, v in enumerate(values))
            exec(check, scope)
            error = None
        except Exception as failure:
            error = f"{type(failure).__name__}: {failure}"[:300]
        os.write(out, (json.dumps([i, error]) + "\n").encode())

_job = json.loads(sys.stdin.read())
sys.stdin.close()
_enter(_job["limits"], _job["uid"])
if _job["role"] == "solution":
    _solution(_job["solution"], _job["tests"], _job["out"])
else:
    _check(_job["tests"], _job["out"])
"""


@dataclass
class SandboxResult:
    """What one sandboxed run did. `passed` counts the tests whose assertion held, out of `total`; `stdout` and
    `stderr` are the solution's, then one line per failed test; `isolation` is how it ran."""

    passed: int
    total: int
    returncode: int
    timed_out: bool
    stdout: str
    stderr: str
    isolation: Isolation = "bwrap"

    @property
    def score(self) -> float:
        return self.passed / self.total if self.total else 0.0


# --- the verdict: which parts of a test need the solution ----------------------------------------------------------


@dataclass
class PlannedTest:
    """One test, split: `expressions` run in the solution's namespace; `check` (the test's assertions, each of those
    expressions replaced by `_ragseek_value_k`) runs on their values, after `imports`, in a process without it."""

    imports: str
    check: str
    expressions: list[str]


_BUILTIN_NAMES = frozenset(dir(builtins))
_CONSUMERS = frozenset(  # builtins that consume iterables: a call to them is evaluated whole in the sandbox
    "all any dict enumerate filter frozenset iter len list map max min next reversed set sorted str sum tuple zip".split()
)


def _bound_names(solution: str) -> set[str]:
    """Every name the solution may bind (assignments, def, class, import, global), read from its syntax tree."""
    try:
        tree = ast.parse(solution)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return set()  # it cannot run either: the sandbox reports why
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Global | ast.Nonlocal):
            names.update(node.names)
    return names


class _Splitter(ast.NodeTransformer):
    """Replaces each part of an assertion that needs the solution by a placeholder name, keeping its source.

    Comparisons, `not`, `and` and arithmetic are taken apart, so `f(2) == 4` sends `f(2)` and keeps `4` outside; a
    call to a test-side function that mixes solution values with constants (`math.isclose(f(2), 3.14)`,
    `round(f(x), 2)`) too. Anything else that uses the solution (`f(2)`, `sorted(f(x))`, `f(x)[0]`) goes whole."""

    def __init__(self, test_side: Callable[[str], bool]):
        self.test_side, self.expressions = test_side, []

    def uses_solution(self, node: ast.AST) -> bool:
        return any(isinstance(n, ast.Name) and not self.test_side(n.id) for n in ast.walk(node))

    def splits(self, node: ast.expr) -> bool:
        if isinstance(node, ast.Compare | ast.UnaryOp | ast.BinOp):
            return True
        if isinstance(node, ast.BoolOp):
            return isinstance(node.op, ast.And)
        if not isinstance(node, ast.Call) or self.uses_solution(node.func):
            return False
        if isinstance(node.func, ast.Name) and node.func.id in _CONSUMERS:
            return False
        # split where the call mixes solution values with constants, or one of its arguments splits itself
        arguments = [*node.args, *(k.value for k in node.keywords)]
        return any(not self.uses_solution(a) or self.splits(a) for a in arguments)

    def visit(self, node: ast.AST) -> ast.AST:
        if not isinstance(node, ast.expr):
            return self.generic_visit(node)
        if not self.uses_solution(node):
            return node
        if self.splits(node):
            return self.generic_visit(node)
        self.expressions.append(ast.unparse(node))
        return ast.Name(f"{_VALUE}{len(self.expressions) - 1}", ast.Load())


def plan_tests(solution: str, tests: Sequence[str]) -> list[PlannedTest]:
    """Split each test (its `import` and `assert` statements) into what the solution evaluates and what is checked
    without it. A name is the solution's unless the test imports it, or it is a builtin or a standard-library module
    that the solution does not bind. Nothing is run here. Raises ValueError for any other statement."""
    bound = _bound_names(solution)
    planned = []
    for i, test in enumerate(tests):
        try:
            statements = ast.parse(test).body
        except SyntaxError as error:
            raise ValueError(f"test {i} is not valid Python ({error}): {test!r:.80}") from None
        imports = [s for s in statements if isinstance(s, ast.Import | ast.ImportFrom)]
        imported = {(a.asname or a.name).split(".")[0] for s in imports for a in s.names}

        def test_side(name: str, imported: set[str] = imported) -> bool:
            builtin_or_module = name in _BUILTIN_NAMES or name in sys.stdlib_module_names
            return name in imported or (name not in bound and builtin_or_module)

        used = {n.id for s in statements for n in ast.walk(s) if isinstance(n, ast.Name)}
        # (the splitter rewrites the statements in place)
        splitter, checks = _Splitter(test_side), []
        for statement in statements:
            if isinstance(statement, ast.Assert):
                checks.append(ast.Assert(splitter.visit(statement.test), None))
            elif not isinstance(statement, ast.Import | ast.ImportFrom):
                raise ValueError(
                    f"test {i}: {type(statement).__name__} statement in {test!r:.80}: a test holds `import` and "
                    "`assert` statements only (MBPP's test_list), so that its verdict is computed outside the sandbox"
                )
        modules = sorted(n for n in used - imported - _BUILTIN_NAMES if n in sys.stdlib_module_names)
        imports += [ast.Import([ast.alias(m)]) for m in modules if m not in bound]
        planned.append(
            PlannedTest(
                ast.unparse(ast.Module(imports, [])),
                ast.unparse(ast.Module(checks, [])),
                splitter.expressions,
            )
        )
    return planned


# --- the sandbox ---------------------------------------------------------------------------------------------------


def _isolation(requested: Isolation | None) -> Isolation:
    isolation = requested or os.environ.get(SANDBOX_ENV) or "bwrap"
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation {isolation!r} (or ${SANDBOX_ENV}): use one of {ISOLATIONS}")
    if isolation == "process":
        _warn_unisolated()
    return isolation  # type: ignore[return-value]


@cache
def _warn_unisolated() -> None:
    log.warning(
        "code sandbox: isolation=process (%s): model-written code runs as a plain child process, with limits but "
        "WITHOUT filesystem, network or process isolation. Use it only for code you trust; %s for the real sandbox.",
        SANDBOX_ENV,
        _INSTALL,
    )


def _bwrap_command(bwrap: str, as_root: bool) -> list[str]:
    """bubblewrap around this interpreter (its base, not a venv: the child runs the standard library alone, `-I -S`),
    with only what the interpreter needs mounted, read-only. The program to run comes last."""
    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    prefix = os.path.realpath(sys.base_prefix)
    command = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
    command += ["--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv"]
    # root drops to the sandbox uid itself (then no capability is left); others get a user namespace
    if as_root:
        command += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        command += ["--unshare-user", "--disable-userns"]
    # a system Python (prefix /usr) keeps its standard library in /usr/lib: the executable alone is added
    interpreter = python if prefix == "/usr" else prefix
    binds = ["/usr/lib", "/usr/lib64", "/usr/lib32", "/etc/ld.so.cache", interpreter]
    binds = [path for path in binds if os.path.exists(path)]
    # their parent folders, made traversable (bwrap makes them 0700, and as root the child drops to another uid)
    for parent in sorted({str(parent) for path in binds for parent in Path(path).parents[:-1]}):
        command += ["--perms", "0755", "--dir", parent]
    for path in binds:
        command += ["--ro-bind", path, path]
    for path in ("/lib", "/lib64", "/lib32"):
        if os.path.islink(path):
            command += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            command += ["--ro-bind", path, path]
    command += ["--proc", "/proc", "--dev", "/dev"]
    command += ["--perms", "1777", "--size", str(_TMP_BYTES), "--tmpfs", "/tmp"]
    command += ["--remount-ro", "/", "--chdir", "/tmp"]
    for name, value in _child_env("/tmp").items():
        command += ["--setenv", name, value]
    return [*command, python, "-I", "-S", "-c", _CHILD]


def _child_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


def _host_root() -> bool:
    """Root of the host's user namespace: exempt from RLIMIT_NPROC, and free to take any uid (a root mapped from
    another user, as in a rootless container, is neither)."""
    try:
        with open("/proc/self/uid_map") as uid_map:
            return os.geteuid() == 0 and uid_map.read().split()[:3] == ["0", "0", "4294967295"]
    except OSError:
        return False


def _sandbox_uid(as_root: bool) -> int | None:
    return _UIDS[0] + secrets.randbelow(_UIDS[1] - _UIDS[0]) if as_root else None


@cache
def _bwrap_ready(bwrap: str, as_root: bool) -> str:
    """'' when bubblewrap can build the sandbox here (the child enters it and checks nothing), else why not. Tried
    once per process."""
    job = {"role": "check", "tests": [], "limits": [], "uid": _sandbox_uid(as_root), "out": 1}
    command = _bwrap_command(bwrap, as_root)
    probe = subprocess.run(
        command, input=json.dumps(job).encode(), capture_output=True, env={}, cwd="/", timeout=30
    )
    return "" if probe.returncode == 0 else probe.stderr.decode(errors="replace").strip()[-500:]


def _require_bwrap(as_root: bool) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(
            f"model-written code runs only inside bubblewrap, and `bwrap` is not on PATH: {_INSTALL}. To run it "
            f"without isolation anyway (code you trust only), set {SANDBOX_ENV}=process."
        )
    why = _bwrap_ready(bwrap, as_root)
    if why:
        raise SandboxUnavailable(
            f"bubblewrap cannot build a sandbox here ({why}). It needs bubblewrap 0.8 or newer, and user namespaces "
            "(sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1) or, as root, CAP_SYS_ADMIN "
            f"(a container allowed to create namespaces). Nothing was run; {SANDBOX_ENV}=process runs code without "
            "isolation (code you trust only)."
        )
    return _bwrap_command(bwrap, as_root)


@dataclass
class _Run:
    returncode: int
    timed_out: bool
    stdout: str
    stderr: str
    lines: list[Any]  # the JSON lines of the result channel that parse


def _read_head(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read(_OUTPUT_LIMIT).decode(errors="replace")


def _json_lines(text: str) -> list[Any]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def _kill_sandbox(child: subprocess.Popen, info: IO[bytes]) -> None:
    """Kill the sandbox's init (its host pid is in bwrap's --info-fd JSON): the kernel kills its whole PID namespace
    and bwrap exits once all of it is gone. Then bwrap's session (or, unisolated, the child's)."""
    info.seek(0)
    with contextlib.suppress(ValueError, KeyError, TypeError, ProcessLookupError, subprocess.TimeoutExpired):
        os.kill(int(json.loads(info.read())["child-pid"]), signal.SIGKILL)
        child.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


def _run_child(
    job: dict[str, Any], isolation: Isolation, timeout_s: float, memory_mb: int, max_processes: int
) -> _Run:
    """Run _CHILD with `job` on stdin, isolated, and kill whatever is left of it on return."""
    as_root = _host_root()
    limits = [
        ("RLIMIT_AS", memory_mb << 20),
        ("RLIMIT_CPU", math.ceil(timeout_s) + 1),
        ("RLIMIT_FSIZE", _OUTPUT_LIMIT),
        ("RLIMIT_CORE", 0),
        ("RLIMIT_NOFILE", 256),
    ]
    if isolation == "bwrap":
        # bwrap's init counts in the user namespace of a non-root sandbox
        limits.append(("RLIMIT_NPROC", max_processes + (0 if as_root else 1)))
        command, uid = _require_bwrap(as_root), _sandbox_uid(as_root)
    else:
        command, uid = [sys.executable, "-I", "-S", "-c", _CHILD], None
    with contextlib.ExitStack() as stack:
        out, err, results, info = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(4))
        if isolation == "bwrap":
            command = [command[0], "--info-fd", str(info.fileno()), *command[1:]]
            cwd = "/"
        else:
            cwd = stack.enter_context(tempfile.TemporaryDirectory(prefix="ragseek-sandbox-"))
        job = {**job, "limits": limits, "uid": uid, "out": results.fileno()}
        child = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            pass_fds=(results.fileno(), info.fileno()),
            cwd=cwd,
            env={} if isolation == "bwrap" else _child_env(cwd),
            start_new_session=True,
        )
        timed_out = False
        try:
            child.communicate(json.dumps(job).encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if child.poll() is None:
                _kill_sandbox(child, info)
            child.wait()
        stdout, stderr, lines = _read_head(out), _read_head(err), _json_lines(_read_head(results))
        return _Run(child.returncode, timed_out, stdout, stderr, lines)


def _values_sent(lines: list[Any], planned: list[PlannedTest]) -> dict[int, list[str]]:
    """test index -> the reprs of its expressions, from the solution's result lines (untrusted: whatever does not
    fit is dropped; the last line for a test wins)."""
    values = {}
    for line in lines:
        if isinstance(line, list) and len(line) == 2 and type(line[0]) is int and isinstance(line[1], list):
            i, sent = line
            fits = 0 <= i < len(planned) and len(sent) == len(planned[i].expressions)
            if fits and all(type(v) is str for v in sent):
                values[i] = sent
    return values


def run_sandboxed(
    solution: str,
    tests: Sequence[str] = (),
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_processes: int = 16,
    isolation: Isolation | None = None,
) -> SandboxResult:
    """Run untrusted Python `solution` and score it on `tests` (statements such as `assert f(2) == 4`); never in
    this process, and never without isolation unless asked.

    Two sandboxed children (bubblewrap; see the section comment above): the solution with the parts of each test
    that need it (`plan_tests`), which sends back their values; then the tests' assertions on those values, with no
    model code. A test passes when its values came back and its assertions held. Limits per child: `timeout_s` of
    wall time (then everything in it is killed), `memory_mb` of address space per process, as many CPU seconds,
    `max_processes` processes and threads, 1 MB per file written, 64 MB of /tmp.

    `isolation`: "bwrap" (default), or "process" (no namespaces, logged; for code you trust); None reads
    $RAGSEEK_SANDBOX. Raises SandboxUnavailable when bubblewrap is missing or cannot run here.
    """
    isolation = _isolation(isolation)
    planned = plan_tests(solution, tests)
    ran = _run_child(
        {"role": "solution", "solution": solution, "tests": [[t.imports, t.expressions] for t in planned]},
        isolation,
        timeout_s,
        memory_mb,
        max_processes,
    )
    values = _values_sent(ran.lines, planned)
    why: dict[int, str] = {
        i: "no values came back (the solution failed or stopped first)" for i in range(len(tests))
    }
    if values:
        why |= {i: "its check did not finish" for i in values}
        checks = [[i, planned[i].imports, planned[i].check, v] for i, v in values.items()]
        checked = _run_child({"role": "check", "tests": checks}, isolation, timeout_s, memory_mb, 1)
        for line in checked.lines:
            if isinstance(line, list) and len(line) == 2 and type(line[0]) is int and line[0] in values:
                i, error = line
                sent = ", ".join(
                    f"{e} = {v:.80}" for e, v in zip(planned[i].expressions, values[i], strict=True)
                )
                why[i] = "" if error is None else "; ".join(filter(None, [error.rstrip(": "), sent]))
    failures = [f"test {i} failed: {reason}" for i, reason in why.items() if reason]
    stderr = "\n".join(filter(None, [ran.stderr.rstrip(), *failures]))
    passed = sum(not reason for reason in why.values())
    return SandboxResult(passed, len(tests), ran.returncode, ran.timed_out, ran.stdout, stderr, isolation)


_CODE_BLOCK = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The last fenced code block (```python … ```) of a response, or the whole response when it has none."""
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else text


def code_reward(
    prompts: Sequence[Any],
    completions: Sequence[Completion],
    tests: Sequence[str | Sequence[str]] | None = None,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    **kw: Any,
) -> list[float]:
    """The share of its tests that each completion's code passes (`extract_code`, then `run_sandboxed`), in [0, 1].

    `tests` holds one entry per completion: a list of test statements (MBPP's `test_list`, e.g.
    `["assert add(1, 2) == 3"]`) or one string run as a single test. Completions run in parallel, one sandbox each.
    Raises SandboxUnavailable where bubblewrap cannot run (RAGSEEK_SANDBOX=process opts out of isolation).
    """
    if tests is None or len(tests) != len(completions):
        raise ValueError(
            "code_reward needs tests=[...], one entry (a list of test statements) per completion"
        )

    def score(completion: Completion, case: str | Sequence[str]) -> float:
        cases = [case] if isinstance(case, str) else list(case)
        return run_sandboxed(extract_code(completion_text(completion)), cases, timeout_s, memory_mb).score

    with ThreadPoolExecutor(max_workers=max(1, min(len(completions), os.cpu_count() or 1))) as pool:
        return list(pool.map(score, completions, tests))


# ---------------------------------------------------------------------------------------------------------------------
# by name


RewardFn = Callable[..., list[float]]
REWARDS: dict[str, RewardFn] = {
    "numeric_match": numeric_match_reward,
    "format": format_reward,
    "code": code_reward,
    "reader_f1": reader_f1_reward,
    "reader_citation": reader_citation_reward,
    "reader_dont_know": reader_dont_know_reward,
    "reader_format": reader_format_reward,
}


def resolve_reward(name: str) -> RewardFn:
    """A built-in reward by name, or any callable as "package.module:function" (TRL's signature)."""
    if name in REWARDS:
        return REWARDS[name]
    module, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"reward {name!r}: use one of {sorted(REWARDS)} or 'package.module:function'")
    return getattr(importlib.import_module(module), attr)
