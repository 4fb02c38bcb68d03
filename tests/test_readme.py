"""The README runs as written: every bash and Python block under "## Use it", in order, in a fresh folder that sees
the repository's docs/, configs/ and tests/ data (the commands' own relative paths), with `ragseek` on PATH."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    use_it = text[text.index("## Use it\n") : text.index("\n## ", text.index("## Use it\n") + 1)]
    return re.findall(rf"```{language}\n(.*?)```", use_it, flags=re.S)


def test_the_use_it_section_has_its_commands():
    commands = [line for block in blocks("bash") for line in block.splitlines() if line.strip()]
    assert len(commands) >= 15 and all(line.startswith("ragseek ") for line in commands)
    assert len(blocks("python")) == 1


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    for name in ("docs", "configs", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for block in blocks("bash"):
        for line in filter(str.strip, block.splitlines()):
            run = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True)
            assert run.returncode == 0, f"{line}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    for code in blocks("python"):
        run = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, f"{code}\n{run.stderr[-2000:]}"
    assert (tmp_path / "runs/grpo/final").is_dir()
