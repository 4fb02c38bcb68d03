"""Post-training I on the lecture's addition story, offline: SFT, DPO and distillation of SmolLM2-135M-Instruct.

    .venv/bin/python bench/bench_posttrain.py            # writes bench/results/posttrain.json and posttrain.md
    .venv/bin/python bench/bench_posttrain.py --quick    # a smoke run: tiny sizes, 50 held-out problems
    .venv/bin/python bench/bench_posttrain.py --keep     # only the rows posttrain.json lacks (after a kill)

Every model is scored on the same held-out problems (`addition.eval_problems()`, a seed never used in training),
greedy, through the chat template, by the final number of the completion (`ragseek eval math`'s scorer):
  base        SmolLM2-135M-Instruct as shipped (the lecture: ~18%)
  sft_worked  v0 SFT on worked solutions ("units: 2 + 9 = 11, write 1 carry 1; tens: ...")
  sft_answer  SFT on the answers only
  dpo         DPO from the base model on (correct answer, the base model's own wrong answer) pairs; the chosen
              response is the model's own text with its final number corrected, so only the sum differs
  distill_*   a tiny random ragseek model (same tokenizer) distilled from sft_worked: kind=data (the teacher writes
              worked solutions for training prompts, then SFT) and kind=logit (α·CE + (1−α)·T²·KL on the fly)
and one DPO step on SmolLM2 (4 pairs, 128 tokens, fp32, CPU), ragseek against TRL's DPOTrainer, same settings.
Sizes are set by the flags below; the markdown states the ones used.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ragseek.defaults import smollm2_gguf
from ragseek.model import ModelConfig, Transformer, load_tokenizer
from ragseek.train.data import load_preference, load_prompts, write_jsonl
from ragseek.train.loop import LoopConfig, build_optimizer, train_step
from ragseek.train.recipes import distill, dpo, sft
from ragseek.train.run import preference_micro_batches
from ragseek.train.tasks import addition
from ragseek.train.tasks.math_eval import evaluate_math

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@dataclass
class Sizes:
    n_eval: int = 500
    eval_batch: int = 50
    sft_problems: int = 2000
    sft_steps: int = 40
    sft_batch: int = 8
    sft_lr: float = 1e-4
    dpo_problems: int = 96
    dpo_steps: int = 20
    dpo_batch: int = 4
    dpo_lr: float = 5e-6
    dpo_beta: float = 0.1
    distill_prompts: int = 256
    distill_data_steps: int = 300
    distill_logit_steps: int = 40
    distill_batch: int = 16
    distill_lr: float = 2e-3
    trl_steps: int = 3


QUICK = Sizes(
    n_eval=50,
    sft_problems=64,
    sft_steps=3,
    dpo_problems=16,
    dpo_steps=2,
    distill_prompts=16,
    distill_data_steps=5,
    distill_logit_steps=2,
    distill_batch=8,
    trl_steps=2,
)
STUDENT = ModelConfig(
    dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, inter_dim=384, max_seq_len=512
)


def evaluate(model_dir: str, eval_file: Path, n: int, max_new_tokens: int, batch: int) -> dict:
    model = Transformer.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    rows = load_prompts(eval_file, tokenizer, 256)[:n]
    t0 = time.perf_counter()
    out = evaluate_math(model, tokenizer, rows, max_new_tokens, batch)
    wall = time.perf_counter() - t0
    return {
        "accuracy": out["accuracy"],
        "n": out["n"],
        "eval_wall_s": wall,
        "eval_tok_s": out["tokens_generated"] / wall,
        "example": out["completions"][0],
    }


def timed(train, cfg) -> dict:
    t0 = time.perf_counter()
    rows = train(cfg)
    wall = time.perf_counter() - t0
    return {
        "steps": len(rows),
        "train_wall_s": wall,
        "train_tok_s": sum(r["seq_tokens"] for r in rows) / wall,
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
    }


def own_wrong_answers(model_dir: str, problems: list, work: Path, batch: int) -> tuple[list, list[str]]:
    """The base model's greedy answers to training problems; the wrong ones become DPO's rejected responses."""
    questions = addition.write_grpo_jsonl(work / "dpo_questions.jsonl", problems)
    model, tokenizer = Transformer.from_pretrained(model_dir), load_tokenizer(model_dir)
    out = evaluate_math(model, tokenizer, load_prompts(questions, tokenizer, 256), 64, batch)
    wrong = [
        (p, c) for p, c in zip(problems, out["completions"], strict=True) if not addition.is_correct(c, p)
    ]
    return [p for p, _ in wrong], [c for _, c in wrong]


def corrected(completion: str, problem: addition.Problem) -> str:
    """The model's own wrong answer with its final number replaced by a + b: same style, right sum."""
    numbers = list(re.finditer(r"-?\d+(?:\.\d+)?", completion))
    if numbers:
        last = numbers[-1]
        fixed = completion[: last.start()] + str(problem.answer) + completion[last.end() :]
        if addition.is_correct(fixed, problem):
            return fixed
    return str(problem.answer)


