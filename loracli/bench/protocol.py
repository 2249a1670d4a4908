"""What the harness hands a worker and what it gets back: plain, JSON-serializable data.

Contract: `Job` is everything one worker needs to run one system on one workload (written as
JSON by the harness, read by `python -m loracli.bench.worker`); `Measurement` is what the
worker reports, with one `Record` per request. Times in a `Record` are seconds from the start
of the timed run: `ttft` when the request's first token exists, `latency` when it is finished.
Nothing here uses torch or a system.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Job:
    """Everything a worker needs to run one system on one workload (JSON-serializable)."""

    system: str
    model: str
    adapters_dir: str | None
    dtype: str  # a torch dtype name, never "auto"
    device: str
    threads: int
    baseline_batch: int
    ignore_eos: bool
    max_lora_rank: int
    pad_id: int
    eos_ids: list[int]
    requests: list[dict]  # BenchRequest fields plus "ids": the prompt token ids
    warmup: int = 4

    def adapters(self) -> list[str]:
        """The adapters the requests name, in order of first use."""
        return list(dict.fromkeys(r["adapter"] for r in self.requests if r["adapter"] is not None))


@dataclass
class Record:
    id: str
    tokens: list[int]
    ttft: float | None
    latency: float
    error: str | None = None
    wait: float | None = None  # seconds from the engine taking the request to its first token (loracli)


@dataclass
class Measurement:
    """What a worker reports for one system: the timed run's records, timings, counters and memory."""

    system: str
    records: list[Record] = field(default_factory=list)
    wall: float = 0.0
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0
    counters: dict = field(default_factory=dict)
    peak_rss_mib: float | None = None
    rss_delta_mib: float | None = None
    error: str | None = None
    skipped: str | None = None
    cpu: dict = field(default_factory=dict)  # cpu_usage.cpu_usage over the timed run: other work, oversubscribed

    @classmethod
    def from_dict(cls, d: dict) -> Measurement:
        return cls(**{**d, "records": [Record(**r) for r in d.get("records", [])]})
