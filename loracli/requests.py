"""Input records: one JSON object per line (or one table row), native or OpenAI Batch form.

Native:  {"id"?, "adapter"?: name|null|{name: weight, ...}, "prompt": str | "messages": [...],
          sampling fields?}
OpenAI:  {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
          "body": {"model": adapter or base model name, "messages" | "prompt", sampling fields,
          "adapter_weights"?: {name: weight, ...}}}

An adapter mix (`AdapterMix`): an object of adapter names and weights, `{"shout": 0.7, "brief":
0.5}` (or one adapter with a weight, `{"shout": 0.5}`), runs base + sum_i w_i * scale_i * B_i A_i
on every LoRA target, as PEFT's `add_weighted_adapter(..., combination_type="cat")`. Weights are
finite numbers (0 and negative allowed, as in PEFT); names non-empty strings; the object is not
empty. `Request.adapter` then holds the mix's name ("shout*0.7+brief*0.5"), the name results and
stats carry, and `Request.mix` its parts. In the OpenAI form the object is `body.adapter_weights`,
and `body.model` must then name the base model (when the caller passes its names).
Every adapter name (`adapter`, a mix's keys, `body.model` when it is not a base model name the caller
passed) must pass `adapter_sources.names.name_problem` (no `/`, `..`, NUL, URL scheme): a line names
adapters the catalog defines, never a path or URL.

`parse_record(raw, line, file)` turns one line's bytes into a `Request`; `parse_object` does the
same for an already decoded object (a table row). Both raise `RecordError` (an `InputError`
naming file, line and field, and carrying the record's id and form when they could be read),
and nothing else, whatever the input. Fields loracli does not know are kept in
`Request.unknown_fields` (the caller warns); a `FieldMap` renames other column names to
`prompt` / `adapter` / `id` first.

Ids: an explicit id (`id`: a non-empty string or an integer; `custom_id`: a non-empty string) is
kept as given, type included: the integer 1 and the string "1" are two different ids, and the
output gives each back as it came. A native record without an id gets `implicit_id(line)`,
"#" + its line number ("#12"); explicit string ids starting with "#" are refused, so the two
never meet. `is_id` is what the resume planner (`resume.py`) accepts as an id read back from
an output; `IdTable` keeps the type in its keys.

A chat message's `content` is a string, or OpenAI's list of parts, of which only text parts
(`{"type": "text", "text": ...}`) are taken, joined with no separator (as OpenAI does).
Sampling values (`SAMPLING_FIELDS`, the same names in both forms, and `max_completion_tokens`,
which must equal `max_tokens` when both are given) are checked by `sampling.problem`, the rule
the run's defaults obey too. A field of OpenAI's or vLLM's API that loracli does not implement
(`tools`, `best_of`, ...: `unsupported_fields.py`) fails the record, naming the field.
The structure and logprob fields (`response_format`, `logprobs`, ...) are read by
`output_fields.output_params`, whose module doc lists them for both forms.

Pure: no I/O here (`input_sources.py` reads files).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .adapter_sources.names import name_problem
from .errors import InputError
from .output_fields import NATIVE_OUTPUT_FIELDS, OPENAI_OUTPUT_FIELDS, output_params
from .sampling import is_int, normalized, problem, shown
from .unsupported_fields import UNSUPPORTED, unsupported

SAMPLING_FIELDS = (  # the same name in both forms (see sampling.py for their meaning)
    *("max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos", "n", "top_k", "min_p"),
    *("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens"),
    *("stop_token_ids", "include_stop_str_in_output"),
)
MAX_TOKENS_ALIAS = "max_completion_tokens"  # OpenAI's newer name for max_tokens, in both forms
# UNSUPPORTED fields that pass `unsupported` ask for what loracli does anyway: known, not warned about
NATIVE_FIELDS = frozenset({"id", "adapter", "prompt", "messages", MAX_TOKENS_ALIAS, *SAMPLING_FIELDS, *UNSUPPORTED})
OPENAI_FIELDS = frozenset({"custom_id", "method", "url", "body"})
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
BODY_PARAMS = {k: k for k in SAMPLING_FIELDS}
BODY_FIELDS = frozenset(
    {"model", "prompt", "messages", "adapter_weights", MAX_TOKENS_ALIAS, *BODY_PARAMS, *UNSUPPORTED}
)
NATIVE_PARAMS = BODY_PARAMS
IMPLICIT_ID_PREFIX = "#"

RequestId = str | int  # as the input gave it (see the module doc)


@dataclass(frozen=True)
class AdapterMix:
    """Adapters run together with weights (see the module doc); `parts` in the order the input gave."""

    parts: tuple[tuple[str, float], ...]  # (adapter name, weight), at least one, names distinct

    @property
    def name(self) -> str:
        """The mix as results and stats name it: "shout*0.7+brief*0.5"."""
        return "+".join(f"{name}*{weight!r}" for name, weight in self.parts)

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.parts)


@dataclass
class Request:
    id: RequestId
    adapter: str | None  # adapter name, a mix's name (see `mix`), or None for the base model
    prompt: str | None = None
    messages: list[dict] | None = None
    params: dict[str, Any] = field(default_factory=dict)  # only what the line sets
    line: int = 0
    form: str = "native"  # or "openai"
    url: str | None = None
    model: str | None = None  # OpenAI body.model as written
    unknown_fields: list[str] = field(default_factory=list)
    mix: AdapterMix | None = None  # the weighted adapters when `adapter` names a mix

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapters this request needs: a mix's parts, the one adapter, or none."""
        if self.mix is not None:
            return self.mix.adapters
        return () if self.adapter is None else (self.adapter,)


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
        record_id: RequestId | None = None,
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


