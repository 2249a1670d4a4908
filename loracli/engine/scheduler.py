"""The scheduler: which sequences run in the next step. Plain Python bookkeeping, no tensors.

A step admits waiting sequences (whole prompts: a prefill) and runs one token for every running
sequence (a decode), in one forward (`mixed_prefill`, vLLM V1's mixed batch without splitting a
prompt): the running sequences get their next KV block first (`Batch.decode`), then waiting ones
are admitted into what is left of the `max_batched_tokens` budget. So a place freed by a finished
sequence is filled in the next step without a step of its own for the new prompt (a prefill of a
few rows costs nearly what a decode step of the whole batch costs). The first sequence admitted
is always allowed, as a lone prompt is, so a step holds at most `max_batched_tokens` plus
`max_num_seqs` tokens, or a lone prompt longer than that budget plus the decoding sequences.
With `mixed_prefill` off (and after a mixed step ran out of device memory), each step is either
a prefill step or a decode step, as in nano-vllm. Admission, in arrival order:
- a sequence needs KV blocks for all its tokens, a place among `max_num_seqs`, room in the
  `max_batched_tokens` budget (the first one of the step is always allowed), and, when it names an
  adapter, a device slot for it (already resident, free, or evictable: unused by the batch);
  a sequence of an adapter mix needs a slot for every adapter of the mix at once (it waits,
  as above, until all fit) and holds them all while it runs;
- running short of KV blocks or sequence places stops admission (FCFS for memory);
- a sequence whose adapter cannot get a slot is skipped so others can run, until it has waited
  `starvation_steps` steps: then admission stops until it gets in, so it waits at most that
  long plus the time for running sequences to finish;
- an adapter is loaded (via `ensure_adapter`) before any slot is evicted for it; if loading
  fails, every waiting sequence for it fails with that reason;
- a sequence needing an adapter that is not in a slot and not ready (`adapter_ready` false: its
  background load is in flight) is skipped without stopping admission or using resources; it
  keeps its place, so once the adapter is ready it is admitted in its arrival order.
A decode step that lacks a block for some sequence preempts the most recently admitted running
sequences (their blocks are freed and they wait again, to be recomputed).
With prefix caching (block_manager.py) an admission takes the longest cached prefix of the
sequence (by `cache_identity`): it needs free blocks only for the rest (a cached block nobody
holds counts as taken), and only the tokens after the prefix (`num_cached`) count against the
`max_batched_tokens` budget, since only they are computed.

A request's n > 1 samples (`Sequence.forks`, see sequence.py) are admitted together: sample 0
needs places for all n and KV blocks for its prompt plus one per sample when the prompt's last
block is partly filled; on admission the others are forked from it (`BlockManager.fork`: full
blocks shared, the partial block copied, `Batch.copies`) and run from the next decode step on.
Samples that could never be admitted together (n above `max_num_seqs`, or a KV cache too small)
are queued as separate sequences instead, each prefilling the prompt itself.

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
from .block_manager import BlockManager, prefix_identity
from .sequence import Sequence, Status
from .slots import SlotManager


@dataclass
class Batch:
    seqs: list[Sequence]  # prefill: the sequences admitted (whole prompts); decode: the running ones
    is_prefill: bool
    decode: list[Sequence] = field(default_factory=list)  # a mixed step: the running sequences decoding beside `seqs`
    activations: list[tuple[int, str]] = field(default_factory=list)  # (slot, adapter) to write
    failed: list[tuple[Sequence, str]] = field(default_factory=list)  # adapter load failures
    forks: list[tuple[Sequence, list[Sequence]]] = field(default_factory=list)  # (sample 0, samples forked from it)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (block, its copy): rows to copy after the run


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        blocks: BlockManager,
        slots: SlotManager,
        ensure_adapter: Callable[[str], str | None],
        adapter_ready: Callable[[str], bool] = lambda name: True,
    ):
        self.config = config
        # live batch limits: start at the config's, lowered by `back_off` after running out of memory
        self.max_num_seqs = config.max_num_seqs
        self.max_batched_tokens = config.max_batched_tokens
        self.mixed = config.mixed_prefill  # off for good once a mixed step ran out of memory
        self.blocks = blocks
        self.slots = slots
        self.ensure_adapter = ensure_adapter  # name -> None if loaded, else the failure reason
        self.adapter_ready = adapter_ready  # name -> False while its load is in flight (skip its requests)
        self.loading_skips = 0  # admissions skipped because an adapter was still loading
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.step_no = 0
        self.preemptions = 0
        self.kv_blocked = False  # the last admission stopped for want of KV blocks
        self.only_adapter: str | None = None  # set while one adapter is merged or draining to merge
        self.reserve_blocks = 0  # free KV blocks admissions must leave (for slots about to grow)
        # a sequence's prefix-cache identity at admission (`block_manager.prefix_identity`; the engine
        # adds its merged adapter and RoPE table); None = no caching
        self.cache_identity: Callable[[Sequence], tuple | None] = prefix_identity

    def add(self, seq: Sequence) -> None:
        seq.arrival_step = self.step_no
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def pending_adapters(self, window: int) -> set[str]:
        """Adapters of the running sequences and of the next `window` waiting ones (the slot demand)."""
        names = {name for s in self.running for name in s.adapters}
        for i, seq in enumerate(self.waiting):
            if i >= window:
                break
            names.update(seq.adapters)
        return names

    def schedule(self) -> Batch:
        self.step_no += 1
        if not self.mixed:
            batch = self._admit(self.max_batched_tokens)
            if batch.seqs or batch.failed:
                return batch
            return Batch(self._decode_set(), is_prefill=False)
        decode = self._decode_set()  # first: a sequence preempted for blocks waits again, first in line
        batch = self._admit(self.max_batched_tokens - len(decode))
        if batch.seqs:
            batch.decode = decode
        else:  # a decode step (with any adapter failures of the admission)
            batch.seqs, batch.is_prefill = decode, False
        return batch

    def _admit(self, budget: int) -> Batch:
        """Admit waiting sequences, in order, while they fit (`budget`: prompt tokens left in the step)."""
        batch = Batch([], is_prefill=True)
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
            failed = _failure_of(seq, failed_adapters)
            if failed is not None:
                batch.failed.append((seq, failed))
                continue
            missing = [name for name in seq.adapters if self.slots.lookup(name) is None]
            if not all(self.adapter_ready(name) for name in missing):
                self.loading_skips += 1
                kept.append(seq)
                continue
            n = len(seq)
            if seq.forks and not self._fits_together(seq):
                self.waiting.extendleft(reversed(seq.forks))  # separate sequences, next in line
                seq.forks = []
            identity = self.cache_identity(seq)
            need, cached = self.blocks.needed(seq, identity)
            need += len(seq.forks) * self.blocks.fork_cost(seq)
            fits = need <= self.blocks.num_free - self.reserve_blocks
            full = len(self.running) + len(seq.forks) >= self.max_num_seqs
            if full or (batch.seqs and n - cached > budget) or not fits:
                self.kv_blocked = not self.blocks.can_allocate(seq)
                kept.append(seq)
                stop = True
                continue
            if missing:
                if not self.slots.can_place_all(seq.adapters):
                    if seq.blocked_since is None:
                        seq.blocked_since = self.step_no
                    kept.append(seq)
                    stop = self.step_no - seq.blocked_since >= self.config.starvation_steps
                    continue
                reason = self._load(missing, failed_adapters)
                if reason is not None:
                    batch.failed.append((seq, reason))
                    continue
            self._start(seq, batch, identity)
            budget -= n - cached
        self.waiting = kept
        if failed_adapters:
            remaining: deque[Sequence] = deque()
            for seq in self.waiting:
                failed = _failure_of(seq, failed_adapters)
                if failed is not None:
                    batch.failed.append((seq, failed))
                else:
                    remaining.append(seq)
            self.waiting = remaining
        return batch

    def _load(self, names: list[str], failed_adapters: dict[str, str]) -> str | None:
        """Load each adapter (`ensure_adapter`); the first failure's reason (also noted in `failed_adapters`)."""
        for name in names:
            reason = self.ensure_adapter(name)
            if reason is not None:
                failed_adapters[name] = reason
                return reason
        return None

    def _start(self, seq: Sequence, batch: Batch, identity: tuple | None) -> None:
        placed = self.slots.place_all(seq.adapters, self.step_no)
        for name, (slot, write) in zip(seq.adapters, placed, strict=True):
            if write:
                batch.activations.append((slot, name))
            self.slots.acquire(slot, self.step_no)
        seq.hold([slot for slot, _ in placed])
        self.blocks.allocate(seq, identity)
        seq.status = Status.RUNNING
        seq.blocked_since = None
        seq.credits = 0
        if seq.admitted_step is None:
            seq.admitted_step = self.step_no
        self.running.append(seq)
        batch.seqs.append(seq)
        if seq.forks:
            self._fork(seq, batch)

    def _fits_together(self, seq: Sequence) -> bool:
        """Whether `seq` and its forks could ever run at once (in an empty engine)."""
        need = self.blocks.blocks_for(len(seq)) + len(seq.forks) * self.blocks.fork_cost(seq)
        return 1 + len(seq.forks) <= self.max_num_seqs and need <= self.blocks.num_blocks - self.reserve_blocks

    def _fork(self, seq: Sequence, batch: Batch) -> None:
        """Start `seq`'s forks beside it: its slots, its full blocks shared, its partial block copied."""
        for child in seq.forks:
            copy = self.blocks.fork(seq, child)
            if copy is not None:
                batch.copies.append(copy)
            for slot in seq.held_slots:
                self.slots.acquire(slot, self.step_no)
            child.slot, child.part_slots = seq.slot, list(seq.part_slots)
            child.status = Status.RUNNING
            child.admitted_step = self.step_no
            self.running.append(child)
        batch.forks.append((seq, seq.forks))
        seq.forks = []

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
        `max_num_seqs` and preempts the running sequences past the new limit. A mixed step turns
        mixing off and requeues its prompts, limits unchanged (the sequences decoding in it stay
        running): the next steps are a decode and a prefill of their own, which back off as above.
        """
        if batch.decode:
            self.mixed = False
        elif batch.is_prefill:
            self.max_batched_tokens = max(1, sum(len(s) - s.num_cached for s in batch.seqs) // 2)
        if batch.is_prefill:
            for seq in batch.seqs:  # their new blocks' KV may be unwritten: take them out of the prefix cache
                self.blocks.forget(seq)
            victims = list(batch.seqs) + [child for _, children in batch.forks for child in children]
        else:
            self.max_num_seqs = max(1, len(batch.seqs) // 2)
            victims = self.running[self.max_num_seqs :]
        for seq in reversed(victims):
            self.preempt(seq)

    def drop(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is (running or waiting): its request failed."""
        if seq.status is Status.RUNNING:
            self.finish(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        self._release_slot(seq)
        seq.status = Status.FINISHED

    def _release_slot(self, seq: Sequence) -> None:
        for slot in seq.held_slots:
            self.slots.release(slot)
        seq.slot = -1
        seq.part_slots = []


def _failure_of(seq: Sequence, failed_adapters: dict[str, str]) -> str | None:
    """Why `seq` fails when one of its adapters failed to load this step, else None."""
    return next((failed_adapters[name] for name in seq.adapters if name in failed_adapters), None)
