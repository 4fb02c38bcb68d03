"""Progress lines on stderr: one mechanism for every phase that takes more than a moment.

    with progress.task("loading SmolLM2-135M"):                # a phase without a count: its elapsed time
        model = load()
    with progress.task("decode", total=64, unit="tok") as bar:  # counted: done/total, rate and ETA
        for ...:
            bar.advance()
    with progress.stages() as on_progress:                      # the (stage, done, total) callbacks of ingest & co.
        store.ingest(paths, on_progress=on_progress)
    for step in progress.counted(steps, "decode", "tok", 64):  # a step of the line per item
        ...
    pieces = progress.until_first(stream, "prefill")            # a line until a stream's first piece arrives

Library code reports unconditionally; whether anything is drawn is the command line's choice (`enable`): lines show
when stderr and stdout are terminals and --json is not given (RAGSEEK_PROGRESS=1 forces them, =0 silences them).
A phase's line appears once it has run DELAY seconds (RAGSEEK_PROGRESS_DELAY) and vanishes when it ends, so what a
command prints is what it printed before. While lines show, what the command writes to stdout or stderr is printed
above them. Disabled, a task costs a function call and draws nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

DELAY = 1.0  # seconds a phase runs before its line shows: the quick ones never flicker


class Task:
    """One phase's line: `advance(n)` or `update(done, total)` when it has a count."""

    def __init__(self, display: _Display | None = None, task_id: Any = None):
        self.display, self.id = display, task_id

    def advance(self, n: float = 1) -> None:
        if self.display is not None:
            self.display.bars.update(self.id, advance=n)

    def update(self, done: float | None = None, total: float | None = None) -> None:
        if self.display is not None:
            self.display.bars.update(self.id, completed=done, total=total)


class _Display:
    """The rich Progress that draws the lines. It starts drawing once a phase has run `delay` seconds, and stops
    after the last one ends, so a quick phase writes nothing to the terminal and nothing is redirected while no
    phase runs (a streamed answer prints as it comes)."""

    def __init__(self, forced: bool, delay: float):
        self.forced, self.delay = forced, delay
        self.lock = threading.RLock()
        self.bars: Any = None
        self.open = 0

    def add(self, description: str, total: float | None, unit: str) -> Task:
        with self.lock:
            if self.bars is None:
                self.bars = bars = _progress(self.forced, self.delay)
                if self.delay > 0:
                    timer = threading.Timer(self.delay, self._draw, (bars,))
                    timer.daemon = True
                    timer.start()
                else:
                    bars.start()
            self.open += 1
            return Task(self, self.bars.add_task(description, total=total, unit=unit))

    def _draw(self, bars: Any) -> None:
        with self.lock:
            if self.bars is bars:
                bars.start()

    def remove(self, task: Task) -> None:
        with self.lock:
            self.bars.remove_task(task.id)
            self.open -= 1
            if self.open == 0:
                if self.bars.live.is_started:
                    self.bars.stop()
                self.bars = None


_display: _Display | None = None


def enable(on: bool) -> None:
    """Draw progress lines from now on (`on`), or not; RAGSEEK_PROGRESS=1 / 0 in the environment overrides `on`."""
    global _display
    forced = os.environ.get("RAGSEEK_PROGRESS", "").strip()
    if forced in ("0", "1"):
        on = forced == "1"
    _display = _Display(forced == "1", float(os.environ.get("RAGSEEK_PROGRESS_DELAY", DELAY))) if on else None


def wanted(json_out: bool) -> bool:
    """What the command line enables: stderr and stdout are terminals, and the output is not --json."""
    return not json_out and sys.stderr.isatty() and sys.stdout.isatty()


@contextlib.contextmanager
def task(description: str, total: float | None = None, unit: str = "") -> Iterator[Task]:
    """A progress line for the block: `description`, then done/total `unit`, the rate and the ETA when `total` is
    given (the Task's advance / update move it), else the elapsed time."""
    display = _display
    if display is None:
        yield Task()
        return
    line = display.add(description, total, unit)
    try:
        yield line
    finally:
        display.remove(line)


@contextlib.contextmanager
def stages() -> Iterator[Callable[[str, int, int], None]]:
    """An `on_progress(stage, done, total)` callback for the block: one line per stage, gone once done == total."""
    open_: dict[str, tuple[contextlib.AbstractContextManager, Task]] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in open_:
            cm = task(stage, total)
            open_[stage] = (cm, cm.__enter__())
        cm, line = open_[stage]
        line.update(done, total)
        if done >= total:
            del open_[stage]
            cm.__exit__(None, None, None)

    try:
        yield report
    finally:
        for cm, _ in open_.values():
            cm.__exit__(None, None, None)


def counted(items: Iterable[T], description: str, unit: str = "", total: int | None = None) -> Iterator[T]:
    """`items`, a step of a progress line each (`total` steps expected: a rate and an ETA)."""
    with task(description, total, unit) as line:
        for item in items:
            yield item
            line.advance()


def until_first(pieces: Iterator[str], description: str) -> Iterator[str]:
    """`pieces`, with a line `description` shown until the first one arrives (a prompt's prefill, before the
    answer streams to the terminal)."""
    with task(description):
        first = next(pieces, None)
    if first is None:
        return
    yield first
    yield from pieces


def _progress(forced: bool, delay: float):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn
    from rich.text import Text

    class Status(ProgressColumn):
        def render(self, task) -> Text:
            return Text(
                status(task), style="progress.elapsed" if task.total is None else "progress.data.speed"
            )

    class Lines(Progress):
        def make_tasks_table(self, tasks):
            # a phase shows once it has run `delay` seconds
            return super().make_tasks_table([t for t in tasks if (t.elapsed or 0) >= delay])

    console = Console(stderr=True, force_terminal=True if forced else None)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20), Status())
    # what the command prints meanwhile goes above the lines; only when both streams are the terminal (forced
    # lines must not carry stdout over to stderr)
    redirect = sys.stdout.isatty() and sys.stderr.isatty()
    return Lines(
        *columns, console=console, transient=True, refresh_per_second=4, redirect_stdout=redirect,
        redirect_stderr=redirect,
    )  # fmt: skip


def status(task: Any) -> str:
    """The end of a phase's line (`task` is rich's Task): done/total unit, the rate and the ETA for a counted
    phase; the elapsed time for both."""
    elapsed = f"{_seconds(task.elapsed or 0)} elapsed"
    if task.total is None:
        return elapsed
    unit = task.fields.get("unit", "")
    parts = [f"{task.completed:,.0f}/{task.total:,.0f}" + (f" {unit}" if unit else "")]
    if task.speed:
        parts.append(f"{task.speed:,.1f} {unit}/s" if unit else f"{task.speed:,.1f}/s")
    if task.time_remaining is not None:
        parts.append(f"ETA {_seconds(task.time_remaining)}")
    return "  ".join([*parts, elapsed])


def _seconds(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s // 60 % 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