def _check_param(name: str, v: Any, ctx: tuple[str, int], where: str) -> Any:
    found = problem(name, v)
    if found is not None:
        raise _fail(ctx, where, found)
    return normalized(name, v)


def _check_params(obj: dict, ctx: tuple[str, int], prefix: str, names: dict[str, str]) -> dict[str, Any]:
    refused = unsupported(obj, prefix)
    if refused is not None:
        raise _fail(ctx, *refused)
    out: dict[str, Any] = {}
    for key, name in names.items():
        if obj.get(key) is not None:
            out[name] = _check_param(name, obj[key], ctx, prefix + key)
    alias = obj.get(MAX_TOKENS_ALIAS)
    if alias is not None:
        value = _check_param("max_tokens", alias, ctx, prefix + MAX_TOKENS_ALIAS)
        if out.get("max_tokens", value) != value:
            message = f"is {value} but max_tokens is {out['max_tokens']}: give one, or the same value"
            raise _fail(ctx, prefix + MAX_TOKENS_ALIAS, message)
        out["max_tokens"] = value
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
    return None, [_check_message(m, ctx, f"{prefix}messages[{i}]") for i, m in enumerate(messages)]


def _check_message(m: Any, ctx: tuple[str, int], where: str) -> dict:
    """One chat message, its content as one string (text parts joined)."""
    content = m.get("content") if isinstance(m, dict) else None
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(content, (str, list))):
        raise _fail(ctx, where, "must be an object with string 'role' and 'content' (text or a list of text parts)")
    if isinstance(content, list):
        content = "".join(_text_of_part(part, ctx, f"{where}.content[{j}]") for j, part in enumerate(content))
        m = {**m, "content": content}
    _check_text(m["role"] + content, ctx, where)
    return m


def _text_of_part(part: Any, ctx: tuple[str, int], where: str) -> str:
    if not isinstance(part, dict):
        raise _fail(ctx, where, f'must be an object like {{"type": "text", "text": ...}}, got {shown(part)}')
    kind = part.get("type")
    if not isinstance(kind, str):
        raise _fail(ctx, f"{where}.type", "missing: a part names its type (only 'text' parts are supported)")
    if kind != "text":
        raise _fail(ctx, f"{where}.type", f"{kind!r} parts are not supported")
    text = part.get("text")
    if not isinstance(text, str):
        raise _fail(ctx, f"{where}.text", f"must be a string, got {shown(text)}")
    return text


def implicit_id(line: int) -> str:
    """The id of a native record that gives none: "#" and its line (or row) number."""
    return f"{IMPLICIT_ID_PREFIX}{line}"


def is_id(value: Any) -> bool:
    """Whether `value` can be an id: a non-empty string or an integer (a bool is not one)."""
    return (isinstance(value, str) and value != "") or is_int(value)


