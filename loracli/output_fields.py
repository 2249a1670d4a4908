"""The record fields that shape a request's output beyond its text: a structure and logprobs.

`output_params(obj, ctx, prefix, url)` reads them from a native record (`url` None) or an OpenAI
body and returns the `SamplingParams` values they set (`structure`, `logprobs`,
`prompt_logprobs`), each checked by `sampling.problem`; a bad value raises `InputError` naming
the field. Plain data, no I/O.

- Structure: at most one of the fields in `structured_spec` (native: `response_format`,
  `json_schema`, `regex`, `choice`, `grammar`; OpenAI body: `response_format`,
  `structured_outputs`, `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`).
- Logprobs, native: `logprobs: N` (each generated token's logprob and its top N alternatives).
  OpenAI chat: `logprobs: true|false` and `top_logprobs: N` (needs `logprobs: true`; default 0).
  OpenAI completions: `logprobs: N` (`top_logprobs` is refused: it is chat's field).
  N is in [0, `sampling.MAX_LOGPROBS`] (20, OpenAI's cap for chat; loracli takes it for
  completions too, where OpenAI stops at 5).
- `prompt_logprobs: N` (vLLM's extra, both forms): each prompt token's logprob given the tokens
  before it, and the top N there.
"""

from __future__ import annotations

from typing import Any

from .errors import InputError
from .sampling import normalized, problem, shown
from .structured_spec import NATIVE_STRUCTURE_FIELDS, OPENAI_STRUCTURE_FIELDS

NATIVE_OUTPUT_FIELDS = frozenset({*NATIVE_STRUCTURE_FIELDS, "logprobs", "prompt_logprobs"})
OPENAI_OUTPUT_FIELDS = frozenset({*OPENAI_STRUCTURE_FIELDS, "logprobs", "top_logprobs", "prompt_logprobs"})
CHAT_URL = "/v1/chat/completions"


def _checked(name: str, v: Any, ctx: tuple[str, int], where: str) -> Any:
    found = problem(name, v)
    if found is not None:
        raise InputError(ctx[0], ctx[1], where, found)
    return normalized(name, v)


def _structure(obj: dict, ctx: tuple[str, int], prefix: str, names: tuple[str, ...]) -> dict[str, Any]:
    given = [name for name in names if obj.get(name) is not None]
    if len(given) > 1:
        message = f"give one structure, not both {given[0]!r} and {given[1]!r}"
        raise InputError(ctx[0], ctx[1], prefix + given[1], message)
    if not given:
        return {}
    structure = _checked(given[0], obj[given[0]], ctx, prefix + given[0])
    return {} if structure is None else {"structure": structure}


def _chat_logprobs(obj: dict, ctx: tuple[str, int], prefix: str) -> dict[str, Any]:
    flag, top = obj.get("logprobs"), obj.get("top_logprobs")
    if flag is not None and not isinstance(flag, bool):
        raise InputError(ctx[0], ctx[1], prefix + "logprobs", f"must be true or false, got {shown(flag)}")
    if top is not None:
        top = _checked("top_logprobs", top, ctx, prefix + "top_logprobs")
        if not flag:
            raise InputError(ctx[0], ctx[1], prefix + "top_logprobs", "needs 'logprobs': true")
    return {"logprobs": top or 0} if flag else {}


def _logprobs(obj: dict, ctx: tuple[str, int], prefix: str, url: str | None) -> dict[str, Any]:
    if url == CHAT_URL:
        return _chat_logprobs(obj, ctx, prefix)
    if url is not None and obj.get("top_logprobs") is not None:
        message = "is a chat completions field; completions take 'logprobs': N"
        raise InputError(ctx[0], ctx[1], prefix + "top_logprobs", message)
    value = obj.get("logprobs")
    return {} if value is None else {"logprobs": _checked("logprobs", value, ctx, prefix + "logprobs")}


def output_params(obj: dict, ctx: tuple[str, int], prefix: str, url: str | None) -> dict[str, Any]:
    """The structure and logprob settings of a native record (`url` None) or an OpenAI body."""
    names = NATIVE_STRUCTURE_FIELDS if url is None else OPENAI_STRUCTURE_FIELDS
    params = _structure(obj, ctx, prefix, names)
    params.update(_logprobs(obj, ctx, prefix, url))
    if obj.get("prompt_logprobs") is not None:
        params["prompt_logprobs"] = _checked("prompt_logprobs", obj["prompt_logprobs"], ctx, prefix + "prompt_logprobs")
    return params
