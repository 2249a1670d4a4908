"""The conversion cache: every converted model folder is built once, atomically, under a lock.

Contract: `cached(target, root, reporter, build, source=...)` returns `target` at once when it
holds the completion marker (the warm path checks nothing else). Otherwise it takes the entry's
`flock`, so concurrent processes convert once, clears leftovers of interrupted runs, calls
`build(tmp)` on a fresh temporary folder beside `target`, checks that the build produced
`config.json` and safetensors weights, writes the marker and renames the folder onto `target`.
A failed or interrupted build leaves nothing behind; an exception that is not a `LoracliError`
becomes a one-line `ModelError` naming `source`.

Layout under the cache root (`cache_root`):

    <root>/models/<name>/          finished folders, each with the marker file `.loracli-complete.json`
    <root>/models/.tmp-<name>-*/   a conversion in progress (renamed onto <name> when done)
    <root>/locks/<name>.lock       one `flock` per cached folder

`model_entry`, `file_entry` and `folder_entry` name the cached folders: a fixed name, or a prefix,
the source's sanitised name and a digest of the paths, sizes and mtimes of its files, so a changed
source gets a new entry. Without `fcntl` (not POSIX) only the atomic rename protects the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from loracli.errors import LoracliError, ModelError
from loracli.model_source.model_folder import has_safetensors
from loracli.model_source.progress import Reporter

try:
    import fcntl
except ImportError:  # not POSIX: the atomic rename still protects the cache
    fcntl = None

CACHE_FORMAT = 1
MARKER = ".loracli-complete.json"


def cache_root(cache_dir: Path | None = None) -> Path:
    """The cache root: `cache_dir` if given, else `$LORACLI_CACHE`, else `~/.cache/loracli`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().absolute()
    env = os.environ.get("LORACLI_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    return Path.home() / ".cache" / "loracli"


# --- entry names -------------------------------------------------------------------------------


def model_entry(root: Path, name: str) -> Path:
    """The cached folder `<root>/models/<name>`."""
    return root / "models" / name


def file_entry(root: Path, prefix: str, path: Path) -> Path:
    """The cached folder converted from the file `path`, keyed by its absolute path, size and mtime."""
    return model_entry(root, f"{prefix}-{_safe_name(path.stem)}-{_digest([_stat_part(path)])}")


def folder_entry(root: Path, prefix: str, folder: Path) -> Path:
    """The cached folder converted from `folder`, keyed by path, size and mtime of its top-level files."""
    key = _digest(sorted(_stat_part(p) for p in folder.iterdir() if p.is_file()))
    return model_entry(root, f"{prefix}-{_safe_name(folder.name)}-{key}")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] or "model"


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]


def _stat_part(path: Path) -> str:
    stat = path.stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


# --- building an entry once --------------------------------------------------------------------


def cached(target: Path, root: Path, reporter: Reporter, build: Callable[[Path], None], *, source: str) -> Path:
    """`target` if already complete, else build it once (under a lock) into a temp folder and rename it."""
    if _is_complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the cache folder {target.parent} ({exc.strerror or exc})") from exc
    with _exclusive_lock(root / "locks" / f"{target.name}.lock", reporter):
        if _is_complete(target):
            return target
        _remove_stale(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            tmp.chmod(0o755)
            _build_checked(build, tmp, source)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == CACHE_FORMAT


def _remove_stale(target: Path) -> None:
    """Under the lock: leftovers of interrupted runs, and an incomplete or outdated target."""
    for leftover in target.parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists():
        shutil.rmtree(target)


def _build_checked(build: Callable[[Path], None], tmp: Path, source: str) -> None:
    try:
        build(tmp)
    except LoracliError:
        raise
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ModelError(f"{source}: conversion failed ({type(exc).__name__}: {first_line})") from exc
    if not (tmp / "config.json").is_file() or not has_safetensors(tmp):
        raise ModelError(f"{source}: conversion produced no config.json or safetensors weights")
    marker = {"format": CACHE_FORMAT, "source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _exclusive_lock(path: Path, reporter: Reporter) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with reporter.step("waiting for another loracli process to finish converting"):
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
