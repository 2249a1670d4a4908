"""`SamplingParams`: how one request is decoded. A plain dataclass (no torch), shared by the
input parser, the job, the engine and the Ray workers.

The rules for sampling values live here once: `problem(name, value)` says what is wrong with a
value of field `name` (None when it is fine), `normalized` gives a good value the form the
engine uses (an int temperature as a float, one stop string as a list). `SamplingParams` checks
its fields when built (the defaults `loracli run` builds from its flags) and raises
`ConfigError` naming the field; the request parser (`requests.py`) checks the values a record
sets with the same `problem`, so both refuse the same values in the same words.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError

SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


def shown(value: Any) -> str:
    """A value as an error message shows it: JSON, cut to 60 characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number_problem(name: str, v: Any) -> str | None:
    if not (is_int(v) or isinstance(v, float)) or not math.isfinite(v):
        return f"must be a finite number, got {shown(v)}"
    if name == "top_p" and not 0 < v <= 1:
        return f"must be in (0, 1], got {v}"
    if v < 0:
        return f"must be >= 0, got {v}"
    return None


def problem(name: str, v: Any) -> str | None:
    """What is wrong with `v` as the value of sampling field `name`, or None when it is fine."""
    if name == "max_tokens":
        if not is_int(v):
            return f"must be an integer, got {shown(v)}"
        return None if v > 0 else f"must be positive, got {v}"
    if name in ("temperature", "top_p"):
        return _number_problem(name, v)
    if name == "seed":
        ok = is_int(v) and SEED_RANGE[0] <= v <= SEED_RANGE[1]
        return None if ok else f"must be a 64-bit integer, got {shown(v)}"
    if name == "stop":
        v = [v] if isinstance(v, str) else v
        ok = isinstance(v, list) and all(isinstance(s, str) and s for s in v)
        return None if ok else "must be a non-empty string or a list of non-empty strings"
    if name == "ignore_eos":
        return None if isinstance(v, bool) else f"must be true or false, got {shown(v)}"
    raise KeyError(name)


def normalized(name: str, v: Any) -> Any:
    """A good value in the form the engine uses: temperature and top_p as floats, stop as a list."""
    if name in ("temperature", "top_p"):
        return float(v)
    if name == "stop" and isinstance(v, str):
        return [v]
    return v


@dataclass
class SamplingParams:
    """Checked when built: a bad value raises `ConfigError` naming its field (see the module doc)."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # None: the job derives one from the run's seed and the request's id
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            name, value = f.name, getattr(self, f.name)
            if name == "seed" and value is None:
                continue
            found = problem(name, value)
            if found is not None:
                raise ConfigError(f"{name} {found}", fields=(name,))
            setattr(self, name, normalized(name, value))
