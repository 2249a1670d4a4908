"""What an engine hands back: one `Result` per request, and `Counters` of the work it did.

Plain data (no torch): the output writer, the resume planner, the job and the Ray driver all
read these without importing the engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import InputError
from .requests import Request, RequestId, implicit_id


class Choice(NamedTuple):
    """One of the n samples of a request that asked for n > 1 (`Result.choices`, in sample order)."""

    text: str
    finish_reason: str | None
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # per output token, when the request asked


class Failure(NamedTuple):
    """Why a request failed: `kind` (a stable code), a one-line `message`, and the request
    `field` it concerns (None when no single field is at fault)."""

    kind: str
    message: str
    field: str | None = None


class TokenLogprob(NamedTuple):
    """One token's log-probability (engine/logprobs.py says of which logits): `rank` 1 = the most
    likely token; `token` its text (invalid UTF-8 replaced), `bytes` its exact bytes; `top` the N
    most likely tokens at that position, best first (their own `top` empty)."""

    id: int
    token: str
    bytes: tuple[int, ...]
    logprob: float
    rank: int
    top: tuple[TokenLogprob, ...] = ()


@dataclass
class Result:
    request: Request | None
    id: RequestId
    adapter: str | None
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Failure | None = None
    token_ids: list[int] = field(default_factory=list)
    arrival: float = 0.0
    first_token: float | None = None
    finished: float = 0.0
    wait_steps: int | None = None  # engine steps from arrival to first admission
    # n > 1: every sample (text, finish_reason, token_ids above are sample 0's; completion_tokens
    # is the sum over the samples, the prompt counted once, as OpenAI counts); empty for n = 1
    choices: list[Choice] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # per output token, when the request asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (the first: None)


@dataclass
class Counters:
    """What one engine did so far; a pool of workers (`cluster/pool.py`) sums its engines' counters."""

    prompt_tokens: int = 0
    steps: int = 0
    prefill_steps: int = 0  # steps that admitted prompts (mixed steps included)
    mixed_steps: int = 0  # of them, those that also decoded running sequences (`mixed_prefill`)
    oom_backoffs: int = 0
    preemptions: int = 0
    disk_loads: int = 0  # adapters read from disk into the CPU cache
    disk_bytes: int = 0
    cpu_hits: int = 0
    background_loads: int = 0  # adapters loaded by the background loader (adapter_loader.py)
    load_wait_seconds: float = 0.0  # time steps waited for an adapter load in flight
    load_hidden_seconds: float = 0.0  # background load time other requests ran through
    load_wait_steps: int = 0  # steps with nothing to run but requests of adapters still loading
    slot_activations: int = 0  # adapters written into a device slot (swaps in)
    slot_evictions: int = 0
    prefill_tokens: int = 0  # tokens admissions asked to prefill (prompts, and recomputed sequences)
    prefix_lookup_blocks: int = 0  # full blocks looked up in the prefix cache at admission
    prefix_hit_blocks: int = 0  # of them, found cached (their KV reused, not computed)
    prefix_saved_tokens: int = 0  # tokens of the blocks found cached
    per_adapter: dict[str, int] = field(default_factory=dict)  # finished requests per adapter ("<base>")

    def prefix_cache(self) -> dict:
        """Prefix-cache hit rates: of the full blocks looked up, and of all tokens asked to prefill."""
        return {
            "lookup_blocks": self.prefix_lookup_blocks,
            "hit_blocks": self.prefix_hit_blocks,
            "block_hit_rate": _rate(self.prefix_hit_blocks, self.prefix_lookup_blocks),
            "prefill_tokens": self.prefill_tokens,
            "saved_tokens": self.prefix_saved_tokens,
            "token_hit_rate": _rate(self.prefix_saved_tokens, self.prefill_tokens),
        }

    def add(self, other: Counters) -> None:
        for name, value in vars(other).items():
            if name == "per_adapter":
                for key, n in value.items():
                    self.per_adapter[key] = self.per_adapter.get(key, 0) + n
            else:
                setattr(self, name, getattr(self, name) + value)


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def input_error_result(error: InputError) -> Result:
    """The result for an input record that could not be read: its id is its line's implicit id ("#12")."""
    now = time.perf_counter()
    failure = Failure("invalid_request", str(error))
    return Result(None, implicit_id(error.line), None, error=failure, arrival=now, finished=now)
