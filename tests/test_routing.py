"""The routing policies of `loracli run --ray` (cluster/routing.py), as plain bookkeeping: no Ray."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loracli.cluster.routing import AffinityRouter, RoundRobinRouter, make_router


@dataclass(frozen=True)
class Req:
    id: str
    adapter: str | None


def reqs(adapters: str, start: int = 0) -> list[Req]:
    """'aab-' -> requests for a, a, b and the base model ('-')."""
    return [Req(f"r{start + i}", None if a == "-" else a) for i, a in enumerate(adapters)]


def adapters_of(taken: list[Req]) -> set:
    return {r.adapter for r in taken}


def test_adapters_are_spread_before_any_is_duplicated():
    r = AffinityRouter(2, min_queue=2)
    for q in reqs("aaabbbcccddd"):
        r.add(q)
    first = r.take(0, 6)
    second = r.take(1, 6)
    assert len(first) == len(second) == 6
    assert adapters_of(first).isdisjoint(adapters_of(second))
    assert adapters_of(first) | adapters_of(second) == set("abcd")
    assert r.stolen == 0


def test_an_adapter_stays_with_the_worker_that_holds_it():
    r = AffinityRouter(2, min_queue=1)
    for q in reqs("ab"):
        r.add(q)
    a_worker = 0 if r.take(0, 1)[0].adapter == "a" else 1
    r.take(1 - a_worker, 1)
    for q in reqs("aaaa", start=10):
        r.add(q)
    # The other worker asks first, but has one in flight (>= min_queue): it takes nothing for a.
    assert r.take(1 - a_worker, 4) == []
    assert [q.adapter for q in r.take(a_worker, 4)] == ["a"] * 4


def test_a_worker_short_of_work_takes_a_popular_adapter_from_another():
    r = AffinityRouter(2, min_queue=4)
    r.holds(0, ["a"])
    for q in reqs("a" * 12):
        r.add(q)
    stolen = r.take(1, 8)
    assert len(stolen) == 4 and adapters_of(stolen) == {"a"}  # up to min_queue, not the whole backlog
    assert r.stolen == 4
    assert len(r.take(0, 8)) == 8  # the holder gets the rest
    assert r.pending() == 0


def test_a_short_input_is_split_between_idle_workers_not_all_given_to_the_first():
    r = AffinityRouter(2, min_queue=32)  # batches of 32; 12 requests for 3 adapters
    for q in reqs("abc" * 4):
        r.add(q)
    first = r.take(0, 40)
    second = r.take(1, 40)
    # Adapters were spread over the workers (a, c to worker 0; b to 1), and worker 0, already over its
    # fair share (6) with its own, took nothing held by worker 1: no adapter is loaded twice.
    assert adapters_of(first) == {"a", "c"} and adapters_of(second) == {"b"}
    assert (len(first), len(second)) == (8, 4)
    assert r.pending() == 0


def test_base_model_requests_go_to_any_worker():
    r = AffinityRouter(2, min_queue=1)
    r.holds(0, ["a"])
    for q in reqs("--a-"):
        r.add(q)
    assert adapters_of(r.take(1, 8)) == {None}
    assert r.stolen == 0


def test_an_old_request_is_not_passed_over_forever():
    r = AffinityRouter(1, min_queue=1, max_waited=8)
    r.add(Req("lonely", "z"))
    taken = []
    for round_no in range(6):
        for q in reqs("aaaa", start=100 * round_no):
            r.add(q)
        taken += r.take(0, 4)  # the larger backlog for a wins each time...
        r.done(0, [q.id for q in taken])
    assert "lonely" in [q.id for q in taken]  # ...until the starvation guard takes z first
    assert r.starved == 1
    assert [q.id for q in taken].index("lonely") == 8  # first once 8 others were sent while it waited


def test_a_starving_request_goes_to_a_worker_holding_its_adapter_not_the_first_that_asks():
    r = AffinityRouter(2, min_queue=1, max_waited=4)
    r.holds(0, ["a"])
    r.holds(1, ["z"])
    r.add(Req("lonely", "z"))
    for q in reqs("aaaaaa"):
        r.add(q)
    assert adapters_of(r.take(0, 3)) == {"a"}
    assert adapters_of(r.take(0, 2)) == {"a"}  # 5 sent while lonely waited: it starves...
    assert r.take(0, 1)[0].adapter == "a"  # ...but worker 0 does not hold z: it takes its own
    assert [q.id for q in r.take(1, 1)] == ["lonely"]
    assert r.starved == 2  # the last a request had starved too: its holder took it by the guard


def test_a_dead_workers_requests_go_first_to_the_others():
    r = AffinityRouter(2, min_queue=1)
    for q in reqs("aabb"):
        r.add(q)
    lost = r.take(0, 2)
    r.take(1, 2)
    for q in reqs("cc", start=10):
        r.add(q)
    r.lose(0, lost)
    assert r.live() == [1] and r.resent == 2
    again = r.take(1, 2)
    assert [q.id for q in again] == [q.id for q in lost]  # oldest first
    assert r.take(0, 5) == []


def test_round_robin_ignores_adapters_and_redistributes_after_a_death():
    r = RoundRobinRouter(2)
    for q in reqs("aaaaaa"):
        r.add(q)
    zero = r.take(0, 10)
    assert [q.id for q in zero] == ["r0", "r2", "r4"]
    r.lose(0, zero[1:])
    got = r.take(1, 10)
    assert sorted(q.id for q in got) == ["r1", "r2", "r3", "r4", "r5"]


def test_unknown_policy_and_no_workers_are_refused():
    with pytest.raises(ValueError):
        make_router("random", 2, min_queue=1)
    with pytest.raises(ValueError):
        AffinityRouter(0, min_queue=1)


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(["affinity", "round-robin"]),
    workers=st.integers(1, 4),
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "take", "finish", "die"]), st.integers(0, 7), st.integers(1, 6)), max_size=80
    ),
)
def test_every_request_is_answered_exactly_once_and_no_worker_idles_with_a_backlog(policy, workers, ops):
    r = make_router(policy, workers, min_queue=2, max_waited=5)  # small: the starvation guard takes part
    n = 0
    inflight: dict[int, list[Req]] = {w: [] for w in range(workers)}
    answered: list[str] = []
    for op, a, k in ops:
        live = r.live()
        w = live[a % len(live)]
        if op == "add":
            for _ in range(k):
                r.add(Req(f"q{n}", None if a == 7 else f"ad{a}"))
                n += 1
        elif op == "take":
            before = r.pending()
            got = r.take(w, k)
            if policy == "affinity" and before and not inflight[w]:
                assert got, "a worker with nothing in flight got no work while requests were pending"
            inflight[w] += got
        elif op == "finish" and inflight[w]:
            done, inflight[w] = inflight[w][:k], inflight[w][k:]
            r.done(w, [q.id for q in done])
            answered += [q.id for q in done]
        elif op == "die" and len(live) > 1:
            r.lose(w, inflight[w])
            inflight[w] = []
    while r.pending() or any(inflight.values()):  # drain: every live worker takes and finishes
        for w in r.live():
            inflight[w] += r.take(w, 3)
            r.done(w, [q.id for q in inflight[w]])
            answered += [q.id for q in inflight[w]]
            inflight[w] = []
    assert sorted(answered) == sorted(f"q{i}" for i in range(n))
