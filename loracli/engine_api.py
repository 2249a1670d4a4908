"""`BatchEngine`: the interface a job drives (`job.run_job`), whatever runs the requests.

A local `engine.Engine` and a `cluster.pool.RayPool` of engine replicas both implement it; the
type checker (mypy, in CI) holds them to it. Plain typing: importing this module imports neither
torch nor Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from .config import EngineConfig
from .errors import InputError
from .requests import Request, RequestId
from .results import Counters, Failure, Result
from .sampling import SamplingParams


class BatchEngine(Protocol):
    config: EngineConfig

    @property
    def model_name(self) -> str: ...  # what results name as their model

    @property
    def base_names(self) -> frozenset[str]: ...  # adapter names that mean the base model

    @property
    def device_name(self) -> str: ...

    @property
    def dtype_name(self) -> str: ...

    def generate(
        self, requests: Iterable[Request | InputError], defaults: SamplingParams | None = None
    ) -> Iterator[Result]:
        """Results as requests finish, reading `requests` lazily (a bounded window ahead)."""
        ...

    def preflight_many(self, reqs: list[Request], defaults: SamplingParams | None = None) -> list[Failure | None]:
        """Why each request would fail before running (a strict job checks the whole input first)."""
        ...

    def stop_admitting(self) -> list[RequestId]:
        """Start no new request; those in flight finish. Returns the ids dropped unstarted."""
        ...

    def abort(self) -> None:
        """Drop every request, started or not (after a failed or forced stop of a job)."""
        ...

    def counters(self) -> Counters: ...

    def reports(self) -> dict:
        """The `slots` and `merges` reports of `--stats` (and `cluster` for a pool)."""
        ...

    def residency(self) -> str:
        """Progress text: adapters resident / slots."""
        ...

    def close(self) -> None: ...
