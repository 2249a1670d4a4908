"""Prompts and results on URLs: `s3://bucket/key`, `hf://datasets/org/name/file`, any fsspec URL.

Contract:
- `is_url`, `filesystem` (`url_fs.py`, shared with the adapter sources): a URL other than
  `file://`, and its fsspec filesystem; a missing backend, an unknown scheme or a URL carrying
  credentials is a one-line `ConfigError` naming the field. Credentials and endpoints come only
  from the provider's own chain (for S3: the AWS environment variables, `~/.aws`, instance roles;
  `AWS_ENDPOINT_URL` for another endpoint): nothing here reads, prints or stores them.
- `local_copy(url)`: an `hf://` file in the local Hub cache when `HF_HUB_OFFLINE` is set (the
  Hub's filesystem has no offline mode), else None. Refuses an uncached file then.
- `open_input(url, field)`, `check_remote(url, field)`: a streaming binary reader (fsspec
  reads in blocks with read-ahead: nothing is downloaded whole), and the checks `check_input`
  makes on a local file (missing, a folder, empty), all as one-line `ConfigError`s.
- `head(url)`: the object's size and ETag (None when there is none); `download(url, dest)` and
  `upload(src, size, url)`: whole-object copies. An upload sends the first `size` bytes of `src`
  and replaces the object only when all of them arrived (S3's PUT and multipart completion are
  atomic); an upload cut by an error or a signal is discarded, leaving the object as it was.
fsspec and the filesystems are imported inside the functions: this module is light.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import IO

from .atomic_files import atomic_file
from .errors import ConfigError
from .url_fs import filesystem, missing_extra, scheme

HUB_URL = re.compile(r"^hf://(?:(datasets|spaces)/)?([^/@]+/[^/@]+)(?:@([^/]+))?/(.+)$")
UPLOAD_CHUNK = 8 << 20


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def local_copy(url: str, field: str = "input_path") -> str | None:
    """The Hub cache's copy of an `hf://` file when offline (see the module doc); None otherwise."""
    if scheme(url) != "hf" or not _offline():
        return None
    m = HUB_URL.match(url)
    if m is None:
        raise ConfigError(f"{field} {url}: not an hf://[datasets/]org/name[@revision]/file URL", fields=(field,))
    kind, repo, revision, filename = m.groups()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        raise missing_extra(url, field) from None
    repo_type = {"datasets": "dataset", "spaces": "space"}.get(kind or "", "model")
    found = try_to_load_from_cache(repo, filename, revision=revision, repo_type=repo_type)
    if not isinstance(found, str):
        raise ConfigError(f"{field} {url}: not in the Hub cache, and HF_HUB_OFFLINE is set", fields=(field,))
    return found


def _fail(url: str, field: str, e: BaseException) -> ConfigError:
    if isinstance(e, FileNotFoundError):
        return ConfigError(f"{field} {url}: not found", fields=(field,))
    return ConfigError(f"{field} {url}: cannot read it: {type(e).__name__}: {e}", fields=(field,))


def check_remote(url: str, field: str = "input_path") -> None:
    """Refuse a missing object, a folder or an empty object, in one line naming `field`."""
    fs, path = filesystem(url, field)
    try:
        info = fs.info(path)
    except Exception as e:  # noqa: BLE001 - any backend failure is one line naming the URL
        raise _fail(url, field, e) from None
    if info.get("type") == "directory":
        raise ConfigError(f"{field} {url} is a folder, not a file", fields=(field,))
    if not info.get("size"):
        raise ConfigError(f"{field} {url} is empty (nothing to run)", fields=(field,))


def open_input(url: str, field: str = "input_path") -> IO[bytes]:
    """A streaming binary reader of `url` (the caller closes it)."""
    fs, path = filesystem(url, field)
    try:
        return fs.open(path, "rb")
    except Exception as e:  # noqa: BLE001 - as in check_remote
        raise _fail(url, field, e) from None


def head(url: str, field: str = "output_path") -> dict | None:
    """{"size", "etag"} of the object at `url`; None when there is none."""
    fs, path = filesystem(url, field)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - as in check_remote
        raise _fail(url, field, e) from None
    if info.get("type") == "directory":
        raise ConfigError(f"{field} {url} is a folder, not a file", fields=(field,))
    return {"size": int(info.get("size") or 0), "etag": info.get("ETag") or info.get("etag")}


def download(url: str, dest: Path, field: str = "output_path") -> bool:
    """Copy the object at `url` to `dest` (`atomic_file`: whole or not at all); False when there is none."""
    fs, path = filesystem(url, field)
    try:
        with fs.open(path, "rb") as src, atomic_file(dest) as out:
            for chunk in iter(lambda: src.read(UPLOAD_CHUNK), b""):
                out.write(chunk)
    except FileNotFoundError:
        return False
    except Exception as e:  # noqa: BLE001 - as in check_remote
        raise _fail(url, field, e) from None
    return True


def upload(src: Path, size: int, url: str, field: str = "output_path") -> None:
    """Replace the object at `url` with the first `size` bytes of `src`, whole or not at all."""
    fs, path = filesystem(url, field)
    target = fs.open(path, "wb")
    try:
        with src.open("rb") as f:
            left = size
            while left > 0:
                chunk = f.read(min(left, UPLOAD_CHUNK))
                if not chunk:
                    break
                target.write(chunk)
                left -= len(chunk)
        target.close()
    except BaseException as e:
        if hasattr(target, "discard"):
            target.discard()
        if isinstance(e, Exception):
            raise _upload_failed(url, field, src, e) from None
        raise


def _upload_failed(url: str, field: str, src: Path, e: Exception) -> ConfigError:
    return ConfigError(
        f"{field} {url}: upload failed: {type(e).__name__}: {e}; every result is kept in {src}: rerun the same "
        "command to upload it",
        fields=(field,),
    )
