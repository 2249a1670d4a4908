"""Carrying out merge decisions between engine steps, and what `--stats` reports about them.

`Merger.between_steps(step, waiting, running, slot_of)` builds a `MergeView` of the queues it is
handed, asks the `MergePolicy`, carries out its transition on the model runner, and returns the
`MergeOrders` the engine applies to its scheduler and slot table (the merger touches neither):

- drain X: admit only X's requests (`MergeOrders.only_adapter`);
- merge X: once X is resident (its admitted requests placed it), `ModelRunner.merge` folds it
  into every target linear and its slot is held (`MergeOrders.held`); X's sequences then run
  with slot -1;
- unmerge / cancel: `ModelRunner.unmerge` restores the saved base weights (bit for bit), the
  hold is dropped, admission is open again, and a credit-forced stop marks the waiting requests
  it was for as owed (no new drain until they are admitted).

An adapter mix is never run merged: its requests count as the base model's in the view (no
candidate), a running mix keeps any adapter from merging (the batch must hold only X's
requests), and while X is merged the mix waits like any other request (its adapters may be
merged on their own).

Step time per token (merged or not) and the time of every merge and unmerge feed the policy's
online estimates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..quantiles import percentile
from .merge_policy import MergePolicy, MergeView, Transition
from .model_runner import ModelRunner
from .sequence import Sequence

log = logging.getLogger("loracli")


@dataclass(frozen=True)
class MergeOrders:
    """What the merge state asks of the scheduler and the slot table."""

    only_adapter: str | None = None  # admit only this adapter's requests (draining or merged); None: all
    held: frozenset[str] = frozenset()  # adapters whose slots must stay (the merged one)


class Merger:
    def __init__(self, policy: MergePolicy, model_runner: ModelRunner):
        self.policy = policy
        self.model_runner = model_runner
        self.owed: set[int] = set()  # seq ids a credit-forced unmerge was for, until admitted
        self.timeline: list[dict] = []
        self.switch_seconds: list[float] = []
        self.merged_seconds = 0.0
        self._merged_at: float | None = None

    def orders(self) -> MergeOrders:
        p = self.policy
        if p.state == "unmerged" or p.adapter is None:
            return MergeOrders()
        return MergeOrders(p.adapter, frozenset({p.adapter}) if p.state == "merged" else frozenset())

    def view(self, waiting: Iterable[Sequence], running: Iterable[Sequence]) -> MergeView:
        x = self.policy.adapter
        waiting, running = list(waiting), list(running)
        counts: dict = {}
        work: dict = {}
        for seq in (*waiting, *running):
            key = None if seq.mix is not None else seq.adapter  # a mix is never merged: counted as the base
            counts[key] = counts.get(key, 0) + 1
            work[key] = work.get(key, 0) + seq.params.max_tokens - seq.num_output
        waiting_ids = {seq.seq_id for seq in waiting}
        self.owed &= waiting_ids
        overdue = max((s.credits for s in waiting if s.adapter != x), default=0) if x is not None else 0
        return MergeView(counts, frozenset(s.adapter for s in running), overdue, bool(self.owed), work)

    def between_steps(
        self,
        step: int,
        waiting: Iterable[Sequence],
        running: Iterable[Sequence],
        slot_of: Callable[[str], int | None],
    ) -> MergeOrders:
        if self.policy.mode == "never":
            return self.orders()
        waiting = list(waiting)
        t = self.policy.decide(self.view(waiting, running))
        if t is None or (t.action == "merge" and not self._merge(t.adapter, slot_of(t.adapter))):
            return self.orders()
        if t.action in ("unmerge", "cancel"):
            self._open(t, waiting)
        self._record(step, t)
        return self.orders()

    def _record(self, step: int, t: Transition) -> None:
        self.policy.apply(t)
        self.timeline.append({"step": step, "action": t.action, "adapter": t.adapter, "reason": t.reason})
        log.info("merge: %s %s at step %d: %s", t.action, t.adapter, step, t.reason)

    def settle(self, step: int) -> MergeOrders:
        """The engine ran out of work: restore the base weights (an idle engine is never merged)."""
        if self.policy.state != "unmerged" and self.policy.adapter is not None:
            action = "unmerge" if self.policy.state == "merged" else "cancel"
            t = Transition(action, self.policy.adapter, "no requests left")
            self._open(t, [])
            self._record(step, t)
        return self.orders()

    def _merge(self, x: str, slot: int | None) -> bool:
        if slot is None:
            return False  # not loaded yet: the drain admits its requests, which places it
        t0 = time.perf_counter()
        self.model_runner.merge(x, slot)
        self._switched(time.perf_counter() - t0)
        self._merged_at = time.perf_counter()
        return True

    def _open(self, t: Transition, waiting: list[Sequence]) -> None:
        if t.action == "unmerge":
            t0 = time.perf_counter()
            self.model_runner.unmerge()
            self._switched(time.perf_counter() - t0)
            if self._merged_at is not None:
                self.merged_seconds += time.perf_counter() - self._merged_at
                self._merged_at = None
        if t.reason.startswith("credits"):
            self.owed = {s.seq_id for s in waiting if s.credits}

    def _switched(self, seconds: float) -> None:
        self.switch_seconds.append(seconds)
        self.policy.observe_switch(seconds)

    def observe_step(self, seconds: float, tokens: int) -> None:
        self.policy.observe_step(seconds, tokens)

    def report(self) -> dict:
        merged = self.merged_seconds
        if self._merged_at is not None:
            merged += time.perf_counter() - self._merged_at
        p50 = percentile([1e3 * s for s in self.switch_seconds], 50)
        p = self.policy
        return {
            "policy": p.mode,
            "state": p.state,
            "adapter": p.adapter,
            "timeline": self.timeline,
            "merges": sum(1 for t in self.timeline if t["action"] == "merge"),
            "merged_seconds": round(merged, 3),
            "switch_ms_p50": None if p50 is None else round(p50, 3),
            "merge_share": round(p.merge_share, 3),
        }
