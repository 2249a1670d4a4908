"""Results as Parquet: one row per result record (outputs.py's records), a fixed schema, JSON for nesting.

Columns (all nullable; a field a record lacks is null):
- `id`, `custom_id`, `adapter`, `text`, `finish_reason`: strings, as in the JSONL record (an
  integer id is written in decimal);
- `id_type`: "string" or "integer", the JSON type of the request's id (native `id`, OpenAI
  `custom_id`), so 1 and "1" stay two ids when a run resumes from the file; null without an id;
- `form`: "native" or "openai" (the record's form);
- `line`: int64, the input line of a record that could not be read;
- `usage`, `choices`, `logprobs`, `prompt_logprobs`, `error`, `response`: the nested fields as
  JSON text (`json.loads` gives the JSONL record's value back); `extra`: any other field, as
  one JSON object (null when there is none).
`row(record)` and `record(row)` convert (record(row(r)) has r's fields, less the null ones);
`write_table(journal, size, dest)` streams the first `size` bytes of a JSONL file of records
(whole lines only) into `dest` through `dest.tmp` + rename, `ROW_GROUP_ROWS` rows per row group
(memory: one row group); `read_records(path)` streams a Parquet file's rows back as records,
one row group at a time. pyarrow (extra `parquet`) is imported inside the functions; without it
a Parquet output is a one-line `ConfigError` naming `output_path`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError

ROW_GROUP_ROWS = 4096
STRINGS = ("id", "custom_id", "id_type", "form", "adapter", "text", "finish_reason")
NESTED = ("usage", "choices", "logprobs", "prompt_logprobs", "error", "response")
KNOWN = frozenset({*STRINGS, *NESTED, "line"}) - {"id_type", "form"}


def pyarrow_modules():
    """(pyarrow, pyarrow.parquet); `ConfigError` when the `parquet` extra is missing."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            "output_path: a .parquet output needs pyarrow: pip install 'loracli[parquet]'", fields=("output_path",)
        ) from None
    return pa, pq


def schema():
    pa, _ = pyarrow_modules()
    fields = [pa.field(name, pa.string()) for name in STRINGS]
    fields.append(pa.field("line", pa.int64()))
    fields += [pa.field(name, pa.string()) for name in (*NESTED, "extra")]
    return pa.schema(fields)


def _text(value) -> str | None:
    return None if value is None else str(value)


def _id_type(value) -> str | None:
    if value is None:
        return None
    return "integer" if isinstance(value, int) else "string"


def row(rec: dict) -> dict:
    """One result record -> one row of `schema()`."""
    openai = "custom_id" in rec
    key = rec.get("custom_id") if openai else rec.get("id")
    out = {name: _text(rec.get(name)) for name in ("id", "custom_id", "adapter", "text", "finish_reason")}
    out["id_type"] = _id_type(key)
    out["form"] = "openai" if openai else "native"
    out["line"] = rec.get("line")
    for name in NESTED:
        out[name] = None if rec.get(name) is None else json.dumps(rec[name], ensure_ascii=False)
    rest = {k: v for k, v in rec.items() if k not in KNOWN}
    out["extra"] = json.dumps(rest, ensure_ascii=False) if rest else None
    return out


def _typed(text: str | None, kind: str | None):
    return int(text) if text is not None and kind == "integer" else text


def record(r: dict) -> dict:
    """One row of `schema()` -> the result record it came from (fields that were null left out)."""
    openai = r.get("form") == "openai"
    rec: dict = {"id": _typed(r.get("id"), None if openai else r.get("id_type"))}
    if openai:
        rec["custom_id"] = _typed(r.get("custom_id"), r.get("id_type"))
    for name in ("adapter", "text", "finish_reason", "line"):
        if r.get(name) is not None:
            rec[name] = r[name]
    for name in NESTED:
        if r.get(name) is not None:
            rec[name] = json.loads(r[name])
        elif openai and name in ("response", "error"):
            rec[name] = None
    if r.get("extra"):
        rec.update(json.loads(r["extra"]))
    return rec


def _whole_lines(journal: Path, size: int) -> Iterator[bytes]:
    """The complete lines among the first `size` bytes of `journal`."""
    with journal.open("rb") as f:
        left = size
        for raw in f:
            if len(raw) > left or not raw.endswith(b"\n"):
                return
            left -= len(raw)
            yield raw


def write_table(journal: Path, size: int, dest: Path, rows_per_group: int = ROW_GROUP_ROWS) -> int:
    """Write the records of `journal`'s first `size` bytes to the Parquet file `dest`; returns the row count."""
    pa, pq = pyarrow_modules()
    tmp = dest.with_name(dest.name + ".tmp")
    rows: list[dict] = []
    count = 0
    with pq.ParquetWriter(str(tmp), schema(), compression="zstd") as writer:
        for raw in _whole_lines(journal, size):
            rows.append(row(json.loads(raw)))
            if len(rows) >= rows_per_group:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema()))
                count += len(rows)
                rows.clear()
        if rows or count == 0:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema()))
            count += len(rows)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    return count


def read_records(path: Path) -> Iterator[dict]:
    """The records of a Parquet results file, in order; `ConfigError` naming `output_path` if unreadable."""
    _, pq = pyarrow_modules()
    try:
        table = pq.ParquetFile(str(path))
        missing = set(schema().names) - set(table.schema_arrow.names)
        if missing:
            raise ValueError(f"not a loracli results file (no column {', '.join(sorted(missing))})")
        for batch in table.iter_batches():
            for r in batch.to_pylist():
                yield record(r)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"output_path {path} cannot be read back as Parquet results ({e}); set overwrite to start over",
            fields=("output_path", "overwrite"),
        ) from None
