"""Dynamic slots without tensors: the resize policy, slot-table compaction, KV block moves, the budget."""

from __future__ import annotations

import pytest

from loracli.config import EngineConfig
from loracli.engine.block_manager import BlockManager
from loracli.engine.memory_budget import MemoryBudget
from loracli.engine.sequence import Sequence
from loracli.engine.slot_policy import KvView, SlotPolicy
from loracli.engine.slots import SlotManager
from loracli.errors import ConfigError
from loracli.sampling import SamplingParams

ROOMY = KvView(total=100, free=90, blocks_per_slot=2, traded=True)
FULL = KvView(total=100, free=5, blocks_per_slot=2, traded=True)


def test_grows_to_demand_within_max_and_a_steady_mix_never_resizes_again():
    p = SlotPolicy(1, 8, cooldown=4)
    first = p.decide(1, slots=1, demand=3, in_use=1, kv=ROOMY)
    assert first is not None and first.to == 3 and "demand 3 > 1" in first.reason
    assert all(p.decide(step, 3, 3, 3, FULL) is None for step in range(2, 1000))
    assert p.decide(1000, 3, 50, 3, ROOMY).to == 8


def test_no_growth_at_max_and_growth_paid_by_free_kv_blocks_only():
    assert SlotPolicy(1, 4).decide(1, 4, 9, 4, ROOMY) is None
    # 20 free of 100 blocks, 10 must stay free, 4 blocks per slot: two more slots at most
    tight = KvView(total=100, free=20, blocks_per_slot=4, traded=True)
    assert SlotPolicy(1, 16).decide(1, 2, 16, 2, tight).to == 4
    broke = KvView(total=100, free=12, blocks_per_slot=4, traded=True)
    assert SlotPolicy(1, 16).decide(1, 2, 16, 2, broke) is None
    untraded = KvView(total=100, free=0, blocks_per_slot=4, traded=False)
    assert SlotPolicy(1, 16).decide(1, 2, 16, 2, untraded).to == 16


def test_shrink_needs_cooldown_pressure_and_a_budget():
    p = SlotPolicy(2, 8, cooldown=5)
    assert [p.decide(s, 8, 3, 1, FULL) for s in range(10, 15)] == [None] * 5
    r = p.decide(15, 8, 3, 1, FULL)
    assert r is not None and r.to == 3 and "KV 95% used" in r.reason
    calm = SlotPolicy(2, 8, cooldown=1)
    assert all(calm.decide(s, 8, 3, 1, ROOMY) is None for s in range(50))  # no memory pressure
    blocked = KvView(total=100, free=50, blocks_per_slot=2, traded=True, blocked=True)
    assert SlotPolicy(2, 8, cooldown=0).decide(1, 8, 3, 1, blocked).reason.endswith("requests wait for KV blocks")
    no_budget = KvView(total=100, free=0, blocks_per_slot=0, traded=False, blocked=True)
    assert all(SlotPolicy(2, 8, cooldown=0).decide(s, 8, 1, 1, no_budget) is None for s in range(50))


def test_shrink_never_below_min_or_the_slots_in_use_and_demand_resets_the_cooldown():
    assert SlotPolicy(4, 8, cooldown=0).decide(1, 8, 1, 1, FULL).to == 4
    assert SlotPolicy(1, 8, cooldown=0).decide(1, 8, 1, 6, FULL).to == 6
    p = SlotPolicy(1, 8, cooldown=3)
    for step in (1, 2, 3):
        p.decide(step, 8, 2, 2, FULL)
    p.decide(4, 8, 8, 2, FULL)  # demand back up: the cooldown starts again
    assert p.decide(5, 8, 2, 2, FULL) is None
    assert p.decide(8, 8, 2, 2, FULL).to == 2


def test_oscillation_freezes_the_slot_count():
    p = SlotPolicy(1, 8, cooldown=0, window=100, max_resizes=3)
    slots, seen = 1, []
    for step in range(1, 40):
        demand = 8 if step % 2 else 1
        r = p.decide(step, slots, demand, 1, FULL if demand == 1 else ROOMY)
        if r:
            slots = r.to
            seen.append(r.to)
    assert seen == [8, 1, 8] and p.frozen and "3 resizes within 100 steps" in p.frozen
    assert p.decide(1000, slots, 1, 1, FULL) is None


def test_slot_table_compaction_keeps_busy_then_pinned_then_recent():
    m = SlotManager(6, pinned={"p"})
    for step, name in enumerate(["a", "b", "p", "c", "d", "e"], start=1):
        m.place(name, step)
    m.acquire(m.lookup("e"), 10)
    m.acquire(m.lookup("b"), 10)
    move = m.resize(3, step=11)
    # busy b (slot 1) and e (slot 5), then pinned p (slot 2); a, c, d evicted
    assert move.keep == [1, 2, 5]
    assert m.adapter_of == ["b", "p", "e"] and move.remap == {1: 0, 2: 1, 5: 2}
    assert sorted(move.evicted) == ["a", "c", "d"] and m.stats.evictions == 3
    assert m.users == [1, 0, 1] and m.lookup("e") == 2
    grown = m.resize(5, step=12)
    assert grown.keep == [0, 1, 2] and m.adapter_of == ["b", "p", "e", None, None] and grown.evicted == []
    assert m.place("x", 13)[0] == 3  # empty slots first
    with pytest.raises(RuntimeError):
        m.resize(1, step=14)  # two slots are in use


def _seq(i: int, n: int) -> Sequence:
    return Sequence(i, str(i), None, list(range(n)), SamplingParams())


def test_kv_blocks_past_the_new_end_move_below_it():
    bm = BlockManager(10, block_size=4)
    a, b = _seq(0, 12), _seq(1, 8)  # 3 and 2 blocks
    bm.allocate(a)
    bm.allocate(b)
    bm.free_seq(a)
    c = _seq(2, 16)  # 4 blocks: takes 5..8
    bm.allocate(c)
    assert c.block_table == [5, 6, 7, 8] and b.block_table == [3, 4]
    mapping = bm.resize(6, [b, c])
    assert mapping == {3: 3, 4: 4, 5: 5, 6: 0, 7: 1, 8: 2}
    assert c.block_table == [5, 0, 1, 2] and bm.num_blocks == 6 and bm.num_free == 0
    with pytest.raises(RuntimeError):
        bm.resize(5, [b, c])
    bm.resize(9, [b, c])
    assert sorted(bm.free) == [6, 7, 8]


def test_budget_arithmetic_and_too_small_budget_message():
    mb = MemoryBudget(budget=1000, weights=300, working=100, slot_bytes=50, block_bytes=20)
    assert mb.kv_blocks(0) == 30 and mb.kv_blocks(4) == 20 and mb.blocks_per_slot == 3
    with pytest.raises(ConfigError, match="memory_budget 1000 B is too small"):
        mb.check(4, 21)


def test_config_validation_of_slot_options():
    cfg = EngineConfig(max_loras=8, min_loras=2)
    assert cfg.dynamic_slots is True
    assert EngineConfig(max_loras=8).dynamic_slots is False and EngineConfig(max_loras=8).min_loras == 8
    for kwargs, message in [
        (dict(max_loras=4, min_loras=5), "min_loras"),
        (dict(max_loras=4, min_loras=1, pinned=("a", "b")), "pinned names 2"),
        (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
        (dict(memory_budget=1 << 30, gpu_memory_utilization=0.5), "not both"),
        (dict(slot_cooldown_steps=0), "slot_cooldown_steps"),
    ]:
        with pytest.raises(ConfigError, match=message):
            EngineConfig(**kwargs)
