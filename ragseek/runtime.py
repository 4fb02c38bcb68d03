"""How ragseek shares the CPU: how many threads torch computes with, and how its idle threads wait.

    ragseek --threads 1 ask ...          # or RAGSEEK_THREADS=1 ragseek ask ...; a config's num_threads: 1 is the same
    runtime.use_threads(None)            # what the command line does first, before torch is imported

torch runs each operator as an OpenMP parallel region over its threads, and every region ends at a barrier where
each thread waits for the slowest. libgomp (the OpenMP torch's wheel ships) waits by spinning, ~300,000 polls,
before it sleeps. On an idle machine that is the fastest way to wait. Beside another busy process there are more
runnable threads than cores: at most barriers one of torch's threads is off its core, and its partners spin on the
cores it and the other process need. A decode step of SmolLM2 is hundreds of small regions, so the step takes
scheduler slices instead of milliseconds. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) hands the core back: the
straggler runs, the barrier opens. Measured by bench/bench_threads.py (docs/threads.md): SmolLM2 on 2 cores
beside one busy process decoded 7.3 tok/s with torch's defaults (spinning; 19.2 idle) and 18.8 with 2 threads that
sleep at once (18.0 idle), whose 512-token prefill kept 311 tok/s (176 spinning; 522 idle, 322 with one thread).

So the command line, before torch loads, sets OMP_WAIT_POLICY=PASSIVE (unless the user set it) and the thread
count: `--threads N`, else $RAGSEEK_THREADS, else a config's num_threads, else $OMP_NUM_THREADS (torchrun sets it
per rank), else one per core torch may run on. The wait policy is read once, when torch loads libgomp: a process
that imported torch before `use_threads` keeps its policy and only gets the count. This module imports neither
torch nor numpy.
"""

from __future__ import annotations

import os
import sys

THREADS_ENV = "RAGSEEK_THREADS"
# the OpenMP runtime reads these when torch loads it; MKL's and OpenBLAS's own pools follow the same count
COUNT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
WAIT_POLICY = "PASSIVE"


def cores() -> int:
    """CPUs this process may run on (its affinity mask, which a container's cpuset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_threads(threads: int | None = None, default: int | None = None) -> int:
    """The thread count: `threads` (a --threads flag), else $RAGSEEK_THREADS, else `default` (a config's
    num_threads), else $OMP_NUM_THREADS, else `cores()`; 0 or None passes to the next. Raises ValueError for a
    count that is not a positive whole number."""
    given = (
        (threads, "--threads"),
        (os.environ.get(THREADS_ENV), THREADS_ENV),
        (default, "num_threads"),
        (os.environ.get("OMP_NUM_THREADS"), "OMP_NUM_THREADS"),
    )
    for value, name in given:
        if value in (None, "", 0, "0"):
            continue
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{name} {value}: give a number of threads >= 1 (0 or unset: one per core)")
        return n
    return cores()


def use_threads(threads: int | None = None, default: int | None = None) -> int:
    """Compute with `resolve_threads(threads, default)` torch threads and let idle OpenMP threads sleep; returns
    the count. A `threads` given is exported as $RAGSEEK_THREADS, so it wins in child processes and over a
    config's `default` read later.

    Before torch is imported this sets the environment its runtimes read when they load (the count, and
    OMP_WAIT_POLICY=PASSIVE unless already set); after, it calls torch.set_num_threads."""
    n = resolve_threads(threads, default)
    if threads:
        os.environ[THREADS_ENV] = str(n)
    for name in COUNT_VARIABLES:
        os.environ[name] = str(n)
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    if "torch" in sys.modules:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return n


def quiet_libraries() -> None:
    """Third-party progress bars and load reports off (transformers' "Loading weights", the hub's downloads,
    sentence-transformers' batches): ragseek's own progress lines say what runs. Set before they are imported."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
