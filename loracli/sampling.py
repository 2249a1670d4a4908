"""`SamplingParams`: how one request is decoded. A plain dataclass (no torch), shared by the
input parser, the job, the engine and the Ray workers.

The rules for sampling values live here once: `problem(name, value)` says what is wrong with a
value of field `name` (None when it is fine), `normalized` gives a good value the form the
engine uses (an int temperature as a float, one stop string as a list, `logit_bias` keys as
ints, `top_k` -1 as 0). `SamplingParams` checks its fields when built (the defaults `loracli run`
builds from its flags) and raises `ConfigError` naming the field; the request parser
(`requests.py`) checks the values a record sets with the same `problem`, so both refuse the same
values in the same words. `conflict` is the one rule between two fields (`min_tokens` <=
`max_tokens`), checked by `SamplingParams` and by the engine's admission check.

The fields and their meaning (vLLM's, which for the penalties is OpenAI's):
- `n`: samples per request, at most `MAX_N` (sample i draws with seed + i, see engine/engine.py);
- `temperature` (0 = greedy), `top_p`, `top_k` (0 = no limit; -1 is taken as 0, as vLLM does),
  `min_p` (drop tokens below min_p x the top token's probability);
- `presence_penalty`, `frequency_penalty` in [-2, 2] over the generated tokens,
  `repetition_penalty` > 0 over prompt + generated tokens, `logit_bias` {token id: [-100, 100]};
- `min_tokens`: EOS and `stop_token_ids` masked, stop strings not looked for, until then;
- `stop` strings, `stop_token_ids`, `include_stop_str_in_output`, `ignore_eos`, `max_tokens`;
- `structure`: what the output must match (`structured_spec.Structure`, read from one of the
  fields in `STRUCTURE_FIELDS`, each checked by `structured_spec.structure_problem`);
- `logprobs` (N: each generated token's logprob and the top N), `prompt_logprobs` (N: each
  prompt token's, given the ones before it), N in [0, MAX_LOGPROBS]; `top_logprobs` is OpenAI
  chat's N (engine/logprobs.py says which logits they are taken from).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .structured_spec import STRUCTURE_FIELDS, Structure, structure_problem, to_structure

SEED_RANGE = (-(1 << 63), (1 << 64) - 1)
RANGES = {  # number fields: (low, high, low included, high included)
    "temperature": (0.0, math.inf, True, False),
    "top_p": (0.0, 1.0, False, True),
    "min_p": (0.0, 1.0, True, True),
    "presence_penalty": (-2.0, 2.0, True, True),
    "frequency_penalty": (-2.0, 2.0, True, True),
    "repetition_penalty": (0.0, math.inf, False, False),
}
LOGIT_BIAS_RANGE = 100.0
INT_MINIMA = {"max_tokens": 1, "n": 1, "min_tokens": 0, "top_k": -1}
MAX_N = 128  # samples per request, as OpenAI caps n
BOOLS = ("ignore_eos", "include_stop_str_in_output")
MAX_LOGPROBS = 20  # as OpenAI caps top_logprobs
LOGPROB_FIELDS = ("logprobs", "top_logprobs", "prompt_logprobs")
OPTIONAL = ("seed", "structure", "logprobs", "prompt_logprobs")  # None: not set


def shown(value: Any) -> str:
    """A value as an error message shows it: JSON, cut to 60 characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(v: Any) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _range_problem(name: str, v: Any) -> str | None:
    if not _is_number(v):
        return f"must be a finite number, got {shown(v)}"
    low, high, low_in, high_in = RANGES[name]
    if math.isinf(high):
        ok = v >= low if low_in else v > low
        return None if ok else f"must be {'>=' if low_in else '>'} {low:g}, got {v}"
    ok = (v >= low if low_in else v > low) and (v <= high if high_in else v < high)
    interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
    return None if ok else f"must be in {interval}, got {v}"


def _int_problem(name: str, v: Any) -> str | None:
    if not is_int(v):
        return f"must be an integer, got {shown(v)}"
    low = INT_MINIMA[name]
    if name == "top_k":
        return None if v >= low else f"must be >= 0 (0 or -1: no limit), got {v}"
    if name == "n" and v > MAX_N:
        return f"must be at most {MAX_N}, got {v}"
    if v >= low:
        return None
    return f"must be positive, got {v}" if low == 1 else f"must be >= {low}, got {v}"


