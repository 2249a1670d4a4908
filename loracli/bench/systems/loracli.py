"""`loracli` and `base`: the loracli engine in this process.

Contract: `LoracliSystem(job, spec)` builds an `Engine` with the job's model, adapters folder,
dtype and device, the spec's `EngineConfig` overrides, and `max_lora_rank` raised to the job's
(the workload's largest rank) unless the spec sets it. `base` is the same engine with every
request's adapter removed (the LoRA overhead reference). Requests are greedy, with the job's
ignore-eos; the bench's prompt token ids must be what the engine tokenizes, or the run fails.
`counters` are the engine's (steps, slots, adapter loads, preemptions, resizes, merges, prefix-cache
blocks looked up and hit, tokens asked to prefill and found cached), as the
difference over each run. `load` is the hook `loracli-ray` overrides to build a pool instead.
"""

from __future__ import annotations

import time

from ...config import EngineConfig
from ..protocol import Job, Record
from ..system_names import SystemSpec
from .interface import System, Timed


class LoracliSystem(System):
    def __init__(self, job: Job, spec: SystemSpec):
        overrides = dict(spec.overrides)
        overrides.setdefault("max_lora_rank", job.max_lora_rank)
        self.strip = spec.kind == "base"
        self.ignore_eos = job.ignore_eos
        config = EngineConfig(
            model=job.model, adapters_dir=job.adapters_dir, dtype=job.dtype, device=job.device, **overrides
        )
        self.engine = self.load(config, spec)

    def load(self, config: EngineConfig, spec: SystemSpec):
        from ...engine.engine import Engine

        return Engine(config)

    def _requests(self, requests: list[dict]):
        from ...requests import AdapterMix, Request

        out = []
        for r in requests:
            mix = r.get("mix")
            req = Request(
                r["id"],
                None if self.strip else r["adapter"],
                r["prompt"],
                r["messages"],
                {
                    "max_tokens": r["max_tokens"],
                    "ignore_eos": self.ignore_eos,
                    "temperature": 0.0,
                    **(r.get("structure") or {}),
                },
                mix=None if self.strip or not mix else AdapterMix(tuple((name, float(w)) for name, w in mix)),
            )
            if hasattr(self.engine, "tokenize") and self.engine.tokenize(req) != r["ids"]:
                raise RuntimeError(f"request {r['id']}: the engine tokenizes the prompt differently from the bench")
            out.append(req)
        return out

    def counters(self) -> dict:
        e = self.engine
        c = e.counters()
        return {
            "steps": c.steps,
            "prefill_steps": c.prefill_steps,
            "mixed_steps": c.mixed_steps,
            "slot_activations": c.slot_activations,
            "slot_evictions": c.slot_evictions,
            "slot_hits": e.slots.stats.hits,
            "disk_loads": c.disk_loads,
            "cpu_evictions": e.store.stats.cpu_evictions,
            "preemptions": c.preemptions,
            "oom_backoffs": c.oom_backoffs,
            "slot_resizes": len(e.resizer.timeline.resizes),
            "slots": e.slots.n_slots,
            "merges": e.merger.report()["merges"],
            "prefill_tokens": c.prefill_tokens,
            "prefix_lookup_blocks": c.prefix_lookup_blocks,
            "prefix_hit_blocks": c.prefix_hit_blocks,
            "prefix_saved_tokens": c.prefix_saved_tokens,
        }

    def run(self, requests: list[dict]) -> Timed:
        reqs = self._requests(requests)
        before = self.counters()
        t0 = time.perf_counter()
        records = []
        for res in self.engine.generate(reqs):
            error = f"{res.error[0]}: {res.error[1]}" if res.error else None
            ttft = res.first_token - t0 if res.first_token is not None else None
            wait = res.first_token - res.arrival if res.first_token is not None else None
            records.append(Record(res.id, list(res.token_ids), ttft, res.finished - t0, error, wait))
        wall = time.perf_counter() - t0
        after = self.counters()
        return Timed(records, wall, {k: after[k] - before[k] for k in after})
