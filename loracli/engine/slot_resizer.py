"""Carrying out slot resizes between engine steps, and what `--stats` reports about them.

The resizer is given the parts it resizes (slot table, block manager, model) and nothing else;
the engine hands it, each step, the slot demand, the running sequences and whether admission
was blocked on KV blocks, and applies the reserve it returns to the scheduler.

`SlotResizer.between_steps(step, demand, running, kv_blocked)` asks the `SlotPolicy` (when
dynamic slots are on) and applies its decision in this order, all before the next step is
scheduled, so no step ever sees a half-resized engine:

1. slot table compaction (`SlotManager.resize`): survivors move to the lowest slots;
2. every LoRA layer's A/B buffers reallocated at the new count, survivors copied by the same
   `keep` list, and every running sequence's slot renumbered by the same `remap`;
3. under a memory budget, the KV cache reallocated at `MemoryBudget.kv_blocks(new slots)`
   blocks; when it shrinks, the blocks of running sequences past the new end are moved below it
   (`BlockManager.resize`, then `CausalLM.resize_kv` copies the rows the same way);
4. on CPU, `malloc_trim(0)` so the freed buffers leave the process, not just the allocator;
5. with `verify_slots`, every resident adapter's weights are checked in every layer.

When demand exceeds the slots but the free KV blocks cannot pay for one more slot, admissions
must leave that many blocks free (the returned reserve, for `Scheduler.reserve_blocks`) while
sequences run, so the blocks released by finishing sequences accumulate and the slots can grow
a few steps later.

The timeline (step, from, to, reason) and the memory split after each resize are kept for
`report()`.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..adapters import LoraWeights
from ..model.llama import CausalLM
from .block_manager import BlockManager
from .memory_budget import MemoryBudget
from .sequence import Sequence
from .slot_policy import KvView, SlotPolicy
from .slots import SlotManager

log = logging.getLogger("loracli")


@dataclass
class SlotTimeline:
    resizes: list[dict] = field(default_factory=list)  # {step, from, to, reason, seconds}
    memory: list[dict] = field(default_factory=list)  # {step, slots, kv_blocks, slot_bytes, vocab_bytes, kv_bytes}


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class SlotResizer:
    def __init__(
        self,
        policy: SlotPolicy | None,
        budget: MemoryBudget | None,
        slots: SlotManager,
        blocks: BlockManager,
        model: CausalLM,
        *,
        min_loras: int,
        max_loras: int,
        weights_of: Callable[[str], LoraWeights],
        verify: bool = False,
    ):
        self.policy = policy
        self.budget = budget
        self.slots = slots
        self.blocks = blocks
        self.model = model
        self.min_loras = min_loras
        self.max_loras = max_loras
        self.weights_of = weights_of  # adapter name -> its CPU weights (for `verify`)
        self.verify_each_resize = verify
        self.timeline = SlotTimeline()
        self._frozen_logged = False
        self._sample(0)

    # --- decisions ---------------------------------------------------------------------------------

    def kv_view(self, kv_blocked: bool) -> KvView:
        per_slot = self.budget.blocks_per_slot if self.budget else 0
        return KvView(
            total=self.blocks.num_blocks,
            free=self.blocks.num_free,
            blocks_per_slot=per_slot,
            blocked=kv_blocked,
            traded=self.budget is not None,
        )

    def between_steps(self, step: int, demand: int, running: list[Sequence], kv_blocked: bool) -> int:
        """Resize if the policy says so; returns the KV blocks admissions must leave free.

        `demand`: adapters the running and next waiting sequences need; `running`: the running
        sequences (their slots are renumbered by a resize); `kv_blocked`: the last admission
        stopped for want of KV blocks.
        """
        if self.policy is None:
            return 0
        choice = self.policy.decide(step, self.slots.n_slots, demand, self.slots.in_use(), self.kv_view(kv_blocked))
        if self.policy.frozen and not self._frozen_logged:
            log.warning("adapter slots: %s", self.policy.frozen)
            self._frozen_logged = True
        if choice is not None:
            self.resize(choice.to, choice.reason, step, running)
        return self._reserve(demand, bool(running))

    def _reserve(self, demand: int, any_running: bool) -> int:
        """Free KV blocks admissions must leave so that one more slot can be paid for soon.

        Only while sequences run (their blocks come back as they finish) and only when the grow
        is affordable at all: with nothing running, holding blocks back could wait forever.
        """
        if self.budget is None or self.policy is None or self.policy.frozen or not any_running:
            return 0
        if not demand > self.slots.n_slots < self.max_loras:
            return 0
        need = self.budget.blocks_per_slot + int(self.policy.low_watermark * self.blocks.num_blocks)
        return need if need <= self.blocks.num_blocks else 0

    # --- mechanics ---------------------------------------------------------------------------------

    def resize(self, n_slots: int, reason: str, step: int, running: Iterable[Sequence] = ()) -> None:
        """Resize to `n_slots` now, renumbering the slots of `running` and moving their KV blocks."""
        running = list(running)
        t0 = time.perf_counter()
        before = self.slots.n_slots
        move = self.slots.resize(n_slots, step)
        self.model.resize_slots(n_slots, move.keep)
        for seq in running:
            if seq.slot >= 0:
                seq.slot = move.remap[seq.slot]
            seq.part_slots = [move.remap[slot] for slot in seq.part_slots]
        if self.budget is not None:
            blocks = self.budget.kv_blocks(n_slots)
            moves = self.blocks.resize(blocks, running)
            self.model.resize_kv(blocks * self.blocks.block_size, moves, self.blocks.block_size)
        if self.model.device.type == "cpu":
            release_freed_memory()
        if self.verify_each_resize:
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
        for name in self.slots.resident():
            slot = self.slots.slot_of[name]
            weights = self.weights_of(name)
            for layer, lin in self.model.linears():
                for j, module in enumerate(lin.names):
                    ab = weights.modules.get((layer, module))
                    r = 0 if ab is None else ab[0].shape[0]
                    a, b = lin.slot_rows(j, slot)
                    ok = lin.ranks[j][slot] == r and not a[r:].any() and not b[:, r:].any()
                    if ok and ab is not None:
                        ok = torch.equal(a[:r], ab[0].to(a.dtype)) and torch.equal(b[:, :r], ab[1].to(b.dtype))
                    if not ok:
                        raise RuntimeError(
                            f"verify_slots: adapter {name!r} in slot {slot}, layer {layer} "
                            f"{module}: the slot does not hold its weights"
                        )

    # --- reporting ---------------------------------------------------------------------------------

    def _sample(self, step: int) -> None:
        self.timeline.memory.append(
            {
                "step": step,
                "slots": self.slots.n_slots,
                "kv_blocks": self.blocks.num_blocks,
                "slot_bytes": self.slots.n_slots * self.model.slot_bytes(),
                "vocab_bytes": self.model.vocab.nbytes(),  # the resident adapters' embedding / lm_head parts
                "kv_bytes": self.model.kv_bytes(),
            }
        )

    def report(self) -> dict:
        tl = self.timeline
        return {
            "slots": self.slots.n_slots,
            "min_loras": self.min_loras,
            "max_loras": self.max_loras,
            "dynamic": bool(self.policy),
            "frozen": self.policy.frozen if self.policy else None,
            "memory_budget": self.budget.budget if self.budget else None,
            "timeline": tl.resizes,
            "memory": tl.memory,
        }
