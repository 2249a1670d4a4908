"""Result records: one JSON line per request, written and flushed as each finishes.

Native requests:  {"id", "adapter", "text", "finish_reason", "usage": {"prompt_tokens",
                   "completion_tokens", "total_tokens"}}  or  {"id", "adapter", "error": {"type", "message"}}
OpenAI Batch requests get OpenAI's Batch output form: {"id", "custom_id", "response":
{"status_code", "request_id", "body": chat.completion | text_completion}, "error"}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO

from .engine.engine import Result


def _usage(r: Result) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}


def native_record(r: Result) -> dict:
    if r.error is not None:
        return {"id": r.id, "adapter": r.adapter, "error": {"type": r.error[0], "message": r.error[1]}}
    return {"id": r.id, "adapter": r.adapter, "text": r.text, "finish_reason": r.finish_reason, "usage": _usage(r)}


def openai_record(r: Result, model_name: str) -> dict:
    req = r.request
    rid = f"batch_req_{r.id}"
    if r.error is not None:
        return {"id": rid, "custom_id": r.id, "response": None,
                "error": {"code": r.error[0], "message": r.error[1]}}
    created = int(time.time())
    model = req.model or model_name
    if req.url == "/v1/chat/completions":
        body = {"id": f"chatcmpl-{r.id}", "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "finish_reason": r.finish_reason}], "usage": _usage(r)}
    else:
        body = {"id": f"cmpl-{r.id}", "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": r.text, "finish_reason": r.finish_reason}], "usage": _usage(r)}
    return {"id": rid, "custom_id": r.id, "response": {"status_code": 200, "request_id": rid, "body": body},
            "error": None}


def to_record(r: Result, model_name: str) -> dict:
    if r.request is not None and r.request.form == "openai":
        return openai_record(r, model_name)
    return native_record(r)


class ResultWriter:
    """Appends JSON lines to a file (or stdout for `-`), one flushed write per result."""

    def __init__(self, path: str, model_name: str, append: bool = False):
        self.model_name = model_name
        self.path = path
        if path == "-":
            self.f: IO[str] = sys.stdout
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.f = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, r: Result) -> None:
        self.f.write(json.dumps(to_record(r, self.model_name), ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        if self.f is not sys.stdout:
            self.f.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
