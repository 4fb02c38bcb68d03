"""GRPO on CPU: one step of ragseek vs TRL's GRPOTrainer, then the lecture's addition story with SmolLM2-135M.

    .venv/bin/python bench/bench_rl.py [--grpo-minutes 15] [--eval-n 500] [--after-n 200]
    .venv/bin/python bench/bench_rl.py --skip-story     # only part 1; the story already in rl.json stays

Part 1, one GRPO step on SmolLM2-135M-Instruct fp32 (2 prompts × 4 completions, 32 new tokens, one update,
β = 0, loss_type grpo, temperature 1): ragseek's recipe (`ragseek.train.grpo.train`) and TRL's GRPOTrainer
(`bf16=False`, `use_cpu=True`, `gradient_checkpointing=False`) in the same process, the same prompts and reward.
Each runs 2 steps; the second is timed (the first pays one-off costs), split into generation and training.

Part 2, the addition story: greedy accuracy of SmolLM2 on the 500 held-out problems (`tasks.addition`), then a GRPO
run with the answer-only reward (`numeric_match`) sized to the CPU budget, then accuracy on the first `after_n`
held-out problems. Writes bench/results/rl.json, rl.md and docs/img/grpo_addition.png (response length, reward,
accuracy per step). The run directory is runs/bench_grpo_addition; the md gives the command that continues it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ragseek.defaults import smollm2_gguf  # noqa: E402
from ragseek.model.checkpoint import gguf_to_folder  # noqa: E402
from ragseek.train import grpo  # noqa: E402
from ragseek.train.common import load_model  # noqa: E402
from ragseek.train.evaluate_math import evaluate_math  # noqa: E402
from ragseek.train.loop import LoopConfig, read_metrics  # noqa: E402
from ragseek.train.rewards import numbers_match, numeric_match_reward  # noqa: E402
from ragseek.train.tasks.addition import eval_problems, train_problems, write_grpo_jsonl  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "runs"
IMG = ROOT / "docs" / "img"
STEP = {"prompts": 2, "group_size": 4, "max_new_tokens": 32, "lr": 1e-6}


def ragseek_step(model_dir: Path, data: Path) -> dict:
    cfg = grpo.GRPOConfig(
        model=str(model_dir),
        data=str(data),
        rewards=["numeric_match"],
        group_size=STEP["group_size"],
        prompts_per_step=STEP["prompts"],
        max_new_tokens=STEP["max_new_tokens"],
        loop=LoopConfig(lr=STEP["lr"], max_steps=2, ckpt_every=0, out_dir=str(RUNS / "bench_rl_step")),
    )
    rows = grpo.train(cfg)
    last = rows[-1]
    return {
        "step_s": last["step_s"],
        "generation_s": last["step_s"] * last["gen_share"],
        "training_s": last["step_s"] * (1 - last["gen_share"]),
        "completion_tokens": last["response_length"] * STEP["prompts"] * STEP["group_size"],
    }


def trl_step(model_dir: Path, data: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in data.read_text().splitlines()][: STEP["prompts"] * 2]
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in rows]
    )
    args = GRPOConfig(
        output_dir=str(RUNS / "bench_rl_trl"),
        per_device_train_batch_size=STEP["prompts"] * STEP["group_size"],
        num_generations=STEP["group_size"],
        max_completion_length=STEP["max_new_tokens"],
        learning_rate=STEP["lr"],
        max_steps=2,
        beta=0.0,
        loss_type="grpo",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps: list[float] = []

        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            self.steps.append(time.perf_counter() - self.t0)

    timer = Timer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=numeric_match_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    gen_times: list[float] = []
    name = "_generate_single_turn" if hasattr(trainer, "_generate_single_turn") else "_generate"
    inner = getattr(trainer, name)

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        gen_times.append(time.perf_counter() - t0)
        return out

    setattr(trainer, name, timed)
    trainer.train()
    step = timer.steps[-1]
    return {"step_s": step, "generation_s": gen_times[-1], "training_s": step - gen_times[-1], "timed": name}


def addition_story(args: argparse.Namespace, step_s: float) -> dict:
    data_dir = RUNS / "data"
    train_file = write_grpo_jsonl(data_dir / "addition_train.jsonl", train_problems(2000, seed=1))
    eval_file = write_grpo_jsonl(data_dir / "addition_eval.jsonl", eval_problems())
    model, tokenizer = load_model(str(smollm2_gguf()))
    from ragseek.train.data import load_prompts

    rows = load_prompts(eval_file, tokenizer, 128)
    t0 = time.perf_counter()
    before = evaluate_math(model, tokenizer, rows[: args.eval_n], args.eval_tokens)
    before_s = time.perf_counter() - t0
    subset_before = (
        sum(
            numbers_match(c, r["answer"])
            for c, r in zip(before["completions"][: args.after_n], rows, strict=False)
        )
        / args.after_n
    )
    del model

    # one step here: 4 prompts × 4 completions ≈ 2× the 8-completion bench step (+30% margin)
    steps = args.grpo_steps or max(5, int(args.grpo_minutes * 60 / (2 * step_s * 1.3)))
    out_dir = RUNS / "bench_grpo_addition"
    cfg = grpo.GRPOConfig(
        model="",
        data=str(train_file),
        rewards=["numeric_match"],
        group_size=4,
        prompts_per_step=4,
        max_new_tokens=args.eval_tokens,
        loop=LoopConfig(lr=args.lr, warmup_steps=3, max_steps=steps, ckpt_every=5, out_dir=str(out_dir)),
    )
    t0 = time.perf_counter()
    logged = grpo.train(cfg)
    train_s = time.perf_counter() - t0
    trained, tokenizer = load_model(str(out_dir / "final"))
    after = evaluate_math(trained, tokenizer, rows[: args.after_n], args.eval_tokens)
    plot(out_dir / "metrics.jsonl", IMG / "grpo_addition.png")
    return {
        "eval_n": before["n"],
        "accuracy_start": before["accuracy"],
        "eval_start_s": before_s,
        "after_n": args.after_n,
        "accuracy_start_subset": subset_before,
        "accuracy_after_subset": after["accuracy"],
        "grpo_steps": steps,
        "grpo_lr": args.lr,
        "grpo_wall_s": train_s,
        "grpo_tokens_generated": sum(r["response_length"] * 16 for r in logged),
        "reward_first5": sum(r["reward_mean"] for r in logged[:5]) / min(5, len(logged)),
        "reward_last5": sum(r["reward_mean"] for r in logged[-5:]) / min(5, len(logged)),
        "length_first5": sum(r["response_length"] for r in logged[:5]) / min(5, len(logged)),
        "length_last5": sum(r["response_length"] for r in logged[-5:]) / min(5, len(logged)),
        "examples_after": after["completions"][:3],
    }


def plot(jsonl: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(jsonl)
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    for ax, key, label in zip(
        axes,
        ("response_length", "reward_mean", "accuracy"),
        ("mean response length (tokens)", "reward", "accuracy"),
        strict=True,
    ):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("GRPO step (4 prompts × 4 completions)")
    fig.suptitle("GRPO, SmolLM2-135M-Instruct, 2-digit addition, answer-only reward")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def write_md(r: dict) -> None:
    s, t = r["ragseek"], r["trl"]
    a = r.get("addition")
    command = r["command"]
    if a and r.get("story_command", command) != command:
        command += f"; then, the story: {r['story_command']}"
    lines = [
        "## RL: GRPO step vs TRL, and the addition story",
        "",
        f"`{command}` — SmolLM2-135M-Instruct fp32 on CPU, {r['threads']} torch thread(s), load average "
        f"{r['load_average']:.1f} on 2 cores when it started (the machine is shared with other jobs: absolute times "
        "are several times an idle machine's; both implementations ran in the same process, one after the other).",
        "",
        "One GRPO step: 2 prompts × 4 completions, 32 new tokens, one update, β = 0, loss_type grpo (the 2nd of 2 "
        "steps timed). TRL: GRPOTrainer, `bf16=False, use_cpu=True, gradient_checkpointing=False`.",
        "",
        "| implementation | step (s) | generation (s) | training (s) | generation share |",
        "|---|---|---|---|---|",
        f"| ragseek | {s['step_s']:.2f} | {s['generation_s']:.2f} | {s['training_s']:.2f} | "
        f"{s['generation_s'] / s['step_s']:.0%} |",
        f"| TRL {r['trl_version']} | {t['step_s']:.2f} | {t['generation_s']:.2f} | {t['training_s']:.2f} | "
        f"{t['generation_s'] / t['step_s']:.0%} |",
        "",
        f"ragseek / TRL step time: **{s['step_s'] / t['step_s']:.2f}×**.",
    ]
    if a:
        lines += [
            "",
            "The addition story (held-out problems of `ragseek.train.tasks.addition`, greedy decoding, "
            f"{r['eval_tokens']} new tokens, numeric match on the last number):",
            "",
            "| model | held-out problems | accuracy |",
            "|---|---|---|",
            f"| SmolLM2-135M-Instruct (v0 start) | first {a['eval_n']} | {a['accuracy_start']:.1%} |",
            *(
                [
                    f"| SmolLM2-135M-Instruct (v0 start) | first {a['after_n']} | {a['accuracy_start_subset']:.1%} |"
                ]
                if a["after_n"] != a["eval_n"]
                else []
            ),
            f"| + GRPO, {a['grpo_steps']} steps, answer-only reward | first {a['after_n']} | "
            f"{a['accuracy_after_subset']:.1%} |",
            "",
            f"GRPO: 4 prompts × 4 completions per step, lr {a['grpo_lr']:g}, β = 0, {a['grpo_steps']} steps in "
            f"{a['grpo_wall_s'] / 60:.1f} min, {a['grpo_tokens_generated']:,.0f} completion tokens; mean reward "
            f"{a['reward_first5']:.2f} (first 5 steps) → {a['reward_last5']:.2f} (last 5); mean response length "
            f"{a['length_first5']:.1f} → {a['length_last5']:.1f} tokens. Curves: `docs/img/grpo_addition.png`.",
            f"The {r['eval_tokens']}-token cap cuts some of SmolLM2's verbose answers before the sum, so its start "
            "here is below the 18–19% the issue reports (not re-measured with a longer cap); GRPO teaches it to answer within the cap (the "
            "response length falls) as well as to add. Training-time accuracy is of samples at temperature 1.",
            "This is a CPU-budget run, far from the issue's ≥95% target. To continue it from its last checkpoint "
            "(a new max_steps stretches the cosine schedule from there):",
            "",
            "```",
            "python -m ragseek.train.grpo --config runs/bench_grpo_addition/config.json --resume "
            "--set loop.max_steps=1000",
            "```",
        ]
    (RESULTS / "rl.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grpo-minutes", type=float, default=15.0, help="budget of the addition GRPO run")
    ap.add_argument("--eval-n", type=int, default=500, help="held-out problems for the starting accuracy")
    ap.add_argument("--after-n", type=int, default=200, help="held-out problems scored after GRPO")
    ap.add_argument("--eval-tokens", type=int, default=32, help="new tokens per answer (eval and GRPO)")
    ap.add_argument("--lr", type=float, default=1e-5, help="learning rate of the addition GRPO run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared 2-core machine)")
    ap.add_argument(
        "--grpo-steps", type=int, default=0, help="GRPO steps of the story (0: from --grpo-minutes)"
    )
    ap.add_argument(
        "--skip-story",
        action="store_true",
        help="only the one-step comparison (the story of bench/results/rl.json is kept)",
    )
    ap.add_argument(
        "--reuse-step", action="store_true", help="keep the one-step comparison of bench/results/rl.json"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = ".venv/bin/python bench/bench_rl.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)

    import trl

    model_dir = gguf_to_folder(smollm2_gguf())
    data = write_grpo_jsonl(RUNS / "data" / "addition_bench_step.jsonl", train_problems(16, seed=7))
    path = RESULTS / "rl.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    if args.reuse_step:
        result = previous
    else:
        result = {
            "command": command,
            "load_average": os.getloadavg()[0],
            "threads": torch.get_num_threads(),
            "trl_version": trl.__version__,
            "step": STEP,
        }
        if args.skip_story:  # the story of the last run stays
            result.update(
                {k: previous[k] for k in ("addition", "story_command", "eval_tokens") if k in previous}
            )
        result["ragseek"] = ragseek_step(model_dir, data)
        print("ragseek", result["ragseek"], flush=True)
        result["trl"] = trl_step(model_dir, data)
        print("trl", result["trl"], flush=True)
        result["ratio"] = result["ragseek"]["step_s"] / result["trl"]["step_s"]
    path.write_text(json.dumps(result, indent=2))
    write_md(result)
    if not args.skip_story:
        result.update(story_command=command, eval_tokens=args.eval_tokens)
        result["addition"] = addition_story(args, result["ragseek"]["step_s"])
        print("addition", result["addition"], flush=True)
        path.write_text(json.dumps(result, indent=2))
        write_md(result)


if __name__ == "__main__":
    main()
