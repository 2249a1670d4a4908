"""Dynamic adapter slots on a tiny model: same greedy tokens whatever the slot policy, weights in the
right slots after compaction, exact tier counts for a scripted sequence, a broken adapter evicts
nothing, and memory really moves between slots and the KV cache under a budget."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from runs import tiny_engine

from loracli.errors import ConfigError
from loracli.requests import Request
from loracli.sampling import SamplingParams

ADAPTERS = (None, "attn4", "mlp8", "all16rs", "pattern")


pytestmark = pytest.mark.usefixtures("one_thread")


def workload(n: int = 24) -> list[Request]:
    # phases: one adapter, then all four mixed with the base model, then one again
    names = [["attn4"] * 6, [ADAPTERS[i % 5] for i in range(12)], ["mlp8"] * 6]
    flat = [a for phase in names for a in phase][:n]
    return [Request(f"r{i}", a, f"the quick brown fox {'jumps ' * (i % 3)}{i}") for i, a in enumerate(flat)]


def outputs(engine, reqs) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    got = {}
    for r in engine.generate(reqs, params):
        assert r.error is None, r.error
        got[r.id] = list(r.token_ids)
    return got


def test_greedy_tokens_equal_for_dynamic_fixed_large_and_fixed_one(llama_dir, llama_adapters):
    reqs = workload()
    fixed_large = outputs(tiny_engine(llama_dir, llama_adapters, max_loras=4), reqs)
    fixed_one = outputs(tiny_engine(llama_dir, llama_adapters, max_loras=1), reqs)
    dyn = tiny_engine(llama_dir, llama_adapters, max_loras=4, min_loras=1, verify_slots=True)
    dynamic = outputs(dyn, reqs)
    # a budget that binds: slots grow with the mix, then shrink to give KV blocks back (and some
    # sequences are preempted for KV along the way)
    budget = tiny_engine(
        llama_dir,
        llama_adapters,
        max_loras=4,
        min_loras=1,
        verify_slots=True,
        memory_budget=1380 << 10,
        slot_cooldown_steps=2,
        max_num_seqs=4,
        block_size=4,
        max_batched_tokens=64,
        adapter_load_workers=0,  # the demand each step sees must not follow load timing
    )
    budgeted = outputs(budget, reqs)
    assert len(fixed_large) == len(reqs)
    assert fixed_one == fixed_large and dynamic == fixed_large and budgeted == fixed_large
    grown = [e for e in dyn.resizer.report()["timeline"] if e["to"] > e["from"]]
    assert grown and dyn.slots.n_slots > 1
    report = budget.resizer.report()
    assert report["memory_budget"] == 1380 << 10
    assert any(e["to"] > e["from"] for e in report["timeline"])
    assert any(e["to"] < e["from"] and "KV" in e["reason"] for e in report["timeline"])
    assert all(m["slot_bytes"] + m["kv_bytes"] > 0 for m in report["memory"])


def test_compaction_moves_weights_with_their_adapters_and_verify_catches_a_wrong_slot(llama_dir, llama_adapters):
    e = tiny_engine(llama_dir, llama_adapters, max_loras=4, min_loras=1)
    e.resizer.resize(4, "test", 0)
    for name in ("attn4", "mlp8", "all16rs", "pattern"):
        slot, _, write = e.slots.place(name, 1)
        e.model_runner.write_adapter(slot, e.store.get(name))
    e.slots.acquire(e.slots.lookup("pattern"), 5)  # pattern is busy: it must survive
    e.slots.last_used[e.slots.lookup("mlp8")] = 4  # mlp8 is the most recent of the idle ones
    e.resizer.resize(2, "test", 6)
    assert e.slots.adapter_of == ["mlp8", "pattern"]
    e.resizer.verify()  # every resident adapter's weights in its new slot, in every layer
    lin = next(lin for _, lin in e.model.linears() if lin.ranks[0][1])
    lin.A[1, 0, 0] += 1.0  # slot 1, sub-projection 0, rank row 0
    with pytest.raises(RuntimeError, match="verify_slots: adapter 'pattern' in slot 1"):
        e.resizer.verify()


def test_scripted_requests_give_exact_disk_loads_cpu_hits_and_evictions(llama_dir, llama_adapters):
    e = tiny_engine(llama_dir, llama_adapters, max_loras=1, max_cpu_loras=2)
    for i, name in enumerate(["attn4", "mlp8", "attn4", "pattern", "attn4", "mlp8", "mlp8"]):
        outputs(e, [Request(f"s{i}", name, "hello there")])
    r = e.reports()["slots"]
    # CPU LRU of 2: loads attn4, mlp8, pattern, mlp8 (evicted by pattern); hits attn4 twice, mlp8 once
    assert (r["disk_loads"], r["cpu_hits"], r["cpu_evictions"]) == (4, 2, 2)
    # one slot: every change of adapter evicts the previous one; the last mlp8 is already resident
    assert (r["slot_activations"], r["slot_evictions"], r["slot_hits"]) == (6, 5, 1)
    assert r["swap_ms_p50"] is not None and r["swap_ms_p99"] >= r["swap_ms_p50"]


def test_an_adapter_that_fails_to_load_gets_an_error_and_evicts_nothing(llama_dir, llama_adapters, tmp_path):
    folder = tmp_path / "adapters"
    shutil.copytree(llama_adapters, folder)
    (folder / "mlp8" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    e = tiny_engine(llama_dir, folder, max_loras=1)
    outputs(e, [Request("a", "attn4", "hello")])
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    results = list(e.generate([Request("b", "mlp8", "hello")], params))
    assert results[0].error is not None and results[0].error[0] == "adapter_error"
    assert e.slots.resident() == ["attn4"] and e.slots.stats.evictions == 0


def test_pinned_adapters_are_resident_from_the_start_and_never_evicted(llama_dir, llama_adapters):
    e = tiny_engine(llama_dir, llama_adapters, max_loras=2, min_loras=2, pinned=("all16rs",))
    assert e.slots.resident() == ["all16rs"]
    outputs(e, [Request(f"p{i}", a, "hello") for i, a in enumerate(["attn4", "mlp8", "pattern", "attn4"])])
    assert "all16rs" in e.slots.resident()
    with pytest.raises(ConfigError, match="pinned: unknown adapter 'nope'"):
        tiny_engine(llama_dir, llama_adapters, max_loras=2, min_loras=2, pinned=("nope",))


def test_slots_and_kv_trade_memory_under_one_budget(llama_dir, llama_adapters):
    e = tiny_engine(llama_dir, llama_adapters, max_loras=4, min_loras=1, memory_budget=24 << 20, max_lora_rank=16)
    blocks_at_one, kv_at_one = e.blocks.num_blocks, e.model.kv_bytes()
    e.resizer.resize(4, "test", 1)
    assert e.blocks.num_blocks == e.resizer.budget.kv_blocks(4) < blocks_at_one
    assert e.model.kv_bytes() < kv_at_one
    assert all(lin.A.shape[0] == 4 for _, lin in e.model.linears())
    e.resizer.resize(1, "test", 2)
    assert e.blocks.num_blocks == blocks_at_one and e.model.kv_bytes() == kv_at_one
    with pytest.raises(ConfigError, match="memory_budget .* is too small"):
        tiny_engine(llama_dir, llama_adapters, max_loras=4, min_loras=1, memory_budget=1 << 20)


RSS_CHILD = r"""
import sys
from pathlib import Path
import torch
from runs import tiny_engine
from tiny import make_adapter

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

def rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

model, folder, budget = sys.argv[1:4]
torch.set_num_threads(1)
# rank 256 on every target: the slot buffers are laid out as wide as the adapters in them need
if not (Path(folder) / "wide").exists():
    make_adapter(Path(model), Path(folder) / "wide", r=256, targets=TARGETS)
e = tiny_engine(model, folder, max_loras=16, min_loras=1, max_lora_rank=256,
                memory_budget=int(budget) or None, max_batched_tokens=64)
e.resizer.resize(16, "grow", 1)
for i in range(16):
    e.model_runner.write_adapter(i, e.store.get("wide"))
for kv in e.model.kv:
    kv.fill_(0)
big = rss_mib()
e.resizer.resize(1, "shrink", 2)
print(big, rss_mib(), e.model.slot_bytes() / 2**20)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc (Linux)")
def test_a_shrink_really_returns_memory_to_the_os(llama_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    for budget in (64 << 20, 0):  # under a budget (the KV cache reallocated larger, not touched yet), and without
        out = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, str(llama_dir), str(tmp_path), str(budget)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        big, small, slot_mib = map(float, out[-3:])
        # 15 slots of buffers freed (2 MiB each here)
        assert big - small >= 0.8 * 15 * slot_mib, (budget, big, small, slot_mib)
