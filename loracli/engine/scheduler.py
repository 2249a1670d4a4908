"""The scheduler: which sequences run in the next step. Plain Python bookkeeping, no tensors.

Each step is either a prefill step (admit waiting sequences, whole prompts) or a decode step
(one token for every running sequence), as in nano-vllm. Admission, in arrival order:
- a sequence needs KV blocks for all its tokens, a place among `max_num_seqs`, room in the
  `max_batched_tokens` budget (a lone sequence is always allowed), and, when it names an
  adapter, a device slot for it (already resident, free, or evictable: unused by the batch);
- running short of KV blocks or sequence places stops admission (FCFS for memory);
- a sequence whose adapter cannot get a slot is skipped so others can run, until it has waited
  `starvation_steps` steps: then admission stops until it gets in, so it waits at most that
  long plus the time for running sequences to finish;
- an adapter is loaded (via `ensure_adapter`) before any slot is evicted for it; if loading
  fails, every waiting sequence for it fails with that reason.
A decode step that lacks a block for some sequence preempts the most recently admitted running
sequences (their blocks are freed and they wait again, to be recomputed).

While one adapter is merged into the base weights (or the batch drains to merge it), only its
requests are admitted (`only_adapter`); every other waiting request earns a credit per step.
Once unmerged, requests with credits are admitted first, in arrival order (see merge_policy.py
for the bound this gives).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import EngineConfig
from .block_manager import BlockManager
from .sequence import Sequence, Status
from .slots import SlotManager


@dataclass
class Batch:
    seqs: list[Sequence]
    is_prefill: bool
    activations: list[tuple[int, str]] = field(default_factory=list)  # (slot, adapter) to write
    failed: list[tuple[Sequence, str]] = field(default_factory=list)  # adapter load failures


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        blocks: BlockManager,
        slots: SlotManager,
        ensure_adapter: Callable[[str], str | None],
    ):
        self.config = config
        # live batch limits: start at the config's, lowered by `back_off` after running out of memory
        self.max_num_seqs = config.max_num_seqs
        self.max_batched_tokens = config.max_batched_tokens
        self.blocks = blocks
        self.slots = slots
        self.ensure_adapter = ensure_adapter  # name -> None if loaded, else the failure reason
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.step_no = 0
        self.preemptions = 0
        self.kv_blocked = False  # the last admission stopped for want of KV blocks
        self.only_adapter: str | None = None  # set while one adapter is merged or draining to merge
        self.reserve_blocks = 0  # free KV blocks admissions must leave (for slots about to grow)

    def add(self, seq: Sequence) -> None:
        seq.arrival_step = self.step_no
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def pending_adapters(self, window: int) -> set[str]:
        """Adapters of the running sequences and of the next `window` waiting ones (the slot demand)."""
        names = {s.adapter for s in self.running if s.adapter is not None}
        for i, seq in enumerate(self.waiting):
            if i >= window:
                break
            if seq.adapter is not None:
                names.add(seq.adapter)
        return names

    def schedule(self) -> Batch:
        self.step_no += 1
        batch = self._admit()
        if batch.seqs or batch.failed:
            return batch
        return Batch(self._decode_set(), is_prefill=False)

    def _admit(self) -> Batch:
        batch = Batch([], is_prefill=True)
        budget = self.max_batched_tokens
        kept: deque[Sequence] = deque()
        failed_adapters: dict[str, str] = {}
        stop = False
        self.kv_blocked = False
        if self.only_adapter is None and any(s.credits for s in self.waiting):
            # requests held back by a merge go first (stable: FCFS within an adapter is kept)
            self.waiting = deque(sorted(self.waiting, key=lambda s: s.credits == 0))
        while self.waiting:
            seq = self.waiting.popleft()
            if self.only_adapter is not None and seq.adapter != self.only_adapter:
                seq.credits += 1
                kept.append(seq)
                continue
            if stop:
                kept.append(seq)
                continue
            if seq.adapter in failed_adapters:
                batch.failed.append((seq, failed_adapters[seq.adapter]))
                continue
            n = len(seq)
            fits = self.blocks.blocks_for(n) <= self.blocks.num_free - self.reserve_blocks
            if len(self.running) >= self.max_num_seqs or (batch.seqs and n > budget) or not fits:
                self.kv_blocked = not self.blocks.can_allocate(seq)
                kept.append(seq)
                stop = True
                continue
            if seq.adapter is not None and self.slots.lookup(seq.adapter) is None:
                if not self.slots.can_place(seq.adapter):
                    if seq.blocked_since is None:
                        seq.blocked_since = self.step_no
                    kept.append(seq)
                    stop = self.step_no - seq.blocked_since >= self.config.starvation_steps
                    continue
                reason = self.ensure_adapter(seq.adapter)
                if reason is not None:
                    failed_adapters[seq.adapter] = reason
                    batch.failed.append((seq, reason))
                    continue
            self._start(seq, batch)
            budget -= n
        self.waiting = kept
        if failed_adapters:
            remaining: deque[Sequence] = deque()
            for seq in self.waiting:
                if seq.adapter in failed_adapters:
                    batch.failed.append((seq, failed_adapters[seq.adapter]))
                else:
                    remaining.append(seq)
            self.waiting = remaining
        return batch

    def _start(self, seq: Sequence, batch: Batch) -> None:
        if seq.adapter is not None:
            slot, _, write = self.slots.place(seq.adapter, self.step_no)
            if write:
                batch.activations.append((slot, seq.adapter))
            self.slots.acquire(slot, self.step_no)
            seq.slot = slot
        self.blocks.allocate(seq)
        seq.status = Status.RUNNING
        seq.blocked_since = None
        seq.credits = 0
        if seq.admitted_step is None:
            seq.admitted_step = self.step_no
        self.running.append(seq)
        batch.seqs.append(seq)

    def _decode_set(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq)
                scheduled.append(seq)
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and slot; it waits again (first in line) to be recomputed."""
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        self._release_slot(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def back_off(self, batch: Batch) -> None:
        """The step of `batch` ran out of device memory: halve the limit it hit and requeue.

        A prefill halves `max_batched_tokens` and requeues the whole batch; a decode halves
        `max_num_seqs` and preempts the running sequences past the new limit.
        """
        if batch.is_prefill:
            self.max_batched_tokens = max(1, sum(len(s) for s in batch.seqs) // 2)
            victims = list(batch.seqs)
        else:
            self.max_num_seqs = max(1, len(batch.seqs) // 2)
            victims = self.running[self.max_num_seqs :]
        for seq in reversed(victims):
            self.preempt(seq)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        self._release_slot(seq)
        seq.status = Status.FINISHED

    def _release_slot(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self.slots.release(seq.slot)
            seq.slot = -1
