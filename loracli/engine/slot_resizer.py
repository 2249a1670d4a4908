"""Carrying out slot resizes between engine steps, and what `--stats` reports about slots.

`SlotResizer.between_steps(step)` asks the `SlotPolicy` (when dynamic slots are on) and applies
its decision in this order, all before the next step is scheduled, so no step ever sees a
half-resized engine:

1. slot table compaction (`SlotManager.resize`): survivors move to the lowest slots;
2. every LoRA layer's A/B buffers reallocated at the new count, survivors copied by the same
   `keep` list, and every running sequence's slot renumbered by the same `remap`;
3. under a memory budget, the KV cache reallocated at `MemoryBudget.kv_blocks(new slots)`
   blocks; when it shrinks, the blocks of running sequences past the new end are moved below it
   (`BlockManager.resize`, then `CausalLM.resize_kv` copies the rows the same way);
4. on CPU, `malloc_trim(0)` so the freed buffers leave the process, not just the allocator;
5. with `verify_slots`, every resident adapter's weights are checked in every layer.

When demand exceeds the slots but the free KV blocks cannot pay for one more slot, admissions
are told to leave that many blocks free (`Scheduler.reserve_blocks`) while sequences run, so the
blocks released by finishing sequences accumulate and the slots can grow a few steps later.

The timeline (step, from, to, reason), slot-write latencies and the memory split after each
resize are kept for `report()`.
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..quantiles import percentile
from .memory_budget import MemoryBudget
from .slot_policy import KvView, SlotPolicy

log = logging.getLogger("loracli")


@dataclass
class SlotTimeline:
    resizes: list[dict] = field(default_factory=list)  # {step, from, to, reason, seconds}
    memory: list[dict] = field(default_factory=list)  # {step, slots, kv_blocks, slot_bytes, kv_bytes}
    write_seconds: list[float] = field(default_factory=list)  # one adapter written into a slot


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class SlotResizer:
    def __init__(self, engine, policy: SlotPolicy | None, budget: MemoryBudget | None):
        self.engine = engine
        self.policy = policy
        self.budget = budget
        self.timeline = SlotTimeline()
        self._frozen_logged = False
        self._sample(0)

    # --- decisions ---------------------------------------------------------------------------------

    def kv_view(self) -> KvView:
        e = self.engine
        per_slot = self.budget.blocks_per_slot if self.budget else 0
        return KvView(
            total=e.blocks.num_blocks,
            free=e.blocks.num_free,
            blocks_per_slot=per_slot,
            blocked=e.scheduler.kv_blocked,
            traded=self.budget is not None,
        )

    def between_steps(self, step: int) -> None:
        if self.policy is None:
            return
        e = self.engine
        demand = len(e.scheduler.pending_adapters(e.config.max_num_seqs))
        choice = self.policy.decide(step, e.slots.n_slots, demand, e.slots.in_use(), self.kv_view())
        if self.policy.frozen and not self._frozen_logged:
            log.warning("adapter slots: %s", self.policy.frozen)
            self._frozen_logged = True
        if choice is not None:
            self.resize(choice.to, choice.reason, step)
        e.scheduler.reserve_blocks = self._reserve(demand)

    def _reserve(self, demand: int) -> int:
        """Free KV blocks admissions must leave so that one more slot can be paid for soon.

        Only while sequences run (their blocks come back as they finish) and only when the grow
        is affordable at all: with nothing running, holding blocks back could wait forever.
        """
        e = self.engine
        if self.budget is None or self.policy.frozen or not e.scheduler.running:
            return 0
        if not demand > e.slots.n_slots < e.config.max_loras:
            return 0
        need = self.budget.blocks_per_slot + int(self.policy.low_watermark * e.blocks.num_blocks)
        return need if need <= e.blocks.num_blocks else 0

    # --- mechanics ---------------------------------------------------------------------------------

    def resize(self, n_slots: int, reason: str, step: int) -> None:
        e = self.engine
        t0 = time.perf_counter()
        before = e.slots.n_slots
        move = e.slots.resize(n_slots, step)
        e.model.resize_slots(n_slots, move.keep)
        for seq in e.scheduler.running:
            if seq.slot >= 0:
                seq.slot = move.remap[seq.slot]
        if self.budget is not None:
            blocks = self.budget.kv_blocks(n_slots)
            moves = e.blocks.resize(blocks, e.scheduler.running)
            e.model.resize_kv(blocks * e.blocks.block_size, moves, e.blocks.block_size)
        if e.device.type == "cpu":
            release_freed_memory()
        if e.config.verify_slots:
            self.verify()
        seconds = time.perf_counter() - t0
        self.timeline.resizes.append(
            {
                "step": step,
                "from": before,
                "to": n_slots,
                "reason": reason,
                "evicted": move.evicted,
                "seconds": round(seconds, 6),
            }
        )
        self._sample(step)
        log.info("adapter slots %d -> %d at step %d: %s", before, n_slots, step, reason)

    def verify(self) -> None:
        """Raise RuntimeError unless every resident adapter's weights sit in its slot in every layer."""
        e = self.engine
        for name in e.slots.resident():
            slot = e.slots.lookup(name)
            weights = e.store.get(name, count_hit=False)
            for layer, lin in e.model.linears():
                for j, module in enumerate(lin.names):
                    ab = weights.modules.get((layer, module))
                    r = 0 if ab is None else ab[0].shape[0]
                    ok = lin.ranks[j][slot] == r and not lin.A[j][slot, r:].any() and not lin.B[j][slot, :, r:].any()
                    if ok and r:
                        ok = torch.equal(lin.A[j][slot, :r], ab[0].to(lin.A[j].dtype)) and torch.equal(
                            lin.B[j][slot, :, :r], ab[1].to(lin.B[j].dtype)
                        )
                    if not ok:
                        raise RuntimeError(
                            f"--verify-slots: adapter {name!r} in slot {slot}, layer {layer} "
                            f"{module}: the slot does not hold its weights"
                        )

    # --- reporting ---------------------------------------------------------------------------------

    def _sample(self, step: int) -> None:
        e = self.engine
        self.timeline.memory.append(
            {
                "step": step,
                "slots": e.slots.n_slots,
                "kv_blocks": e.blocks.num_blocks,
                "slot_bytes": e.slots.n_slots * e.model.slot_bytes(),
                "kv_bytes": e.model.kv_bytes(),
            }
        )

    def report(self) -> dict:
        e, tl = self.engine, self.timeline
        writes_ms = [1e3 * s for s in tl.write_seconds]
        p50, p99 = percentile(writes_ms, 50), percentile(writes_ms, 99)
        return {
            "slots": e.slots.n_slots,
            "min_loras": e.config.min_loras,
            "max_loras": e.config.max_loras,
            "dynamic": bool(self.policy),
            "frozen": self.policy.frozen if self.policy else None,
            "memory_budget": self.budget.budget if self.budget else None,
            "timeline": tl.resizes,
            "memory": tl.memory,
            "disk_loads": e.store.stats.disk_loads,
            "cpu_hits": e.store.stats.cpu_hits,
            "cpu_evictions": e.store.stats.cpu_evictions,
            "slot_activations": e.slots.stats.activations,
            "slot_hits": e.slots.stats.hits,
            "slot_evictions": e.slots.stats.evictions,
            "swap_ms_p50": None if p50 is None else round(p50, 3),
            "swap_ms_p99": None if p99 is None else round(p99, 3),
            "swap_ms_mean": round(statistics.fmean(writes_ms), 3) if writes_ms else None,
        }
