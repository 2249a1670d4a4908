"""`ClusterOptions`: how `loracli run --ray` spreads a job over engine replicas. Plain data,
validated in `__post_init__` (errors name the fields); importing it does not import Ray or torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

ROUTING_POLICIES = ("affinity", "round-robin")


@dataclass
class ClusterOptions:
    address: str | None = None  # None: start a local Ray instance
    workers: int = 2
    worker_cpus: float = 1.0
    worker_gpus: float | None = None  # None: 1 when the cluster has GPUs and --device is not cpu
    routing: str = "affinity"
    ship_adapters: bool = False  # send adapter files through the object store: no shared folder needed

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers must be a positive integer, got {self.workers!r}", fields=("workers",))
        if not self.worker_cpus > 0:
            raise ConfigError(f"worker_cpus must be positive, got {self.worker_cpus!r}", fields=("worker_cpus",))
        if self.worker_gpus is not None and self.worker_gpus < 0:
            raise ConfigError(f"worker_gpus must be >= 0, got {self.worker_gpus!r}", fields=("worker_gpus",))
        if self.routing not in ROUTING_POLICIES:
            raise ConfigError(
                f"routing must be one of {', '.join(ROUTING_POLICIES)}, got {self.routing!r}", fields=("routing",)
            )
