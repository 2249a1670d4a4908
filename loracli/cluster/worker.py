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
- With `shipped_names` (`--ship-adapters`) the worker reads no shared folder: it loads adapters
  from a local `shipping.AdapterInbox` that `work(..., adapters=...)` fills with the object-store
  references the driver sends before the requests that need them.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field, replace

import torch

from ..config import EngineConfig
from ..engine.engine import Engine
from ..requests import Request, RequestId
from ..results import Counters, Failure, Result
from ..sampling import SamplingParams
from .shipping import AdapterInbox


@dataclass
class Reply:
    results: list[Result]
    counters: Counters
    holds: list[str]  # adapters in a device slot or the CPU cache
    residency: str  # adapters in slots / slots
    dropped: list[RequestId] = field(default_factory=list)  # ids dropped by stop=True
    peak_rss_mib: float = 0.0  # the worker process's resident-memory high-water mark


class WorkerStartError(Exception):
    """The engine could not start on a worker (the message names the driver's adapters folder)."""


class EngineWorker:
    def __init__(
        self,
        config: EngineConfig,
        threads: int | None = None,
        shipped_names: list[str] | None = None,
        adapters: dict | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.inbox: AdapterInbox | None = None
        if shipped_names is None:
            self.engine = Engine(config)
            return
        inbox = self.inbox = AdapterInbox(shipped_names, shown_as=config.adapters_dir or "")
        try:
            self._receive(adapters)  # the pinned adapters: the engine loads them at start
            self.engine = Engine(replace(config, adapters_dir=str(inbox.folder)))
        except Exception as e:
            inbox.close()
            raise WorkerStartError(inbox.shown(f"{type(e).__name__}: {e}")) from None

    def _receive(self, adapters: dict | None) -> None:
        if adapters and self.inbox is not None:
            import ray

            self.inbox.receive(dict(zip(adapters, ray.get(list(adapters.values())), strict=True)))

    def describe(self) -> dict:
        e = self.engine
        return {
            "model_name": e.model_name,
            "base_names": sorted(e.base_names),
            "device": e.device_name,
            "dtype": e.dtype_name,
            "max_model_len": e.max_model_len,
            "adapters_folder": e.store.catalog.where or None,
        }

    def preflight_many(self, reqs: list[Request], defaults: SamplingParams | None = None) -> list[Failure | None]:
        return self.engine.preflight_many(reqs, defaults)

    def work(
        self,
        new: list[Request],
        defaults: SamplingParams,
        stop: bool = False,
        adapters: dict | None = None,
        min_seconds: float = 0.1,
        max_seconds: float = 2.0,
    ) -> Reply:
        e = self.engine
        self._receive(adapters)
        dropped = e.stop_admitting() if stop else []
        out = [r for r in (e.add_request(req, defaults) for req in new) if r is not None]
        t0 = time.perf_counter()
        while e.has_work():
            out += e.step()
            elapsed = time.perf_counter() - t0
            if (out and elapsed >= min_seconds) or elapsed >= max_seconds:
                break
        holds = sorted(set(e.slots.resident()) | e.store.cached_names())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return Reply([self._shown(r) for r in out], e.counters(), holds, e.residency(), dropped, peak)

    def _shown(self, r: Result) -> Result:
        """The result as sent back: without its request, errors naming the driver's adapters folder."""
        error = r.error
        if error is not None and self.inbox is not None:
            error = error._replace(message=self.inbox.shown(error.message))
        return replace(r, request=None, error=error)

    def reports(self) -> dict:
        return self.engine.reports()

    def close(self) -> None:
        self.engine.close()
        if self.inbox is not None:
            self.inbox.close()
