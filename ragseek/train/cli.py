"""`ragseek train pretrain|sft|distill|rm|dpo|grpo|ppo`: one command per recipe (`recipes/NAME.py`), same flags;
and `ragseek eval math` (`tasks/math_eval.py`).

    ragseek train sft --config configs/sft.yaml --set loop.max_steps=50 --set batch_size=4 --out runs/sft1
    ragseek train sft --config configs/sft.yaml --out runs/sft1 --resume          # after a crash or kill -9

Every field of the recipe's config dataclass (its help text is the documentation) can be set in the YAML file or
with --set key=value (loop.key=value for the loop's); --out and --resume are shortcuts for loop.out_dir and
loop.resume (`ragseek.config.load_config`, the loader every command uses). The resolved config is written to
<out>/config.json and inside every checkpoint.
"""

from __future__ import annotations

import importlib
import json
from typing import Annotated, Any

import typer

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


def register(app: typer.Typer) -> None:
    """Add the `train` group to the `ragseek` app."""
    train_app = typer.Typer(
        no_args_is_help=True, help="Training recipes: pretrain, sft, distill, rm, dpo, grpo, ppo."
    )
    for name, (module, help) in RECIPES.items():
        train_app.command(name)(_command(module, help))
    app.add_typer(train_app, name="train")


def register_data(app: typer.Typer) -> None:
    """Add the `data` group: the training sets the recipes' configs read, made by one command each."""
    data_app = typer.Typer(
        no_args_is_help=True, help="Make training data: reader (SQuAD RAG reading), addition."
    )

    def reader(
        squad: str = typer.Option(..., help="SQuAD v1.1 JSON file (e.g. ../shared/data/squad/train.json)"),
        out: str = typer.Option("runs/data/reader", help="folder for train.jsonl, val.json and split.json"),
        val_articles: int = typer.Option(4, help="articles held out for validation (whole articles)"),
        dont_know: float = typer.Option(
            0.15, help="fraction of questions asked without their gold paragraph"
        ),
        k: int = typer.Option(3, help="sources per prompt (as `ragseek ask`)"),
        shuffle: float = typer.Option(
            0.5, help="fraction of questions whose sources are put in a random order (not retrieval's)"
        ),
        seed: int = typer.Option(20261204, help="draws the validation articles and the don't-know questions"),
    ) -> None:
        """RAG reading rows: each question retrieved over every paragraph, in ask's exact prompt, target 'phrase [n]'."""
        from ragseek.train.tasks.reader import build

        try:
            summary = build(squad, out, val_articles, dont_know, k, seed, shuffle)
        except (FileNotFoundError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from e
        print(json.dumps(summary))

    def addition(
        out: str = typer.Option(..., help="JSONL file to write"),
        kind: str = typer.Option(
            "grpo", help='grpo ({"question", "answer"}) or sft ({"prompt", "response"})'
        ),
        style: str = typer.Option("answer", help="answer, worked or think (the response / prompt style)"),
        n: int = typer.Option(2000, help="training problems (ignored with --eval)"),
        seed: int = typer.Option(1, help="draws the training problems"),
        eval_set: bool = typer.Option(False, "--eval", help="the 500 held-out problems instead"),
    ) -> None:
        """The lecture's addition story: 2-digit problems, the held-out 500 never in a training set."""
        from ragseek.train.tasks import addition as task

        writers = {"grpo": task.write_grpo_jsonl, "sft": task.write_sft_jsonl}
        if kind not in writers or style not in ("answer", "worked", "think"):
            typer.echo(
                f"error: --kind {kind} --style {style}: kind is grpo|sft, style answer|worked|think", err=True
            )
            raise typer.Exit(1)
        problems = task.eval_problems() if eval_set else task.train_problems(n, seed=seed)
        print(writers[kind](out, problems, style=style))

    data_app.command("reader")(reader)
    data_app.command("addition")(addition)
    app.add_typer(data_app, name="data")


def register_math(eval_app: Any) -> None:
    """Add `math` to the `ragseek eval` group (torch loads only when it runs)."""

    def math(
        model: str = typer.Option(
            None, help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)"
        ),
        data: str = typer.Option(
            ..., help='JSONL with {"question", "answer"} rows (GSM8K\'s "… #### N" works)'
        ),
        n: int = typer.Option(None, help="score only the first n rows"),
        max_new_tokens: int = typer.Option(64, help="completion length cap"),
        batch_size: int = typer.Option(32, help="questions decoded together"),
        json_out: bool = typer.Option(False, "--json", help='print {"accuracy", "n", ...} as JSON'),
    ) -> None:
        """Accuracy on maths questions: greedy decoding, the final number compared with the answer."""
        from ragseek.train.tasks.math_eval import evaluate_file

        result = evaluate_file(model or "", data, n, max_new_tokens, batch_size)
        if json_out:
            print(json.dumps({k: v for k, v in result.items() if k != "completions"}))
        else:
            print(
                f"accuracy {result['accuracy']:.4f} on n={result['n']} ({result['tokens_generated']} tokens)"
            )

    eval_app.command("math")(math)
