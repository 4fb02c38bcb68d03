"""Configs: one field idiom, one loader, one way from the command line to a config dataclass.

Every option of every command is a field of a config dataclass, declared with `config_field(default, help)`; its
help text is written once, there, and is what `--help` shows. Every command reads its configs the same way:
the field defaults, then a YAML file (`--config FILE`), then `--set key=value` overrides (values parsed as YAML),
then — for the commands whose fields are also flags — the flags given on the command line.

    cfg = load_config(SFTConfig, "configs/sft.yaml", ["loop.max_steps=20", "batch_size=4"])
    app.command("ask")(with_configs(ask, classes, k=3))   # a --flag per field, plus --config and --set

A recipe's config nests blocks (`loop.lr=1e-4`); a command built by `with_configs` has flat keys (`k=4`), one
per flag. This module imports neither torch nor numpy: `ragseek --help` stays fast.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

from ragseek.errors import FileError, one_line, reading


def config_field(default: Any, help: str) -> Any:
    """A dataclass field with help text (what `--help` and the config docs show); a list, dict or dataclass default
    is deep-copied per instance."""
    if isinstance(default, (dict, list)) or is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def require(ok: bool, name: str, value: Any, need: str) -> None:
    """A config's `__post_init__` check: unless `ok`, raise ValueError("--name value: need") naming the flag as the
    command line spells it (a command turns it into a usage error, exit 2)."""
    if not ok:
        raise ValueError(f"--{name.replace('_', '-')} {value}: {need}")


def read_settings(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The mapping a YAML file holds (empty without one), then each `key=value` / `block.key=value` of
    `overrides` set in it (values parsed as YAML). Raises a FileError naming the file (one line: where YAML gave
    up), or a ValueError naming the override."""
    data: Any = {}
    if path:
        try:
            with reading(path, "valid YAML"):
                data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise FileError(path, f"cannot read the config file ({e.strerror or e})") from e
        if not isinstance(data, dict):
            raise FileError(path, f"a config file is a YAML mapping of key: value, not {type(data).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: write key=value, e.g. --set loop.max_steps=10")
        *parents, leaf = key.strip().split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {p} is a value, not a block of keys")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({one_line(e)})") from e
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """A config dataclass from a YAML file, then `key=value` / `loop.key=value` overrides (`read_settings`)."""
    return cls(**typed(cls, read_settings(path, overrides)))


def typed(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with YAML's loose scalars made the declared type (YAML 1.1 reads `1e-05` as a string) and nested
    blocks merged into the field's default (a `loop:` block changes only the keys it names)."""
    hints, defaults = get_type_hints(cls), {f.name: f for f in fields(cls)}
    unknown = set(data) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(defaults)}")
    out = {}
    for name, value in data.items():
        hint = _dataclass_or_none(hints[name])
        if is_dataclass(hint) and isinstance(value, Mapping):
            f = defaults[name]
            base = f.default_factory() if f.default_factory is not MISSING else f.default
            base = hint() if base is MISSING or base is None else base
            value = replace(base, **typed(hint, dict(value)))
        elif hint is float and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{cls.__name__}.{name} must be a number, got {value!r}") from None
        out[name] = value
    return out


def _dataclass_or_none(hint: Any) -> Any:
    """`X` for a field declared `X | None` with X a dataclass (an optional block such as `lora:`), else the hint."""
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and is_dataclass(args[0]) else hint


def with_configs(fn, classes: Mapping[str, type], **defaults):
    """Replace each parameter of `fn` typed with a config dataclass of `classes` (by class name) by one `--flag` per
    field of that class, and add `--config FILE` (a YAML mapping of flag names to values) and `--set key=value`;
    `defaults` overrides a field's default for this command (e.g. k=4). A flag given on the command line wins over
    --set, which wins over the file."""
    import typer

    sig = inspect.signature(fn)
    params, groups, seen = [], {}, set()
    for p in sig.parameters.values():
        cls = classes.get(p.annotation if isinstance(p.annotation, str) else p.annotation.__name__)
        if cls is None:
            params.append(p)
            continue
        hints = typing.get_type_hints(cls)
        groups[p.name] = cls
        for f in dataclasses.fields(cls):
            if f.name in seen:
                raise TypeError(
                    f"{fn.__name__}: the flag --{f.name} comes from two config classes; rename one field"
                )
            seen.add(f.name)
            default = defaults.get(f.name, f.default_factory() if f.default is MISSING else f.default)
            opt = typer.Option(default, "--" + f.name.replace("_", "-"), help=f.metadata.get("help", ""))
            params.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=hints[f.name]
                )
            )
    keyword = inspect.Parameter.KEYWORD_ONLY
    params += [
        inspect.Parameter(
            "config_file",
            keyword,
            default=typer.Option(
                None, "--config", metavar="FILE", help="YAML file of flag: value (flags given here win)"
            ),
            annotation=str | None,
        ),
        inspect.Parameter(
            "set_",
            keyword,
            default=typer.Option(
                None, "--set", metavar="KEY=VALUE", help="set a flag's field: key=value (repeatable)"
            ),
            annotation=list[str] | None,
        ),
        inspect.Parameter("ctx", keyword, annotation=typer.Context),
    ]

    @functools.wraps(fn)
    def wrapper(**kwargs):
        ctx = kwargs.pop("ctx")
        try:
            settings = read_settings(kwargs.pop("config_file"), kwargs.pop("set_") or [])
            unknown = set(settings) - seen
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)} in --config / --set; known: {sorted(seen)}")
            for name, cls in groups.items():
                values = {}
                for f in dataclasses.fields(cls):
                    flag = kwargs.pop(f.name)
                    # the source's name, whether it is typer's click or click's own enum
                    given = getattr(ctx.get_parameter_source(f.name), "name", "") == "COMMANDLINE"
                    values[f.name] = settings[f.name] if f.name in settings and not given else flag
                kwargs[name] = cls(**typed(cls, values))
        # a broken config file is no usage error: the group prints its one line (ragseek/errors.py)
        except FileError:
            raise
        except (ValueError, TypeError) as e:
            raise typer.BadParameter(str(e)) from e
        return fn(**kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}  # typer resolves these, not fn's
    del wrapper.__wrapped__
    return wrapper
