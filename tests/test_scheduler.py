"""Scheduler, block and slot bookkeeping, tested without tensors."""

from __future__ import annotations

from loracli.config import EngineConfig
from loracli.engine.block_manager import BlockManager
from loracli.engine.scheduler import Scheduler
from loracli.engine.sequence import Sequence, Status
from loracli.engine.slots import SlotManager
from loracli.sampling import SamplingParams


def make(n_slots=2, blocks=100, block_size=4, max_num_seqs=8, bad=(), starvation_steps=64):
    loads = []

    def ensure(name):
        loads.append(name)
        return f"{name} is broken" if name in bad else None

    cfg = EngineConfig(
        max_loras=n_slots, max_num_seqs=max_num_seqs, starvation_steps=starvation_steps, block_size=block_size
    )
    sched = Scheduler(cfg, BlockManager(blocks, block_size), SlotManager(n_slots), ensure)
    return sched, loads


def seq(i, adapter, n=5, max_tokens=4):
    return Sequence(i, str(i), adapter, list(range(n)), SamplingParams(max_tokens=max_tokens))


def finish_all(sched, batch):
    for s in batch.seqs:
        sched.finish(s)


def test_batch_never_holds_more_adapters_than_slots():
    sched, loads = make(n_slots=2)
    for i, a in enumerate(["a", "b", "c", "a", None, "c"]):
        sched.add(seq(i, a))
    batch = sched.schedule()
    assert batch.is_prefill
    assert [s.adapter for s in batch.seqs] == ["a", "b", "a", None]
    assert {s.adapter for s in batch.seqs if s.adapter} == {"a", "b"}
    assert sorted(batch.activations) == [(0, "a"), (1, "b")]
    assert loads == ["a", "b"]
    assert [s.adapter for s in sched.waiting] == ["c", "c"]
    decode = sched.schedule()  # nothing admissible: c needs a slot, all in use
    assert not decode.is_prefill and len(decode.seqs) == 4
    finish_all(sched, decode)
    batch = sched.schedule()
    assert [s.adapter for s in batch.seqs] == ["c", "c"]
    assert batch.activations == [(0, "c")]  # LRU slot of a (equal use time -> lowest slot)
    assert sched.slots.stats.evictions == 1


def test_failed_adapter_fails_all_its_requests_and_evicts_nothing():
    sched, _ = make(n_slots=1, bad={"x"})
    sched.add(seq(0, "a"))
    finish_all(sched, sched.schedule())  # a is resident, unused
    for i in range(1, 4):
        sched.add(seq(i, "x"))
    batch = sched.schedule()
    assert [s.seq_id for s, _ in batch.failed] == [1, 2, 3]
    assert all("broken" in r for _, r in batch.failed)
    assert sched.slots.adapter_of == ["a"] and sched.slots.stats.evictions == 0
    assert not sched.waiting


def test_starvation_bound():
    """A flood of resident-adapter requests cannot starve one that needs a slot."""
    bound = 5
    sched, _ = make(n_slots=1, starvation_steps=bound, max_num_seqs=4)
    sched.add(seq(0, "hot", max_tokens=3))
    sched.schedule()
    sched.add(seq(1, "cold"))
    next_id, admitted_at = 2, None
    for step in range(1, 200):
        sched.add(seq(next_id, "hot", max_tokens=3))
        next_id += 1
        batch = sched.schedule()
        if any(s.adapter == "cold" for s in batch.seqs):
            admitted_at = step
            break
        for s in batch.seqs:
            if not batch.is_prefill:
                s.token_ids.append(0)
                if s.num_output >= s.params.max_tokens:
                    sched.finish(s)
    assert admitted_at is not None
    # blocked at most `bound` steps, then the running hot sequences (3 tokens each) drain
    assert admitted_at <= bound + 2 * 4 * 3


