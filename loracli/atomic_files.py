"""`atomic_file(dest)`: write a file so that a reader sees the old one or the whole new one, never part.

The bytes go to a temporary file beside `dest` (same folder, so the rename stays on one filesystem),
which replaces `dest` in one `os.replace` when the block ends (mode 0644), or is removed if the block
raises. Concurrent writers each get their own temporary file; the last rename wins. Light: no torch.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[io.BufferedWriter]:
    """A binary file to write `dest`'s new content into (see the module doc)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{dest.name}-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
