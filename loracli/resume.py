"""Resuming a run: may an existing output be reused, what does it already settle, what is left.

The sidecar `<output>.loracli.json` records what produced an output: the input (path or URL and a
fingerprint: size + SHA-256 of its first and last MiB, read by range for a URL), the options that change results
(model, max_tokens, temperature, top_p, seed, ignore_eos, dtype, max_model_len, the field
mapping) and the errors file. It lives beside the output, or in the cache when the output's
folder is not writable (`output_lock.companion`). `plan_output` decides, before any model is
loaded (and, in a job, under the output's lock):
- stdout (`-`), or an output that is not a regular file (`/dev/null`, a FIFO): no sidecar and
  no resume ('stdout', 'stream');
- no output yet (or an empty one): a fresh run;
- `overwrite`: start over (output and errors file truncated);
- an output whose sidecar matches: resume; one whose sidecar differs, or a non-empty output
  without a sidecar (not ours): refused with `ConfigError`, naming what differs.
An output that is the input itself, or the errors file, is always refused.

`repair` reads an output (and the errors file) once, in order, and keeps:
- answers: their ids are settled and skipped by the rerun;
- error records of lines that could not be read (invalid_request, duplicate_id): the
  unchanged input would fail the same way, so they are settled too (keyed by line);
and drops, so the rerun does them again:
- every other error record (unknown or broken adapter, prompt too long, non-finite logits,
  out of memory...): the cause may be fixed since, or transient;
- a torn last line (a kill mid-write: no final newline) is truncated away; a line that is
  not a record of ours, or a second answer for a settled id, is dropped with a warning.
The file is rewritten (temporary file + rename) only when a complete line is dropped. A full
disk while writing the sidecar raises `outputs.DiskFullError`.

`Ledger.decide` then walks the input in order: skip what is settled, report duplicates, run
the rest. Its tables (`IdTable`) are the run's only structures that grow with the input.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .data_urls import local_copy, open_input
from .errors import ConfigError
from .idtable import IdTable
from .output_lock import companion, is_file_output
from .outputs import INPUT_ERROR_TYPES, disk_full_fails
from .requests import RecordError, Request, is_id
from .url_fs import is_url

SIDECAR_SUFFIX = ".loracli.json"
# 2: ids keep their type (1 and "1" differ) and a record without one is "#<line>"; outputs of
# version 1 wrote such ids differently, so resuming one could answer records twice: refused.
SIDECAR_VERSION = 2
FINGERPRINT_BYTES = 1 << 20
DONE, SEEN = 1, 2  # IdTable flags: answered by an earlier run; met earlier in this input

ANSWER, INPUT_ERROR, RETRY, FOREIGN = "answer", "input_error", "retry", "foreign"
NO_RESUME = frozenset({"stdout", "stream"})  # plan_output's modes without a sidecar


def sidecar_path(output: str) -> Path:
    """`<output>.loracli.json`, or its stand-in in the cache (see `output_lock.companion`)."""
    return companion(output, SIDECAR_SUFFIX)


def fingerprint(path: str) -> dict | None:
    """Size and SHA-256 of the first and last MiB of a file or URL; None for stdin or a pipe (never read)."""
    if is_url(path):
        local = local_copy(path)
        if local is None:
            with open_input(path) as f:
                return _fingerprint(f, f.size)
        path = local
    p = Path(path)
    if path == "-" or not p.is_file():
        return None
    with p.open("rb") as f:
        return _fingerprint(f, p.stat().st_size)


def _fingerprint(f, size: int) -> dict:
    """The fingerprint of an open, seekable binary file of `size` bytes."""
    h = hashlib.sha256()
    h.update(f.read(FINGERPRINT_BYTES))
    if size > FINGERPRINT_BYTES:
        f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
        h.update(f.read(FINGERPRINT_BYTES))
    return {"size": size, "sha256": h.hexdigest()}


@dataclass
class JobIdentity:
    """What an output's results depend on; equal identities may share one output."""

    input: str
    fingerprint: dict | None
    options: dict[str, Any]
    errors: str | None = None
    command: list[str] = field(default_factory=list)

    def differences(self, now: JobIdentity) -> list[str]:
        """Human-readable differences between this (earlier) identity and `now`."""
        out = []
        both = self.fingerprint is not None and now.fingerprint is not None
        if both and self.fingerprint != now.fingerprint:
            out.append(
                f"the input differs ({self.input}, {self.fingerprint['size']} bytes, then; "
                f"{now.input}, {now.fingerprint['size']} bytes, now)"
            )
        elif (self.fingerprint is None) != (now.fingerprint is None):
            out.append(f"the input was {self.input} then, {now.input} now")
        for key in sorted(set(self.options) | set(now.options)):
            then, cur = self.options.get(key), now.options.get(key)
            if then != cur:
                out.append(f"{key} was {json.dumps(then)} then, {json.dumps(cur)} now")
        if self.errors != now.errors:
            out.append(f"errors_path was {self.errors or 'not given'} then, {now.errors or 'not given'} now")
        return out

    def to_json(self) -> str:
        return json.dumps({"version": SIDECAR_VERSION, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> JobIdentity:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("version") != SIDECAR_VERSION:
            raise ValueError(
                f"written by another loracli version (sidecar version {data.get('version')!r}, "
                f"this one reads {SIDECAR_VERSION}), whose ids may not match this one's"
            )
        return cls(
            str(data["input"]),
            data.get("fingerprint"),
            dict(data["options"]),
            data.get("errors"),
            list(data.get("command") or []),
        )


def _nonempty(path: str | None) -> bool:
    return path is not None and Path(path).is_file() and Path(path).stat().st_size > 0


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)
    except OSError:
        return False


def plan_output(
    output: str,
    input_path: str,
    errors: str | None,
    identity: JobIdentity,
    overwrite: bool,
    lines: str | None = None,
    shown: str | None = None,
) -> str:
    """'stdout', 'stream', 'fresh', 'overwrite' or 'resume'; `ConfigError` when the output may not be used.

    `lines`: the file results are appended to when it is not `output` itself (a Parquet output's journal);
    `shown`: the output's name in messages when it is not `output` (a URL whose staged copy `output` is)."""
    if output == "-":
        return "stdout"
    for path, what in ((output, "output_path"), (errors, "errors_path")):
        if path is not None and input_path != "-" and _same_file(path, input_path):
            raise ConfigError(f"{what} {path} is the input file itself", fields=(what,))
        if path is not None and Path(path).is_dir():
            raise ConfigError(f"{what} {path} is a folder, not a file", fields=(what,))
    if errors is not None and (errors == output or _same_file(errors, output)):
        raise ConfigError("errors_path must name another file than output_path", fields=("errors_path", "output_path"))
    if not is_file_output(output):
        return "stream"
    if overwrite:
        return "overwrite"
    if not _nonempty(output) and not _nonempty(lines) and not _nonempty(errors):
        return "fresh"
    sidecar = sidecar_path(output)
    advice = "set overwrite to start over, or another output_path"
    fields = ("overwrite", "output_path")
    if not sidecar.is_file():
        named = sidecar.name if shown is None else sidecar_name(shown)
        raise ConfigError(
            f"{shown or output} already exists and has no {named} saying which run wrote it; {advice}",
            fields=fields,
        )
    try:
        then = JobIdentity.from_json(sidecar.read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ConfigError(f"{sidecar} is unreadable ({e}); {advice}", fields=fields) from None
    diffs = then.differences(identity)
    if diffs:
        changed = tuple(sorted(set(then.options) | set(identity.options))) + ("errors_path",)
        raise ConfigError(
            f"{shown or output} holds results of another run: "
            + "; ".join(diffs)
            + f". Resume with the same input and options, or {advice}",
            fields=fields + changed,
        )
    return "resume"


def sidecar_name(output: str) -> str:
    return output.rstrip("/").rsplit("/", 1)[-1] + SIDECAR_SUFFIX


def write_sidecar(output: str, identity: JobIdentity) -> None:
    path = sidecar_path(output)
    tmp = path.with_name(path.name + ".tmp")
    with disk_full_fails(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(identity.to_json(), encoding="utf-8")
        os.replace(tmp, path)


def classify(raw: bytes) -> tuple[str, str | int | None]:
    """One complete output line -> (ANSWER, id) | (INPUT_ERROR, line) | (RETRY, None) | (FOREIGN, None)."""
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):
        return FOREIGN, None
    if not isinstance(rec, dict):
        return FOREIGN, None
    key = rec.get("custom_id") if "custom_id" in rec else rec.get("id")
    err = rec.get("error")
    if err is None:
        return (ANSWER, key) if is_id(key) else (FOREIGN, None)
    if not isinstance(err, dict):
        return FOREIGN, None
    kind, line = err.get("type", err.get("code")), rec.get("line")
    if kind in INPUT_ERROR_TYPES and isinstance(line, int) and not isinstance(line, bool):
        return INPUT_ERROR, line
    return RETRY, None


@dataclass
class Settled:
    """What earlier runs settled, and what `repair` did to get there."""

    ids: IdTable = field(default_factory=lambda: IdTable(b"id"))
    lines: IdTable = field(default_factory=lambda: IdTable(b"line"))
    answers: int = 0
    input_errors: int = 0
    retried: int = 0
    foreign: int = 0
    torn: int = 0


def _keep(raw: bytes, settled: Settled, warn: Callable[[str], None], where: str) -> bool:
    kind, key = classify(raw)
    if kind == ANSWER:
        if settled.ids.mark(key, DONE) & DONE:
            warn(f"{where}: a second answer for id {key!r}, dropped")
            settled.foreign += 1
            return False
        settled.answers += 1
        return True
    if kind == INPUT_ERROR:
        if settled.lines.mark(str(key), DONE) & DONE:
            settled.foreign += 1
            return False
        settled.input_errors += 1
        return True
    if kind == RETRY:
        settled.retried += 1
    else:
        settled.foreign += 1
        warn(f"{where}: not a loracli result record, dropped")
    return False


def repair(path: str, settled: Settled, warn: Callable[[str], None]) -> None:
    """Scan one output file in place: keep settled records, drop the rest (see the module doc)."""
    p = Path(path)
    if not p.is_file():
        return
    tmp_path = p.with_name(p.name + ".resume.tmp")
    tmp = None
    offset = 0
    try:
        with p.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    settled.torn += 1
                    break
                keep = _keep(raw, settled, warn, f"{path}:{number}")
                if not keep and tmp is None:
                    tmp = tmp_path.open("wb")
                    _copy_prefix(p, offset, tmp)
                elif keep and tmp is not None:
                    tmp.write(raw)
                offset += len(raw)
        if tmp is not None:
            tmp.flush()
            os.fsync(tmp.fileno())
            tmp.close()
            os.replace(tmp_path, p)
            tmp = None
        elif settled.torn:
            os.truncate(p, offset)
    finally:
        if tmp is not None:
            tmp.close()
            tmp_path.unlink(missing_ok=True)


def _copy_prefix(src: Path, length: int, dst) -> None:
    with src.open("rb") as f:
        while length > 0:
            chunk = f.read(min(length, 1 << 20))
            if not chunk:
                return
            dst.write(chunk)
            length -= len(chunk)


class Ledger:
    """Walks the input in order and says, per record: run it, report it, or skip it."""

    def __init__(self, file: str, settled: Settled | None = None):
        settled = settled or Settled()
        self.file = file
        self.ids = settled.ids
        self.lines = settled.lines

    def decide(self, item: Request | RecordError) -> Request | RecordError | None:
        """The request to run, the problem to write, or None when an earlier run settled it."""
        if isinstance(item, RecordError):
            if item.record_id is not None:
                self.ids.mark(item.record_id, SEEN)
            return None if str(item.line) in self.lines else item
        before = self.ids.mark(item.id, SEEN)
        if before & SEEN:
            if str(item.line) in self.lines:
                return None
            return RecordError(
                self.file,
                item.line,
                "custom_id" if item.form == "openai" else "id",
                f"duplicate id {item.id!r}: an earlier line has the same id; skipped",
                record_id=item.id,
                form=item.form,
                kind="duplicate_id",
            )
        return None if before & DONE else item