def test_preemption_frees_newest_and_requeues_first():
    sched, _ = make(n_slots=1, blocks=4, block_size=4, max_num_seqs=4)
    a, b = seq(0, None, n=7), seq(1, None, n=7)
    sched.add(a)
    sched.add(b)
    assert sched.schedule().seqs == [a, b]  # 2 blocks each
    a.token_ids.append(0)
    b.token_ids.append(0)
    decode = sched.schedule()  # 8 tokens: still 2 blocks each
    assert decode.seqs == [a, b]
    a.token_ids.append(0)
    b.token_ids.append(0)
    decode = sched.schedule()  # 9 tokens need a third block: b is preempted
    assert decode.seqs == [a] and b.status is Status.WAITING and sched.waiting[0] is b
    assert b.block_table == [] and sched.preemptions == 1


def test_block_manager_rows():
    bm = BlockManager(10, 4)
    s = seq(0, None, n=9)
    bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free == 7
    assert bm.row(s, 5) == s.block_table[1] * 4 + 1
    bm.free_seq(s)
    assert bm.num_free == 10


def test_slot_manager_lru_and_pinning():
    sm = SlotManager(2, pinned={"p"})
    assert sm.place("p", 1)[0] == 0
    assert sm.place("a", 2)[0] == 1
    slot, evicted, write = sm.place("b", 3)
    assert (slot, evicted, write) == (1, "a", True)  # p is pinned
    sm.acquire(1, 4)
    assert not sm.can_place_all(("c",))  # b in use, p pinned
    sm.release(1)
    assert sm.can_place_all(("c",))
    assert sm.place("b", 5) == (1, None, False) and sm.stats.hits == 1


# --- adapters still loading in the background (engine/adapter_loader.py) ---------------------------


def make_loading(loading, **kw):
    """A scheduler whose `adapter_ready` is false for the adapters in the (mutable) set `loading`."""
    sched, loads = make(**kw)
    sched.adapter_ready = lambda name: name not in loading
    return sched, loads


def test_loading_adapter_is_skipped_and_others_run():
    loading = {"a"}
    sched, loads = make_loading(loading, n_slots=2)
    for i, a in enumerate(["a", "b", "a", None, "b"]):
        sched.add(seq(i, a))
    batch = sched.schedule()
    assert [s.seq_id for s in batch.seqs] == [1, 3, 4]  # a's requests skipped, not blocking those after
    assert loads == ["b"]  # nothing is read for an adapter still loading, no slot taken for it
    assert [s.seq_id for s in sched.waiting] == [0, 2]
    assert all(s.blocked_since is None for s in sched.waiting)  # a load is not slot starvation
    assert sched.loading_skips == 2
    loading.clear()
    batch = sched.schedule()
    assert [s.seq_id for s in batch.seqs] == [0, 2] and loads == ["b", "a"]


def test_loaded_adapter_keeps_its_place_in_line():
    """Once loaded, a skipped request goes before those that arrived after it, even when memory is short."""
    loading = {"x"}
    sched, _ = make_loading(loading, n_slots=2, max_num_seqs=2)
    for i, a in enumerate(["x", "a", "a", "a", "a"]):
        sched.add(seq(i, a))
    batch = sched.schedule()
    assert [s.seq_id for s in batch.seqs] == [1, 2]  # x loading; the batch is then full (FCFS stop)
    loading.clear()
    finish_all(sched, batch)
    batch = sched.schedule()
    assert [s.seq_id for s in batch.seqs] == [0, 3]  # x first, in its arrival order
    assert [s.seq_id for s in sched.waiting] == [4]


def test_loading_adapter_that_fails_fails_only_its_requests():
    loading = {"x"}
    sched, _ = make_loading(loading, n_slots=2, bad={"x"})
    for i, a in enumerate(["x", "a", "x"]):
        sched.add(seq(i, a))
    assert [s.seq_id for s in sched.schedule().seqs] == [1]
    loading.clear()  # the load finished, and failed
    batch = sched.schedule()
    assert [s.seq_id for s, _ in batch.failed] == [0, 2] and all("broken" in r for _, r in batch.failed)
    assert not sched.waiting and [s.seq_id for s in sched.running] == [1]
