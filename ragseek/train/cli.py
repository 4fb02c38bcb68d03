"""`ragseek train pretrain|sft|distill|rm|dpo|grpo|ppo`: one command per recipe (`recipes/NAME.py`), same flags;
`ragseek data reader|addition` and `ragseek eval math` (`tasks/`), whose flags are their config dataclasses' fields
(with --config FILE and --set key=value, as every rag command).

    ragseek train sft --config configs/sft.yaml --set loop.max_steps=50 --set batch_size=4 --out runs/sft1
    ragseek train sft --config configs/sft.yaml --out runs/sft1 --resume          # after a crash or kill -9
    torchrun --nproc-per-node 4 -m ragseek.train.sft --config configs/sft.yaml    # 4 processes (run_module)

Every field of the recipe's config dataclass (its help text is the documentation) can be set in the YAML file or
with --set key=value (loop.key=value for the loop's); --out and --resume are shortcuts for loop.out_dir and
loop.resume (`ragseek.config.load_config`, the loader every command uses). The resolved config is written to
<out>/config.json and inside every checkpoint.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from ragseek.config import config_field, with_configs

# command -> (module, what it does); the module's `main(config, overrides, out, resume)` runs it
RECIPES = {
    "pretrain": (
        "ragseek.train.recipes.pretrain",
        "Pretrain a DeepSeek-style model from scratch (BPE, MTP, MoE balancing bias|aux|none, val perplexity).",
    ),
    "sft": (
        "ragseek.train.recipes.sft",
        "Supervised fine-tuning on prompt/response JSONL (prompt tokens masked).",
    ),
    "distill": (
        "ragseek.train.recipes.distill",
        "Distillation: kind=data (teacher writes SFT data) or kind=logit (soft targets).",
    ),
    "rm": ("ragseek.train.recipes.rm", "A Bradley-Terry reward model (value head) on preference pairs."),
    "dpo": ("ragseek.train.recipes.dpo", "DPO on preference pairs against a frozen reference model."),
    "grpo": (
        "ragseek.train.recipes.grpo",
        "GRPO with rule-based rewards: group advantages, clipped objective, k3 KL.",
    ),
    "ppo": (
        "ragseek.train.recipes.ppo",
        "RLHF with PPO: reward model, KL-penalised per-token rewards, GAE, critic.",
    ),
}


def _command(module: str, help: str) -> Any:
    def command(
        config: Annotated[
            str | None,
            typer.Option(metavar="FILE", help="YAML file of the recipe's config (configs/NAME.yaml)"),
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", metavar="KEY=VALUE", help="override a field: key=value or loop.key=value"),
        ] = None,
        out: Annotated[str | None, typer.Option(help="output folder (sets loop.out_dir)")] = None,
        resume: Annotated[
            bool, typer.Option(help="continue from the latest checkpoint in the output folder")
        ] = False,
    ) -> None:
        importlib.import_module(module).main(config, set_ or [], out, resume)

    command.__doc__ = help
    return command


def run_module(module: str) -> None:
    """`python -m ragseek.train.NAME ...` (so `torchrun --nproc-per-node N -m ragseek.train.NAME ...` on each rank)
    is `ragseek train NAME ...`: the same flags, the same one-line errors."""
    from ragseek.cli import app

    app(["train", module.rpartition(".")[2], *sys.argv[1:]], prog_name="ragseek")


def register(app: typer.Typer) -> None:
    """Add the `train` group to the `ragseek` app."""
    train_app = typer.Typer(
        no_args_is_help=True, help="Training recipes: pretrain, sft, distill, rm, dpo, grpo, ppo."
    )
    for name, (module, help) in RECIPES.items():
        train_app.command(name)(_command(module, help))
    app.add_typer(train_app, name="train")


@dataclass
class ReaderDataConfig:
    out: str = config_field("runs/data/reader", "folder for train.jsonl, val.json and split.json")
    val_articles: int = config_field(4, "articles held out for validation (whole articles)")
    dont_know: float = config_field(0.15, "fraction of questions asked without their gold paragraph")
    k: int = config_field(3, "sources per prompt (as `ragseek ask`)")
    shuffle: float = config_field(
        0.5, "fraction of questions whose sources are put in a random order (not retrieval's)"
    )
    seed: int = config_field(20261204, "draws the validation articles and the don't-know questions")


@dataclass
class AdditionDataConfig:
    kind: str = config_field(
        "grpo",
        'grpo ({"question", "answer"}), sft ({"prompt", "response"}) or pairs ({"prompt", "chosen", "rejected"}: '
        "the right response against a plausible slip, for rm and dpo)",
    )
    style: str = config_field("answer", "answer, worked or think (the response / prompt style)")
    n: int = config_field(2000, "training problems (ignored with --eval)")
    seed: int = config_field(1, "draws the training problems (and the slips of pairs)")
    eval: bool = config_field(False, "the 500 held-out problems instead")


@dataclass
class MathEvalConfig:
    n: int | None = config_field(None, "score only the first n rows")
    max_new_tokens: int = config_field(64, "completion length cap")
    batch_size: int = config_field(32, "questions decoded together")


CLASSES = {c.__name__: c for c in (ReaderDataConfig, AdditionDataConfig, MathEvalConfig)}


def register_data(app: typer.Typer) -> None:
    """Add the `data` group: the training sets the recipes' configs read, made by one command each."""
    data_app = typer.Typer(
        no_args_is_help=True, help="Make training data: reader (SQuAD RAG reading), addition."
    )

    def reader(
        squad: str = typer.Option(..., help="SQuAD v1.1 JSON file (e.g. ../shared/data/squad/train.json)"),
        cfg: ReaderDataConfig = None,
    ) -> None:
        """RAG reading rows: each question retrieved over every paragraph, in ask's exact prompt, target 'phrase [n]'."""
        from ragseek.train.tasks.reader import build

        summary = build(squad, cfg.out, cfg.val_articles, cfg.dont_know, cfg.k, cfg.seed, cfg.shuffle)
        print(json.dumps(summary))

    def addition(
        out: str = typer.Option(..., help="JSONL file to write"),
        cfg: AdditionDataConfig = None,
    ) -> None:
        """The lecture's addition story: 2-digit problems, the held-out 500 never in a training set."""
        from ragseek.train.tasks import addition as task

        writers = {
            "grpo": task.write_grpo_jsonl,
            "sft": task.write_sft_jsonl,
            "pairs": functools.partial(task.write_pairs_jsonl, seed=cfg.seed),
        }
        if cfg.kind not in writers or cfg.style not in ("answer", "worked", "think"):
            raise ValueError(
                f"--kind {cfg.kind} --style {cfg.style}: kind is grpo|sft|pairs, style answer|worked|think"
            )
        problems = task.eval_problems() if cfg.eval else task.train_problems(cfg.n, seed=cfg.seed)
        print(writers[cfg.kind](out, problems, style=cfg.style))

    data_app.command("reader")(with_configs(reader, CLASSES))
    data_app.command("addition")(with_configs(addition, CLASSES))
    app.add_typer(data_app, name="data")


def register_math(eval_app: Any) -> None:
    """Add `math` to the `ragseek eval` group (torch loads only when it runs)."""

    def math(
        data: str = typer.Option(
            ..., help='JSONL with {"question", "answer"} rows (GSM8K\'s "… #### N" works)'
        ),
        model: str = typer.Option(
            None, help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)"
        ),
        json_out: bool = typer.Option(False, "--json", help='print {"accuracy", "n", ...} as JSON'),
        cfg: MathEvalConfig = None,
    ) -> None:
        """Accuracy on maths questions: greedy decoding, the final number compared with the answer."""
        from ragseek.train.tasks.math_eval import evaluate_file

        result = evaluate_file(model or "", data, cfg.n, cfg.max_new_tokens, cfg.batch_size)
        if json_out:
            print(json.dumps({k: v for k, v in result.items() if k not in ("completions", "correct")}))
        else:
            print(
                f"accuracy {result['accuracy']:.4f} on n={result['n']} ({result['tokens_generated']} tokens)"
            )

    eval_app.command("math")(with_configs(math, CLASSES))
