"""Input records: one JSON object per line, in loracli's native form or OpenAI's Batch form.

Native:  {"id"?, "adapter"?: name|null, "prompt": str | "messages": [...], "max_tokens"?,
          "temperature"?, "top_p"?, "seed"?, "stop"?: [str] | str, "ignore_eos"?}
OpenAI:  {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
          "body": {"model": adapter or base model name, "messages" | "prompt", "max_tokens"
          (or "max_completion_tokens"), "temperature", "top_p", "seed", "stop"}}

`parse_record` turns one line into a `Request` or raises `InputError` naming file, line and
field. `read_records` streams a file (or `-` for stdin, `.gz` too) and yields, per non-blank
line, either a `Request` or the `InputError` for it, so one bad line never stops a run.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

NATIVE_FIELDS = {"id", "adapter", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop",
                 "ignore_eos"}
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
BODY_PARAMS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
               "top_p": "top_p", "seed": "seed", "stop": "stop"}


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


def _fail(ctx: tuple[str, int], fld: str | None, msg: str) -> InputError:
    return InputError(ctx[0], ctx[1], fld, msg)


def _check_params(obj: dict, ctx: tuple[str, int], prefix: str, names: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, name in names.items():
        if key not in obj or obj[key] is None:
            continue
        v, where = obj[key], prefix + key
        if name == "max_tokens":
            if not isinstance(v, int) or isinstance(v, bool):
                raise _fail(ctx, where, f"must be an integer, got {json.dumps(v)}")
            if v <= 0:
                raise _fail(ctx, where, f"must be positive, got {v}")
        elif name in ("temperature", "top_p"):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise _fail(ctx, where, f"must be a number, got {json.dumps(v)}")
            if v < 0 or (name == "top_p" and not 0 < v <= 1):
                raise _fail(ctx, where, "must be in (0, 1]" if name == "top_p" else "must be >= 0")
            v = float(v)
        elif name == "seed":
            if not isinstance(v, int) or isinstance(v, bool):
                raise _fail(ctx, where, f"must be an integer, got {json.dumps(v)}")
        elif name == "stop":
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
                raise _fail(ctx, where, "must be a non-empty string or a list of non-empty strings")
        elif name == "ignore_eos" and not isinstance(v, bool):
            raise _fail(ctx, where, f"must be true or false, got {json.dumps(v)}")
        out[name] = v
    return out


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
        return prompt, None
    if not isinstance(messages, list) or not messages:
        raise _fail(ctx, prefix + "messages", "must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _fail(ctx, f"{prefix}messages[{i}]", "must be an object with string 'role' and 'content'")
    return None, messages


def _request_id(value: Any, ctx: tuple[str, int], name: str) -> str:
    if value is None:
        return str(ctx[1])
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _fail(ctx, name, f"must be a string or integer, got {json.dumps(value)}")
    return str(value)


def parse_record(raw: bytes | str, line: int, file: str, base_names: frozenset[str] = frozenset()) -> Request:
    """One input line -> `Request`; raises `InputError` (file:line: field 'x': problem)."""
    ctx = (file, line)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise _fail(ctx, None, f"not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(ctx, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _fail(ctx, None, f"must be a JSON object, got {type(obj).__name__}")
    if "custom_id" in obj or "body" in obj:
        return _parse_openai(obj, ctx, base_names)
    rid = _request_id(obj.get("id"), ctx, "id")
    adapter = obj.get("adapter")
    if adapter is not None and (not isinstance(adapter, str) or not adapter):
        raise _fail(ctx, "adapter", f"must be an adapter name or null, got {json.dumps(adapter)}")
    prompt, messages = _check_prompt(obj, ctx, "")
    params = _check_params(obj, ctx, "", {k: k for k in ("max_tokens", "temperature", "top_p", "seed", "stop",
                                                          "ignore_eos")})
    unknown = sorted(set(obj) - NATIVE_FIELDS)
    return Request(rid, adapter, prompt, messages, params, line, "native", unknown_fields=unknown)


def _parse_openai(obj: dict, ctx: tuple[str, int], base_names: frozenset[str]) -> Request:
    rid = obj.get("custom_id")
    if not isinstance(rid, str) or not rid:
        raise _fail(ctx, "custom_id", "missing or not a non-empty string")
    if obj.get("method", "POST") != "POST":
        raise _fail(ctx, "method", f"must be POST, got {json.dumps(obj.get('method'))}")
    url = obj.get("url")
    if url not in OPENAI_URLS:
        raise _fail(ctx, "url", f"must be one of {', '.join(OPENAI_URLS)}, got {json.dumps(url)}")
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
    return Request(rid, adapter, prompt, messages, params, ctx[1], "openai", url, model)


def _open_lines(path: str):
    if path == "-":
        return sys.stdin.buffer
    p = Path(path)
    if p.suffix == ".gz":
        return gzip.open(p, "rb")
    return p.open("rb")


def read_records(path: str, base_names: frozenset[str] = frozenset()) -> Iterator[Request | InputError]:
    """Stream a JSONL file; blank lines are skipped, every other line yields a Request or an error."""
    name = "<stdin>" if path == "-" else path
    f = _open_lines(path)
    try:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield parse_record(raw, i, name, base_names)
            except InputError as e:
                yield e
    finally:
        if f is not sys.stdin.buffer:
            f.close()
