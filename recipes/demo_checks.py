"""Programmatic checks for the demo adapters' styles, one predicate per adapter.

Each check takes a generated answer (str) and returns True when the answer has the adapter's
style. The recipe uses them to score held-out generations and `tests/test_demo_adapters.py` uses
them on the CLI's output, so both judge by the same definition. Standard library only.

- `shout`: letters present and no lowercase letter.
- `json`: the whole answer (surrounding whitespace aside) is a JSON object with a string `answer`.
- `brief`: 1 to 12 words (whitespace-separated).
- `list`: exactly three non-empty lines, each starting with "- " and saying something after it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

BRIEF_MAX_WORDS = 12
LIST_ITEMS = 3


def is_shout(text: str) -> bool:
    """Upper case: at least one letter and no lowercase letter."""
    return any(c.isalpha() for c in text) and not any(c.islower() for c in text)


def is_json_answer(text: str) -> bool:
    """Only a JSON object, with a string value under the key `answer`."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("answer"), str)


def is_brief(text: str) -> bool:
    """One short answer: between 1 and BRIEF_MAX_WORDS words."""
    return 1 <= len(text.split()) <= BRIEF_MAX_WORDS


def is_list(text: str) -> bool:
    """A bulleted list of exactly LIST_ITEMS lines, each "- " followed by some text."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return len(lines) == LIST_ITEMS and all(line.startswith("- ") and line[2:].strip() for line in lines)


CHECKS: dict[str, Callable[[str], bool]] = {
    "shout": is_shout,
    "json": is_json_answer,
    "brief": is_brief,
    "list": is_list,
}


def pass_rate(check: Callable[[str], bool], texts: Iterable[str]) -> float:
    """Fraction of `texts` passing `check` (0.0 for no texts)."""
    results = [check(t) for t in texts]
    return sum(results) / len(results) if results else 0.0
