"""The lecture's addition story: "What is a + b?" for two 2-digit numbers (10 to 99).

    v0 (SFT):   "I explain how I perform the addition ... I first add the units, remember the carry" — `worked_solution`
    v1 (RLHF):  a reward model judges reasoning and answer
    v2 (GRPO):  "I ignore the reasoning and reward her when the answer is correct" — `is_correct`

The held-out evaluation set is `eval_problems()`: 500 distinct problems drawn with `EVAL_SEED`, a seed no training
set may use. Training sets (`train_problems`) are drawn from the other pairs: neither a + b nor b + a of an
evaluation problem appears in training. Responses come in three styles: "worked" (the lecture's
"fathersplaining": "units: 2 + 9 = 11, write 1 carry 1; tens: ..."), "answer" (the number only) and "think"
(`<think>worked solution</think><answer>N</answer>`, the R1-Zero template). The JSONL writers produce the rows the
recipes read: SFT {"prompt", "response"}, DPO {"prompt", "chosen", "rejected"}, GRPO {"question", "answer"}.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from ragseek.train.data import write_jsonl
from ragseek.train.rewards import numbers_match

Style = Literal["worked", "answer", "think"]

EVAL_SEED = 20250120  # DeepSeek-R1's release day; train_problems refuses it
EVAL_SIZE = 500
LOW, HIGH = 10, 99  # two-digit operands, both ends included
THINK_INSTRUCTION = "Think inside <think></think>, then give the final answer inside <answer></answer>."


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def question(self) -> str:
        return f"What is {self.a} + {self.b}?"


@cache
def _all_pairs() -> tuple[tuple[int, int], ...]:
    return tuple((a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1))


@cache
def _eval_pairs() -> tuple[tuple[int, int], ...]:
    return tuple(random.Random(EVAL_SEED).sample(_all_pairs(), EVAL_SIZE))


def eval_problems(n: int = EVAL_SIZE) -> list[Problem]:
    """The held-out set: the first n of 500 distinct problems drawn with EVAL_SEED (the same on every machine)."""
    if not 0 < n <= EVAL_SIZE:
        raise ValueError(f"n={n}: the held-out set has {EVAL_SIZE} problems")
    return [Problem(a, b) for a, b in _eval_pairs()[:n]]


def train_problems(n: int, seed: int) -> list[Problem]:
    """n distinct problems drawn with `seed` from the pairs not held out (neither order of an evaluation pair)."""
    if seed == EVAL_SEED:
        raise ValueError(f"seed={seed} is EVAL_SEED, reserved for the held-out set: pick another seed")
    held_out = {pair for a, b in _eval_pairs() for pair in ((a, b), (b, a))}
    pool = [pair for pair in _all_pairs() if pair not in held_out]
    if not 0 < n <= len(pool):
        raise ValueError(
            f"n={n}: between 1 and {len(pool)} distinct training problems exist; reuse them over epochs"
        )
    return [Problem(a, b) for a, b in random.Random(seed).sample(pool, n)]


def worked_solution(problem: Problem) -> str:
    """Column addition in words, e.g. 12 + 19:
    "units: 2 + 9 = 11, write 1 carry 1; tens: 1 + 1 + 1 = 3, write 3; so 12 + 19 = 31." (the answer comes last)."""
    return _worked(problem)


def worked_slip(problem: Problem, rng: random.Random) -> str:
    """A worked solution with one plausible slip carried through to a wrong final answer: the units sum off by one,
    the carry dropped from the tens (when there is one), or the tens sum off by one. The reward model's rejected
    responses: the steps read like `worked_solution`'s, and only checking them finds the error."""
    units = problem.a % 10 + problem.b % 10
    units_error = rng.choice((-1, 1))
    if units + units_error < 0:  # 0 + 0 can only be misadded upwards
        units_error = 1
    slips = [dict(units_error=units_error), dict(tens_error=rng.choice((-1, 1)))]
    if units >= 10:
        slips.append(dict(drop_carry=True))
    return _worked(problem, **rng.choice(slips))


