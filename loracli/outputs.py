"""Result records: one JSON line per request, each written whole, at once, as it finishes.

Native requests:  {"id", "adapter", "text", "finish_reason", "usage": {"prompt_tokens",
                   "completion_tokens", "total_tokens"}}  or  {"id", "adapter", "error": {"type", "message"}}
`adapter` is the adapter's name, a mix's name ("shout*0.7+brief*0.5", `requests.AdapterMix`), or
null. OpenAI Batch requests get OpenAI's Batch output form: {"id", "custom_id", "response":
{"status_code", "request_id", "body": chat.completion | text_completion}, "error"}.
A request for n > 1 samples is still one record: native {"id", "adapter", "choices": [{"index",
"text", "finish_reason"}, ...], "usage"} (no top-level "text"), OpenAI its body's `choices` with
`index` 0..n-1; `usage` counts the prompt once and sums the samples' completion tokens.
Logprobs, when a request asks (`"logprobs"`, `"prompt_logprobs"`, OpenAI's choices[].logprobs,
null otherwise), are shaped by `logprob_shapes.py`, whose module doc gives each form.
A record that could not be read (bad JSON, a bad field, a duplicate id) is answered with an
error record of the form its line had, plus "line" (its line or row number): native
{"id": id or null, "line", "error": {"type": "invalid_request" | "duplicate_id", "message"}},
OpenAI {"id", "custom_id": id or null, "response": null, "error": {"code", "message"}, "line"}.

`LineFile` appends each record with one `os.write` of the whole line (signals held meanwhile,
see `signals.critical`), so a kill can cut the file only between lines, or inside the last
line in progress, which `resume.py` repairs; nothing is buffered in between, and the file is
fsynced at least every `FSYNC_SECONDS` and when closed. `ResultWriter`
sends answers to the output and, when an errors file is given, every failure there instead.

A full disk (ENOSPC) or an exhausted quota (EDQUOT) while writing any of the run's files (a
result, the sidecar, the lock) raises `DiskFullError` (`disk_full_fails`): one line naming the
file and how to resume, exit status 2. Every line written before stays; a line cut by the full
disk is a torn last line, which the rerun cuts off and does again.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LoracliError
from .logprob_shapes import add_native_logprobs, add_openai_logprobs
from .requests import RecordError
from .results import Result
from .signals import critical

INPUT_ERROR_TYPES = frozenset({"invalid_request", "duplicate_id"})
FSYNC_SECONDS = 1.0  # results reach the disk at least this often (a power cut loses at most that much)
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(LoracliError):
    """No space or quota left while writing one of the run's files; everything written before is kept."""


@contextmanager
def disk_full_fails(path: str | os.PathLike) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT raised while writing `path` into a one-line `DiskFullError`; other errors pass."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise DiskFullError(
            f"cannot write {path}: {os.strerror(e.errno)}; every result written before is kept: "
            "free space, then rerun the same command"
        ) from None


def _usage(r: Result) -> dict:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
    }


def _samples(r: Result) -> list[tuple[str, str | None]]:
    """(text, finish_reason) of each sample, in order: the n of `r.choices`, or the one of `r`."""
    return [(c.text, c.finish_reason) for c in r.choices] or [(r.text, r.finish_reason)]


def native_record(r: Result) -> dict:
    if r.error is not None:
        return {"id": r.id, "adapter": r.adapter, "error": {"type": r.error[0], "message": r.error[1]}}
    if r.choices:
        choices = [{"index": i, "text": t, "finish_reason": f} for i, (t, f) in enumerate(_samples(r))]
        return {"id": r.id, "adapter": r.adapter, "choices": choices, "usage": _usage(r)}
    return {"id": r.id, "adapter": r.adapter, "text": r.text, "finish_reason": r.finish_reason, "usage": _usage(r)}


def openai_record(r: Result, model_name: str) -> dict:
    req = r.request
    rid = f"batch_req_{r.id}"
    if r.error is not None:
        return {"id": rid, "custom_id": r.id, "response": None, "error": {"code": r.error[0], "message": r.error[1]}}
    created = int(time.time())
    model = req.model or model_name
    if req.url == "/v1/chat/completions":
        body = {
            "id": f"chatcmpl-{r.id}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                for i, (text, finish) in enumerate(_samples(r))
            ],
            "usage": _usage(r),
        }
    else:
        body = {
            "id": f"cmpl-{r.id}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": i, "text": t, "finish_reason": f} for i, (t, f) in enumerate(_samples(r))],
            "usage": _usage(r),
        }
    add_openai_logprobs(body, r, chat=req.url == "/v1/chat/completions")
    return {
        "id": rid,
        "custom_id": r.id,
        "response": {"status_code": 200, "request_id": rid, "body": body},
        "error": None,
    }


def to_record(r: Result, model_name: str) -> dict:
    if r.request is not None and r.request.form == "openai":
        return openai_record(r, model_name)
    record = native_record(r)
    if r.error is None:
        add_native_logprobs(record, r)
    return record


def problem_record(e: RecordError) -> dict:
    """The error record for a line that could not be read or run (see the module doc)."""
    if e.form == "openai":
        return {
            "id": f"batch_req_line{e.line}",
            "custom_id": e.record_id,
            "response": None,
            "error": {"code": e.kind, "message": str(e)},
            "line": e.line,
        }
    return {"id": e.record_id, "line": e.line, "error": {"type": e.kind, "message": str(e)}}


def encode_line(record: dict) -> bytes:
    """One record as one UTF-8 JSON line; text that UTF-8 cannot hold (lone surrogates) is escaped."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record) + "\n").encode("ascii")


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (a short write is continued)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class LineFile:
    """Append-only JSONL file (or stdout for `-`): one whole-line write per record."""

    def __init__(self, path: str, truncate: bool = False):
        self.path = path
        self.lines = 0
        self.synced = time.monotonic()
        if path == "-":
            self.fd = None
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
            with disk_full_fails(path):
                self.fd = os.open(path, flags, 0o644)

    def write(self, record: dict) -> None:
        with critical(), disk_full_fails("<stdout>" if self.fd is None else self.path):
            self._put(encode_line(record))
        self.lines += 1
        if self.fd is not None and time.monotonic() - self.synced > FSYNC_SECONDS:
            self._sync()

    def _put(self, data: bytes) -> None:
        if self.fd is None:
            sys.stdout.write(data.decode("utf-8"))
            sys.stdout.flush()
        else:
            write_all(self.fd, data)

    def _sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError:
            pass
        self.synced = time.monotonic()

    def close(self) -> None:
        if self.fd is not None:
            self._sync()
            os.close(self.fd)
            self.fd = None


class ResultWriter:
    """Writes results and input problems; `errors_path` (optional) takes every failure."""

    def __init__(self, path: str, model_name: str, append: bool = False, errors_path: str | None = None):
        self.model_name = model_name
        self.path = path
        self.out = LineFile(path, truncate=not append)
        self.errors = LineFile(errors_path, truncate=not append) if errors_path else None

    def _target(self, failed: bool) -> LineFile:
        return self.errors if failed and self.errors is not None else self.out

    def write(self, r: Result) -> None:
        self._target(r.error is not None).write(to_record(r, self.model_name))

    def write_problem(self, e: RecordError) -> None:
        self._target(True).write(problem_record(e))

    def close(self) -> None:
        self.out.close()
        if self.errors is not None:
            self.errors.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
