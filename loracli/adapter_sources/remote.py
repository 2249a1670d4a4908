"""Adapter folders on fsspec URLs (`s3://`, `gs://`, ...), copied once into the local cache.

`fetch_folder(url)` returns a local folder holding the adapter files of the folder at `url`
(`adapter_config.json` and the weights: `ADAPTER_FILES`; nothing else is downloaded). `list_names(url)`
returns the sub-folders of a folder of adapters. Both go through the cache under `cache_root()`
(`$LORACLI_CACHE`, else `~/.cache/loracli`):

    <root>/adapters/<name>-<digest of the URL>/<digest of the files' names, sizes and ETags>/
        the adapter files and `.loracli-complete.json` (written last, inside the folder renamed into place)
    <root>/adapters/<name>-<digest of the URL>/latest      the newest complete entry (for offline runs)
    <root>/adapters/<name>-<digest of the URL>/names.json  a folder of adapters' sub-folders, as last listed
    <root>/locks/adapter-<digest of the URL>.lock           one `flock` per source (concurrent processes)

A fetch lists the folder (one request), and returns the entry at once when it is complete; otherwise it
downloads each file to a temporary folder beside it, checks its size and, when the store reports one, its
MD5 (a plain S3 ETag or GCS `md5Hash`) or SHA-256 (`ChecksumSHA256`), writes the marker and renames the
folder into place, under a thread lock and the source's `flock`. Listing and each download are retried
(`ATTEMPTS`, exponential backoff from `BACKOFF` seconds; the S3 client's own retries are turned off so the
bound is this one); when the listing fails for any reason but a missing or forbidden object (an unreachable
network) and a complete entry exists, the newest one is used at once, without retries, so everything cached
works offline; for `UNREACHABLE_SECONDS` after that, other cached sources of the same bucket skip the
listing. Failures are `AdapterError`s naming the source (credentials never appear: `redact`); a missing
fsspec backend is a `ConfigError` naming the extra to install.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from .. import url_fs
from ..adapters import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME
from ..atomic_files import atomic_file
from ..errors import AdapterError, ConfigError
from ..model_source.conversion_cache import cache_root
from .urls import redact, scheme

try:
    import fcntl
except ImportError:  # not POSIX: the thread lock and the atomic rename still protect the cache
    fcntl = None  # type: ignore[assignment]

ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME)
ATTEMPTS = 4
BACKOFF = 0.5  # seconds before the 2nd attempt; doubled each time
# the client's own retries, cut so that the bound is ours (s3fs would retry each read 5 times, botocore 5 more)
CLIENT_OPTIONS = {"s3": {"config_kwargs": {"retries": {"max_attempts": 1}}}}
CLIENT_ATTRIBUTES = {"s3": {"retries": 1}}  # s3fs: a class attribute, set on loracli's own instance
MARKER = ".loracli-complete.json"
CHUNK = 1 << 20

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()
_unreachable_since: dict[str, float] = {}  # store (scheme://bucket) -> when a listing of it last failed
UNREACHABLE_SECONDS = 60.0
T = TypeVar("T")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for `url`, with loracli's retry bound (`url_fs.filesystem`:
    a missing backend is a `ConfigError` naming what to install)."""
    fs, path = url_fs.filesystem(url, "adapters_dir", **CLIENT_OPTIONS.get(scheme(url), {}))
    for name, value in CLIENT_ATTRIBUTES.get(scheme(url), {}).items():
        setattr(fs, name, value)
    return fs, path


def retried(action: Callable[[], T], what: str, attempts: int = ATTEMPTS) -> T:
    """`action()`, retried on failure (not on a missing or forbidden object) with bounded backoff."""
    for attempt in range(attempts):
        try:
            return action()
        except (FileNotFoundError, PermissionError, AdapterError):
            raise
        except Exception:  # noqa: BLE001 - any transfer error may be transient
            if attempt == attempts - 1:
                raise
            time.sleep(BACKOFF * 2**attempt)
    raise AssertionError(what)  # unreachable: the loop returns or raises


def reason(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def source_dir(url: str) -> Path:
    """The cache folder of one source URL (see the module doc)."""
    clean = redact(url).rstrip("/")
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in posixpath.basename(clean))[:40] or "root"
    return cache_root() / "adapters" / f"{name}-{_digest(clean)}"


