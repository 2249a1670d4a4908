"""Request fields of OpenAI's and vLLM's APIs that loracli knows but does not implement.

A record setting one of them fails with an error naming the field (`unsupported(obj, prefix)`
finds the first), rather than being answered as if the field were not there. A field set to
null, or to the value that means what loracli does anyway (`stream: false`, `n` as `best_of`,
...; `SAME_AS_LORACLI`), is fine. Fields that only label a request for OpenAI's service (`user`,
`metadata`, `store`, `service_tier`, ...) change no answer: they are unknown fields, warned
about once and ignored, like any other unknown field. Plain data, no I/O.
"""

from __future__ import annotations

from typing import Any

UNSUPPORTED: dict[str, str] = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "parallel_tool_calls": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "audio": "audio output",
    "modalities": "output other than text",
    "prediction": "predicted outputs",
    "reasoning_effort": "reasoning settings",
    "verbosity": "verbosity settings",
    "web_search_options": "web search",
    "stream": "streaming (a batch writes each answer whole)",
    "stream_options": "streaming (a batch writes each answer whole)",
    "echo": "echoing the prompt",
    "suffix": "a suffix after the completion",
    "best_of": "best_of other than n",
    "use_beam_search": "beam search",
    "length_penalty": "beam search",
    "early_stopping": "beam search",
    "bad_words": "bad_words",
    "allowed_token_ids": "allowed_token_ids",
    "truncate_prompt_tokens": "prompt truncation",
    "skip_special_tokens": "keeping special tokens in the text",
    "spaces_between_special_tokens": "spaces_between_special_tokens",
    "add_generation_prompt": "chat without a generation prompt",
    "continue_final_message": "continue_final_message",
    "add_special_tokens": "add_special_tokens",
    "chat_template": "a chat template per request",
    "chat_template_kwargs": "chat template arguments",
    "documents": "documents for the chat template",
    "mm_processor_kwargs": "multimodal input",
    "logits_processors": "custom logits processors",
    "return_tokens_as_token_ids": "return_tokens_as_token_ids",
}

# field -> the value under which it asks for what loracli does anyway
SAME_AS_LORACLI: dict[str, Any] = {
    "stream": False,
    "echo": False,
    "use_beam_search": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "add_generation_prompt": True,
    "continue_final_message": False,
    "parallel_tool_calls": True,  # OpenAI's default; meaningless without tools
    "modalities": ["text"],
}


def unsupported(obj: dict, prefix: str = "") -> tuple[str, str] | None:
    """(field as the record spells it, the one-line reason) of the first field of `obj` loracli
    does not implement, or None."""
    for name, what in UNSUPPORTED.items():
        value = obj.get(name)
        if value is None or _same_as_loracli(name, value, obj):
            continue
        return prefix + name, f"is not supported: loracli does not implement {what}; remove the field"
    return None


def _same_as_loracli(name: str, value: Any, obj: dict) -> bool:
    if name == "best_of":
        return type(value) is int and value == obj.get("n", 1)
    if name not in SAME_AS_LORACLI:
        return False
    same = SAME_AS_LORACLI[name]
    return type(value) is type(same) and value == same