def _token_id(key: Any) -> int | None:
    """A token id as a `logit_bias` key spells it (JSON keys are strings: "42"), or None."""
    if is_int(key):
        return key if key >= 0 else None
    if isinstance(key, str) and key.isdecimal() and key.isascii():
        return int(key)
    return None


def _logit_bias_problem(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f"must be an object of token ids and biases, got {shown(v)}"
    for key, bias in v.items():
        if _token_id(key) is None:
            return f"keys must be token ids (non-negative integers), got {shown(key)}"
        if not _is_number(bias) or abs(bias) > LOGIT_BIAS_RANGE:
            return f"biases must be numbers in [-100, 100], got {shown(bias)} for token {key}"
    return None


def problem(name: str, v: Any) -> str | None:
    """What is wrong with `v` as the value of sampling field `name`, or None when it is fine."""
    if name in INT_MINIMA:
        return _int_problem(name, v)
    if name in RANGES:
        return _range_problem(name, v)
    if name == "seed":
        ok = is_int(v) and SEED_RANGE[0] <= v <= SEED_RANGE[1]
        return None if ok else f"must be a 64-bit integer, got {shown(v)}"
    if name == "stop":
        v = [v] if isinstance(v, str) else v
        ok = isinstance(v, list) and all(isinstance(s, str) and s for s in v)
        return None if ok else "must be a non-empty string or a list of non-empty strings"
    if name == "stop_token_ids":
        ok = isinstance(v, list) and all(is_int(t) and t >= 0 for t in v)
        return None if ok else f"must be a list of token ids (non-negative integers), got {shown(v)}"
    if name == "logit_bias":
        return _logit_bias_problem(v)
    if name in BOOLS:
        return None if isinstance(v, bool) else f"must be true or false, got {shown(v)}"
    if name in LOGPROB_FIELDS:
        ok = is_int(v) and 0 <= v <= MAX_LOGPROBS
        return None if ok else f"must be an integer in [0, {MAX_LOGPROBS}], got {shown(v)}"
    if name in STRUCTURE_FIELDS:
        return structure_problem(name, v)
    if name == "structure":
        return None if isinstance(v, Structure) else f"must be a Structure, got {shown(v)}"
    raise KeyError(name)


def normalized(name: str, v: Any) -> Any:
    """A good value in the form the engine uses (see the module doc)."""
    if name in RANGES:
        return float(v)
    if name == "stop" and isinstance(v, str):
        return [v]
    if name == "top_k":
        return max(v, 0)
    if name == "logit_bias":
        return {_token_id(k): float(b) for k, b in v.items()}
    if name in STRUCTURE_FIELDS:
        return to_structure(name, v)
    return v


def conflict(min_tokens: int, max_tokens: int) -> str | None:
    """The rule between two fields: at most `max_tokens` tokens can honour `min_tokens`."""
    if min_tokens > max_tokens:
        return f"min_tokens {min_tokens} is above max_tokens {max_tokens}"
    return None


@dataclass
class SamplingParams:
    """Checked when built: a bad value raises `ConfigError` naming its field (see the module doc)."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # None: the job derives one from the run's seed and the request's id
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    top_k: int = 0  # 0 = no limit
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    structure: Structure | None = None  # what the output must match (None: free text)
    logprobs: int | None = None  # None: no logprobs; N: the sampled token's and the top N
    prompt_logprobs: int | None = None  # None: none; N: each prompt token's and the top N

    def __post_init__(self) -> None:
        for f in fields(self):
            name, value = f.name, getattr(self, f.name)
            if name in OPTIONAL and value is None:
                continue
            found = problem(name, value)
            if found is not None:
                raise ConfigError(f"{name} {found}", fields=(name,))
            setattr(self, name, normalized(name, value))
        clash = conflict(self.min_tokens, self.max_tokens)
        if clash is not None:
            raise ConfigError(clash, fields=("min_tokens", "max_tokens"))

    @property
    def penalized(self) -> bool:
        """Whether any penalty applies (the sampler skips the token counts otherwise)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def truncates(self) -> bool:
        """Whether top-k, top-p or min-p cut the distribution of a sampled row."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0
