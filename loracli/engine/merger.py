"""Carrying out merge decisions between engine steps, and what `--stats` reports about them.

`Merger.between_steps(step)` builds a `MergeView` of the scheduler's queues, asks the
`MergePolicy`, and applies its transition:

- drain X: the scheduler admits only X's requests (`Scheduler.only_adapter`);
- merge X: once X is resident (its admitted requests placed it), its slot is pinned and
  `ModelRunner.merge` folds it into every target linear; X's sequences then run with slot -1;
- unmerge / cancel: `ModelRunner.unmerge` restores the saved base weights (bit for bit), the pin
  is dropped, admission is open again, and a credit-forced stop marks the waiting requests it
  was for as owed (no new drain until they are admitted).

Step time per token (merged or not) and the time of every merge and unmerge feed the policy's
online estimates.
"""

from __future__ import annotations

import logging
import time

from ..quantiles import percentile
from .merge_policy import MergePolicy, MergeView, Transition

log = logging.getLogger("loracli")


class Merger:
    def __init__(self, engine, policy: MergePolicy):
        self.engine = engine
        self.policy = policy
        self.owed: set[int] = set()  # seq ids a credit-forced unmerge was for, until admitted
        self.timeline: list[dict] = []
        self.switch_seconds: list[float] = []
        self.merged_seconds = 0.0
        self._merged_at: float | None = None

    def view(self) -> MergeView:
        sched, x = self.engine.scheduler, self.policy.adapter
        counts: dict = {}
        work: dict = {}
        for seq in (*sched.waiting, *sched.running):
            counts[seq.adapter] = counts.get(seq.adapter, 0) + 1
            work[seq.adapter] = work.get(seq.adapter, 0) + seq.params.max_tokens - seq.num_output
        waiting_ids = {seq.seq_id for seq in sched.waiting}
        self.owed &= waiting_ids
        overdue = max((s.credits for s in sched.waiting if s.adapter != x), default=0) if x is not None else 0
        return MergeView(counts, frozenset(s.adapter for s in sched.running), overdue, bool(self.owed), work)

    def between_steps(self, step: int) -> None:
        if self.policy.mode == "never":
            return
        t = self.policy.decide(self.view())
        if t is None:
            return
        if t.action == "merge" and not self._merge(t.adapter):
            return
        if t.action in ("unmerge", "cancel"):
            self._open(t)
        if t.action == "drain":
            self.engine.scheduler.only_adapter = t.adapter
        self._record(step, t)

    def _record(self, step: int, t: Transition) -> None:
        self.policy.apply(t)
        self.timeline.append({"step": step, "action": t.action, "adapter": t.adapter, "reason": t.reason})
        log.info("merge: %s %s at step %d: %s", t.action, t.adapter, step, t.reason)

    def settle(self, step: int) -> None:
        """The engine ran out of work: restore the base weights (an idle engine is never merged)."""
        if self.policy.state == "unmerged":
            return
        action = "unmerge" if self.policy.state == "merged" else "cancel"
        t = Transition(action, self.policy.adapter, "no requests left")
        self._open(t)
        self._record(step, t)

    def _merge(self, x: str) -> bool:
        e = self.engine
        slot = e.slots.lookup(x)
        if slot is None:
            return False  # not loaded yet: the drain admits its requests, which places it
        e.slots.pinned.add(x)
        t0 = time.perf_counter()
        e.runner.merge(x, slot)
        self._switched(time.perf_counter() - t0)
        self._merged_at = time.perf_counter()
        return True

    def _open(self, t: Transition) -> None:
        e = self.engine
        if t.action == "unmerge":
            t0 = time.perf_counter()
            e.runner.unmerge()
            self._switched(time.perf_counter() - t0)
            if self._merged_at is not None:
                self.merged_seconds += time.perf_counter() - self._merged_at
                self._merged_at = None
            if t.adapter not in e.config.pinned:
                e.slots.pinned.discard(t.adapter)
        e.scheduler.only_adapter = None
        if t.reason.startswith("credits"):
            self.owed = {s.seq_id for s in e.scheduler.waiting if s.credits}

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