def _reserved(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(IMPLICIT_ID_PREFIX)


def _explicit_id(value: RequestId, ctx: tuple[str, int], where: str) -> RequestId:
    if _reserved(value):
        message = f"must not start with '{IMPLICIT_ID_PREFIX}' (kept for the ids of records without one, like \"#12\")"
        raise _fail(ctx, where, message)
    return value


def _native_id(value: Any, ctx: tuple[str, int]) -> RequestId:
    if value is None:
        return implicit_id(ctx[1])
    if value == "":
        raise _fail(ctx, "id", "is empty")
    if not is_id(value):
        raise _fail(ctx, "id", f"must be a string or integer, got {shown(value)}")
    return _explicit_id(value, ctx, "id")


def readable_id(obj: dict, form: str) -> RequestId | None:
    """The record's explicit id, as given, if it can be read at all (for error records), else None."""
    value = obj.get("custom_id" if form == "openai" else "id")
    return value if is_id(value) and not _reserved(value) else None


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


def _check_mix(value: Any, ctx: tuple[str, int], where: str) -> AdapterMix:
    """An object {adapter name: weight} -> `AdapterMix`; weights finite numbers, names non-empty."""
    if not isinstance(value, dict) or not value:
        raise _fail(ctx, where, f"must be a non-empty object of adapter names and weights, got {shown(value)}")
    parts = []
    for name, weight in value.items():
        if not isinstance(name, str) or not name:
            raise _fail(ctx, where, f"adapter names must be non-empty strings, got {shown(name)}")
        if problem := name_problem(name):
            raise _fail(ctx, where, f"refused adapter name {shown(name)}: {problem}")
        ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
        if not ok:
            raise _fail(ctx, f"{where}.{name}", f"weight must be a finite number, got {shown(weight)}")
        parts.append((name, float(weight)))
    return AdapterMix(tuple(parts))


def _parse_native(obj: dict, ctx: tuple[str, int]) -> Request:
    rid = _native_id(obj.get("id"), ctx)
    adapter = obj.get("adapter")
    mix = _check_mix(adapter, ctx, "adapter") if isinstance(adapter, dict) else None
    if mix is not None:
        adapter = mix.name
    elif adapter is not None and (not isinstance(adapter, str) or not adapter):
        message = f"must be an adapter name, an object of adapter names and weights, or null, got {shown(adapter)}"
        raise _fail(ctx, "adapter", message)
    elif adapter is not None and (problem := name_problem(adapter)):
        raise _fail(ctx, "adapter", f"refused adapter name {shown(adapter)}: {problem}")
    prompt, messages = _check_prompt(obj, ctx, "")
    params = _check_params(obj, ctx, "", NATIVE_PARAMS) | output_params(obj, ctx, "", None)
    unknown = sorted(str(k) for k in set(obj) - NATIVE_FIELDS - NATIVE_OUTPUT_FIELDS)
    return Request(rid, adapter, prompt, messages, params, ctx[1], "native", unknown_fields=unknown, mix=mix)


def _parse_openai(obj: dict, ctx: tuple[str, int], base_names: frozenset[str]) -> Request:
    rid = obj.get("custom_id")
    if not isinstance(rid, str) or not rid:
        raise _fail(ctx, "custom_id", "missing or not a non-empty string")
    rid = _explicit_id(rid, ctx, "custom_id")
    if obj.get("method", "POST") != "POST":
        raise _fail(ctx, "method", f"must be POST, got {shown(obj.get('method'))}")
    url = obj.get("url")
    if url not in OPENAI_URLS:
        raise _fail(ctx, "url", f"must be one of {', '.join(OPENAI_URLS)}, got {shown(url)}")
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
    params = _check_params(body, ctx, "body.", BODY_PARAMS) | output_params(body, ctx, "body.", url)
    adapter = None if model in base_names else model
    # with unknown base names the engine refuses it
    if base_names and adapter is not None and (problem := name_problem(adapter)):
        raise _fail(ctx, "body.model", f"refused adapter name {shown(adapter)}: {problem}")
    mix = None
    if body.get("adapter_weights") is not None:
        mix = _check_mix(body["adapter_weights"], ctx, "body.adapter_weights")
        if base_names and model not in base_names:
            names = ", ".join(sorted(base_names))
            raise _fail(ctx, "body.model", f"must name the base model ({names}) when body.adapter_weights is given")
        adapter = mix.name
    known_body = BODY_FIELDS | OPENAI_OUTPUT_FIELDS
    unknown = sorted([str(k) for k in set(obj) - OPENAI_FIELDS] + [f"body.{k}" for k in set(body) - known_body])
    return Request(rid, adapter, prompt, messages, params, ctx[1], "openai", url, model, unknown, mix)
