"""The lecture's addition story with SmolLM2-135M-Instruct on this CPU: v0 SFT and DPO (post-training I), v1 RLHF
(PPO from v0 against a Bradley-Terry reward model), v2 GRPO with the answer reward (from the base model and from v0),
and GRPO with the format reward added (after a 20-step cold-start SFT on the think/answer template).

    .venv/bin/python bench/bench_addition.py [--stages grpo,grpo_sft,rm,ppo,sft_think,grpo_format] [--dtype bf16]

Each stage is its recipe run with its config file (configs/grpo.yaml, rm.yaml, ppo.yaml, sft.yaml, grpo_format.yaml, the
overrides shown in the table) into runs/addition/<stage>. A stage whose `final/` model exists is not retrained; a
killed stage resumes from its last checkpoint. Every final model is then scored greedily on the 500 held-out
problems (`addition.eval_problems()`, a seed never trained on) with `evaluate_math`, the code of `ragseek eval
math`. The SFT / DPO rows are read from bench/results/posttrain.json (bench_posttrain.py), measured the same way.

Writes bench/results/addition.json, bench/results/addition.md and docs/img/addition_rl.png (accuracy and response
length per step of each RL run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragseek.config import load_config  # noqa: E402
from ragseek.train.loop import read_metrics  # noqa: E402
from ragseek.train.recipes import grpo, ppo, rm, sft  # noqa: E402
from ragseek.train.tasks import addition  # noqa: E402
from ragseek.train.tasks.math_eval import evaluate_file  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "runs" / "addition"
IMG = ROOT / "docs" / "img"
DATA = RUNS / "data"
RL_STAGES = {  # the RL stages, in table order: (version, method)
    "ppo": ("v1", "RLHF: PPO + GAE vs the reward model, from v0"),
    "grpo": ("v2", "GRPO, answer reward"),
    "grpo_sft": ("v2", "GRPO, answer reward, from v0 (SFT on worked solutions)"),
    "grpo_format": ("v2", "GRPO, answer + format reward (think/answer), from the cold start"),
}
SFT = ROOT / "runs" / "bench_posttrain" / "sft_worked" / "final"  # v0, made by bench_posttrain.py


def grpo_stage(config: str, files: dict[str, Path], eval_tokens: int, *sets: str) -> dict:
    """A GRPO stage: its config file, train/eval data ({"train", "eval"}), further overrides, eval token budget."""
    return dict(
        train=grpo.train,
        cls=grpo.GRPOConfig,
        config=config,
        set=[f"data={files['train']}", f"eval_data={files['eval']}", *sets],
        eval=files["eval"],
        max_new_tokens=eval_tokens,
    )


def stage_specs(args: argparse.Namespace) -> dict[str, dict]:
    """Each stage: recipe, its config class and file, overrides, completions per step, eval data and token budget."""
    think = {"train": DATA / "think_train.jsonl", "eval": DATA / "think_eval.jsonl"}
    plain = {"train": DATA / "train.jsonl", "eval": DATA / "eval.jsonl"}
    specs = {
        "grpo": grpo_stage("configs/grpo.yaml", plain, 64, f"loop.max_steps={args.grpo_steps}"),
        "grpo_sft": grpo_stage(
            "configs/grpo.yaml",
            plain,
            64,
            f"model={SFT}",
            "max_new_tokens=64",
            f"loop.lr={args.grpo_sft_lr}",
            f"loop.max_steps={args.grpo_sft_steps}",
        ),
        "rm": dict(
            train=rm.train,
            cls=rm.RewardModelConfig,
            config="configs/rm.yaml",
            set=[
                f"model={SFT}",
                f"data={DATA / 'rm_pairs.jsonl'}",
                f"loop.lr={args.rm_lr}",
                f"loop.max_steps={args.rm_steps}",
            ],
        ),
        "ppo": dict(
            train=ppo.train,
            cls=ppo.PPOConfig,
            config="configs/ppo.yaml",
            set=[
                f"model={SFT}",
                f"data={plain['train']}",
                f"reward_model={RUNS / 'rm' / 'final'}",
                "max_new_tokens=64",
                f"loop.max_steps={args.ppo_steps}",
            ],
            eval=plain["eval"],
            max_new_tokens=64,
        ),
        # DeepSeek-R1's cold start: the base model never writes the think/answer template unprompted by examples, so
        # the format reward is 0 on every rollout and gives no gradient; a short SFT on formatted solutions first
        "sft_think": dict(
            train=sft.train,
            cls=sft.SFTConfig,
            config="configs/sft.yaml",
            set=[
                f"data={DATA / 'think_sft.jsonl'}",
                "max_len=192",
                "loop.lr=1e-4",
                "loop.warmup_steps=2",
                "loop.ckpt_every=10",
                f"loop.max_steps={args.cold_start_steps}",
            ],
        ),
        "grpo_format": grpo_stage(
            "configs/grpo_format.yaml",
            think,
            96,
            f"model={RUNS / 'sft_think' / 'final'}",
            f"loop.max_steps={args.format_steps}",
        ),
    }
    if args.dtype != "fp32":
        for name in filter(None, args.stages.split(",")):
            specs[name]["set"].append(f"loop.dtype={args.dtype}")
    return specs


def write_data() -> None:
    train = addition.train_problems(2000, seed=1)
    addition.write_grpo_jsonl(DATA / "train.jsonl", train)
    addition.write_grpo_jsonl(DATA / "eval.jsonl", addition.eval_problems())
    addition.write_grpo_jsonl(DATA / "think_train.jsonl", train, style="think")
    addition.write_grpo_jsonl(DATA / "think_eval.jsonl", addition.eval_problems(), style="think")
    addition.write_sft_jsonl(DATA / "think_sft.jsonl", train, style="think")
    # the reward model's ranked responses, in the SFT policy's own style: a correct worked solution over one with a
    # slip (a step off by one, or the carry dropped) carried through to the answer
    pairs = addition.train_problems(2000, seed=3)
    rng = random.Random(0)
    addition.write_dpo_jsonl(
        DATA / "rm_pairs.jsonl", pairs, [addition.worked_slip(p, rng) for p in pairs], style="worked"
    )


def run_stage(name: str, spec: dict) -> None:
    out = RUNS / name
    if f"model={SFT}" in spec["set"] and not SFT.exists():
        raise SystemExit(f"{name} starts from the v0 SFT model {SFT}: run bench/bench_posttrain.py first")
    if (out / "final").exists():
        print(f"{name}: {out / 'final'} exists, not retrained", flush=True)
        return
    cfg = load_config(spec["cls"], spec["config"], spec["set"])
    cfg.loop.out_dir = str(out)
    cfg.loop.resume = any((out / "checkpoints").glob("step_*"))
    print(f"{name}: training into {out}" + (" (resumed)" if cfg.loop.resume else ""), flush=True)
    spec["train"](cfg)


def run_summary(name: str, spec: dict) -> dict:
    """Steps, wall time of the training steps, tokens generated in rollouts, first/last accuracy and length."""
    rows = [r for r in read_metrics(RUNS / name / "metrics.jsonl") if "step_s" in r]
    config = json.loads((RUNS / name / "config.json").read_text())
    per_step = config.get("prompts_per_step", 0) * config.get(
        "group_size", config.get("samples_per_prompt", 1)
    )
    first, last = rows[: max(1, len(rows) // 10)], rows[-max(1, len(rows) // 10) :]
    mean = lambda part, key: sum(r.get(key, 0.0) for r in part) / len(part)  # noqa: E731
    return {
        "steps": len(rows),
        "train_wall_s": sum(r["step_s"] for r in rows),
        "tokens_generated": int(sum(r["response_length"] * per_step for r in rows)),
        "completions_per_step": per_step,
        "train_accuracy_first": mean(first, "accuracy"),
        "train_accuracy_last": mean(last, "accuracy"),
        "length_first": mean(first, "response_length"),
        "length_last": mean(last, "response_length"),
        "lr": config["loop"]["lr"],
        "command_set": spec["set"],
    }


def rm_summary() -> dict:
    rows = read_metrics(RUNS / "rm" / "metrics.jsonl")
    evals = [r for r in rows if "eval_accuracy" in r]
    return {
        "steps": max(r["step"] for r in rows),
        "eval_accuracy": evals[-1]["eval_accuracy"] if evals else None,
    }


def smooth(xs: list[float], window: int = 10) -> list[float]:
    return [
        sum(xs[max(0, i - window + 1) : i + 1]) / len(xs[max(0, i - window + 1) : i + 1])
        for i in range(len(xs))
    ]


def plot(names: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        rows = [r for r in read_metrics(RUNS / name / "metrics.jsonl") if "step_s" in r]
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, smooth([r.get("accuracy", 0.0) for r in rows]), label=name)
        axes[1].plot(steps, smooth([r["response_length"] for r in rows]), label=name)
    axes[0].set(xlabel="step", ylabel="rollout accuracy (temperature 1, 10-step mean)")
    axes[1].set(xlabel="step", ylabel="mean response tokens (10-step mean)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def markdown(r: dict) -> str:
    lines = [
        "## The addition story: SFT, DPO, RLHF-PPO, GRPO",
        "",
        "`.venv/bin/python bench/bench_addition.py --stages STAGE ...` for each stage (the settings of each are "
        f"listed below; the last invocation: `{r['command']}`) — SmolLM2-135M-Instruct (fp32 weights; `loop.dtype` "
        "per stage) on this CPU, 2 cores shared between two stages at a time: wall times are upper bounds. "
        "Accuracy: greedy (64 new tokens; 96 with the think template), chat template, numeric match of the final "
        "number on the 500 held-out problems of `addition.eval_problems()`, as bench_posttrain. Train wall time is "
        "the sum of the training steps (rollouts included, periodic evals excluded); tokens generated are rollout "
        "tokens.",
        "",
        "| version | method | accuracy (500) | steps | train wall s | tokens generated | rollout accuracy first → last "
        "| response tokens first → last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["table"]:
        lines.append(
            f"| {row['version']} | {row['method']} | {row['accuracy']:.1%} | {row.get('steps', '–')} | "
            + (f"{row['train_wall_s']:.0f}" if row.get("train_wall_s") else "–")
            + f" | {row.get('tokens_generated', 0):,} | "
            + (
                f"{row['train_accuracy_first']:.2f} → {row['train_accuracy_last']:.2f} | "
                f"{row['length_first']:.1f} → {row['length_last']:.1f} |"
                if "length_first" in row
                else "– | – |"
            )
        )
    rm = r.get("rm")
    if rm:
        lines += [
            "",
            f"Reward model (v1): Bradley-Terry, initialised from v0 (InstructGPT's order: SFT, then the reward "
            f"model, then PPO from SFT), on {r['rm_pairs']} pairs of worked solutions, the correct one over one with "
            f"a slip carried to the answer (`addition.worked_slip`; the last 10% held out), {rm['steps']} steps, "
            f"held-out pair accuracy {rm['eval_accuracy']:.1%}.",
        ]
        if not any(row["version"] == "v1" for row in r["table"]):
            lines.append("PPO against it (v1) has no row: it was not run to the end.")
    lines += [
        "",
        "Stage commands (`ragseek train RECIPE --config FILE --set ...`); a stage resumed with new settings shows "
        "its last ones (grpo_sft: 80 steps at lr 3e-6, resumed to 200, then to 260 at `loop.lr=1e-5`; "
        "docs/grpo.md):",
        "",
    ]
    for name, st in r["stages"].items():
        sets = " ".join(f"--set {x}" for x in st["set"]).replace(f"{ROOT}/", "")
        lines.append(f"- {name}: `--config {st['config']} {sets}`")
    lines += ["", "![accuracy and response length per step](docs/img/addition_rl.png)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--stages",
        default="grpo,grpo_sft,rm,ppo,sft_think,grpo_format",
        help="RL stages to run (comma-separated)",
    )
    ap.add_argument("--grpo-steps", type=int, default=230)
    ap.add_argument("--grpo-sft-steps", type=int, default=100)
    ap.add_argument("--grpo-sft-lr", type=float, default=3e-6)
    ap.add_argument("--rm-steps", type=int, default=200)
    ap.add_argument("--rm-lr", type=float, default=1e-5)
    ap.add_argument("--ppo-steps", type=int, default=40)
    ap.add_argument("--format-steps", type=int, default=30)
    ap.add_argument("--cold-start-steps", type=int, default=20, help="SFT steps on think/answer solutions")
    ap.add_argument("--eval-n", type=int, default=500)
    ap.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="loop.dtype of the stages run: bf16 = bf16 rollouts and autocast, fp32 weights (~1.7x faster here)",
    )
    args = ap.parse_args()
    command = ".venv/bin/python bench/bench_addition.py " + " ".join(sys.argv[1:])
    write_data()
    specs = stage_specs(args)
    wanted = [s for s in args.stages.split(",") if s]
    path = RESULTS / "addition.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update(command=command.strip(), rm_pairs=2000)
    evals = result.setdefault("evals", {})

    def evaluate(key: str, model: str, data: Path, tokens: int) -> dict:
        # a cached eval counts only for the same n, token budget and weights file (a continued run rewrites it)
        weights = (Path(model) / "model.safetensors").stat().st_mtime_ns if model else 0
        cached = evals.get(key, {})
        if (cached.get("n"), cached.get("max_new_tokens"), cached.get("weights_mtime_ns")) != (
            args.eval_n,
            tokens,
            weights,
        ):
            t0 = time.perf_counter()
            e = evaluate_file(model, str(data), args.eval_n, tokens)
            evals[key] = {
                "accuracy": e["accuracy"],
                "n": e["n"],
                "tokens": e["tokens_generated"],
                "max_new_tokens": tokens,
                "weights_mtime_ns": weights,
                "wall_s": time.perf_counter() - t0,
                "examples": e["completions"][:3],
            }
            if path.exists():  # keep the evals another bench_addition process (other stages) wrote meanwhile
                evals.update(
                    {k: v for k, v in json.loads(path.read_text())["evals"].items() if k not in evals}
                )
            path.write_text(json.dumps(result, indent=2))
            print(f"eval {key}: {evals[key]['accuracy']:.3f}", flush=True)
        return evals[key]

    for name in wanted:
        run_stage(name, specs[name])
    result.setdefault("stages", {}).update(
        {n: {"config": specs[n]["config"], "set": specs[n]["set"]} for n in wanted}
    )
    base = evaluate("base", "", DATA / "eval.jsonl", 64)
    table = [{"version": "start", "method": "SmolLM2-135M-Instruct", "accuracy": base["accuracy"]}]
    posttrain = RESULTS / "posttrain.json"
    if posttrain.exists():
        rows = json.loads(posttrain.read_text())["rows"]
        for key, version, method in (
            ("sft_worked", "v0", "SFT on worked solutions"),
            ("sft_answer", "v0", "SFT on answers only"),
            ("dpo", "DPO", "DPO, own wrong answers rejected"),
        ):
            if key in rows:
                row = rows[key]
                table.append(
                    {
                        "version": version,
                        "method": method + " (bench_posttrain)",
                        "accuracy": row["accuracy"],
                        "steps": row.get("steps"),
                        "train_wall_s": row.get("train_wall_s"),
                    }
                )
    if (RUNS / "sft_think" / "final").exists():
        think = specs["grpo_format"]
        e = evaluate("sft_think", str(RUNS / "sft_think" / "final"), think["eval"], think["max_new_tokens"])
        steps = len(read_metrics(RUNS / "sft_think" / "metrics.jsonl"))
        table.append(
            {
                "version": "cold start",
                "method": "SFT on think/answer solutions (grpo_format starts here)",
                "accuracy": e["accuracy"],
                "steps": steps,
            }
        )
    for name in [n for n in RL_STAGES if (RUNS / n / "final").exists()]:
        spec = specs[name]
        e = evaluate(name, str(RUNS / name / "final"), spec["eval"], spec["max_new_tokens"])
        version, method = RL_STAGES[name]
        table.append(
            {"version": version, "method": method, "accuracy": e["accuracy"], **run_summary(name, spec)}
        )
    if (RUNS / "rm" / "final").exists():
        result["rm"] = rm_summary()
    result["table"] = table
    plot(
        [n for n in RL_STAGES if (RUNS / n / "metrics.jsonl").exists()],
        IMG / "addition_rl.png",
    )
    if path.exists():  # the stages another bench_addition process ran meanwhile
        ran = json.loads(path.read_text()).get("stages", {})
        result["stages"].update({n: st for n, st in ran.items() if n not in wanted})
    path.write_text(json.dumps(result, indent=2))
    (RESULTS / "addition.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
