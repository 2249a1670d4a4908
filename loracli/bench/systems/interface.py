"""What every system under test implements: `System`, and the `Timed` result of one run.

Contract: a system is built from a `Job` (and its `SystemSpec`) by the registry in
`loracli.bench.systems`; building it loads the model (the worker times that as loading).
`run(requests)` generates every request of the list (dicts of `Job.requests`) and returns a
`Timed`: one `Record` per request, the wall time and the system's counters for that run; it is
called once to warm up, then once timed. Every system gets the same token ids, dtype, device and
thread count. Times in a `Record` are seconds from the start of the timed run (`ttft`: the
request's first token exists; `latency`: it is finished). `close()` releases what would outlive
the process otherwise. Heavy imports (torch models, transformers, peft, vllm, Ray) happen
inside the systems' methods only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol import Record


@dataclass
class Timed:
    """What a system's timed run produced: one record per request and its counters."""

    records: list[Record]
    wall: float
    counters: dict = field(default_factory=dict)


class System:
    """One loaded system: `run(requests)` generates them all and times it (call once to warm up)."""

    def run(self, requests: list[dict]) -> Timed:
        raise NotImplementedError

    def elsewhere_rss_mib(self) -> float:
        """Peak memory of processes other than this one the system ran in (Ray workers)."""
        return 0.0

    def close(self) -> None:
        """Release what outlives this process otherwise (Ray workers and their files)."""
