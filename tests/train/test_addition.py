"""The addition task: a fixed held-out set, training sets that never touch it, worked solutions whose arithmetic is
right for every one of the 8100 problems, the three response styles, the checker and the JSONL writers."""

from __future__ import annotations

import json
import random
import re

import pytest

from ragseek.train.rewards import format_reward, numeric_match_reward
from ragseek.train.tasks.addition import (
    EVAL_SEED,
    Problem,
    accuracy,
    eval_problems,
    is_correct,
    prompt,
    response,
    train_problems,
    worked_slip,
    worked_solution,
    write_dpo_jsonl,
    write_grpo_jsonl,
    write_sft_jsonl,
    wrong_answer,
)

ALL = [Problem(a, b) for a in range(10, 100) for b in range(10, 100)]


def test_eval_set_is_fixed_distinct_and_two_digit():
    problems = eval_problems()
    assert len(problems) == 500 == len(set(problems))
    assert problems[:3] == [Problem(59, 64), Problem(92, 21), Problem(54, 83)]  # pinned: the set never drifts
    assert eval_problems(10) == problems[:10]
    assert all(10 <= x <= 99 for p in problems for x in (p.a, p.b))
    assert problems[0].question == "What is 59 + 64?" and problems[0].answer == 123


def test_training_sets_exclude_the_eval_pairs_in_both_orders():
    held_out = {(p.a, p.b) for p in eval_problems()}
    train = train_problems(3000, seed=0)
    assert len(set(train)) == 3000
    assert not any((p.a, p.b) in held_out or (p.b, p.a) in held_out for p in train)
    assert train_problems(50, seed=0) != train_problems(50, seed=1)
    assert train_problems(50, seed=7) == train_problems(50, seed=7)
    with pytest.raises(ValueError, match="EVAL_SEED"):
        train_problems(10, seed=EVAL_SEED)
    with pytest.raises(ValueError, match="distinct training problems"):
        train_problems(len(ALL), seed=0)


def test_worked_solution_hand_examples():
    assert worked_solution(Problem(12, 19)) == (
        "units: 2 + 9 = 11, write 1 carry 1; tens: 1 + 1 + 1 = 3, write 3; so 12 + 19 = 31."
    )
    assert (
        worked_solution(Problem(13, 24))
        == "units: 3 + 4 = 7, write 7, no carry; tens: 1 + 2 = 3, write 3; so 13 + 24 = 37."
    )
    assert worked_solution(Problem(56, 78)) == (
        "units: 6 + 8 = 14, write 4 carry 1; tens: 5 + 7 + 1 = 13, write 13; so 56 + 78 = 134."
    )


STEPS = re.compile(
    r"units: (\d) \+ (\d) = (\d+), write (\d)(?: carry (1)|, no carry); tens: (\d) \+ (\d)(?: \+ (1))? = (\d+), write (\d+); "
    r"so (\d+) \+ (\d+) = (\d+)\.$"
)


def test_every_worked_solution_does_correct_column_addition():
    for p in ALL:
        m = STEPS.fullmatch(worked_solution(p))
        assert m, worked_solution(p)
        au, bu, units, digit, carry, at, bt, carried, tens, written, a, b, total = m.groups()
        assert (int(at) * 10 + int(au), int(bt) * 10 + int(bu), int(a), int(b)) == (p.a, p.b, p.a, p.b)
        assert int(units) == int(au) + int(bu) and int(digit) == int(units) % 10
        assert carry == carried and (carry is not None) == (int(units) >= 10)
        assert int(tens) == int(at) + int(bt) + int(carry or 0) and written == tens
        assert int(written + digit) == int(total) == p.a + p.b


def test_styles_and_checker():
    p = Problem(12, 19)
    assert response(p, "answer") == "31"
    think = response(p, "think")
    assert think.startswith("<think>units: 2 + 9") and think.endswith("</think><answer>31</answer>")
    assert format_reward(None, [think, response(p, "worked")]) == [1.0, 0.0]
    assert prompt(p, "answer") == "What is 12 + 19?" and "<answer>" in prompt(p, "think")
    assert all(
        is_correct(response(q, style), q) for q in ALL[::97] for style in ("worked", "answer", "think")
    )
    assert not is_correct("<answer>30</answer> or maybe 31", p)  # the answer block wins over the last number
    assert not is_correct("I cannot add", p)
    assert accuracy(["31", "32", "so it is 31."], [p, p, p]) == pytest.approx(2 / 3)


def test_wrong_answer_is_always_wrong_and_plausible():
    rng = random.Random(0)
    for p in ALL:
        wrong = wrong_answer(p, rng)
        assert wrong != p.answer and abs(wrong - p.answer) in (1, 10)
    forgot_carry = {wrong_answer(Problem(12, 19), random.Random(s)) for s in range(50)}
    assert 21 in forgot_carry  # 12 + 19 with the carry dropped


def test_worked_slip_has_one_wrong_step_carried_to_a_wrong_answer():
    head = "units: 2 + 9 = 11, write 1 carry 1; tens: "
    assert {worked_slip(Problem(12, 19), random.Random(s)) for s in range(200)} == {
        "units: 2 + 9 = 10, write 0 carry 1; tens: 1 + 1 + 1 = 3, write 3; so 12 + 19 = 30.",
        "units: 2 + 9 = 12, write 2 carry 1; tens: 1 + 1 + 1 = 3, write 3; so 12 + 19 = 32.",
        head + "1 + 1 + 1 = 2, write 2; so 12 + 19 = 21.",
        head + "1 + 1 + 1 = 4, write 4; so 12 + 19 = 41.",
        head + "1 + 1 = 2, write 2; so 12 + 19 = 21.",  # the carry dropped
    }
    rng = random.Random(0)
    for p in ALL:
        slip = worked_slip(p, rng)
        m = STEPS.fullmatch(slip)
        assert m and not is_correct(slip, p), slip
        *_, tens, written, a, b, total = m.groups()
        assert int(written) == int(tens) and int(total) == int(written) * 10 + int(m.group(4))
        assert (int(a), int(b)) == (p.a, p.b)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_jsonl_writers(tmp_path):
    problems = train_problems(20, seed=3)
    sft = read_jsonl(write_sft_jsonl(tmp_path / "sft" / "worked.jsonl", problems))
    assert sft[0] == {"prompt": problems[0].question, "response": worked_solution(problems[0])}
    answers_only = read_jsonl(write_sft_jsonl(tmp_path / "answers.jsonl", problems, style="answer"))
    assert [row["response"] for row in answers_only] == [str(p.answer) for p in problems]

    rng = random.Random(1)
    rejected = [str(wrong_answer(p, rng)) for p in problems]
    dpo = read_jsonl(write_dpo_jsonl(tmp_path / "dpo.jsonl", problems, rejected))
    assert set(dpo[0]) == {"prompt", "chosen", "rejected"}
    assert all(
        is_correct(r["chosen"], p) and not is_correct(r["rejected"], p)
        for r, p in zip(dpo, problems, strict=True)
    )
    with pytest.raises(ValueError, match="is correct"):
        write_dpo_jsonl(tmp_path / "bad.jsonl", problems[:1], [f"it is {problems[0].answer}"])

    grpo = read_jsonl(write_grpo_jsonl(tmp_path / "grpo.jsonl", problems, style="think"))
    assert set(grpo[0]) == {"question", "answer"} and grpo[0]["question"] == prompt(problems[0], "think")
    # the rows feed the numeric reward as TRL passes dataset columns
    completions = [response(p, "think") for p in problems]
    assert numeric_match_reward(None, completions, answer=[r["answer"] for r in grpo]) == [1.0] * 20
