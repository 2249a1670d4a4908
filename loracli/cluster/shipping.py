"""Adapter shipping for `loracli run --ray --ship-adapters`: clusters without a shared filesystem.

Contract:
- The driver (`AdapterShipper`) reads an adapter's files (its `adapter_config.json` and the weights
  file loading reads, nothing else) the first time a worker needs it (a request names it, or it is
  pinned: pinned adapters go to every worker at start), puts them in Ray's object store once
  (`ray.put`) and hands the same reference to every worker that needs it. Once every live worker
  has it, the driver drops its reference, so the object store does not keep every adapter of a run
  (an in-flight call still holds its own reference until the worker has read it).
- `ship(worker, names, live)` returns the references `worker` still lacks and records them as sent:
  an adapter goes to a worker at most once per run (a worker keeps what it received on its disk).
- A worker (`AdapterInbox`) starts with an empty local folder holding one empty subfolder per
  adapter name (so names are known before any bytes arrive) and writes what it receives there;
  its engine then loads adapters from that folder as from any other. Error messages name the
  driver's folder, not the worker's copy. The folder is removed when the pool closes; one left by
  a worker killed outright is removed by the next inbox created on that machine (each folder
  records its owner's process id).
- Bytes are counted: `bytes_read` (driver disk reads), per-worker `sent`/`bytes_sent`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..adapter_sources import adapter_names
from ..adapters import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME

INBOX_PREFIX = "loracli-adapters-"
OWNER_FILE = ".owner.pid"


def adapter_files(folder: Path) -> dict[str, bytes]:
    """The files of one adapter folder that loading reads (the pickle only when there are no safetensors);
    missing ones are left out, and loading on the worker says so."""
    weights = SAFETENSORS_NAME if (folder / SAFETENSORS_NAME).is_file() else PICKLE_NAME
    return {name: (folder / name).read_bytes() for name in (CONFIG_NAME, weights) if (folder / name).is_file()}


class AdapterShipper:
    def __init__(self, ray, folder: Path, workers: int):
        self.ray, self.folder = ray, folder
        self.names = frozenset(adapter_names(folder))
        self.refs: dict[str, tuple[object, int]] = {}  # name -> (ObjectRef, bytes), while some live worker lacks it
        self.bytes_read = 0
        self.sent: list[set[str]] = [set() for _ in range(workers)]
        self.bytes_sent = [0] * workers

    def ship(self, worker: int, names: set[str], live: Iterable[int]) -> dict[str, object]:
        """References to the adapters in `names` that `worker` has not been sent yet (unknown names skipped)."""
        live = list(live)
        out = {}
        for name in sorted((names & self.names) - self.sent[worker]):
            ref, size = self._ref(name)
            out[name] = ref
            self.sent[worker].add(name)
            self.bytes_sent[worker] += size
            if all(name in self.sent[w] for w in live):
                del self.refs[name]
        return out

    def _ref(self, name: str) -> tuple[object, int]:
        if name not in self.refs:
            files = adapter_files(self.folder / name)
            size = sum(len(b) for b in files.values())
            self.bytes_read += size
            self.refs[name] = (self.ray.put(files), size)
        return self.refs[name]


def _owner_alive(folder: Path) -> bool:
    try:
        pid = int((folder / OWNER_FILE).read_text())
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError):
        return True  # unreadable, or not ours to signal: leave it
    return True


def remove_orphans(parent: Path) -> None:
    """Remove inbox folders whose owner process is gone (a worker killed before it could clean up)."""
    for folder in parent.glob(INBOX_PREFIX + "*"):
        if folder.is_dir() and (folder / OWNER_FILE).exists() and not _owner_alive(folder):
            shutil.rmtree(folder, ignore_errors=True)


class AdapterInbox:
    """A worker's local adapters folder, filled by what the driver ships."""

    def __init__(self, names: list[str], shown_as: str):
        remove_orphans(Path(tempfile.gettempdir()))
        self.folder = Path(tempfile.mkdtemp(prefix=INBOX_PREFIX))
        self.shown_as = shown_as
        (self.folder / OWNER_FILE).write_text(str(os.getpid()))
        for name in names:
            (self.folder / name).mkdir()

    def receive(self, adapters: dict[str, dict[str, bytes]]) -> None:
        for name, files in adapters.items():
            for filename, data in files.items():
                (self.folder / name / filename).write_bytes(data)

    def shown(self, message: str) -> str:
        """`message` naming the driver's folder instead of this copy."""
        return message.replace(str(self.folder), self.shown_as)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
