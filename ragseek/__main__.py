"""`python -m ragseek ...` is the `ragseek` command."""

from ragseek.cli import app

app(prog_name="ragseek")
