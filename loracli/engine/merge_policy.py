"""When to merge one adapter into the base weights (dLoRA): a plain-Python policy, between steps.

States: `unmerged` -> `draining X` -> `merged X` -> `unmerged`. While draining, only X's requests are
admitted, so the running batch empties of other adapters. X is merged once the batch holds nothing
else. While merged, other requests wait. That is dLoRA's choice, because running them would mean
subtracting the delta on the fly, which costs more than it saves. Their wait is bounded by credits
(below).

`decide(step, view)` returns the next transition or None:

- auto: start draining the most requested adapter X when its share of the runnable requests
  (waiting + running) is at least `merge_share`, it has at least `min_requests`, and merging is
  worth its cost: (time per token unmerged - merged) x the tokens X's runnable requests may still
  generate > a merge plus an unmerge. Times are measured online (EMAs), with a prior of 15%
  saving until the first merged period. Unmerge when X's
  share falls below `unmerge_share`, when X has no requests left, or when credits run out.
- always-single: merge whenever every runnable request names the same adapter; unmerge as soon
  as another adapter, or the base model, has a request.
- never: never.
- Credits: a request of another adapter earns one credit per step it waits while a drain or
  merge blocks it. At `credit_steps` the policy unmerges (or cancels the drain). It starts no new
  drain while such a request is still waiting to be admitted. The scheduler admits requests that
  have waited `credit_steps` first. So a request waits at most about `credit_steps` steps plus
  the time for one running sequence to finish.
- Online tuning (dLoRA's additive/multiplicative adjustment): when a merged period ends, its
  throughput is compared with the unmerged average. If merging paid, `merge_share` decreases by
  `share_step`, down to 0.5. If not, it is multiplied by `share_backoff`, up to 0.99.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MergeView:
    counts: dict  # adapter name (None = base model) -> runnable requests (waiting + running)
    running: frozenset  # adapters (None = base) of the running sequences
    overdue: int  # most credits any request blocked by the current drain/merge has (0 if none)
    owed: bool  # a request that forced an unmerge still waits to be admitted
    work: dict = field(default_factory=dict)  # adapter -> tokens its runnable requests may still generate


@dataclass(frozen=True)
class Transition:
    action: str  # drain | cancel | merge | unmerge
    adapter: str
    reason: str


@dataclass
class Ema:
    value: float | None = None
    alpha: float = 0.2

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x


@dataclass
class MergePolicy:
    mode: str = "auto"
    merge_share: float = 0.8
    unmerge_share: float = 0.5
    min_requests: int = 4
    credit_steps: int = 64
    share_step: float = 0.05
    share_backoff: float = 1.1
    prior_saving: float = 0.15
    state: str = "unmerged"  # unmerged | draining | merged
    adapter: str | None = None
    step_unmerged: Ema = field(default_factory=Ema)  # seconds per generated token
    step_merged: Ema = field(default_factory=Ema)
    switch_cost: Ema = field(default_factory=Ema)  # seconds of one merge or unmerge
    period: list = field(default_factory=lambda: [0, 0.0, 0])  # steps, seconds, tokens of this merged period

    # --- decisions ---------------------------------------------------------------------------------

    def decide(self, view: MergeView) -> Transition | None:
        if self.mode == "never":
            return None
        if self.state == "unmerged":
            x = self._candidate(view)
            return None if x is None or view.owed else Transition("drain", x, self._why(view, x))
        x = self.adapter
        assert x is not None, "draining or merged always names its adapter"
        stop = self._stop_reason(view, x)
        if self.state == "draining":
            if stop is not None:
                return Transition("cancel", x, stop)
            if view.running <= {x}:
                return Transition("merge", x, "batch holds only its requests")
            return None
        return Transition("unmerge", x, stop) if stop is not None else None

    def _candidate(self, view: MergeView) -> str | None:
        named = {a: n for a, n in view.counts.items() if a is not None and n > 0}
        if not named:
            return None
        x = max(sorted(named), key=named.__getitem__)
        total = sum(view.counts.values())
        if self.mode == "always-single":
            return x if total == named[x] else None
        if named[x] < self.min_requests or named[x] / total < self.merge_share:
            return None
        return x if self._worth(view.work.get(x, 0)) else None

    def _worth(self, tokens: int) -> bool:
        """Saving over the `tokens` X's queued requests may generate, against a merge and an unmerge."""
        t_u = self.step_unmerged.value
        if t_u is None:
            return True  # nothing measured yet: the prior says merging saves `prior_saving`
        t_m = self.step_merged.value if self.step_merged.value is not None else t_u * (1 - self.prior_saving)
        cost = 2 * (self.switch_cost.value or 0.0)
        return (t_u - t_m) * tokens > cost

    def _stop_reason(self, view: MergeView, x: str) -> str | None:
        if view.overdue >= self.credit_steps:
            return f"credits: a request of another adapter waited {view.overdue} steps"
        mine, total = view.counts.get(x, 0), sum(view.counts.values())
        if mine == 0:
            return "no requests left"
        if self.mode == "always-single":
            return None if total == mine else "other adapters have requests"
        if mine / total < self.unmerge_share:
            return f"share {mine / total:.0%} < {self.unmerge_share:.0%}"
        return None

    def _why(self, view: MergeView, x: str) -> str:
        total = sum(view.counts.values())
        return f"{view.counts[x]} of {total} runnable requests"

    # --- bookkeeping -------------------------------------------------------------------------------

    def apply(self, t: Transition) -> None:
        if t.action == "drain":
            self.state, self.adapter = "draining", t.adapter
        elif t.action == "merge":
            self.state = "merged"
            self.period = [0, 0.0, 0]
        else:
            if t.action == "unmerge":
                self._tune()
            self.state, self.adapter = "unmerged", None

    def observe_step(self, seconds: float, tokens: int) -> None:
        if tokens <= 0:
            return
        if self.state == "merged":
            self.step_merged.add(seconds / tokens)
            self.period[0] += 1
            self.period[1] += seconds
            self.period[2] += tokens
        else:
            self.step_unmerged.add(seconds / tokens)

    def observe_switch(self, seconds: float) -> None:
        self.switch_cost.add(seconds)

    def _tune(self) -> None:
        _, seconds, tokens = self.period
        if not tokens or self.step_unmerged.value is None:
            return
        if seconds / tokens < self.step_unmerged.value:
            self.merge_share = max(0.5, self.merge_share - self.share_step)
        else:
            self.merge_share = min(0.99, self.merge_share * self.share_backoff)
