"""Never silent (issue 16 §4): the longest stretch in which a command's terminal shows nothing new.

    .venv/bin/python bench/bench_progress.py

Each command runs twice on the embedded defaults. First in a pseudo-terminal (stdout and stderr both the terminal,
as a user at a shell): every byte it writes is timestamped, and the longest gap between writes, the command's start
and its end included, is its silence. A phase's line appears after 1 s (`progress.DELAY`) and redraws 4 times a
second with its rate and ETA, so a gap much above 1 s is a phase without a line. Then with `--json` and pipes: stdout
must parse as JSON and stderr must hold no terminal escape codes (no progress drawn into a program's input).
Writes bench/results/progress.json and progress.md.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RAGSEEK = str(Path(sys.executable).with_name("ragseek"))
QUESTION = "How many bytes per token does the MLA absorbed KV cache take?"  # make demo's
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def commands(tmp: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) of the commands a user waits on; `{store}` is filled per run."""
    rows = [
        ("ingest docs/ (MiniLM)", ["ingest", "docs", "--store", "{store}"]),
        ("ask (make demo's question)", ["ask", QUESTION, "--store", str(tmp / "tty-store")]),
        ("generate 64 tokens", ["generate", "Explain MoE.", "--max-new-tokens", "64"]),
    ]
    if GSM8K.exists():
        rows.append(("eval math, 16 GSM8K questions", ["eval", "math", "--data", str(GSM8K), "--n", "16"]))
    return rows


def on_a_terminal(argv: list[str]) -> dict:
    """Run argv with a pseudo-terminal as stdout and stderr; the gaps between its writes."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "RAGSEEK_PROGRESS"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    out = bytearray()
    # (when, whether a progress line is left on the screen): a gap after a line's redraw is a frozen line (a C
    # call or an import holding the GIL keeps rich's refresh thread from redrawing), after anything else silence
    writes = [(t0, False)]
    while True:
        ready, _, _ = select.select([master], [], [], 0.05)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal closed: the command ended
                break
            if not chunk:
                break
            text = ESCAPE.sub("", chunk.decode(errors="replace")).strip()
            writes.append((time.perf_counter(), "elapsed" in (text.splitlines()[-1] if text else "")))
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait()
    os.close(master)
    end = time.perf_counter()
    writes.append((end, False))
    gaps = [(b - a, shown) for (a, shown), (b, _) in zip(writes, writes[1:], strict=False)]
    text = ESCAPE.sub("", out.decode(errors="replace"))
    return {
        "exit": proc.returncode,
        "wall_s": end - t0,
        "silence_s": max(g for g, shown in gaps if not shown),
        "frozen_line_s": max((g for g, shown in gaps if shown), default=0.0),
        "first_write_s": writes[1][0] - t0,
        "eta_shown": "ETA" in text,
        "tail": text.strip().splitlines()[-1][:120] if text.strip() else "",
    }


def with_json(argv: list[str]) -> dict:
    """Run argv with --json and pipes: is stdout JSON, and is stderr free of terminal codes?"""
    res = subprocess.run([*argv, "--json"], capture_output=True, text=True, cwd=ROOT)
    try:
        json.loads(res.stdout)
        parses = True
    except ValueError:
        parses = False
    return {"exit": res.returncode, "json": parses, "escapes_on_stderr": "\x1b" in res.stderr}


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_progress-"))
    rows = []
    try:
        for name, args in commands(tmp):
            tty = [RAGSEEK, *(a.replace("{store}", str(tmp / "tty-store")) for a in args)]
            piped = [RAGSEEK, *(a.replace("{store}", str(tmp / "json-store")) for a in args)]
            row = {"command": name, "argv": args, "terminal": on_a_terminal(tty), "piped": with_json(piped)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()[0]
    (RESULTS / "progress.json").write_text(json.dumps({"load_avg_1min": load, "rows": rows}, indent=2))
    lines = [
        "## Never silent: how long a command's terminal shows nothing (issue 16 §4)",
        "",
        "`.venv/bin/python bench/bench_progress.py` — each command on the embedded defaults in a pseudo-terminal "
        "(stdout and stderr the terminal, as at a shell), every write timestamped. Silence: the longest gap between "
        "writes with no progress line on the screen (the start and the end included). A phase's line shows after "
        "1 s and redraws 4 times a second with its rate and ETA; a line stands still while an import or a C call "
        "holds the GIL, which the next column counts apart. First output includes starting Python and importing "
        "torch (1.8 s here). Then the same command with `--json` into pipes: stdout must be JSON, stderr free of "
        f"terminal codes. Load average {load:.1f} on 2 cores at the end.",
        "",
        "| command | wall (s) | first output (s) | longest silence (s) | longest a line stood still (s) | ETA shown "
        "| `--json`: stdout JSON, no codes on stderr |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        t, p = r["terminal"], r["piped"]
        clean = p["json"] and p["exit"] == 0 and not p["escapes_on_stderr"]
        lines.append(
            f"| {r['command']} (exit {t['exit']}) | {t['wall_s']:.1f} | {t['first_write_s']:.2f} | "
            f"{t['silence_s']:.2f} | {t['frozen_line_s']:.2f} | {'yes' if t['eta_shown'] else 'no'} | "
            f"{'yes' if clean else 'NO'} |"
        )
    (RESULTS / "progress.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
