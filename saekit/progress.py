"""The one progress display of long jobs (harvest, train, e2e, finetune, splice, analyze).

On a terminal: rich bars, one row per task, with done/total, rate, ETA and the job's own
numbers (loss terms, L0...).  When stdout is not a terminal (a log file, a batch job, a
pipe): one plain whole line per task every `interval` seconds, on stderr, e.g.

    train blocks.0.hook_resid_post/topk-k32: 1,228,800/10,000,000 tokens (12%) 81,920 tokens/s ETA 1:47 loss=0.21 l0=32

so a log shows where a run is without carriage returns.  A job shorter than `interval`
prints nothing, and neither does one with `enabled=False`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field


def _clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@dataclass
class _Task:
    label: str
    total: int | None
    done: int
    start_done: int
    info: str = ""
    t0: float = field(default_factory=time.perf_counter)

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return (self.done - self.start_done) / dt if dt > 0 else float("nan")

    def line(self, unit: str) -> str:
        rate = self.rate()
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            head = f"{self.done:,}/{self.total:,} {unit} ({self.done / self.total:.0%}) {_rate(rate)} {unit}/s ETA {_clock(eta)}"
        else:
            head = f"{self.done:,} {unit} {_rate(rate)} {unit}/s"
        return f"{self.label}: {head}" + (f" {self.info}" if self.info else "")


class Progress:
    """Tasks with a total (None: unknown), advanced by `update`; use as a context manager or call `close`."""

    def __init__(self, enabled: bool = True, unit: str = "tokens", interval: float = 5.0, tty: bool | None = None,
                 transient: bool = False):
        """`transient`: on a terminal the bars vanish when done (a table printed next takes their place)."""
        self.enabled = enabled
        self.unit = unit
        self.interval = interval
        self.tasks: list[_Task] = []
        self.tty = sys.stdout.isatty() if tty is None else tty
        self._rich = None
        self._ids: list = []
        self._last = time.perf_counter()
        self._printed = False
        if enabled and self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                      transient=transient)
            self._rich.start()

    def add(self, label: str, total: int | None, done: int = 0) -> int:
        """A new row; returns its id for `update`."""
        self.tasks.append(_Task(label, total, done, done))
        if self._rich is not None:
            self._ids.append(self._rich.add_task(label, total=total, completed=done, rate="", info=""))
        return len(self.tasks) - 1

    def update(self, task: int = 0, done: int | None = None, advance: int = 0, info: str | None = None,
               total: int | None = None) -> None:
        if not self.enabled:
            return
        t = self.tasks[task]
        t.done = (t.done if done is None else done) + advance
        t.info = t.info if info is None else info
        t.total = t.total if total is None else total
        if self._rich is not None:
            rate = t.rate()
            self._rich.update(self._ids[task], completed=t.done, total=t.total, info=t.info,
                              rate=f"{_rate(rate)} {self.unit}/s" if rate == rate else "")
        elif time.perf_counter() - self._last >= self.interval:
            self._print()

    def _print(self) -> None:
        for t in self.tasks:
            print(t.line(self.unit), file=sys.stderr, flush=True)
        self._last = time.perf_counter()
        self._printed = True

    def close(self) -> None:
        """Stop the bars; in plain mode a last line per task, if the job ran long enough to print any."""
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        elif self.enabled and self._printed:
            self._print()
            self._printed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def callback(bar: Progress, task: int = 0):
    """A `progress(done, total)` function (the form splice_eval and analyze take) that drives `bar`'s task."""
    return lambda done, total: bar.update(task, done=done, total=total)


def _rate(rate: float) -> str:
    """Thousands separated; two significant digits below 10 (a slow step rate must not print as 0/s)."""
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
