"""Logprobs as the output records shape them (`outputs.py`), from a `Result`'s `TokenLogprob`s.

OpenAI chat (`choices[i].logprobs`, null when not asked):
    {"content": [{"token", "logprob", "bytes": [int], "top_logprobs": [{"token", "logprob", "bytes"}]}]}
OpenAI completions (`choices[i].logprobs`, null when not asked):
    {"tokens": [str], "token_logprobs": [float], "top_logprobs": [{token: logprob}],
     "text_offset": [int]}  (offsets into the completion's text, which starts at 0)
vLLM `prompt_logprobs` (chat: in the body, completions: in each choice), one per prompt token:
    [null, {"<token id>": {"logprob", "rank", "decoded_token"}, ...}, ...]  (the token itself,
    then its top N)
Native (`"logprobs"` and `"prompt_logprobs"` in the record, only when asked; with n > 1 each of
`choices` carries its own `"logprobs"`):
    [{"token", "id", "logprob", "rank", "bytes", "top": [{"token", "id", "logprob", "bytes"}]}],
    prompt_logprobs the same list with null for the first prompt token.
A -inf logprob (a token a grammar forbids, listed in a top N larger than what it allows) is
written as -9999.0, as vLLM writes it: JSON has no infinity.
"""

from __future__ import annotations

import math

from .results import Result, TokenLogprob

NEG_INF_AS = -9999.0


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else NEG_INF_AS


def native_logprobs(entries: list[TokenLogprob | None]) -> list[dict | None]:
    return [
        None if e is None else {**_native_top(e), "rank": e.rank, "top": [_native_top(t) for t in e.top]}
        for e in entries
    ]


def _native_top(e: TokenLogprob) -> dict:
    return {"token": e.token, "id": e.id, "logprob": _value(e.logprob), "bytes": list(e.bytes)}


def _chat_top(e: TokenLogprob) -> dict:
    return {"token": e.token, "logprob": _value(e.logprob), "bytes": list(e.bytes)}


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    return {"content": [{**_chat_top(e), "top_logprobs": [_chat_top(t) for t in e.top]} for e in entries]}


def completion_logprobs(entries: list[TokenLogprob]) -> dict:
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [_value(e.logprob) for e in entries],
        "top_logprobs": [{t.token: _value(t.logprob) for t in e.top} for e in entries],
        "text_offset": offsets,
    }


def vllm_prompt_logprobs(entries: list[TokenLogprob | None]) -> list[dict | None]:
    def one(e: TokenLogprob) -> dict:
        return {"logprob": _value(e.logprob), "rank": e.rank, "decoded_token": e.token}

    return [None if e is None else {str(t.id): one(t) for t in (e, *e.top)} for e in entries]


def _choice_entries(r: Result, index: int) -> list[TokenLogprob] | None:
    return r.choices[index].logprobs if r.choices else r.logprobs


def add_openai_logprobs(body: dict, r: Result, chat: bool) -> None:
    """Fill `logprobs` of each of the body's choices (null when not asked) and vLLM's `prompt_logprobs`."""
    shape = chat_logprobs if chat else completion_logprobs
    for choice in body["choices"]:
        entries = _choice_entries(r, choice["index"])
        choice["logprobs"] = None if entries is None else shape(entries)
        if not chat and r.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(r.prompt_logprobs)
    if chat and r.prompt_logprobs is not None:
        body["prompt_logprobs"] = vllm_prompt_logprobs(r.prompt_logprobs)


def add_native_logprobs(record: dict, r: Result) -> None:
    """Add `logprobs` / `prompt_logprobs` to a native record when the request asked for them."""
    if r.logprobs is not None and not r.choices:
        record["logprobs"] = native_logprobs(list(r.logprobs))
    for i, choice in enumerate(record.get("choices") or []):
        entries = _choice_entries(r, i)
        if isinstance(choice, dict) and entries is not None:
            choice["logprobs"] = native_logprobs(list(entries))
    if r.prompt_logprobs is not None:
        record["prompt_logprobs"] = native_logprobs(r.prompt_logprobs)
