"""`loracli-ray`: the loracli engine as `loracli run --ray` replicas on a local Ray instance.

Contract: `LoracliRaySystem(job, spec)` builds the same `EngineConfig` as `loracli` and hands it
to a `RayPool` with the spec's `ClusterOptions` settings; requests and records as `loracli`.
`counters` are summed over the workers (`RayPool.counters()`) plus the pool's traffic (resent
and stolen requests, bytes of requests, results and adapters). The workers' peak memory counts
as the system's (`elsewhere_rss_mib`); `close()` closes the pool (the workers remove their
adapter copies, a Ray instance the pool started is shut down).
"""

from __future__ import annotations

from ...config import EngineConfig
from ..system_names import SystemSpec
from .loracli import LoracliSystem


class LoracliRaySystem(LoracliSystem):
    def load(self, config: EngineConfig, spec: SystemSpec):
        from ...cluster.options import ClusterOptions
        from ...cluster.pool import RayPool

        return RayPool(config, ClusterOptions(**dict(spec.cluster)))

    def counters(self) -> dict:
        c, rep = self.engine.counters(), self.engine.cluster_report()
        return {
            "steps": c.steps,
            "slot_activations": c.slot_activations,
            "slot_evictions": c.slot_evictions,
            "disk_loads": c.disk_loads,
            "preemptions": c.preemptions,
            "resent": rep["resent"],
            "stolen": rep["stolen"],
            "request_bytes": rep["request_bytes_sent"],
            "result_bytes": rep["result_bytes_received"],
            "adapter_bytes": rep["adapter_bytes_read"],
            "shipped_bytes": rep["adapter_bytes_shipped"],
        }

    def elsewhere_rss_mib(self) -> float:
        return sum(w["peak_rss_mib"] or 0.0 for w in self.engine.cluster_report()["per_worker"])

    def close(self) -> None:
        self.engine.close()
