"""`peft-mixed` and `peft-grouped`: transformers + PEFT, every adapter of the job in one `PeftModel`.

Contract: `peft-mixed` runs static batches of `baseline_batch` requests in arrival order with
`generate(..., adapter_names=[...])` (base-model requests use `BASE_ADAPTER`); `peft-grouped`
groups the requests by adapter (groups in order of first use), `set_adapter(name)` then the
group's batches, base-model requests under `disable_adapter()`, and counts one adapter switch
per group. PEFT's adapter names are the adapters' folder names. Batching, padding, greedy
decoding and timing as `hf.HFSystem`.
"""

from __future__ import annotations

from pathlib import Path

from ..protocol import Job, Record
from .hf import HFSystem
from .interface import Timed

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def load_peft(model, adapters_dir: str, names: list[str], dtype):
    """One PeftModel holding every named adapter (PEFT adapter names are the folder names), cast to dtype."""
    from peft import PeftModel

    if not names:
        return model
    peft_model = PeftModel.from_pretrained(model, str(Path(adapters_dir) / names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(Path(adapters_dir) / name), adapter_name=name)
    return peft_model.to(dtype).eval()


class PeftMixedSystem(HFSystem):
    def __init__(self, job: Job):
        super().__init__(job)
        self.names = job.adapters()
        self.peft = load_peft(self.model, job.adapters_dir, self.names, self.dtype)

    def run(self, requests: list[dict]) -> Timed:
        def body(t0: float) -> list[Record]:
            out = []
            for batch in self.batches(requests):
                kwargs = {}
                if self.names:
                    kwargs["adapter_names"] = [r["adapter"] or BASE_ADAPTER for r in batch]
                out.extend(self.generate(self.peft, batch, t0, **kwargs))
            return out

        return self.timed(requests, body)


class PeftGroupedSystem(PeftMixedSystem):
    def run(self, requests: list[dict]) -> Timed:
        def body(t0: float) -> list[Record]:
            out = []
            for adapter, group in self.grouped(requests):
                self.switches += 1
                for batch in self.batches(group):
                    if adapter is None and self.names:
                        with self.peft.disable_adapter():
                            out.extend(self.generate(self.peft, batch, t0))
                        continue
                    if adapter is not None:
                        self.peft.set_adapter(adapter)
                    out.extend(self.generate(self.peft, batch, t0))
            return out

        return self.timed(requests, body)
