"""URLs that loracli reads and writes through fsspec: adapters (`adapter_sources/`) and prompts and
results (`data_urls.py`). Light: fsspec and its backends are imported by `filesystem` only.

- `is_url(text)`: an fsspec URL (`s3://`, `gs://`, `hf://`, `https://`, ...); `file://` is a local
  path (`local_path` strips it).
- `credential_problem(text)`: why a URL is refused for carrying credentials (`user:password@`, or a
  query parameter such as `token`, `signature`, `X-Amz-Credential`), or None. Credentials come only
  from the standard provider chains (AWS env / profiles / instance roles, `gcloud`, the Hugging Face
  token), so they are never written to stats, sidecars, results or messages; `redact(text)` drops
  any userinfo and query from a URL for a message.
- `filesystem(url, field, **options)`: (fsspec filesystem, path inside it); a missing backend is a
  one-line `ConfigError` naming `field` and what to install (`missing_extra`), an unknown scheme
  one saying there is no filesystem for it.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .errors import ConfigError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_SECRET_PARAMS = re.compile(
    r"token|secret|signature|sig|password|passwd|key|credential|auth|session", flags=re.IGNORECASE
)
INSTALL = {  # scheme -> (the package its fsspec backend needs, how to install it)
    "s3": ("s3fs", "pip install 'loracli[s3]'"),
    "s3a": ("s3fs", "pip install 'loracli[s3]'"),
    "hf": ("huggingface_hub", "pip install 'loracli[hub]'"),
    "gs": ("gcsfs", "pip install gcsfs"),
    "gcs": ("gcsfs", "pip install gcsfs"),
    "az": ("adlfs", "pip install adlfs"),
    "abfs": ("adlfs", "pip install adlfs"),
}


def is_url(text: str | None) -> bool:
    """Whether `text` is a URL other than `file://` (which is a local path)."""
    return text is not None and bool(_URL.match(text)) and not text.lower().startswith("file://")


def local_path(text: str) -> str:
    """A local path given as a path or a `file://` URL."""
    return text[len("file://") :] if text.lower().startswith("file://") else text


def scheme(text: str) -> str:
    return text.split("://", 1)[0].lower() if "://" in text else ""


def credential_problem(text: str) -> str | None:
    """Why `text` is refused for holding credentials, or None. Never repeats the credential."""
    if not is_url(text):
        return None
    parts = urlsplit(text)
    if "@" in parts.netloc:
        return "holds credentials (user:password@) in the URL"
    secret = sorted({k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if _SECRET_PARAMS.search(k)})
    if secret:
        return f"holds a credential query parameter ({', '.join(secret)})"
    return None


def redact(text: str) -> str:
    """`text` without any userinfo or query (for messages); non-URLs unchanged."""
    if not is_url(text):
        return text
    parts = urlsplit(text)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}{parts.path}"


def missing_extra(url: str, field: str) -> ConfigError:
    """The one-line error for a URL whose fsspec backend is not installed."""
    found = INSTALL.get(scheme(url))
    if found is None:
        return no_filesystem(url, field)
    package, how = found
    return ConfigError(f"{field} {redact(url)}: {scheme(url)}:// URLs need {package}: {how}", fields=(field,))


def no_filesystem(url: str, field: str) -> ConfigError:
    return ConfigError(f"{field} {redact(url)}: no filesystem for {scheme(url)}:// URLs", fields=(field,))


def filesystem(url: str, field: str, **options: Any) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url`, made with `options`; `ConfigError` naming `field`
    (a URL carrying credentials is refused before any connection)."""
    problem = credential_problem(url)
    if problem:
        raise ConfigError(
            f"{field} {redact(url)}: {problem}; give credentials through the provider's own chain", fields=(field,)
        )
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise missing_extra(url, field) from None
    try:
        return url_to_fs(url, **options)
    except ImportError:
        raise missing_extra(url, field) from None
    except ValueError as e:
        if "not known" in str(e):  # fsspec: "Protocol not known: <scheme>"
            raise no_filesystem(url, field) from None
        raise ConfigError(f"{field} {redact(url)}: {e}", fields=(field,)) from None