def list_names(url: str) -> list[str]:
    """The sub-folders of the folder of adapters at `url` (from the cache when the listing fails offline)."""
    fs, path = filesystem(url)
    names_file = source_dir(url) / "names.json"
    try:
        attempts = 1 if names_file.is_file() else ATTEMPTS
        listing = retried(lambda: fs.ls(path, detail=True, refresh=True), redact(url), attempts)
    except (FileNotFoundError, PermissionError) as e:
        raise ConfigError(f"adapters_dir: {redact(url)}: {reason(e)}", fields=("adapters_dir",)) from None
    except Exception as e:  # noqa: BLE001 - unreachable: the last listing, if any
        try:
            return json.loads(names_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ConfigError(
                f"adapters_dir: {redact(url)}: cannot list ({reason(e)}) and no listing is cached",
                fields=("adapters_dir",),
            ) from None
    names = sorted(posixpath.basename(f["name"].rstrip("/")) for f in listing if f.get("type") == "directory")
    with atomic_file(names_file) as f:
        f.write(json.dumps(names).encode())
    return names


def fetch_folder(url: str) -> Path:
    """A local folder with the adapter files of `url` (module doc); `AdapterError` naming the source on failure."""

    def files(fs, path: str) -> dict[str, dict]:
        listing = fs.ls(path, detail=True, refresh=True)
        found = {posixpath.basename(f["name"]): f for f in listing if f.get("type") == "file"}
        if CONFIG_NAME not in found:
            raise AdapterError(redact(url), f"no {CONFIG_NAME} in the folder")
        return {n: f for n, f in found.items() if n in ADAPTER_FILES}

    return _fetch(url, files, "list the folder")


def fetch_file(url: str) -> Path:
    """The local copy of the one file at `url` (a manifest), through the same cache."""

    def files(fs, path: str) -> dict[str, dict]:
        info = fs.info(path)
        if info.get("type") != "file":
            raise FileNotFoundError(f"{redact(url)} is not a file")
        return {posixpath.basename(path): info}

    return _fetch(url, files, "read") / posixpath.basename(urlsplit(url).path)


def _fetch(url: str, list_files: Callable, verb: str) -> Path:
    """The cache entry of `url`'s current files (`list_files(fs, path)` -> {name: info}), downloaded if needed."""
    fs, path = filesystem(url)
    shown = redact(url)
    home = source_dir(url)
    cached = _latest(home)
    if cached is not None and _unreachable(url):
        return cached  # its store failed a listing moments ago: do not wait on it again
    try:  # one attempt when a copy is cached: offline, that copy is used at once
        files = retried(lambda: list_files(fs, path), shown, 1 if cached else ATTEMPTS)
    except AdapterError:
        raise
    except (FileNotFoundError, PermissionError) as e:
        raise AdapterError(shown, f"cannot {verb} ({reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - unreachable: the newest complete entry, if any
        if cached is None:
            raise AdapterError(shown, f"cannot {verb} ({reason(e)}) and nothing is cached") from None
        _mark_unreachable(url)
        return cached
    entry = home / _digest(json.dumps(sorted((n, f.get("size"), _version(f)) for n, f in files.items())))
    if not _complete(entry):
        with _source_lock(home):
            if not _complete(entry):
                _build(entry, lambda tmp: _download_all(fs, files, tmp, shown), shown)
    with atomic_file(home / "latest") as f:
        f.write(entry.name.encode())
    return entry


def _download_all(fs, files: dict[str, dict], tmp: Path, shown: str) -> None:
    for name, info in sorted(files.items()):
        retried(functools.partial(_download, fs, info, tmp / name, f"{shown}/{name}"), shown)


def _download(fs, info: dict, target: Path, shown: str) -> None:
    """One file to `target` (via `target.part`), checked against the size and checksum the store reports."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    part = target.with_name(target.name + ".part")
    size = 0
    with fs.open(info["name"], "rb") as src, open(part, "wb") as dst:
        while chunk := src.read(CHUNK):
            md5.update(chunk)
            sha.update(chunk)
            size += len(chunk)
            dst.write(chunk)
    expected = info.get("size")
    if expected is not None and size != expected:
        raise OSError(f"{shown}: got {size} bytes, the store lists {expected}")
    problem = _checksum_problem(info, md5.hexdigest(), sha.digest())
    if problem:
        raise OSError(f"{shown}: {problem}")
    os.replace(part, target)


def _checksum_problem(info: dict, md5_hex: str, sha256: bytes) -> str | None:
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag.lower()) and etag.lower() != md5_hex:
        return "MD5 differs from the ETag"
    md5_b64 = info.get("md5Hash")
    if md5_b64 and base64.b64decode(md5_b64).hex() != md5_hex:
        return "MD5 differs from the store's md5Hash"
    sha_b64 = info.get("ChecksumSHA256")
    if sha_b64 and base64.b64decode(sha_b64) != sha256:
        return "SHA-256 differs from the store's checksum"
    return None


def _version(info: dict) -> str:
    """What changes when the object changes: its ETag, else a version id, else its modification time."""
    for key in ("ETag", "etag", "md5Hash", "VersionId", "generation", "LastModified", "mtime", "updated"):
        if info.get(key):
            return str(info[key])
    return ""


def _build(entry: Path, fill: Callable[[Path], None], shown: str) -> None:
    """Fill a fresh temporary folder beside `entry`, mark it complete and rename it onto `entry`."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    for leftover in entry.parent.glob(f".tmp-{entry.name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if entry.exists():
        shutil.rmtree(entry)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        fill(tmp)
        marker = {"source": shown, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        os.rename(tmp, entry)
    except AdapterError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # noqa: BLE001 - the download failed after its retries
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdapterError(shown, f"download failed after {ATTEMPTS} attempts ({reason(e)})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _store_of(url: str) -> str:
    """The scheme and bucket (or host) of `url`: what one unreachable network takes down together."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}"


def _unreachable(url: str) -> bool:
    with _locks_guard:
        since = _unreachable_since.get(_store_of(url))
    return since is not None and time.monotonic() - since < UNREACHABLE_SECONDS


def _mark_unreachable(url: str) -> None:
    with _locks_guard:
        _unreachable_since[_store_of(url)] = time.monotonic()


def _complete(entry: Path) -> bool:
    return (entry / MARKER).is_file()


def _latest(home: Path) -> Path | None:
    try:
        entry = home / (home / "latest").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return entry if entry.name and _complete(entry) else None


@contextlib.contextmanager
def _source_lock(home: Path) -> Iterator[None]:
    """This source's thread lock, then its `flock` (other processes)."""
    with _locks_guard:
        lock = _locks.setdefault(str(home), threading.Lock())
    with lock:
        path = cache_root() / "locks" / f"adapter-{home.name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as handle:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
