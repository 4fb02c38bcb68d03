"""One GRPO step on CPU: ragseek vs TRL's GRPOTrainer on SmolLM2-135M-Instruct, in the same run.

    .venv/bin/python bench/bench_rl.py [--threads 2]

One GRPO step on SmolLM2-135M-Instruct fp32 (2 prompts × 4 completions, 32 new tokens, one update, β = 0, loss_type
grpo, temperature 1): ragseek's recipe (`ragseek.train.recipes.grpo.train`) and TRL's GRPOTrainer (`bf16=False`,
`use_cpu=True`, `gradient_checkpointing=False`), the same prompts and reward; then both again in bf16 (ragseek
`loop.dtype: bf16`, TRL `bf16=True`), and ragseek in bf16 with `compile_rollouts: true`. Each row runs 2 steps in a fresh process of its own (in one process, a row
after TRL's ran up to 1.7x slower); the second step is timed (the first pays one-off costs), split into generation
and training. The rows take turns for ROUNDS rounds; each row's faster round is kept. Writes
bench/results/rl.json and rl.md. The addition story (GRPO to high accuracy, PPO, the table) is bench_addition.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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
from ragseek.train.loop import LoopConfig  # noqa: E402
from ragseek.train.recipes import grpo  # noqa: E402
from ragseek.train.rewards import numeric_match_reward  # noqa: E402
from ragseek.train.tasks.addition import train_problems, write_grpo_jsonl  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "runs"
STEP = {"prompts": 2, "group_size": 4, "max_new_tokens": 32, "lr": 1e-6}


def ragseek_step(model_dir: Path, data: Path, dtype: str, compiled: bool = False) -> dict:
    cfg = grpo.GRPOConfig(
        compile_rollouts=compiled,
        model=str(model_dir),
        data=str(data),
        rewards=["numeric_match"],
        group_size=STEP["group_size"],
        prompts_per_step=STEP["prompts"],
        max_new_tokens=STEP["max_new_tokens"],
        loop=LoopConfig(
            lr=STEP["lr"], max_steps=2, ckpt_every=0, dtype=dtype, out_dir=str(RUNS / "bench_rl_step")
        ),
    )
    rows = grpo.train(cfg)
    last = rows[-1]
    return {
        "first_step_s": rows[0]["step_s"],  # with the compile, when compiled
        "step_s": last["step_s"],
        "generation_s": last["step_s"] * last["gen_share"],
        "training_s": last["step_s"] * (1 - last["gen_share"]),
        "completion_tokens": last["response_length"] * STEP["prompts"] * STEP["group_size"],
    }


def trl_step(model_dir: Path, data: Path, bf16: bool) -> dict:
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
        bf16=bf16,
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


def write_md(r: dict) -> None:
    rows = (
        ("ragseek", "ragseek, fp32"),
        ("trl", f"TRL {r['trl_version']}, fp32 (`bf16=False`)"),
        ("ragseek_bf16", "ragseek, `loop.dtype: bf16` (bf16 rollout copy, bf16 autocast; fp32 weights)"),
        (
            "ragseek_bf16_compiled",
            "ragseek, bf16 and `compile_rollouts: true` (the rollout copy's decoding step compiled)",
        ),
        ("trl_bf16", f"TRL {r['trl_version']}, `bf16=True`"),
    )
    lines = [
        "## RL: one GRPO step, ragseek vs TRL",
        "",
        f"`{r['command']}` — SmolLM2-135M-Instruct (fp32 weights) on CPU, {r['threads']} torch thread(s), load "
        f"average {r['load_average']:.1f} on 2 cores when it started, {r['load_average_end']:.1f} at the end; "
        f"each row in a fresh process, the rows taking turns for {len(r['rounds'])} rounds, each row's faster "
        "round shown.",
        "",
        "One GRPO step: 2 prompts × 4 completions, 32 new tokens, one update, β = 0, loss_type grpo (the 2nd of 2 "
        "steps timed). TRL: GRPOTrainer, `use_cpu=True, gradient_checkpointing=False`.",
        "",
        "| implementation | step (s) | generation (s) | training (s) | generation share | vs TRL fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for key, name in rows:
        x = r[key]
        lines.append(
            f"| {name} | {x['step_s']:.2f} | {x['generation_s']:.2f} | {x['training_s']:.2f} | "
            f"{x['generation_s'] / x['step_s']:.0%} | {x['step_s'] / r['trl']['step_s']:.2f}× |"
        )
    lines += [
        "",
        f"ragseek / TRL step time, both fp32: **{r['ratio']:.2f}×**; ragseek bf16 / TRL's faster setting: "
        f"**{r['ratio_bf16']:.2f}×**, with compiled rollouts **{r['ratio_bf16_compiled']:.2f}×** (their first "
        f"step, the compile included: {r['ragseek_bf16_compiled']['first_step_s']:.0f} s, once per run). This CPU has avx512_bf16: a bf16 matmul runs ~2× faster than fp32 here, and "
        "decoding a batch of 8 is bound by reading the weights, which bf16 halves.",
    ]
    (RESULTS / "rl.md").write_text("\n".join(lines) + "\n")


RUNNERS = {
    "ragseek": lambda model_dir, data: ragseek_step(model_dir, data, "fp32"),
    "trl": lambda model_dir, data: trl_step(model_dir, data, bf16=False),
    "ragseek_bf16": lambda model_dir, data: ragseek_step(model_dir, data, "bf16"),
    "ragseek_bf16_compiled": lambda model_dir, data: ragseek_step(model_dir, data, "bf16", compiled=True),
    "trl_bf16": lambda model_dir, data: trl_step(model_dir, data, bf16=True),
}
ROUNDS = 2


def run_one(key: str) -> dict:
    """One row in this process: its timed step, printed as the last line of stdout."""
    model_dir = gguf_to_folder(smollm2_gguf())
    data = write_grpo_jsonl(RUNS / "data" / "addition_bench_step.jsonl", train_problems(16, seed=7))
    return RUNNERS[key](model_dir, data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared 2-core machine)")
    ap.add_argument("--only", choices=list(RUNNERS), help="run one row in this process (what main launches)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.only:
        print(json.dumps(run_one(args.only)), flush=True)
        return
    import trl

    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "command": f".venv/bin/python bench/bench_rl.py --threads {args.threads}",
        "load_average": os.getloadavg()[0],
        "threads": args.threads,
        "trl_version": trl.__version__,
        "step": STEP,
        "rounds": [],
    }
    # every row in a fresh process (one library's state never slows the next), the rows taking turns
    for _ in range(ROUNDS):
        runs = {}
        for key in RUNNERS:
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--only", key]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[key] = json.loads(out.strip().splitlines()[-1])
            print(key, runs[key], flush=True)
        result["rounds"].append(runs)
    for key in RUNNERS:  # each row's faster round
        result[key] = min((r[key] for r in result["rounds"]), key=lambda x: x["step_s"])
    result["load_average_end"] = os.getloadavg()[0]
    result["ratio"] = result["ragseek"]["step_s"] / result["trl"]["step_s"]
    # against TRL's faster setting on this machine, whichever it is
    trl_best = min(result["trl"]["step_s"], result["trl_bf16"]["step_s"])
    result["ratio_bf16"] = result["ragseek_bf16"]["step_s"] / trl_best
    result["ratio_bf16_compiled"] = result["ragseek_bf16_compiled"]["step_s"] / trl_best
    (RESULTS / "rl.json").write_text(json.dumps(result, indent=2))
    write_md(result)


if __name__ == "__main__":
    main()
