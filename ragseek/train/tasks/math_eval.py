"""`ragseek eval math`: accuracy of a model on {"question", "answer"} JSONL rows, greedy decoding, batched.

    ragseek eval math --model runs/grpo/final --data addition_eval.jsonl --n 100 --json

A row is correct when the completion's final number (`rewards.extract_answer`: <answer>, \\boxed{}, #### N, else the
last number) equals the answer's; the answer may be a number or GSM8K's "… #### N". Each question goes through the
model's chat template, as in GRPO training (`data.load_prompts`).

It lives in tasks/ beside `addition`, whose rows it scores: it is how a maths task is graded, for the CLI, for GRPO's
eval_every and for the benchmarks, not a step of any one recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragseek import progress
from ragseek.model import SamplingConfig, Tokenizer, Transformer
from ragseek.model.decoding import generate_ids
from ragseek.train.data import load_prompts
from ragseek.train.rewards import numbers_match


def evaluate_math(
    model: Transformer,
    tokenizer: Tokenizer,
    rows: Sequence[dict[str, Any]],
    max_new_tokens: int = 64,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Greedy completions for `rows` (from `load_prompts`: prompt_ids + answer), scored by numeric match.

    Returns {"accuracy", "n", "tokens_generated", "completions", "correct"} ("correct": one bool per row).
    """
    if not rows:
        raise ValueError("no rows to evaluate: the data file is empty (or every prompt was too long)")
    missing = [i for i, r in enumerate(rows) if r.get("answer") is None]
    if missing:
        raise ValueError(
            f"rows {missing[:5]} have no 'answer': eval math needs {{'question', 'answer'}} rows"
        )
    was_training = model.training
    model.eval()
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    completions, tokens = [], 0
    with progress.task("questions", total=len(rows), unit="q") as line:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            for g in generate_ids(
                model, [r["prompt_ids"] for r in chunk], greedy, {tokenizer.eos_id}, tokenizer
            ):
                completions.append(g.text)
                tokens += len(g.tokens)
            line.advance(len(chunk))
    model.train(was_training)
    correct = [numbers_match(c, r["answer"]) for c, r in zip(completions, rows, strict=True)]
    return {
        "accuracy": sum(correct) / len(rows),
        "n": len(rows),
        "tokens_generated": tokens,
        "completions": completions,
        "correct": correct,
    }


def evaluate_file(
    model_path: str,
    data: str,
    n: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    max_prompt_len: int = 512,
) -> dict[str, Any]:
    """Load the model and the first n rows of `data`, and run `evaluate_math`."""
    from ragseek.train.run import load_model

    with progress.task(f"loading {Path(model_path).name if model_path else 'SmolLM2-135M-Instruct'}"):
        model, tokenizer = load_model(model_path)
    rows = load_prompts(data, tokenizer, max_prompt_len)
    return evaluate_math(model, tokenizer, rows[:n] if n else rows, max_new_tokens, batch_size)
