"""Where results go beyond a local JSONL file: a Parquet file, an object at a URL, or both.

A `Destination` maps what the user named (`target`) onto local files that the job already keeps
safe line by line (outputs.py: whole-line writes, fsync every second; resume.py; output_lock.py):
- `local`: the file the lock, the sidecar and the resume plan belong to: the target itself, or
  for a URL a staging copy `cache_root()/outputs/<digest of the URL>-<file name>`;
- `lines`: the JSONL file results are appended to: `local` for JSONL, or for Parquet its journal
  `<local>.loracli.jsonl` (a Parquet file has its footer at the end: a file cut by a stop could
  not be read back, a journal can).
`prepare` runs under the lock, before the resume plan:
- a URL with nothing staged here: the object and its sidecar `<URL>.loracli.json` are downloaded
  into staging (so a rerun on another machine resumes from the object's lines); with staging
  already here, the object must be the one this machine last uploaded or downloaded (size and
  ETag, kept in `<local>.loracli.upload.json`), or have the size of the upload in progress when
  the run was killed, else the run is refused: another writer changed it.
  `overwrite` drops the staging and takes the object as it is (it is replaced at the first upload).
- a Parquet file without a journal: its rows are read back into a new journal (`parquet_results`),
  so resume reads the ids (and keeps the results) of the existing file.
`Publisher` makes the target from `lines`: the Parquet file is written whole from the journal
(through a temporary file and a rename) and a URL's object is replaced by one upload of the
staged file (atomic on S3). Both happen in a background thread at checkpoints — after a write,
when at least `period` seconds and ten times the last publication's own duration (the first's
not counted: it pays for imports and connections) have passed —
and once more when the run ends or stops (`finish`), after the thread is done. Only whole lines
are published. After a run that ended without a stop, the journal and the staging are removed
(the target then holds everything; a rerun reads it back). What holds at any moment: the target
is complete and readable, holding every result finished before the last checkpoint, and `lines`
holds every finished result. Nothing here locks an object across machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .atomic_files import atomic_file
from .data_urls import download, head, upload
from .errors import ConfigError
from .model_source import cache_root
from .output_lock import companion
from .outputs import ResultWriter
from .resume import SIDECAR_SUFFIX, sidecar_path
from .url_fs import is_url

JOURNAL_SUFFIX = ".loracli.jsonl"
STATE_SUFFIX = ".loracli.upload.json"
STAGING = "outputs"  # the cache's folder for staged copies of URL outputs
SLOWDOWN = 10.0  # a checkpoint costs at most a tenth of the run: the next waits 10x the last one's duration


@dataclass(frozen=True)
class Destination:
    target: str
    local: str
    lines: str
    parquet: bool = False
    url: bool = False

    @property
    def plain(self) -> bool:
        """A local JSONL file (or `-`): written directly, nothing to publish."""
        return not (self.parquet or self.url)


def staging_path(url: str) -> Path:
    name = url.rstrip("/").rsplit("/", 1)[-1][:100] or "output"
    digest = hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return cache_root() / STAGING / f"{digest}-{name}"


def destination(output: str, input_path: str, errors_path: str | None, stats_path: str | None = None) -> Destination:
    """The `Destination` of `output_path`; `ConfigError` for a URL that is the input, or an errors or stats URL."""
    for path, field in ((errors_path, "errors_path"), (stats_path, "stats_path")):
        if is_url(path):
            raise ConfigError(f"{field} {path}: must be a local file (URLs are for output_path)", fields=(field,))
    if output == "-":
        return Destination(output, output, output)
    parquet = output.lower().endswith(".parquet")
    if parquet:
        from .parquet_results import pyarrow_modules

        pyarrow_modules()  # a missing extra fails now, before the model loads (and checkpoints are not slowed)
    if not is_url(output):
        return Destination(output, output, companion(output, JOURNAL_SUFFIX).as_posix() if parquet else output, parquet)
    if output == input_path:
        raise ConfigError(f"output_path {output} is the input itself", fields=("output_path",))
    local = staging_path(output)
    lines = local.with_name(local.name + JOURNAL_SUFFIX) if parquet else local
    return Destination(output, str(local), str(lines), parquet, url=True)


def _nonempty(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).stat().st_size > 0


def _state_path(dest: Destination) -> Path:
    return Path(dest.local + STATE_SUFFIX)


def _save_state(dest: Destination, obj: dict | None) -> None:
    with atomic_file(_state_path(dest)) as f:
        f.write((json.dumps(obj) + "\n").encode("utf-8"))


def _load_state(dest: Destination) -> dict | None:
    try:
        return json.loads(_state_path(dest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove(*paths: str | Path) -> None:
    for p in paths:
        Path(p).unlink(missing_ok=True)


def prepare(dest: Destination, overwrite: bool, say: Callable[[str], None]) -> None:
    """Bring what earlier runs left into `dest.local` / `dest.lines` (see the module doc)."""
    if dest.url:
        _prepare_staging(dest, overwrite, say)
    if not dest.parquet:
        return
    if overwrite:
        _remove(dest.lines)
    elif not _nonempty(dest.lines) and _nonempty(dest.local):
        _seed_journal(dest)


def _prepare_staging(dest: Destination, overwrite: bool, say: Callable[[str], None]) -> None:
    obj = head(dest.target)
    staged = Path(dest.local).exists() or Path(dest.lines).exists()
    if overwrite or not staged:
        _remove(dest.local, dest.lines, sidecar_path(dest.local))
        if obj is not None and not overwrite:
            download(dest.target, Path(dest.local))
            download(dest.target + SIDECAR_SUFFIX, sidecar_path(dest.local))
            say(f"{dest.target}: {obj['size']} bytes downloaded to resume from (staged in {dest.local})")
        _save_state(dest, obj)
        return
    if not _ours(_load_state(dest), obj):
        raise ConfigError(
            f"output_path {dest.target} changed since this machine last uploaded or read it (another writer?); "
            f"set overwrite to start over, or delete the staged copy {dest.local} to resume from the object",
            fields=("output_path", "overwrite"),
        )


def _ours(state: dict | None, obj: dict | None) -> bool:
    """Whether the object is the one this machine last saw, or the one it was uploading when it stopped."""
    if obj is None:  # gone, or never uploaded: the staged copy holds everything
        return True
    if state is None:
        return False
    same = state.get("etag") == obj["etag"] and state.get("size") == obj["size"]
    return same or state.get("uploading") == obj["size"]


def _seed_journal(dest: Destination) -> None:
    from .outputs import encode_line
    from .parquet_results import read_records

    tmp = Path(dest.lines + ".tmp")
    with tmp.open("wb") as f:
        for rec in read_records(Path(dest.local)):
            f.write(encode_line(rec))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest.lines)


class Publisher:
    """Publishes `dest.lines` to the target at checkpoints and at the end (see the module doc)."""

    def __init__(self, dest: Destination, period: float, say: Callable[[str], None]):
        if not period > 0:
            raise ConfigError(f"checkpoint_seconds must be > 0, not {period}", fields=("checkpoint_seconds",))
        self.dest = dest
        self.period = period
        self.say = say
        self.next_at = time.monotonic() + period
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.sidecar_sent = False
        self.published = -1  # bytes of `lines` last published
        self.published_once = False

    def written(self) -> None:
        """After a result was written: start a checkpoint when one is due and none is running."""
        if self.dest.plain or time.monotonic() < self.next_at or (self.thread and self.thread.is_alive()):
            return
        size = os.path.getsize(self.dest.lines)  # whole lines: each was written at once
        self.thread = threading.Thread(target=self._checkpoint, args=(size,), daemon=True, name="loracli-publish")
        self.thread.start()

    def _checkpoint(self, size: int) -> None:
        try:
            self.publish(size)
        except Exception as e:  # noqa: BLE001 - said once; the next checkpoint or the end tries again
            if self.failure is None:
                self.say(f"{self.dest.target}: checkpoint failed ({e}); trying again later")
            self.failure = e

    def publish(self, size: int) -> None:
        """Make the target hold the whole lines among the first `size` bytes of `dest.lines`."""
        t0 = time.monotonic()
        dest = self.dest
        if size != self.published:
            if dest.parquet:
                from .parquet_results import write_table

                write_table(Path(dest.lines), size, Path(dest.local))
            if dest.url:
                if not self.sidecar_sent and sidecar_path(dest.local).is_file():
                    sidecar = sidecar_path(dest.local)
                    upload(sidecar, sidecar.stat().st_size, dest.target + SIDECAR_SUFFIX)
                    self.sidecar_sent = True
                local = Path(dest.local)
                sending = size if not dest.parquet else local.stat().st_size
                _save_state(dest, {**(_load_state(dest) or {}), "uploading": sending})  # a kill may come next
                upload(local, sending, dest.target)
                _save_state(dest, head(dest.target))
            self.published = size
        cost = time.monotonic() - t0 if self.published_once else 0.0  # the first one pays imports and connections
        self.published_once = True
        self.next_at = time.monotonic() + max(self.period, SLOWDOWN * cost)

    def finish(self, complete: bool) -> None:
        """The last publication, after the checkpoint in progress; `complete`: also drop the local copies."""
        if self.dest.plain:
            return
        if self.thread is not None:
            self.thread.join()
        if not Path(self.dest.lines).is_file():
            return
        self.publish(os.path.getsize(self.dest.lines))
        if complete:
            _remove(self.dest.lines)
            if self.dest.url:
                _remove(self.dest.local, sidecar_path(self.dest.local), _state_path(self.dest))


class PublishingWriter(ResultWriter):
    """A `ResultWriter` on `dest.lines` that lets the publisher checkpoint after each record."""

    def __init__(self, publisher: Publisher, model_name: str, errors_path: str | None):
        super().__init__(publisher.dest.lines, model_name, append=True, errors_path=errors_path)
        self.publisher = publisher

    def write(self, r) -> None:
        super().write(r)
        self.publisher.written()

    def write_problem(self, e) -> None:
        super().write_problem(e)
        self.publisher.written()
