"""What an `adapters_dir` value or a manifest source is, and the credential rule. Pure: no I/O.

`kind_of(text)`: "url" (an fsspec URL: `s3://`, `gs://`, `hf://`, `https://`, ...; `file://` counts as
local), "manifest" (a path or URL ending in .json / .yaml / .yml) or "folder" (a local folder).
`is_url`, `local_path`, `scheme`, `credential_problem` and `redact` (the credential rule) come from
`loracli/url_fs.py`, shared with prompt and result URLs. `parse_hub(text)` reads a Hub source
`org/name[@revision][/subfolder]` (also after `hf://`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..url_fs import credential_problem, is_url, local_path, redact, scheme

MANIFEST_SUFFIXES = (".json", ".yaml", ".yml")
_HUB_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB = re.compile(rf"^(?P<repo>{_HUB_PART}/{_HUB_PART})(?:@(?P<rev>[A-Za-z0-9._-]+))?(?:/(?P<sub>[^@]+))?$")


def kind_of(text: str) -> str:
    """ "url", "manifest" or "folder" (see the module doc)."""
    path = urlsplit(text).path if is_url(text) else text
    if path.lower().endswith(MANIFEST_SUFFIXES):
        return "manifest"
    return "url" if is_url(text) else "folder"


@dataclass(frozen=True)
class HubSource:
    repo: str  # "org/name"
    revision: str | None = None  # a branch, tag or commit; None = the default branch
    subfolder: str | None = None  # the adapter's folder inside the repo; None = its root

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"hf://{self.repo}{rev}{sub}"


def parse_hub(text: str) -> HubSource | None:
    """`org/name[@rev][/subfolder]` (optionally after `hf://`) -> `HubSource`; None when it is not one.

    `hf://datasets/...` and `hf://spaces/...` are not adapter repos: None.
    """
    body = text[len("hf://") :] if text.lower().startswith("hf://") else text
    match = _HUB.match(body.strip("/"))
    if match is None or match["repo"].split("/")[0] in ("datasets", "spaces"):
        return None
    sub = match["sub"]
    if sub is not None and any(p in ("", ".", "..") for p in sub.split("/")):
        return None
    return HubSource(match["repo"], match["rev"], sub)


__all__ = ["HubSource", "credential_problem", "is_url", "kind_of", "local_path", "parse_hub", "redact", "scheme"]
