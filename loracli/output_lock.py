"""One writer per output: a lock held for the whole job, and where an output's own files live.

Contract:
- `is_file_output(path)`: only a regular file (or a path with nothing there yet) is locked, gets
  a sidecar and can be resumed. `-` (stdout), devices (`/dev/null`), FIFOs and sockets are
  written without any of that.
- `companion(output, suffix)`: the path of a file that belongs to an output (its sidecar
  `<output>.loracli.json`, see `resume.py`, and its lock `<output>.loracli.lock`). It is beside
  the output when files can be created in the output's folder, else in
  `cache_root() / "sidecars"`, named after the output's file name and a digest of its absolute
  path, so every run on that output finds the same one.
- `hold(targets)`: an `OutputLock` per file output, entered together and released together when
  the `with` ends, however it ends (return, exception, a stop signal).
- `OutputLock`: `flock(LOCK_EX | LOCK_NB)` on the lock file of the output's real path (symlinks
  resolved, so two spellings of one file share one lock), which then holds the holder's PID
  and start time. A lock another job holds is refused at once with a one-line `ConfigError`
  naming that job's PID and the field (`output_path`, `errors_path`); it is never waited for.
  The kernel drops a `flock` when its process dies, even by `kill -9`, so a lock file left
  behind by a killed job holds no lock and is simply taken over. On release the lock file is
  removed while still locked; a job that opened it just before checks, once it holds the lock,
  that the path still names the file it locked, and otherwise starts again.
- A full disk while writing the holder: `outputs.DiskFullError`.
Without `fcntl` (not POSIX) nothing is locked. Imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .errors import ConfigError
from .model_source import cache_root
from .outputs import DISK_FULL, disk_full_fails, write_all

try:
    import fcntl
except ImportError:  # not POSIX: outputs are not locked
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".loracli.lock"
SIDECARS = "sidecars"  # the cache's folder for the companions of outputs in folders we cannot write


def is_file_output(path: str) -> bool:
    """A regular file, or nothing yet: an output that can be locked, resumed and given a sidecar."""
    return path != "-" and (not os.path.exists(path) or os.path.isfile(path))


def writable_folder(folder: Path) -> bool:
    """Whether a file can be created in `folder` (made if missing): tried, since root ignores mode bits."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError as e:
        return e.errno in DISK_FULL  # writable, only full: the write itself reports that


def companion(output: str, suffix: str) -> Path:
    """`<output><suffix>`, or its stand-in in the cache when the output's folder is not writable."""
    path = Path(output)
    if writable_folder(path.parent):
        return path.with_name(path.name + suffix)
    digest = hashlib.sha256(str(path.resolve()).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return cache_root() / SIDECARS / f"{path.name[:100]}-{digest}{suffix}"


def in_cache(path: Path) -> bool:
    """Whether a companion file went to the cache (see `companion`)."""
    return path.parent == cache_root() / SIDECARS


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


class OutputLock:
    """The exclusive lock of one output for one job (see the module doc); a context manager."""

    def __init__(self, output: str, field: str):
        self.output = output
        self.field = field
        self.path = companion(str(Path(output).resolve()), LOCK_SUFFIX)  # one lock per file, however named
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            self.fd = self._try_once()
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)  # drops the lock
        self.fd = None

    def _try_once(self) -> int | None:
        """The locked file's descriptor; None when the file was replaced meanwhile (try again)."""
        with disk_full_fails(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise ConfigError(self._refusal(fd), fields=(self.field,)) from None
            if not _same_file(fd, self.path):
                os.close(fd)
                return None
            holder = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "output": self.output}
            with disk_full_fails(self.path):
                os.ftruncate(fd, 0)
                write_all(fd, (json.dumps(holder) + "\n").encode("utf-8", "surrogatepass"))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _refusal(self, fd: int) -> str:
        try:
            holder = json.loads(os.pread(fd, 1 << 16, 0))
            who = f"PID {int(holder['pid'])}, started {holder['started']}"
        except (OSError, ValueError, TypeError, KeyError):
            who = "PID not written yet"
        return (
            f"{self.output} is being written by another loracli job ({who}; lock {self.path}); "
            f"wait for it to end, or choose another {self.field}"
        )


@contextmanager
def hold(targets: Iterable[tuple[str | None, str]]) -> Iterator[list[OutputLock]]:
    """Lock each (path, field) that is a file output (see `is_file_output`), all for one `with`."""
    with ExitStack() as stack:
        locks: list[OutputLock] = []
        for path, field in targets:
            if path is None or not is_file_output(path):
                continue
            lock = OutputLock(path, field)
            if all(lock.path != held.path for held in locks):  # the same file twice: resume.py refuses it
                locks.append(stack.enter_context(lock))
        yield locks
