"""Progress of slow model steps, on stderr only.

Contract: `Reporter(enabled).step(description)` is a context manager around one slow step. When
enabled it shows a rich spinner line with the elapsed time on a terminal (a plain "… step" line
otherwise) and a final "✓ step (N.Ns)" line, all on stderr; when disabled it prints nothing. rich
is imported only when a reporter is enabled.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator


class Reporter:
    """Rich spinner lines on stderr, one per slow step, with the elapsed time; silent when disabled."""

    def __init__(self, enabled: bool):
        self._console = None
        if enabled:
            from rich.console import Console

            self._console = Console(file=sys.stderr)

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        if self._console is None:
            yield
            return
        from rich.markup import escape
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        label = escape(description)
        start = time.monotonic()
        if self._console.is_terminal:
            columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
            with Progress(
                *columns, console=self._console, transient=True, redirect_stdout=False, redirect_stderr=False
            ) as bar:
                bar.add_task(label, total=None)
                yield
        else:
            self._console.print(f"… {label}")
            yield
        self._console.print(f"[green]✓[/] {label} [dim]({time.monotonic() - start:.1f}s)[/]")
