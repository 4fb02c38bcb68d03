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

import importlib
import json
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
from typing import IO, Any, Literal

Completion = str | list[dict[str, str]]
NetworkGuard = Literal["auto", "netns", "audit_hook"]


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
    from ragseek.rag.evaluate import is_dont_know, strip_citations, token_f1

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
    from ragseek.rag.evaluate import is_dont_know

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
# Code execution in a sandboxed subprocess

# The child's own code, run before the model's: it sets the resource limits (soft = hard, so they stay), forbids new
# processes and, when the kernel cannot take the network away, sockets (audit hooks, PEP 578). Then it executes the
# solution and each test in one namespace and, after each test that passes, writes a secret token (read from stdin
# before any untrusted code runs) to a copy of stdout: a program that exits early with status 0, or that patches
# builtins such as exec, scores nothing. Code that sets out to read the runner's frames or file descriptors can
# still forge passes; for adversarial code, run each test in its own `run_sandboxed` call.
_RUNNER = r"""
import json, os, resource, sys

_BLOCKED = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty")
_BLOCK_SOCKETS = sys.argv[1] == "1"

def _guard(event, args):
    if event in _BLOCKED or (_BLOCK_SOCKETS and event.startswith("socket.")):
        raise PermissionError(f"{event} is not allowed in the ragseek sandbox")

def _limit(memory_mb, cpu_s, output_bytes):
    # soft = hard: an unprivileged process cannot raise a hard limit again
    for limit, value in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, cpu_s),
                         (resource.RLIMIT_FSIZE, output_bytes), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))

def _run(token, solution, tests, _exec=exec, _compile=compile, _write=os.write, _out=os.dup(1)):
    # exec, compile and the result channel are bound here, before the solution can patch builtins or stdout
    sys.addaudithook(_guard)
    scope = {"__name__": "solution"}
    _exec(_compile(solution, "solution.py", "exec"), scope)
    for i, test in enumerate(tests):
        try:
            _exec(_compile(test, f"test_{i}.py", "exec"), scope)
        except Exception as error:
            print(f"test {i} failed: {type(error).__name__}: {error}", file=sys.stderr)
        else:
            _write(_out, f"{token} {i}\n".encode())

_job = json.loads(sys.stdin.read())
sys.stdin.close()
_limit(*_job.pop("limits"))
_run(_job.pop("token"), _job["solution"], _job["tests"])
"""

_OUTPUT_LIMIT = 1 << 20  # bytes of stdout / stderr kept (RLIMIT_FSIZE kills a child that writes more)


def _read_head(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read(_OUTPUT_LIMIT).decode(errors="replace")


@dataclass
class SandboxResult:
    """What one sandboxed run did. `passed` counts the tests that passed, out of `total`."""

    passed: int
    total: int
    returncode: int
    timed_out: bool
    stdout: str
    stderr: str

    @property
    def score(self) -> float:
        return self.passed / self.total if self.total else 0.0


@cache
def netns_available() -> bool:
    """Whether `unshare -rn` can give the child a fresh network namespace (no interfaces up: no network at all)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10)
    return probe.returncode == 0


def run_sandboxed(
    solution: str,
    tests: Sequence[str] = (),
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    network_guard: NetworkGuard = "auto",
) -> SandboxResult:
    """Run untrusted Python `solution`, then each test in `tests` (statements such as `assert f(2) == 4`), in a
    child process; never in this one.

    The child is this interpreter in isolated mode (`-I`: no user site, no PYTHON* variables), started in a fresh
    temp dir (its cwd, HOME and TMPDIR, deleted afterwards) with a minimal environment, in its own session so that a
    timeout kills the whole process group (SIGKILL). Limits: `timeout_s` of wall time, `memory_mb` of address space
    (RLIMIT_AS: a memory bomb gets MemoryError or dies), CPU seconds, 1 MB of output. Network: "netns" runs the
    child in a new user + network namespace (`unshare -rn`: no interface is up, every connection fails in the
    kernel); "audit_hook" makes every socket operation raise in the child instead; "auto" takes netns when the
    kernel allows it. In every mode an audit hook forbids starting processes. An audit hook is not a security
    boundary against hostile code (ctypes can go around it); the namespace is.
    """
    guard = ("netns" if netns_available() else "audit_hook") if network_guard == "auto" else network_guard
    if guard == "netns" and not netns_available():
        raise RuntimeError(
            "network_guard='netns' needs `unshare -rn` (user namespaces); use 'audit_hook' or 'auto'"
        )
    token = secrets.token_hex(16)
    command = [sys.executable, "-I", "-c", _RUNNER, "1" if guard == "audit_hook" else "0"]
    if guard == "netns":
        command = ["unshare", "-rn", *command]
    limits = (memory_mb, math.ceil(timeout_s) + 1, _OUTPUT_LIMIT)
    job = json.dumps({"token": token, "limits": limits, "solution": solution, "tests": list(tests)})
    with tempfile.TemporaryDirectory(prefix="ragseek-sandbox-") as tmp:
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        env |= {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        # unnamed files (not pipes: a child that prints without end cannot fill this process's memory)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            child = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                cwd=tmp,
                env=env,
                start_new_session=True,
            )
            timed_out = False
            try:
                child.communicate(job.encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the child and anything it left behind in its session
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.wait()
            stdout, stderr = (_read_head(f) for f in (out, err))
    passed = sum(line.startswith(token + " ") for line in stdout.splitlines())
    stdout = "\n".join(line for line in stdout.splitlines() if not line.startswith(token + " "))
    return SandboxResult(passed, len(tests), child.returncode, timed_out, stdout, stderr)


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
    `["assert add(1, 2) == 3"]`) or one string run as a single test. Completions run in parallel, one child each.
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
