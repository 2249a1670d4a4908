"""Input records: one JSON object per line (or one table row), native or OpenAI Batch form.

Native:  {"id"?, "adapter"?: name|null, "prompt": str | "messages": [...], "max_tokens"?,
          "temperature"?, "top_p"?, "seed"?, "stop"?: [str] | str, "ignore_eos"?}
OpenAI:  {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
          "body": {"model": adapter or base model name, "messages" | "prompt", "max_tokens"
          (or "max_completion_tokens"), "temperature", "top_p", "seed", "stop"}}

`parse_record(raw, line, file)` turns one line's bytes into a `Request`; `parse_object` does the
same for an already decoded object (a table row). Both raise `RecordError` (an `InputError`
naming file, line and field, and carrying the record's id and form when they could be read),
and nothing else, whatever the input. A native record without an id gets its line number as
id. Fields loracli does not know are kept in `Request.unknown_fields` (the caller warns); a
`FieldMap` renames other column names to `prompt` / `adapter` / `id` first.

Pure: no I/O here (`input_sources.py` reads files).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError

NATIVE_FIELDS = frozenset(
    {"id", "adapter", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos"}
)
OPENAI_FIELDS = frozenset({"custom_id", "method", "url", "body"})
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
BODY_PARAMS = {
    "max_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
}
BODY_FIELDS = frozenset({"model", "prompt", "messages", *BODY_PARAMS})
NATIVE_PARAMS = {k: k for k in ("max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos")}
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


@dataclass
class Request:
    id: str
    adapter: str | None
    prompt: str | None = None
    messages: list[dict] | None = None
    params: dict[str, Any] = field(default_factory=dict)  # only what the line sets
    line: int = 0
    form: str = "native"  # or "openai"
    url: str | None = None
    model: str | None = None  # OpenAI body.model as written
    unknown_fields: list[str] = field(default_factory=list)


class RecordError(InputError):
    """A bad record. `record_id` is its id when it could be read (else None); `form` its shape;
    `kind` the error type written for it ("invalid_request", or "duplicate_id")."""

    def __init__(
        self,
        file: str,
        line: int,
        field: str | None,
        message: str,
        *,
        record_id: str | None = None,
        form: str = "native",
        kind: str = "invalid_request",
    ):
        super().__init__(file, line, field, message)
        self.record_id = record_id
        self.form = form
        self.kind = kind


@dataclass(frozen=True)
class FieldMap:
    """Which input columns hold the prompt, the adapter name and the id (None = the usual name).

    A mapped prompt column holding a list is taken as chat `messages`.
    """

    prompt: str | None = None
    adapter: str | None = None
    id: str | None = None

    def apply(self, obj: dict) -> dict:
        if not (self.prompt or self.adapter or self.id):
            return obj
        out = dict(obj)
        for source, target in ((self.prompt, "prompt"), (self.adapter, "adapter"), (self.id, "id")):
            if source and source != target and source in out:
                value = out.pop(source)
                if target == "prompt" and isinstance(value, list):
                    target = "messages"
                out[target] = value
        return out

    def source_of(self, name: str | None) -> str | None:
        """The input's name for a field loracli names `name` (for messages)."""
        mapped = {"prompt": self.prompt, "messages": self.prompt, "adapter": self.adapter, "id": self.id}
        return mapped.get(name or "") or name

    def as_dict(self) -> dict[str, str | None]:
        return {"prompt": self.prompt, "adapter": self.adapter, "id": self.id}


def _fail(ctx: tuple[str, int], fld: str | None, msg: str) -> InputError:
    return InputError(ctx[0], ctx[1], fld, msg)


def _show(v: Any) -> str:
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = type(v).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_param(name: str, v: Any, ctx: tuple[str, int], where: str) -> Any:
    if name == "max_tokens":
        if not _is_int(v):
            raise _fail(ctx, where, f"must be an integer, got {_show(v)}")
        if v <= 0:
            raise _fail(ctx, where, f"must be positive, got {v}")
        return v
    if name in ("temperature", "top_p"):
        if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
            raise _fail(ctx, where, f"must be a finite number, got {_show(v)}")
        if name == "top_p" and not 0 < v <= 1:
            raise _fail(ctx, where, f"must be in (0, 1], got {v}")
        if v < 0:
            raise _fail(ctx, where, f"must be >= 0, got {v}")
        return float(v)
    if name == "seed":
        if not _is_int(v) or not SEED_RANGE[0] <= v <= SEED_RANGE[1]:
            raise _fail(ctx, where, f"must be a 64-bit integer, got {_show(v)}")
        return v
    if name == "stop":
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
            raise _fail(ctx, where, "must be a non-empty string or a list of non-empty strings")
        return v
    if not isinstance(v, bool):  # ignore_eos
        raise _fail(ctx, where, f"must be true or false, got {_show(v)}")
    return v


def _check_params(obj: dict, ctx: tuple[str, int], prefix: str, names: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, name in names.items():
        if obj.get(key) is not None:
            out[name] = _check_param(name, obj[key], ctx, prefix + key)
    return out


def _check_text(text: str, ctx: tuple[str, int], where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _fail(ctx, where, f"holds an unpaired surrogate ({text[e.start]!r}) at {e.start}") from None


def _check_prompt(obj: dict, ctx: tuple[str, int], prefix: str) -> tuple[str | None, list[dict] | None]:
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if prompt is None and messages is None:
        raise _fail(ctx, prefix + "prompt", "missing: give 'prompt' (text) or 'messages' (chat)")
    if prompt is not None and messages is not None:
        raise _fail(ctx, prefix + "messages", "give either 'prompt' or 'messages', not both")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise _fail(ctx, prefix + "prompt", f"must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise _fail(ctx, prefix + "prompt", "is empty")
        _check_text(prompt, ctx, prefix + "prompt")
        return prompt, None
    if not isinstance(messages, list) or not messages:
        raise _fail(ctx, prefix + "messages", "must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise _fail(ctx, f"{prefix}messages[{i}]", "must be an object with string 'role' and 'content'")
        _check_text(m["role"] + m["content"], ctx, f"{prefix}messages[{i}]")
    return None, messages


def _native_id(value: Any, ctx: tuple[str, int]) -> str:
    if value is None:
        return str(ctx[1])
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _fail(ctx, "id", f"must be a string or integer, got {_show(value)}")
    if value == "":
        raise _fail(ctx, "id", "is empty")
    return str(value)


def readable_id(obj: dict, form: str) -> str | None:
    """The record's id if it can be read at all (for error records), else None."""
    value = obj.get("custom_id" if form == "openai" else "id")
    if isinstance(value, str) and value:
        return value
    if _is_int(value):
        return str(value)
    return None


def parse_record(
    raw: bytes | str, line: int, file: str, base_names: frozenset[str] = frozenset(), fields: FieldMap | None = None
) -> Request:
    """One input line -> `Request`; raises `RecordError` (file:line: field 'x': problem)."""
    ctx = (file, line)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        bad = f"byte {e.start} is {raw[e.start]:#04x}" if isinstance(raw, bytes) else f"at {e.start}"
        raise RecordError(file, line, None, f"not valid UTF-8 ({bad})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(file, line, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise RecordError(file, line, None, f"not usable JSON ({type(e).__name__}: {str(e)[:80]})") from None
    return parse_object(obj, ctx[1], file, base_names, fields)


def parse_object(
    obj: Any, line: int, file: str, base_names: frozenset[str] = frozenset(), fields: FieldMap | None = None
) -> Request:
    """One decoded record (a JSON object or a table row) -> `Request`; raises `RecordError`."""
    if not isinstance(obj, dict):
        raise RecordError(file, line, None, f"must be a JSON object, got {type(obj).__name__}")
    obj = fields.apply(obj) if fields else obj
    form = "openai" if "custom_id" in obj or "body" in obj else "native"
    try:
        if form == "openai":
            return _parse_openai(obj, (file, line), base_names)
        return _parse_native(obj, (file, line))
    except InputError as e:
        rid = readable_id(obj, form)
        fld = fields.source_of(e.field) if fields else e.field
        raise RecordError(e.file, e.line, fld, e.reason, record_id=rid, form=form) from None


def _parse_native(obj: dict, ctx: tuple[str, int]) -> Request:
    rid = _native_id(obj.get("id"), ctx)
    adapter = obj.get("adapter")
    if adapter is not None and (not isinstance(adapter, str) or not adapter):
        raise _fail(ctx, "adapter", f"must be an adapter name or null, got {_show(adapter)}")
    prompt, messages = _check_prompt(obj, ctx, "")
    params = _check_params(obj, ctx, "", NATIVE_PARAMS)
    unknown = sorted(str(k) for k in set(obj) - NATIVE_FIELDS)
    return Request(rid, adapter, prompt, messages, params, ctx[1], "native", unknown_fields=unknown)


def _parse_openai(obj: dict, ctx: tuple[str, int], base_names: frozenset[str]) -> Request:
    rid = obj.get("custom_id")
    if not isinstance(rid, str) or not rid:
        raise _fail(ctx, "custom_id", "missing or not a non-empty string")
    if obj.get("method", "POST") != "POST":
        raise _fail(ctx, "method", f"must be POST, got {_show(obj.get('method'))}")
    url = obj.get("url")
    if url not in OPENAI_URLS:
        raise _fail(ctx, "url", f"must be one of {', '.join(OPENAI_URLS)}, got {_show(url)}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise _fail(ctx, "body", "missing or not an object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _fail(ctx, "body.model", "missing: name an adapter or the base model")
    prompt, messages = _check_prompt(body, ctx, "body.")
    if url == "/v1/chat/completions" and messages is None:
        raise _fail(ctx, "body.messages", "missing: chat completions take 'messages'")
    if url == "/v1/completions" and prompt is None:
        raise _fail(ctx, "body.prompt", "missing: completions take 'prompt'")
    params = _check_params(body, ctx, "body.", BODY_PARAMS)
    adapter = None if model in base_names else model
    unknown = sorted([str(k) for k in set(obj) - OPENAI_FIELDS] + [f"body.{k}" for k in set(body) - BODY_FIELDS])
    return Request(rid, adapter, prompt, messages, params, ctx[1], "openai", url, model, unknown)
