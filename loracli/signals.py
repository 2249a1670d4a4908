"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM.

Inside `with StopSignals() as stop:` the first signal only sets `stop.requested` (its number)
and says so on stderr: the runner then admits no new request, finishes the ones in flight and
writes them. A second signal raises `ForcedStop` at once, except inside `critical()` (one
record's write), where it is held until the write is done, so no line is ever torn by it.
`ForcedStop` is a `BaseException`, so no `except Exception` on the way swallows it. Outside
the `with`, Python's own handlers are back.

`exit_status(signum)` is the shell's 128 + signal (130 for SIGINT, 143 for SIGTERM);
`resume_command(argv)` is the command line that finishes an interrupted run.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
NOTICE = (
    "\nloracli: {name} received: admitting no new requests, finishing those in flight (send it again to stop now)\n"
)


class ForcedStop(BaseException):
    """A second stop signal: leave now. `signum` is the first signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Guard:
    """Module state: the active `StopSignals`, and how deep inside `critical()` we are."""

    active: StopSignals | None = None
    depth = 0
    pending = False


def exit_status(signum: int) -> int:
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def resume_command(argv: list[str], program: str = "loracli") -> str:
    """The command that finishes the run started by `argv`: the same one, less `--overwrite`."""
    return shlex.join([program, *(a for a in argv if a != "--overwrite")])


@contextmanager
def critical() -> Iterator[None]:
    """Hold a forced stop until the block is done (use around one record's write)."""
    _Guard.depth += 1
    try:
        yield
    finally:
        _Guard.depth -= 1
        stop = _Guard.active
        if _Guard.depth == 0 and _Guard.pending and stop is not None:
            _Guard.pending = False
            raise ForcedStop(stop.requested or signal.SIGINT)


class StopSignals:
    """Handlers for SIGINT and SIGTERM for the duration of a `with` (main thread only)."""

    def __init__(self, exit_after_stop: bool = False) -> None:
        self.exit_after_stop = exit_after_stop  # the caller exits once a stop was asked for (the CLI)
        self.requested: int | None = None
        self.forced = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        _Guard.active, _Guard.depth, _Guard.pending = self, 0, False
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # When the process exits after a stop, a late second signal must not turn into a
            # KeyboardInterrupt traceback during shutdown: it is ignored from here on.
            leaving = self.exit_after_stop and self.requested is not None
            signal.signal(sig, signal.SIG_IGN if leaving else handler)
        _Guard.active, _Guard.pending = None, False

    def _handle(self, signum: int, frame) -> None:
        if self.requested is None:
            self.requested = signum
            try:
                os.write(2, NOTICE.format(name=signal_name(signum)).encode())
            except OSError:
                pass
            return
        self.forced = True
        if _Guard.depth > 0:
            _Guard.pending = True
            return
        raise ForcedStop(self.requested)
