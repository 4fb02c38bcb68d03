"""`make bench`: run every bench/bench_*.py in order, then rewrite BENCHMARKS.md from their results.

Contract for a bench script: runnable as `python bench/bench_NAME.py`, it writes
`bench/results/NAME.json` (the numbers) and `bench/results/NAME.md` (a markdown section with a `## ` heading
and the exact command that regenerates it). A script can be rerun alone; this file only concatenates.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def main(only: list[str]) -> None:
    scripts = sorted((ROOT / "bench").glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in only]
    for script in scripts:
        t0 = time.time()
        print(f"== {script.name}", flush=True)
        subprocess.run([sys.executable, str(script)], check=True, cwd=ROOT)
        print(f"   done in {time.time() - t0:.0f}s", flush=True)
    write_benchmarks_md()


def write_benchmarks_md() -> None:
    sections = [p.read_text().strip() for p in sorted(RESULTS.glob("*.md"))]
    header = (
        "# ragseek benchmarks\n\n"
        "Measured on this project's machine: 2 CPU cores, 24 GiB RAM, no GPU, torch 2.13.0 CPU, fp32 unless said.\n"
        "Each section names the command that regenerates it; `make bench` reruns them all. Raw numbers: `bench/results/*.json`.\n"
    )
    (ROOT / "BENCHMARKS.md").write_text(header + "\n" + "\n\n".join(sections) + "\n")
    print(f"wrote BENCHMARKS.md ({len(sections)} sections)")


if __name__ == "__main__":
    main(sys.argv[1:])
