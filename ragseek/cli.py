"""The `ragseek` command. Each area keeps its commands beside its code; this file only composes them."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate retrieval (beir) or a model (math).")
app.add_typer(eval_app, name="eval")
