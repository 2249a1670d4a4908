"""Which worker runs which request: adapter-affinity routing, and a round-robin baseline.

Plain-Python bookkeeping: no Ray, no tensors (tests/test_routing.py). The pool (`pool.py`) puts
requests in (`add`), asks for work whenever a worker's queue has room (`take(worker, room)`),
reports what came back (`done`) and what a worker holds after each reply (`holds`), and hands
back the requests of a worker that died (`lose`). Requests are anything with `.id` and `.adapter`
(`None` = the base model, which every worker holds). A request for an adapter mix (`.mix` set) is
routed by its mix's first adapter (`route_key`): it goes where that adapter lives, and the worker
loads the mix's other adapters as it would any adapter.

`AffinityRouter.take(w, room)` fills up to `room` places for worker `w`, in this order:
1. Starvation guard: a request that has waited while `max_waited` others were sent (to any
   worker) goes first, oldest first, to the next worker that asks and holds its adapter (any
   worker, for the base model; step 2 gives every adapter a holder): the guard bounds the wait
   without spreading adapters. The pool sets `max_waited` to twice its read-ahead window, about
   twice the wait first-come-first-served would give.
2. Assignment: every adapter with pending requests that no live worker holds is assigned to the
   live worker holding the fewest adapters (ties: fewest in flight, then lowest index): adapters
   are spread over workers before any is duplicated.
3. Affinity: requests for adapters `w` holds (device slot, CPU cache, in flight or assigned), the
   adapter with the most pending requests first, oldest first within it.
4. Balance: only if `w` would still have fewer than `min_queue` requests in flight (its batch would
   run short), requests for adapters other workers hold, the largest backlog first, up to
   `min_queue` in flight or `w`'s fair share of all outstanding requests (pending and in flight,
   over the live workers), whichever is smaller: a short input is split between idle workers
   instead of going whole to the first that asks. A popular adapter then lives on several
   workers, and no worker idles while another has a backlog.
So a worker loads an adapter it does not hold only when nobody holds it or when it would idle.

`RoundRobinRouter`: request k goes to live worker k mod N, whatever its adapter (the baseline
that `--routing round-robin` runs and the tests compare against).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


def route_key(req: Any) -> str | None:
    """The adapter `req` is routed by: its adapter, or the first adapter of its mix."""
    mix = getattr(req, "mix", None)
    return mix.adapters[0] if mix is not None else req.adapter


@dataclass
class _Pending:
    order: int  # arrival number, for oldest-first
    sent_mark: int  # the router's send count when it was queued
    req: Any


@dataclass
class WorkerState:
    held: set = field(default_factory=set)  # adapters the worker holds or was assigned
    inflight: dict = field(default_factory=dict)  # request id -> adapter
    alive: bool = True
    sent: int = 0  # requests sent, re-sends included


class Router:
    """What both policies share: workers, in-flight bookkeeping, counts."""

    def __init__(self, n_workers: int):
        if n_workers < 1:
            raise ValueError("a router needs at least one worker")
        self.workers = [WorkerState() for _ in range(n_workers)]
        self.resent = 0  # requests sent again after their worker died
        self.sent_total = 0  # requests sent to any worker, re-sends included
        self._order = 0

    def live(self) -> list[int]:
        return [i for i, w in enumerate(self.workers) if w.alive]

    def inflight(self, w: int) -> int:
        return len(self.workers[w].inflight)

    def add(self, req: Any) -> None:
        """Queue a request to be routed."""
        raise NotImplementedError

    def take(self, w: int, room: int) -> list[Any]:
        """Up to `room` queued requests for worker `w` (recorded as in flight there)."""
        raise NotImplementedError

    def pending(self) -> int:
        """Requests queued, not yet taken by any worker."""
        raise NotImplementedError

    def done(self, w: int, ids: Iterable[str | int]) -> None:
        for rid in ids:
            self.workers[w].inflight.pop(rid, None)

    def holds(self, w: int, adapters: Iterable[str]) -> None:
        """What worker `w` reported holding (slots and CPU cache), plus what is in flight to it."""
        state = self.workers[w]
        state.held = set(adapters) | {a for a in state.inflight.values() if a is not None}

    def lose(self, w: int, requests: Iterable[Any]) -> None:
        """Worker `w` died: forget it; its unfinished `requests` go back to the front of the queue."""
        state = self.workers[w]
        state.alive, state.held, state.inflight = False, set(), {}
        if not self.live():
            return
        back = list(requests)
        self.resent += len(back)
        self._requeue(back)

    def _sent(self, w: int, reqs: list[Any]) -> list[Any]:
        state = self.workers[w]
        for req in reqs:
            key = route_key(req)
            state.inflight[req.id] = key
            if key is not None:
                state.held.add(key)
        state.sent += len(reqs)
        self.sent_total += len(reqs)
        return reqs

    def _next_order(self) -> int:
        self._order += 1
        return self._order

    def _requeue(self, reqs: list[Any]) -> None:
        raise NotImplementedError


class AffinityRouter(Router):
    def __init__(self, n_workers: int, *, min_queue: int, max_waited: int = 256):
        super().__init__(n_workers)
        self.min_queue = min_queue
        self.max_waited = max_waited
        self.queues: dict[str | None, deque[_Pending]] = {}
        self.stolen = 0  # requests taken by the balance rule (for an adapter another worker held)
        self.starved = 0  # requests taken by the starvation guard

    def add(self, req: Any) -> None:
        self.queues.setdefault(route_key(req), deque()).append(_Pending(self._next_order(), self.sent_total, req))

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def _requeue(self, reqs: list[Any]) -> None:
        for req in reversed(reqs):  # to the front, keeping their order, with the oldest numbers
            pending = _Pending(-self._next_order(), self.sent_total, req)
            self.queues.setdefault(route_key(req), deque()).appendleft(pending)

    def take(self, w: int, room: int) -> list[Any]:
        if room <= 0 or not self.workers[w].alive or not self.pending():
            return []
        live = self.live()
        fair_share = -(-(self.pending() + sum(self.inflight(i) for i in live)) // len(live))
        self._assign()
        held = self.workers[w].held

        def mine(adapter: str | None) -> bool:
            return adapter is None or adapter in held

        out = self._starving(room, mine)
        for adapter in self._by_backlog(mine):
            out += self._pop(adapter, room - len(out))
        short = min(room, min(self.min_queue, fair_share) - self.inflight(w))
        if len(out) < short:
            for adapter in self._by_backlog(lambda a: True):
                got = self._pop(adapter, short - len(out))
                self.stolen += len(got)
                out += got
        self.queues = {a: q for a, q in self.queues.items() if q}
        return self._sent(w, out)

    def _starving(self, room: int, mine) -> list[Any]:
        old = sorted(
            (
                p
                for a, q in self.queues.items()
                if mine(a)
                for p in q
                if self.sent_total - p.sent_mark >= self.max_waited
            ),
            key=lambda p: p.order,
        )[:room]
        for p in old:
            self.queues[route_key(p.req)].remove(p)
        self.starved += len(old)
        return [p.req for p in old]

    def _assign(self) -> None:
        live = self.live()
        held_by_someone = set().union(*(self.workers[i].held for i in live))
        heads = sorted((q[0].order, a) for a, q in self.queues.items() if q and a is not None)
        for _, adapter in heads:
            if adapter in held_by_someone:
                continue
            best = min(live, key=lambda i: (len(self.workers[i].held), self.inflight(i), i))
            self.workers[best].held.add(adapter)
            held_by_someone.add(adapter)

    def _by_backlog(self, keep) -> list[str | None]:
        return sorted(
            (a for a, q in self.queues.items() if q and keep(a)),
            key=lambda a: (-len(self.queues[a]), self.queues[a][0].order),
        )

    def _pop(self, adapter: str | None, n: int) -> list[Any]:
        q = self.queues[adapter]
        return [q.popleft().req for _ in range(min(n, len(q)))]


class RoundRobinRouter(Router):
    def __init__(self, n_workers: int):
        super().__init__(n_workers)
        self.queues: list[deque[Any]] = [deque() for _ in range(n_workers)]
        self._next = 0

    def add(self, req: Any) -> None:
        self._to_next().append(req)

    def _to_next(self) -> deque[Any]:
        live = self.live()
        w = live[self._next % len(live)]
        self._next += 1
        return self.queues[w]

    def pending(self) -> int:
        return sum(len(q) for q in self.queues)

    def _requeue(self, reqs: list[Any]) -> None:
        for i, w in enumerate(self.workers):
            if not w.alive and self.queues[i]:
                reqs = reqs + list(self.queues[i])
                self.queues[i].clear()
        for req in reversed(reqs):
            self._to_next().appendleft(req)

    def take(self, w: int, room: int) -> list[Any]:
        q = self.queues[w]
        return self._sent(w, [q.popleft() for _ in range(min(room, len(q)))])


def make_router(policy: str, n_workers: int, *, min_queue: int, max_waited: int = 256) -> Router:
    if policy == "affinity":
        return AffinityRouter(n_workers, min_queue=min_queue, max_waited=max_waited)
    if policy == "round-robin":
        return RoundRobinRouter(n_workers)
    raise ValueError(f"unknown routing policy {policy!r}")
