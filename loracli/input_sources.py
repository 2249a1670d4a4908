"""Where requests come from, streamed: never the whole input in memory.

- JSONL (any name not listed below; `-` is stdin): read line by line in binary, so bad bytes
  are a record's problem, not the reader's. Gzip is known by its first bytes (the magic number),
  not by the name: a gzipped file or stdin is gunzipped whatever it is called, and a `.gz` file
  holding plain text is read as it is. A UTF-8 byte order mark before the first line is
  dropped. A line longer than `MAX_LINE_BYTES` is skipped in chunks and reported, never held
  whole.
- Tables (`.parquet`, `.csv`, `.tsv` (tab-separated), `.arrow`): read row by row through
  `datasets` in streaming mode (nothing cached or copied); a row's "line" is its 1-based row
  number. A CSV or TSV file's byte order mark is dropped by `datasets` itself.
- URLs (`s3://`, `hf://datasets/...`, any fsspec URL; `data_urls.py`): the same kinds, streamed
  (JSONL through the filesystem's block reader with read-ahead, tables through `datasets`); an
  `hf://` file comes from the local Hub cache when `HF_HUB_OFFLINE` is set. A missing extra,
  object or permission is a one-line `ConfigError` naming `input_path`. A URL input has no
  cheap total (`count_records` is None).

`read_items` yields, for every line or row, exactly one item: a `Request`, a `RecordError`, or a
`Blank` (a JSONL line holding only whitespace). `check_input` refuses a missing, unreadable or
empty input before any model is loaded; `count_records` is the cheap total for progress bars.
"""

from __future__ import annotations

import gzip
import io
import math
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .data_urls import check_remote, local_copy, open_input
from .errors import ConfigError
from .requests import FieldMap, RecordError, Request, parse_object, parse_record
from .url_fs import is_url

MAX_LINE_BYTES = 32 << 20
TABLE_BUILDERS: dict[str, tuple[str, dict[str, str]]] = {  # kind -> the `datasets` builder and its options
    "parquet": ("parquet", {}),
    "csv": ("csv", {}),
    "tsv": ("csv", {"delimiter": "\t"}),
    "arrow": ("arrow", {}),
}
GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"
COUNT_LIMIT = 1 << 30  # plain JSONL files larger than this get no total (counting would cost a read)


@dataclass(frozen=True)
class Blank:
    file: str
    line: int


Item = Request | RecordError | Blank


def display_name(path: str) -> str:
    return "<stdin>" if path == "-" else path


def input_kind(path: str) -> str:
    """'jsonl', or the kind of table file (a key of `TABLE_BUILDERS`), from the file's suffix."""
    kind = Path(path).suffix.lower().lstrip(".")
    return kind if path != "-" and kind in TABLE_BUILDERS else "jsonl"


def check_input(path: str) -> None:
    """Raise `ConfigError` for an input that cannot be a batch: missing, a folder, or an empty file.

    Pipes (`<(zcat prompts.jsonl.gz)`) are accepted like stdin.
    """
    if path == "-":
        return
    if is_url(path):
        local = local_copy(path)
        if local is None:
            check_remote(path)
            return
        path = local
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"input file not found: {path}")
    if p.is_dir():
        raise ConfigError(f"input is a folder, not a file: {path}")
    if p.is_file() and p.stat().st_size == 0:
        raise ConfigError(f"input file is empty: {path} (nothing to run)")


class _Replayed(io.RawIOBase):
    """A stream whose first bytes were read to look at them: gives them back, then the rest."""

    def __init__(self, head: bytes, rest: IO[bytes]):
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        # read1: what is already buffered, else one read; never waits for a full buffer (a pipe streams)
        read = getattr(self._rest, "read1", self._rest.read)  # an fsspec file has no read1: it reads by blocks
        data = self._head or read(len(buffer))
        n = min(len(buffer), len(data))
        buffer[:n] = data[:n]
        self._head = data[n:]  # empty once the head is given back: read1 returns at most len(buffer)
        return n


