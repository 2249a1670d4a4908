"""When to resize the adapter slots: a plain-Python policy, consulted between engine steps.

`SlotPolicy.decide(step, slots, demand, in_use, kv)` returns a `Resize(to, reason)` or None.

- demand = distinct adapters among the running sequences and the next requests the scheduler
  would admit (the engine computes it); in_use = slots held by running sequences.
- Grow when demand > slots and slots < max: to min(max, demand), but when slots and KV share a
  memory budget (`kv.traded`), only as many slots as the *free* KV blocks pay for while keeping
  `low_watermark` of the KV blocks free (never memory of running sequences).
- Shrink only when slots and KV share a budget, demand has stayed below the slot count for
  `cooldown` consecutive steps, and the memory is worth more to the KV cache: KV usage above
  `high_watermark`, or requests waiting on KV blocks. To max(min, demand, in_use).
- Hysteresis: a grow needs demand strictly above the slot count and a shrink needs a whole
  cooldown below it plus memory pressure, so a steady mix resizes at most once (to fit it) and
  then never again.
- Oscillation guard: a resize that would make more than `max_resizes` within `window` steps
  freezes the slot count instead; `frozen` says why (the engine logs it once).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KvView:
    """What the policy needs to know of the KV cache, in blocks."""

    total: int
    free: int
    blocks_per_slot: int  # KV blocks one adapter slot's memory is worth under the budget
    blocked: bool = False  # requests wait because the KV cache is full
    traded: bool = False  # slots and KV share one memory budget

    @property
    def usage(self) -> float:
        return 1.0 - self.free / self.total if self.total else 1.0


@dataclass(frozen=True)
class Resize:
    to: int
    reason: str


@dataclass
class SlotPolicy:
    min_slots: int
    max_slots: int
    cooldown: int = 32
    window: int = 256
    max_resizes: int = 8
    low_watermark: float = 0.10  # fraction of KV blocks a grow must leave free
    high_watermark: float = 0.90  # KV usage above which a shrink is worth it
    below_since: int | None = None
    history: deque = field(default_factory=deque)  # steps of recent resizes
    frozen: str | None = None

    def decide(self, step: int, slots: int, demand: int, in_use: int, kv: KvView) -> Resize | None:
        if self.frozen is not None:
            return None
        if demand >= slots:
            self.below_since = None
        elif self.below_since is None:
            self.below_since = step
        choice = self._grow(slots, demand, kv) if demand > slots else self._shrink(step, slots, demand, in_use, kv)
        if choice is None:
            return None
        while self.history and self.history[0] <= step - self.window:
            self.history.popleft()
        if len(self.history) >= self.max_resizes:
            self.frozen = f"{len(self.history)} resizes within {self.window} steps: slot count frozen at {slots}"
            return None
        self.history.append(step)
        self.below_since = None
        return choice

    def _grow(self, slots: int, demand: int, kv: KvView) -> Resize | None:
        if slots >= self.max_slots:
            return None
        target = min(self.max_slots, demand)
        if kv.traded:
            spare = kv.free - int(self.low_watermark * kv.total)
            target = min(target, slots + max(0, spare) // max(1, kv.blocks_per_slot))
        if target <= slots:
            return None
        return Resize(target, f"demand {demand} > {slots} slots")

    def _shrink(self, step: int, slots: int, demand: int, in_use: int, kv: KvView) -> Resize | None:
        if not kv.traded or self.below_since is None or step - self.below_since < self.cooldown:
            return None
        if not (kv.blocked or kv.usage > self.high_watermark):
            return None
        target = max(self.min_slots, demand, in_use)
        if target >= slots:
            return None
        why = "requests wait for KV blocks" if kv.blocked else f"KV {kv.usage:.0%} used"
        return Resize(target, f"demand {demand} < {slots} slots for {step - self.below_since} steps; {why}")
