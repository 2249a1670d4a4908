"""`EngineWorker`: one engine replica, run as a Ray actor by `pool.py` (which wraps it with
`ray.remote`, so this module imports without Ray).

Contract:
- The worker loads the base model once (`Engine`) and reads adapters itself from the config's
  adapters folder: a path every node must see (a shared filesystem). Nothing but requests and
  results crosses the wire.
- It keeps its engine between calls. `work(new, defaults)` queues `new`, then runs engine steps
  until some requests finished and `min_seconds` passed, `max_seconds` passed, or nothing is
  left, and returns a `Reply`: the finished results without their `request` (the driver holds
  it), the engine's counters and what the worker holds (adapters in slots or its CPU cache).
- `work(..., stop=True)` first drops the requests not yet started (`Reply.dropped`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from ..config import EngineConfig
from ..engine.engine import Counters, Engine, Result
from ..engine.sequence import SamplingParams
from ..requests import Request


@dataclass
class Reply:
    results: list[Result]
    counters: Counters
    holds: list[str]  # adapters in a device slot or the CPU cache
    residency: str  # adapters in slots / slots
    dropped: list[str] = field(default_factory=list)  # ids dropped by stop=True


class EngineWorker:
    def __init__(self, config: EngineConfig, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.engine = Engine(config)

    def describe(self) -> dict:
        e = self.engine
        return {"model_name": e.model_name, "base_names": sorted(e.base_names), "device": str(e.device),
                "dtype": str(e.dtype).replace("torch.", ""), "max_model_len": e.max_model_len}

    def preflight_many(self, reqs: list[Request]) -> list[str | None]:
        return self.engine.preflight_many(reqs)

    def work(self, new: list[Request], defaults: SamplingParams, stop: bool = False,
             min_seconds: float = 0.1, max_seconds: float = 2.0) -> Reply:
        e = self.engine
        dropped = e.stop_admitting() if stop else []
        out = [r for r in (e.add_request(req, defaults) for req in new) if r is not None]
        t0 = time.perf_counter()
        while e.has_work():
            out += e.step()
            elapsed = time.perf_counter() - t0
            if (out and elapsed >= min_seconds) or elapsed >= max_seconds:
                break
        holds = sorted(set(e.slots.resident()) | set(e.store.cache))
        return Reply([replace(r, request=None) for r in out], e.counters(), holds, e.residency(), dropped)

    def reports(self) -> dict:
        return self.engine.reports()
