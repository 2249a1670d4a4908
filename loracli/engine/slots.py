"""Adapter slot table: which adapter sits in which device slot. Plain Python, no tensors.

An adapter is *placed* in a slot (the caller then writes its weights there), *acquired* by
each running sequence that uses it and *released* when that sequence leaves the batch. Only
slots with no users and neither pinned nor held can be evicted; among those the least recently used goes
first, and empty slots are taken before any eviction. An adapter mix needs all its adapters in
slots at once: `can_place_all` says whether the missing ones fit without evicting the others, and
`place(name, step, keep)` never evicts an adapter of `keep` (the rest of the mix). Slots count
distinct adapters, never mixes.

`resize(n)` changes the slot count and compacts: the adapters that stay (every slot in use, then
pinned ones, then the most recently used) move to the lowest slots in their old order; the rest
are evicted (counted, and named in the returned `SlotMove`). The caller must move every layer's
buffers by `SlotMove.keep` and every running sequence's slot by `SlotMove.remap` together.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SlotStats:
    activations: int = 0  # adapter weights written into a slot
    evictions: int = 0  # a resident adapter displaced by another
    hits: int = 0  # placement requests already resident


@dataclass(frozen=True)
class SlotMove:
    keep: list[int]  # new slot i takes old slot keep[i]
    remap: dict[int, int]  # old slot -> new slot, for the adapters that stay
    evicted: list[str]


@dataclass
class SlotManager:
    n_slots: int
    pinned: frozenset[str] = frozenset()  # never evicted (the configured pins)

    def __post_init__(self) -> None:
        self.held: set[str] = set()  # not evicted while held (an adapter merged into the base)
        self.adapter_of: list[str | None] = [None] * self.n_slots
        self.users = [0] * self.n_slots
        self.last_used = [0] * self.n_slots
        self.slot_of: dict[str, int] = {}
        self.stats = SlotStats()

    def protected(self, name: str | None) -> bool:
        return name in self.pinned or name in self.held

    def set_held(self, names: frozenset[str]) -> None:
        """Adapters kept in their slots on top of the pins (the one merged into the base weights)."""
        self.held = set(names)

    def lookup(self, name: str) -> int | None:
        return self.slot_of.get(name)

    def _room(self, keep: frozenset[str] = frozenset()) -> list[int]:
        """Slots a new adapter may take: the empty ones first, then the evictable ones (not in `keep`), LRU first."""
        empty = [s for s in range(self.n_slots) if self.adapter_of[s] is None]
        free = [
            s
            for s in range(self.n_slots)
            if self.adapter_of[s] is not None
            and self.users[s] == 0
            and not self.protected(self.adapter_of[s])
            and self.adapter_of[s] not in keep
        ]
        return empty + sorted(free, key=lambda s: self.last_used[s])

    def _victim(self, keep: frozenset[str] = frozenset()) -> int | None:
        room = self._room(keep)
        return room[0] if room else None

    def can_place_all(self, names: tuple[str, ...]) -> bool:
        """Whether every adapter of `names` (a mix) can be resident at once, none evicting another."""
        missing = [n for n in names if n not in self.slot_of]
        return len(missing) <= len(self._room(frozenset(names)))

    def place_all(self, names: tuple[str, ...], step: int) -> list[tuple[int, bool]]:
        """`place` each adapter of `names` (a mix's, or one), none evicting another -> [(slot, whether
        weights must be written)], in order."""
        keep = frozenset(names)
        return [(slot, write) for slot, _, write in (self.place(name, step, keep) for name in names)]

    def place(self, name: str, step: int, keep: frozenset[str] = frozenset()) -> tuple[int, str | None, bool]:
        """Slot for `name` -> (slot, evicted adapter or None, whether weights must be written).

        Adapters in `keep` (the other adapters of a mix) are not evicted for it."""
        if name in self.slot_of:
            self.stats.hits += 1
            slot = self.slot_of[name]
            self.last_used[slot] = step
            return slot, None, False
        victim = self._victim(keep)
        if victim is None:
            raise RuntimeError("no slot available; call can_place_all first")
        slot = victim
        evicted = self.adapter_of[slot]
        if evicted is not None:
            del self.slot_of[evicted]
            self.stats.evictions += 1
        self.adapter_of[slot] = name
        self.slot_of[name] = slot
        self.last_used[slot] = step
        self.stats.activations += 1
        return slot, evicted, True

    def acquire(self, slot: int, step: int) -> None:
        self.users[slot] += 1
        self.last_used[slot] = step

    def release(self, slot: int) -> None:
        if self.users[slot] <= 0:
            raise RuntimeError(f"slot {slot} released more often than acquired")
        self.users[slot] -= 1

    def resident(self) -> list[str]:
        return [a for a in self.adapter_of if a is not None]

    def in_use(self) -> int:
        return sum(1 for u in self.users if u > 0)

    def resize(self, n_slots: int, step: int) -> SlotMove:
        """Compact into `n_slots` slots; raises if the slots in use do not fit."""
        busy = [s for s in range(self.n_slots) if self.users[s] > 0]
        if len(busy) > n_slots:
            raise RuntimeError(f"cannot shrink to {n_slots} slots: {len(busy)} are in use")
        resident = [s for s in range(self.n_slots) if self.adapter_of[s] is not None]
        rank = sorted(
            resident, key=lambda s: (self.users[s] == 0, not self.protected(self.adapter_of[s]), -self.last_used[s])
        )
        keep = sorted(rank[:n_slots])
        evicted = [a for a in (self.adapter_of[s] for s in rank[n_slots:]) if a is not None]
        old = (self.adapter_of, self.users, self.last_used)
        self.n_slots = n_slots
        self.adapter_of = [old[0][s] for s in keep] + [None] * (n_slots - len(keep))
        self.users = [old[1][s] for s in keep] + [0] * (n_slots - len(keep))
        self.last_used = [old[2][s] for s in keep] + [step] * (n_slots - len(keep))
        self.slot_of = {a: i for i, a in enumerate(self.adapter_of) if a is not None}
        self.stats.evictions += len(evicted)
        return SlotMove(keep, {s: i for i, s in enumerate(keep)}, evicted)
