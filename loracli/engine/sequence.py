"""`Sequence`: one request's tokens and bookkeeping as it moves through the engine.

Plain Python: no tensors. `token_ids` holds prompt + generated tokens; after a preemption the
whole of it is recomputed by the next prefill. A sequence of an adapter mix (`mix`) holds one
slot per adapter of the mix while running (`part_slots`, in the mix's order; `slot` is the first).
`token_ids` only grows, so the prefix cache's digests of its full blocks (`block_digests`) are
computed once each; `num_cached` says how many leading tokens its admission found cached.

A request with n > 1 samples is a `SampleGroup` of n sequences. Sample 0 is queued with the
other n - 1 in `forks`; when it is admitted they are forked from it (engine/scheduler.py): they
share its prompt's full KV blocks and take their first token from its prefill logits. After
that each is a sequence of its own (a preempted one is recomputed alone). The group's result
is written once all n have finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..requests import AdapterMix, Request, RequestId
from ..results import TokenLogprob
from ..sampling import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: RequestId
    adapter: str | None
    token_ids: list[int]
    params: SamplingParams
    num_prompt: int = 0
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    slot: int = -1  # adapter slot while running, -1 = base model
    arrival_step: int = 0
    blocked_since: int | None = None  # step at which it first waited for an adapter slot
    admitted_step: int | None = None  # step of its first admission (arrival_step -> this = its wait)
    credits: int = 0  # steps it waited because another adapter was merged (or draining to merge)
    finish_reason: str | None = None
    text: str = ""
    payload: Request | None = None  # the caller's request, handed back with the result
    mix: AdapterMix | None = None  # set when `adapter` names a weighted mix of adapters
    part_slots: list[int] = field(default_factory=list)  # a running mix's slot per adapter, in mix order
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per output token, when params.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token, once its prefill ran
    group: SampleGroup | None = field(default=None, compare=False, repr=False)  # the request's n > 1 samples
    sample_index: int = 0  # which of the n samples this is
    forks: list[Sequence] = field(default_factory=list, compare=False, repr=False)  # samples 1..n-1 until forked
    num_cached: int = 0  # tokens of its last admission found in the prefix cache: the prefill starts after them
    block_digests: list[bytes] = field(default_factory=list, compare=False, repr=False)  # per full block

    def __post_init__(self) -> None:
        if not self.num_prompt:
            self.num_prompt = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapters this sequence needs in slots: a mix's, its one adapter, or none."""
        if self.mix is not None:
            return self.mix.adapters
        return () if self.adapter is None else (self.adapter,)

    @property
    def held_slots(self) -> list[int]:
        """The slots it holds while running: a mix's, its one adapter's, or none (the base model)."""
        return self.part_slots or ([self.slot] if self.slot >= 0 else [])

    def hold(self, slots: list[int]) -> None:
        """Take `slots`, those of `adapters` in order, as the slots it runs with."""
        if slots:
            self.slot = slots[0]
        self.part_slots = slots if self.mix is not None else []

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt


@dataclass
class SampleGroup:
    """The n samples of one request; `finished` fills as they end, the result goes out when full."""

    n: int
    members: list[Sequence] = field(default_factory=list, repr=False)  # in sample order
    finished: dict[int, Sequence] = field(default_factory=dict)  # sample index -> the finished sequence
    failed: bool = False  # one sample failed: the request's error result is out, the others dropped

    @property
    def done(self) -> bool:
        return len(self.finished) == self.n