def student_init(teacher_dir: str, path: Path) -> str:
    torch.manual_seed(0)
    tokenizer = load_tokenizer(teacher_dir)
    cfg = ModelConfig(
        **{**asdict(STUDENT), "vocab_size": Transformer.from_pretrained(teacher_dir).cfg.vocab_size}
    )
    Transformer(cfg).save_pretrained(path)
    tokenizer.save(path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# one DPO step: ragseek vs TRL


def long_pairs(n: int) -> list[dict]:
    """n preference pairs whose prompt + response exceed 128 tokens (cut to 128 by both trainers)."""
    rng = random.Random(7)
    rows = []
    for p in addition.train_problems(3 * n, seed=11)[:n]:
        others = addition.train_problems(3, seed=100 + p.a)
        good = " ".join(addition.worked_solution(q) for q in [p, *others])
        bad = " ".join(
            f"{q.a} + {q.b} = {addition.wrong_answer(q, rng)}, I am sure of it." for q in [p, *others] * 2
        )
        rows.append(
            {
                "prompt": f"{p.question} Explain each step, then check three more sums.",
                "chosen": good,
                "rejected": bad,
            }
        )
    return rows


def ragseek_dpo_step_times(model_dir: str, pairs_file: Path, steps: int) -> dict:
    cfg = dpo.DPOConfig(
        model=model_dir,
        data=str(pairs_file),
        beta=0.1,
        length_normalize=False,
        max_len=128,
        batch_size=4,
        loop=LoopConfig(lr=1e-6, max_steps=steps, max_grad_norm=1.0),
    )
    model, tokenizer = Transformer.from_pretrained(model_dir), load_tokenizer(model_dir)
    reference = Transformer.from_pretrained(model_dir).eval().requires_grad_(False)
    model.train()
    pairs = load_preference(pairs_file, tokenizer, 128)
    optimizer = build_optimizer(model, cfg.loop)
    loss_fn = dpo.dpo_loss_fn(model, reference, cfg)
    micro = preference_micro_batches(pairs, cfg.loop, tokenizer.pad_id)
    with torch.no_grad():
        chosen, rejected, _, _ = dpo.pair_logps(reference, micro[0])
    times, first = [], None
    for step in range(steps):
        t0 = time.perf_counter()
        metrics = train_step(optimizer, micro, loss_fn, cfg.loop, step)
        times.append(time.perf_counter() - t0)
        first = first or metrics
    return {
        "step_s": times,
        "median_step_s": statistics.median(times),
        "first_loss": first["loss"],
        "logps_chosen": chosen.sum(-1).mean().item(),
        "logps_rejected": rejected.sum(-1).mean().item(),
        "seq_len": [len(p["chosen_ids"]) for p in pairs] + [len(p["rejected_ids"]) for p in pairs],
    }


def trl_dpo_step_times(model_dir: str, pairs: list[dict], steps: int, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    conversational = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in pairs
    ]
    args = DPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_length=128,
        beta=0.1,
        learning_rate=1e-6,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        max_steps=steps,
        bf16=False,
        use_cpu=True,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list(conversational),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[timer],
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "step_s": timer.times,
        "median_step_s": statistics.median(timer.times),
        "first_loss": logs[0]["loss"],
    }


# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes, a smoke run (results not written to bench/)"
    )
    ap.add_argument("--work", default="runs/bench_posttrain", help="scratch folder for data, runs and models")
    ap.add_argument("--skip-trl", action="store_true", help="leave out the TRL comparison")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the rows already in the results file and run only the missing ones (a teacher model whose "
        "folder is gone is retrained, not re-scored)",
    )
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sizes = QUICK if args.quick else Sizes()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_json = (work if args.quick else RESULTS) / "posttrain.json"
    out_md = out_json.with_suffix(".md")
    base = str(smollm2_gguf())
    results: dict = {"sizes": asdict(sizes), "threads": torch.get_num_threads(), "rows": {}}
    earlier_s = 0.0
    if args.keep and out_json.exists():
        kept = json.loads(out_json.read_text())
        if kept["sizes"] != results["sizes"]:
            raise SystemExit(f"--keep: {out_json} was made with other sizes; rerun without --keep")
        results["rows"], earlier_s = kept["rows"], kept.get("total_wall_s", 0.0)
    missing = lambda name: name not in results["rows"]  # noqa: E731
    t_start = time.perf_counter()

    def record(name: str, row: dict) -> None:
        results["rows"][name] = row
        results["total_wall_s"] = earlier_s + time.perf_counter() - t_start
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2))
        out_md.write_text(markdown(results, args))
        print(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'example'})}", flush=True)

    eval_file = addition.write_grpo_jsonl(work / "eval.jsonl", addition.eval_problems(sizes.n_eval))
    train_set = addition.train_problems(sizes.sft_problems, seed=1)
    worked = addition.write_sft_jsonl(work / "sft_worked.jsonl", train_set, "worked")
    answers = addition.write_sft_jsonl(work / "sft_answer.jsonl", train_set, "answer")
    ev = lambda path, tokens=64: evaluate(path, eval_file, sizes.n_eval, tokens, sizes.eval_batch)  # noqa: E731

    if missing("base"):
        record("base", ev(base))

    def sft_loop(name: str, steps: int, lr: float) -> LoopConfig:
        return LoopConfig(
            lr=lr, warmup_steps=max(1, steps // 10), max_steps=steps, ckpt_every=0, out_dir=str(work / name)
        )

    teacher = str(work / "sft_worked" / "final")
    need_teacher = (missing("distill_data") or missing("distill_logit")) and not Path(teacher).exists()
    for name, data in (("sft_worked", worked), ("sft_answer", answers)):
        if not (missing(name) or (name == "sft_worked" and need_teacher)):
            continue
        cfg = sft.SFTConfig(
            model=base,
            data=str(data),
            max_len=128,
            batch_size=sizes.sft_batch,
            loop=sft_loop(name, sizes.sft_steps, sizes.sft_lr),
        )
        row = timed(sft.train, cfg)
        if missing(name):
            record(name, {**row, **ev(str(work / name / "final"))})

    if missing("dpo"):
        dpo_problems, rejected = own_wrong_answers(
            base, addition.train_problems(sizes.dpo_problems, seed=2), work, sizes.eval_batch
        )
        pairs = write_jsonl(
            work / "dpo_pairs.jsonl",
            (
                {"prompt": p.question, "chosen": corrected(bad, p), "rejected": bad}
                for p, bad in zip(dpo_problems, rejected, strict=True)
            ),
        )
        cfg = dpo.DPOConfig(
            model=base,
            data=str(pairs),
            beta=sizes.dpo_beta,
            length_normalize=True,
            precompute_ref=True,
            max_len=128,
            batch_size=sizes.dpo_batch,
            loop=sft_loop("dpo", sizes.dpo_steps, sizes.dpo_lr),
        )
        record(
            "dpo", {**timed(dpo.train, cfg), "pairs": len(dpo_problems), **ev(str(work / "dpo" / "final"))}
        )

    prompts = addition.write_sft_jsonl(
        work / "distill_prompts.jsonl", addition.train_problems(sizes.distill_prompts, seed=3), "worked"
    )
    for kind, steps, data in (
        ("data", sizes.distill_data_steps, prompts),
        ("logit", sizes.distill_logit_steps, worked),
    ):
        name = f"distill_{kind}"
        if not missing(name):
            continue
        cfg = distill.DistillConfig(
            kind=kind,
            teacher=teacher,
            student=student_init(teacher, work / f"{name}_student"),
            data=str(data),
            max_new_tokens=64,
            max_len=128,
            batch_size=sizes.distill_batch,
            loop=sft_loop(name, steps, sizes.distill_lr),
        )
        record(name, {**timed(distill.train, cfg), **ev(str(work / name / "final"))})

    if not args.skip_trl and missing("dpo_step_vs_trl"):
        pairs_128 = long_pairs(4)
        pairs_file = write_jsonl(work / "dpo_128.jsonl", pairs_128)
        hf_dir = work / "smollm2_hf"
        Transformer.from_pretrained(base).save_pretrained(hf_dir)
        load_tokenizer(base).save(hf_dir)
        ours = ragseek_dpo_step_times(str(hf_dir), pairs_file, sizes.trl_steps)
        theirs = trl_dpo_step_times(str(hf_dir), pairs_128, sizes.trl_steps, work)
        record("dpo_step_vs_trl", {"ragseek": ours, "trl": theirs, "log2": math.log(2)})


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def markdown(results: dict, args: argparse.Namespace) -> str:
    s, rows = results["sizes"], results["rows"]
    lines = [
        "## Post-training I: the addition story (SFT, DPO, distillation)",
        "",
        "`.venv/bin/python bench/bench_posttrain.py" + (" --quick`" if args.quick else "`"),
        "",
        f'SmolLM2-135M-Instruct (fp32, CPU, {results["threads"]} threads) on "What is a + b?" (two 2-digit numbers), '
        f"greedy, chat template, accuracy on the first {s['n_eval']} of the 500 held-out problems "
        "(`addition.eval_problems()`, a seed never used for training). What was run:",
        f"- **sft_worked**: v0 SFT on worked solutions, {s['sft_steps']} steps × {s['sft_batch']} examples "
        f"(of {s['sft_problems']} training problems), lr {s['sft_lr']}; **sft_answer**: the same on the answers only.",
        f"- **dpo**: from the base model, pairs (chosen: the model's own answer with its final number corrected, "
        f"rejected: the base model's own wrong greedy answer) on "
        f"{s['dpo_problems']} training problems (the wrong ones kept), {s['dpo_steps']} steps × {s['dpo_batch']} "
        f"pairs, β = {s['dpo_beta']}, length-normalised, precomputed reference, lr {s['dpo_lr']}.",
        f"- **distill_data / distill_logit**: a random tiny ragseek student (dim {STUDENT.dim}, {STUDENT.n_layers} "
        f"layers, GQA, SmolLM2's tokenizer) from sft_worked: kind=data, the teacher answers {s['distill_prompts']} "
        f"training prompts, then {s['distill_data_steps']} SFT steps; kind=logit, {s['distill_logit_steps']} steps "
        f"of α = 0.5, T = 2 on the worked-solution set (one teacher forward per step); {s['distill_batch']} "
        f"examples per step, lr {s['distill_lr']}.",
        "",
        "| model | accuracy | train steps | train wall s | train tok/s | loss first → last | eval tok/s | eval wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if name == "dpo_step_vs_trl":
            continue
        train = (
            f"{r['steps']} | {r['train_wall_s']:.0f} | {r['train_tok_s']:,.0f} | {r['first_loss']:.3f} → {r['last_loss']:.3f}"
            if "steps" in r
            else "– | – | – | –"
        )
        lines.append(
            f"| {name} | {r['accuracy']:.1%} | {train} | {r['eval_tok_s']:,.0f} | {r['eval_wall_s']:.0f} |"
        )
    if "dpo_step_vs_trl" in rows:
        r = rows["dpo_step_vs_trl"]
        lines += [
            "",
            f"One DPO step on SmolLM2-135M (4 pairs cut to 128 tokens, β = 0.1, sigmoid loss on sums, fp32, CPU), "
            f"median of {s['trl_steps']} steps, same process:",
            "",
            "| trainer | s/step | loss at step 1 (log 2 = 0.6931) | Σ logp chosen | Σ logp rejected |",
            "|---|---|---|---|---|",
            *(
                f"| {label} | {r[key]['median_step_s']:.2f} | {r[key]['first_loss']:.4f} "
                f"| {_num(r[key].get('logps_chosen'))} | {_num(r[key].get('logps_rejected'))} |"
                for key, label in (
                    ("ragseek", "ragseek `dpo`"),
                    ("trl", "TRL DPOTrainer (bf16=False, use_cpu=True)"),
                )
            ),
        ]
    lines += ["", f"Total wall time {results['total_wall_s'] / 60:.1f} min.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
