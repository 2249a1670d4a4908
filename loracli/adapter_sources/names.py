"""Which adapter names are safe: checked before any name meets a filesystem or a URL.

An adapter name is what a request line gives (`adapter`, a mix's keys, `body.model`); the catalog
(folder subfolders or manifest keys) defines the names that exist, and a request can only reach those.
`name_problem(name)` says why a name is refused, or None: empty, longer than 255 characters, a NUL or
another control character, a path separator (`/`, `\\`), `..`, a name that is only dots, a URL
scheme (`s3://...`, `file:...`) or fsspec's chaining `::`. Pure: no I/O.
"""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 255
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def name_problem(name: object) -> str | None:
    """Why `name` cannot be an adapter name (one phrase), or None when it is safe."""
    if not isinstance(name, str) or not name:
        return "an adapter name must be a non-empty string"
    if len(name) > MAX_NAME_LENGTH:
        return f"an adapter name must be at most {MAX_NAME_LENGTH} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "an adapter name must not hold NUL or control characters"
    if "/" in name or "\\" in name:
        return "an adapter name must not hold a path separator ('/' or '\\')"
    if ".." in name or set(name) == {"."}:
        return "an adapter name must not hold '..' or be only dots"
    if "::" in name or _SCHEME.match(name):
        return "an adapter name must not be a URL or start with a scheme ('s3:', 'file:')"
    return None
