"""`Sequence`: one request's tokens and bookkeeping as it moves through the engine.

Plain Python: no tensors. `token_ids` holds prompt + generated tokens; after a preemption the
whole of it is recomputed by the next prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..requests import Request, RequestId
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

    def __post_init__(self) -> None:
        if not self.num_prompt:
            self.num_prompt = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt
