"""What a run shows while it runs, and what is left of the input when it stops.

- `RunProgress` counts the input's lines (or rows) dealt with: answered, failed, skipped as
  settled by an earlier run, or blank. On a terminal it draws a rich bar (done/total, tok/s,
  the adapters on the device, elapsed time). Anywhere else (a log file, CI) a background thread
  prints a plain line on stderr every `every` seconds, as batch tools do:
  `loracli run: 1200/4000 done (30%), 35.2 tok/s, 0:01:05 elapsed, ETA 0:02:10`; done/total
  and the ETA only when the input's total is known (`input_sources.count_records`), the ETA
  once a result is in. `every` <= 0: no lines.
- `records_after(path, line, total)`: how many records (lines that are not blank, or table rows)
  of the input come after `line`, when the total is known; None otherwise (stdin, `.gz`, csv,
  arrow, JSONL over 1 GiB), so a stop can say exactly how much is left, or say it cannot.
Imports nothing heavy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .input_sources import input_kind, iter_lines


class Counts(Protocol):
    """What the progress reads of a run's summary (`job.JobSummary`)."""

    completion_tokens: int
    requests: int  # results written by this run
    resumed: int  # records settled by earlier runs, met so far


def clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class RunProgress:
    """Progress of one run on `console` (see the module doc); a context manager.

    `settled`: records earlier runs settled (the ETA counts them as free); `residency` describes
    the adapters on the device, for the bar.
    """

    def __init__(
        self,
        console: Console,
        counts: Counts,
        total: int | None,
        every: float,
        settled: int = 0,
        residency: Callable[[], str] = str,
    ):
        self.console = console
        self.counts = counts
        self.total = total
        self.every = every
        self.settled = settled
        self.residency = residency
        self.done = 0
        self.started = time.perf_counter()
        self._bar = Progress(
            TextColumn("[bold]loracli run"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[tps]:>7.1f} tok/s  adapters {task.fields[res]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self._task = self._bar.add_task("run", total=total, tps=0.0, res="")
        self._stopped = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> RunProgress:
        self.started = time.perf_counter()
        self._bar.start()
        if not self.console.is_terminal and self.every > 0:
            self._ticker = threading.Thread(target=self._tick, name="loracli-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        if self._ticker is not None:
            self._ticker.join()
        self._bar.stop()

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def advance(self) -> None:
        """One more line of the input dealt with."""
        self.done += 1
        if self.console.is_terminal:
            tps = self.counts.completion_tokens / self.elapsed()
            self._bar.update(self._task, advance=1, tps=tps, res=self.residency())

    def eta(self) -> float | None:
        """Seconds to go at this run's pace so far; None until a result is in or without a total."""
        results = self.counts.requests
        if self.total is None or results == 0:
            return None
        to_skip = max(self.settled - self.counts.resumed, 0)
        return max(self.total - self.done - to_skip, 0) * self.elapsed() / results

    def line(self) -> str:
        """The plain progress line."""
        elapsed = self.elapsed()
        if self.total:
            done = f"{self.done}/{self.total} done ({100 * self.done // self.total}%)"
        else:
            done = f"{self.done} done"
        text = f"loracli run: {done}, {self.counts.completion_tokens / elapsed:.1f} tok/s, {clock(elapsed)} elapsed"
        eta = self.eta()
        return text if eta is None else f"{text}, ETA {clock(eta)}"

    def _tick(self) -> None:
        while not self._stopped.wait(self.every):
            self.console.print(self.line(), highlight=False, soft_wrap=True, markup=False)


def records_after(path: str, line: int, total: int | None) -> int | None:
    """Records of the input after its line (or row) `line`; None when its total is not known."""
    if total is None:
        return None
    if input_kind(path) != "jsonl":
        return max(total - line, 0)  # a table: every row is a record
    with open(path, "rb") as f:
        return sum(1 for number, raw in iter_lines(f) if number > line and (raw is None or raw.strip()))
