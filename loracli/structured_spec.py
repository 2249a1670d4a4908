"""What a request asks its output to match: a `Structure` read from the record's fields. Plain data.

One record names at most one structure, in any of these fields (the engine compiles it:
`engine/structured.py`):

- `response_format` (both forms, OpenAI's shape): `{"type": "text"}` (no structure),
  `{"type": "json_object"}` (any JSON object) or `{"type": "json_schema", "json_schema": {"name",
  "schema", "strict"?, "description"?}}` (that schema);
- `structured_outputs` (vLLM >= 0.12, OpenAI form): exactly one of `{"json": schema}`,
  `{"regex": str}`, `{"choice": [str]}`, `{"grammar": str}`, `{"json_object": true}`;
- `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (vLLM < 0.12, OpenAI form);
- `json_schema`, `regex`, `choice`, `grammar` (native form).

A schema is a JSON object (vLLM also takes it as a JSON string: so does loracli); a regex or
grammar a non-empty string (grammar: xgrammar's EBNF, GBNF-like, root rule `root`); a choice a
non-empty list of strings. `strict` must be a boolean: the schema is enforced either way (strict
is what loracli always does). `json_schema.name` is required (as OpenAI requires it) and, like
`description`, only checked. Other `structured_outputs` keys vLLM knows (`structural_tag`,
`whitespace_pattern`, `disable_*`) are refused with that reason, as is any unknown key.

`structure_problem(field, value)` says what is wrong with a value (None when fine) and
`to_structure(field, value)` turns a good one into a `Structure` (None for `{"type": "text"}`);
`sampling.problem` / `sampling.normalized` call these for the fields in `STRUCTURE_FIELDS`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar")
NATIVE_STRUCTURE_FIELDS = ("response_format", "json_schema", "regex", "choice", "grammar")
OPENAI_STRUCTURE_FIELDS = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)
# the field that holds one kind directly -> that kind
DIRECT_FIELDS = {
    "json_schema": "json",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
STRUCTURE_FIELDS = frozenset({*NATIVE_STRUCTURE_FIELDS, *OPENAI_STRUCTURE_FIELDS})
VLLM_UNSUPPORTED = ("structural_tag", "whitespace_pattern", "disable_fallback", "disable_any_whitespace")


@dataclass(frozen=True)
class Structure:
    """`kind` one of KINDS; `spec` the schema as JSON text (key order kept: it is the output's), the regex, the
    choices as a JSON list, the grammar, or "" for json_object; `source` the field it was read from
    (for error messages; not part of equality). Hashable: the compile cache key."""

    kind: str
    spec: str
    source: str = field(default="", compare=False)

    @property
    def label(self) -> str:
        """How an error message names it: 'json schema', 'regex', ..."""
        return {"json": "json schema", "json_object": "json object"}.get(self.kind, self.kind)


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, list, dict, bool)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _schema_problem(v: Any) -> str | None:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return "must be a JSON schema (an object, or its JSON text), got text that is not JSON"
    return None if isinstance(v, dict) else f"must be a JSON schema object, got {_shown(v)}"


def _kind_problem(kind: str, v: Any) -> str | None:
    """What is wrong with `v` as the value of one kind (see the module doc)."""
    if kind == "json":
        return _schema_problem(v)
    if kind in ("regex", "grammar"):
        return None if isinstance(v, str) and v else f"must be a non-empty string, got {_shown(v)}"
    if kind == "choice":
        ok = isinstance(v, list) and v and all(isinstance(c, str) and c for c in v)
        return None if ok else f"must be a non-empty list of non-empty strings, got {_shown(v)}"
    return None if v is True else f"must be true, got {_shown(v)}"  # json_object


def _response_format_problem(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f"must be an object with a 'type', got {_shown(v)}"
    kind = v.get("type")
    if kind in ("text", "json_object"):
        extra = sorted(set(v) - {"type"})
        return None if not extra else f"type {kind!r} takes no other keys, got {', '.join(extra)}"
    if kind != "json_schema":
        return f"type must be 'text', 'json_object' or 'json_schema', got {_shown(kind)}"
    spec = v.get("json_schema")
    if not isinstance(spec, dict):
        return "type 'json_schema' needs 'json_schema': {\"name\", \"schema\"}"
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        return "json_schema.name must be a non-empty string"
    if "strict" in spec and spec["strict"] is not None and not isinstance(spec["strict"], bool):
        return f"json_schema.strict must be true or false, got {_shown(spec['strict'])}"
    unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if unknown:
        return f"json_schema has unknown keys: {', '.join(unknown)}"
    found = _schema_problem(spec.get("schema", {}))
    return None if found is None else f"json_schema.schema {found}"


def _structured_outputs_problem(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f'must be an object like {{"json": schema}}, got {_shown(v)}'
    given = {k: x for k, x in v.items() if x is not None}
    refused = sorted(k for k in given if k in VLLM_UNSUPPORTED)
    if refused:
        return f"{', '.join(refused)} is not supported by loracli"
    unknown = sorted(str(k) for k in given if k not in KINDS)
    if unknown:
        return f"unknown keys: {', '.join(unknown)} (known: {', '.join(KINDS)})"
    if len(given) != 1:
        return f"must hold exactly one of {', '.join(KINDS)}"
    ((kind, value),) = given.items()
    found = _kind_problem(kind, value)
    return None if found is None else f"{kind} {found}"


def structure_problem(name: str, v: Any) -> str | None:
    """What is wrong with `v` as the value of structure field `name`, or None when it is fine."""
    if name == "response_format":
        return _response_format_problem(v)
    if name == "structured_outputs":
        return _structured_outputs_problem(v)
    return _kind_problem(DIRECT_FIELDS[name], v)


def _structure(kind: str, v: Any) -> Structure:
    if kind == "json":
        schema = json.loads(v) if isinstance(v, str) else v
        return Structure("json", json.dumps(schema, ensure_ascii=False))
    if kind == "choice":
        return Structure("choice", json.dumps(v, ensure_ascii=False))
    if kind == "json_object":
        return Structure("json_object", "")
    return Structure(kind, v)


def to_structure(name: str, v: Any) -> Structure | None:
    """A good value (`structure_problem` is None) -> its `Structure`; None for `{"type": "text"}`."""
    found = _read_structure(name, v)
    return None if found is None else replace(found, source=name)


def _read_structure(name: str, v: Any) -> Structure | None:
    if name == "response_format":
        if v["type"] == "text":
            return None
        if v["type"] == "json_object":
            return Structure("json_object", "")
        return _structure("json", v["json_schema"].get("schema", {}))
    if name == "structured_outputs":
        ((kind, value),) = ((k, x) for k, x in v.items() if x is not None)
        return _structure(kind, value)
    return _structure(DIRECT_FIELDS[name], v)
