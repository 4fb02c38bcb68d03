"""Errors a user can act on: one line that says what is wrong (and names the file), exit code 2. `ragseek --debug`
(or RAGSEEK_DEBUG=1) shows the traceback instead.

    raise FileError(path, "not valid JSON (line 3, column 1: Expecting value)", "re-save it")
    with reading(path, "a safetensors file", fix="re-save the checkpoint"):
        tensors = load_file(path)     # the parser's error becomes one FileError naming `path`

Commands raise; they do not print and exit. `CommandGroup`, the class of the `ragseek` command group, is the one
place that turns an exception into that line (`user_message`): a ValueError or a LookupError (not a KeyError or an
IndexError) carries a message written for the user, and an OSError names its file. Anything else is a bug and
keeps its traceback. This module imports neither torch nor numpy.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path

import typer
import typer.core
import yaml

# parsers' errors that mean "this file is not what it should be" (a ValueError: JSON, UTF-8, ...); safetensors'
# SafetensorError and the tokenizers library's bare Exception are matched by name in `reading`: importing them here
# would load their libraries
PARSE_ERRORS = (ValueError, struct.error, EOFError, yaml.YAMLError, sqlite3.DatabaseError)
PARSE_ERROR_NAMES = ("SafetensorError", "Exception")


class FileError(ValueError):
    """A file ragseek reads is unreadable, truncated or corrupt. Its message is one line: `PATH: what is wrong`,
    then `; what to do` when there is something to do."""

    def __init__(self, path: str | Path, problem: str, fix: str = ""):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}" + (f"; {fix}" if fix else ""))


def one_line(e: BaseException) -> str:
    """An exception's message on one line (YAML and JSON errors quote the text they stopped at over several)."""
    mark = getattr(e, "problem_mark", None)
    if isinstance(e, yaml.MarkedYAMLError) and mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}"
    if isinstance(e, json.JSONDecodeError):
        return f"line {e.lineno}, column {e.colno}: {e.msg}"
    return " ".join(str(e).split()) or type(e).__name__


@contextlib.contextmanager
def reading(path: str | Path, what: str, fix: str = "") -> Iterator[None]:
    """Turn a parser's error inside the block into a FileError: `PATH: not WHAT (the parser's words); FIX`. An OSError
    (a missing or unreadable file) and a FileError pass through unchanged."""
    try:
        yield
    except (FileError, OSError):
        raise
    except Exception as e:
        if not isinstance(e, PARSE_ERRORS) and type(e).__name__ not in PARSE_ERROR_NAMES:
            raise
        raise FileError(path, f"not {what} ({one_line(e)})", fix) from e


def user_message(e: BaseException) -> str | None:
    """The line to print for an error the user can act on; None for a bug (its traceback is what helps)."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or one_line(e)}"
    if isinstance(e, (KeyError, IndexError)):
        return None
    if isinstance(e, (ValueError, LookupError, OSError)):
        return str(e)
    return None


def debugging(ctx: typer.Context) -> bool:
    """`ragseek --debug COMMAND`, or RAGSEEK_DEBUG=1 (or true, yes, on) in the environment."""
    return bool(ctx.find_root().params.get("debug"))


# ctx.meta key: the command's arguments hold --json (its output is for a program: no progress lines)
JSON_ASKED = "ragseek.json"


class CommandGroup(typer.core.TyperGroup):
    """The `ragseek` group: an error a user can act on, raised by any command below it, is printed as one line
    `error: MESSAGE` on stderr with exit code 2; with --debug it propagates with its traceback. The group's own
    options (ragseek/cli.py `main`) see whether the command's arguments ask for --json through ctx.meta."""

    def invoke(self, ctx: typer.Context):
        ctx.meta[JSON_ASKED] = any(a == "--json" or a.startswith("--json=") for a in ctx.args)
        try:
            return super().invoke(ctx)
        except Exception as e:
            message = user_message(e)
            if message is None or debugging(ctx):
                raise
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2) from e