def _worked(problem: Problem, units_error: int = 0, drop_carry: bool = False, tens_error: int = 0) -> str:
    """`worked_solution`, or with one step wrong and the rest computed from it (`worked_slip`)."""
    (a_tens, a_units), (b_tens, b_units) = divmod(problem.a, 10), divmod(problem.b, 10)
    units = a_units + b_units + units_error
    carry, digit = divmod(units, 10)
    units_step = f"units: {a_units} + {b_units} = {units}, write {digit}" + (
        f" carry {carry}" if carry else ", no carry"
    )
    added = 0 if drop_carry else carry
    tens = a_tens + b_tens + added + tens_error
    tens_terms = f"{a_tens} + {b_tens}" + (f" + {added}" if added else "")
    total = tens * 10 + digit
    return f"{units_step}; tens: {tens_terms} = {tens}, write {tens}; so {problem.a} + {problem.b} = {total}."


RESPONSES: dict[Style, Callable[[Problem], str]] = {
    "worked": worked_solution,
    "answer": lambda problem: str(problem.answer),
    "think": lambda problem: f"<think>{worked_solution(problem)}</think><answer>{problem.answer}</answer>",
}


def prompt(problem: Problem, style: Style = "answer") -> str:
    """The user turn: the question, plus the think/answer instruction for the "think" style."""
    return f"{problem.question} {THINK_INSTRUCTION}" if style == "think" else problem.question


def response(problem: Problem, style: Style = "worked") -> str:
    """The target response in one style: "worked", "answer" or "think"."""
    return RESPONSES[style](problem)


def wrong_answer(problem: Problem, rng: random.Random) -> int:
    """A plausible slip, never the right sum: the carry forgotten (when there is one), or off by one or by ten."""
    carry = 10 if problem.a % 10 + problem.b % 10 >= 10 else 0
    slips = {
        problem.answer - carry,
        problem.answer + 1,
        problem.answer - 1,
        problem.answer + 10,
        problem.answer - 10,
    }
    return rng.choice(sorted(slips - {problem.answer}))


def is_correct(completion: str, problem: Problem) -> bool:
    """The answer checker: the completion's final number (`rewards.extract_answer`) equals a + b."""
    return numbers_match(completion, problem.answer)


def accuracy(completions: Sequence[str], problems: Sequence[Problem]) -> float:
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completions for {len(problems)} problems: pass one per problem")
    return sum(is_correct(c, p) for c, p in zip(completions, problems, strict=True)) / len(problems)


def write_sft_jsonl(path: str | Path, problems: Iterable[Problem], style: Style = "worked") -> Path:
    """SFT rows {"prompt", "response"}: "worked" is v0's fathersplaining, "answer" the answers-only variant."""
    return write_jsonl(path, ({"prompt": prompt(p, style), "response": response(p, style)} for p in problems))


def write_dpo_jsonl(
    path: str | Path, problems: Sequence[Problem], rejected: Sequence[str], style: Style = "answer"
) -> Path:
    """DPO rows {"prompt", "chosen", "rejected"}: the correct response against a wrong one (the model's own wrong
    answer, or `str(wrong_answer(...))`); a "rejected" response that is in fact correct is an error."""
    if len(rejected) != len(problems):
        raise ValueError(
            f"{len(rejected)} rejected responses for {len(problems)} problems: pass one per problem"
        )
    rows = []
    for problem, bad in zip(problems, rejected, strict=True):
        if is_correct(bad, problem):
            raise ValueError(
                f"the rejected response {bad!r} to {problem.question!r} is correct: DPO needs a wrong one"
            )
        rows.append({"prompt": prompt(problem, style), "chosen": response(problem, style), "rejected": bad})
    return write_jsonl(path, rows)


def write_pairs_jsonl(
    path: str | Path, problems: Sequence[Problem], style: Style = "answer", seed: int = 0
) -> Path:
    """Preference rows for `ragseek train rm` / `dpo`: the correct response against a plausible slip drawn with
    `seed`, `wrong_answer`'s number ("answer") or a `worked_slip` ("worked")."""
    rng = random.Random(seed)
    slips = {"answer": lambda p: str(wrong_answer(p, rng)), "worked": lambda p: worked_slip(p, rng)}
    if style not in slips:
        raise ValueError(f"--style {style}: preference pairs are answer or worked")
    return write_dpo_jsonl(path, problems, [slips[style](p) for p in problems], style)


def write_grpo_jsonl(path: str | Path, problems: Iterable[Problem], style: Style = "answer") -> Path:
    """GRPO / `ragseek eval math` rows {"question", "answer"}: no reasoning given, only the answer to check."""
    return write_jsonl(path, ({"question": prompt(p, style), "answer": str(p.answer)} for p in problems))
