"""`merged-swap`: plain transformers, each adapter merged into the base weights for its requests.

Contract: the requests are grouped by adapter (groups in order of first use); for each adapter
group `W += scale * B @ A` is computed in float32 from loracli's validated adapter reader
(`load_adapter`, B already scaled), the group's batches run, then the saved `W` is restored
exactly (no drift), even if a batch failed. The merges are inside the timed run and count as
adapter switches. Batching, padding, greedy decoding and timing as `hf.HFSystem`.
"""

from __future__ import annotations

from pathlib import Path

from ..protocol import Job, Record
from .hf import HFSystem
from .interface import Timed


class MergedSwapSystem(HFSystem):
    def __init__(self, job: Job):
        from ...adapters import load_adapter
        from ...model.spec import ModelSpec

        super().__init__(job)
        self.spec = ModelSpec.from_hf_config(self.model.config)
        self.adapters = {
            name: load_adapter(Path(job.adapters_dir) / name, self.spec, dtype=self.dtype) for name in job.adapters()
        }

    def merge(self, name: str) -> dict:
        """Add the adapter's scale * B @ A into the base weights (float32 math); returns the originals."""
        saved = {}
        for (layer, module), (a, b) in self.adapters[name].modules.items():
            weight = self.model.get_submodule(self.spec.module_path(layer, module)).weight
            saved[(layer, module)] = weight.detach().clone()
            weight.data.copy_((weight.float() + b.float() @ a.float()).to(weight.dtype))
        return saved

    def restore(self, saved: dict) -> None:
        for (layer, module), original in saved.items():
            self.model.get_submodule(self.spec.module_path(layer, module)).weight.data.copy_(original)

    def run(self, requests: list[dict]) -> Timed:
        def body(t0: float) -> list[Record]:
            out = []
            for adapter, group in self.grouped(requests):
                saved = {}
                if adapter is not None:
                    self.switches += 1
                    with self.torch.inference_mode():
                        saved = self.merge(adapter)
                try:
                    for batch in self.batches(group):
                        out.extend(self.generate(self.model, batch, t0))
                finally:
                    self.restore(saved)
            return out

        return self.timed(requests, body)
