"""The `ragseek` command as a whole: every command takes its options the same way (its flags, --config FILE and
--set key=value), and the command line loads without torch (`ragseek --help` stays fast)."""

import subprocess
import sys

import typer.main

from ragseek.cli import app


def _leaves(cmd, path: str = "ragseek"):
    # a group has .commands (typer ships its own click, so no isinstance against click's classes)
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _leaves(sub, f"{path} {name}")
    else:
        yield path, cmd


def test_every_command_takes_config_and_set():
    leaves = dict(_leaves(typer.main.get_command(app)))
    assert {
        "ragseek ask",
        "ragseek generate",
        "ragseek serve",
        "ragseek eval math",
        "ragseek data reader",
    } <= set(leaves)
    missing = {
        path: sorted({"--config", "--set"} - {o for p in cmd.params for o in p.opts})
        for path, cmd in leaves.items()
    }
    assert {p: m for p, m in missing.items() if m} == {}


def test_the_command_line_loads_without_torch():
    code = "import sys, ragseek.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lazy_model_names_are_the_functions_even_after_their_module_loads():
    import ragseek.model.decoding as decoding
    from ragseek.model import SamplingConfig, generate, stream
    from ragseek.model.sampling import SamplingConfig as declared

    assert generate is decoding.generate and stream is decoding.stream and SamplingConfig is declared


def test_a_command_reads_flags_then_set_then_config(tmp_path):
    from typer.testing import CliRunner

    def rows(*args):
        out = tmp_path / "rows.jsonl"
        result = CliRunner().invoke(app, ["data", "addition", "--out", str(out), *args])
        assert result.exit_code == 0, result.output
        return len(out.read_text().splitlines())

    config = tmp_path / "addition.yaml"
    config.write_text("n: 7\nkind: sft\n")
    assert rows("--n", "5") == 5
    assert rows("--config", str(config)) == 7
    assert rows("--config", str(config), "--set", "n=3") == 3
    assert rows("--config", str(config), "--set", "n=3", "--n", "4") == 4
    assert rows("--eval") == 500
    bad = CliRunner().invoke(app, ["data", "addition", "--out", str(tmp_path / "x"), "--set", "m=3"])
    assert bad.exit_code != 0 and "unknown keys ['m']" in bad.output


def test_data_addition_writes_preference_pairs(tmp_path):
    """configs/rm.yaml's data: a right response against a wrong one, in either style; think has no slips."""
    import json

    from typer.testing import CliRunner

    from ragseek.train.tasks.addition import is_correct, train_problems

    problems = train_problems(6, seed=3)
    for style in ("answer", "worked"):
        out = tmp_path / f"{style}.jsonl"
        args = ["--kind", "pairs", "--style", style, "--n", "6", "--seed", "3", "--out", str(out)]
        result = CliRunner().invoke(app, ["data", "addition", *args])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["prompt"] for r in rows] == [p.question for p in problems]
        assert all(is_correct(r["chosen"], p) for r, p in zip(rows, problems, strict=True))
        assert not any(is_correct(r["rejected"], p) for r, p in zip(rows, problems, strict=True))
    think = ["data", "addition", "--kind", "pairs", "--style", "think", "--out", str(tmp_path / "t.jsonl")]
    result = CliRunner().invoke(app, think)
    assert result.exit_code == 2 and "preference pairs are answer or worked" in result.output