@contextmanager
def _opened(path: str) -> Iterator[io.BufferedIOBase]:
    """The input's bytes (`-`: stdin), gunzipped when they start with gzip's magic number."""
    if path == "-":
        source = sys.stdin.buffer
    elif is_url(path):
        local = local_copy(path)
        source = open(local, "rb") if local else open_input(path)  # noqa: SIM115 - closed below
    else:
        source = open(path, "rb")  # noqa: SIM115 - closed below
    try:
        head = source.read(len(GZIP_MAGIC))
        stream = io.BufferedReader(_Replayed(head, source), 1 << 16)
        yield gzip.GzipFile(fileobj=stream, mode="rb") if head == GZIP_MAGIC else stream
    finally:
        if source is not sys.stdin.buffer:
            source.close()


def iter_lines(f: io.BufferedIOBase, limit: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) per line, without the newline; None for a line longer than `limit`."""
    number = 0
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(1 << 20)
            yield number, None
            continue
        yield number, raw.rstrip(b"\r\n")


def _jsonl_items(path: str, base_names: frozenset[str], fields: FieldMap | None) -> Iterator[Item]:
    name = display_name(path)
    try:
        with _opened(path) as f:
            for number, raw in iter_lines(f):
                if number == 1 and raw is not None and raw.startswith(BOM):
                    raw = raw[len(BOM) :]
                if raw is None:
                    yield RecordError(name, number, None, f"line longer than {MAX_LINE_BYTES >> 20} MiB, skipped")
                elif not raw.strip():
                    yield Blank(name, number)
                else:
                    try:
                        yield parse_record(raw, number, name, base_names, fields)
                    except RecordError as e:
                        yield e
    except (OSError, EOFError, zlib.error) as e:
        raise ConfigError(f"cannot read {name}: {e}") from None


def _clean(row: dict) -> dict:
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def _table_items(path: str, kind: str, base_names: frozenset[str], fields: FieldMap | None) -> Iterator[Item]:
    from datasets import load_dataset

    builder, options = TABLE_BUILDERS[kind]
    files = (local_copy(path) or path) if is_url(path) else path  # datasets streams a URL through fsspec itself
    try:
        rows = iter(load_dataset(builder, data_files=files, split="train", streaming=True, **options))
    except Exception as e:  # noqa: BLE001 - any reader failure is one line about the file
        raise ConfigError(f"cannot read {path} as {kind}: {type(e).__name__}: {e}") from None
    number = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - as above, past the rows already read
            raise ConfigError(f"cannot read {path} as {kind} after row {number}: {type(e).__name__}: {e}") from None
        number += 1
        try:
            yield parse_object(_clean(row), number, path, base_names, fields)
        except RecordError as e:
            yield e


def read_items(path: str, base_names: frozenset[str] = frozenset(), fields: FieldMap | None = None) -> Iterator[Item]:
    """Stream the input: one `Request`, `RecordError` or `Blank` per line (or row)."""
    kind = input_kind(path)
    if kind == "jsonl":
        return _jsonl_items(path, base_names, fields)
    return _table_items(path, kind, base_names, fields)


def count_records(path: str) -> int | None:
    """Lines (or rows) in the input when cheap to know: plain (not gzip) JSONL under 1 GiB, parquet; else None."""
    kind = input_kind(path)
    p = Path(path)
    if path == "-" or is_url(path) or not p.is_file():
        return None
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(p).metadata.num_rows
        except Exception:  # noqa: BLE001 - no total, the run reports the problem
            return None
    if kind != "jsonl" or p.stat().st_size > COUNT_LIMIT:
        return None
    with p.open("rb") as f:
        if f.read(len(GZIP_MAGIC)) == GZIP_MAGIC:
            return None
    newlines, last = 0, b"\n"
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            newlines += chunk.count(b"\n")
            last = chunk[-1:]
    return newlines + (last != b"\n")
