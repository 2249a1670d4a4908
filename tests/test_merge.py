"""dLoRA merge/unmerge: the policy without tensors, base weights restored bit for bit, the same greedy
tokens under never/auto/always-single, and a bounded wait for a trickle of other adapters while one
adapter floods the queue (the bound is asserted, and shown to fail without credits)."""

from __future__ import annotations

import pytest
import torch
from runs import tiny_engine

from loracli.engine.merge_policy import MergePolicy, MergeView, Transition
from loracli.errors import ConfigError
from loracli.requests import Request
from loracli.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def view(counts, running=(), overdue=0, owed=False, work=None) -> MergeView:
    return MergeView(dict(counts), frozenset(running), overdue, owed, work or {a: 64 * n for a, n in counts.items()})


# --- the policy, no tensors --------------------------------------------------------------------------


def test_auto_drains_then_merges_then_unmerges_with_hysteresis():
    p = MergePolicy("auto")
    assert p.decide(view({"x": 3, "y": 0})) is None  # too few requests to be worth it
    assert p.decide(view({"x": 7, "y": 3})) is None  # 70% < 80%
    t = p.decide(view({"x": 9, "y": 1}, running={"x", "y"}))
    assert t == Transition("drain", "x", "9 of 10 runnable requests")
    p.apply(t)
    assert p.decide(view({"x": 9, "y": 1}, running={"x", "y"})) is None  # y still runs: keep draining
    t = p.decide(view({"x": 9, "y": 1}, running={"x"}))
    assert t.action == "merge"
    p.apply(t)
    assert p.decide(view({"x": 6, "y": 4}, running={"x"})) is None  # 60%: above the 50% unmerge share
    t = p.decide(view({"x": 4, "y": 5}, running={"x"}))
    assert t.action == "unmerge" and "44% < 50%" in t.reason
    p.apply(t)
    assert p.state == "unmerged" and p.adapter is None


def test_drain_is_cancelled_when_the_mix_changes_and_merged_unmerges_when_its_requests_end():
    p = MergePolicy("auto")
    p.apply(Transition("drain", "x", ""))
    assert p.decide(view({"x": 1, "y": 5}, running={"y"})).action == "cancel"
    p.apply(Transition("merge", "x", ""))
    assert p.decide(view({"y": 2}, running={"y"})) == Transition("unmerge", "x", "no requests left")


def test_base_model_requests_count_against_the_share_but_are_never_merged():
    p = MergePolicy("auto")
    assert p.decide(view({None: 50, "x": 5})) is None
    assert p.decide(view({None: 1, "x": 9})).adapter == "x"


def test_always_single_merges_only_an_unmixed_queue_and_never_never_merges():
    p = MergePolicy("always-single")
    assert p.decide(view({"x": 2, None: 1})) is None
    t = p.decide(view({"x": 1}))
    assert t.action == "drain"  # always-single ignores min_requests and the cost estimate
    p.apply(t)
    p.apply(Transition("merge", "x", ""))
    assert p.decide(view({"x": 30, "y": 1})).reason == "other adapters have requests"
    assert MergePolicy("never").decide(view({"x": 100})) is None


def test_credits_force_an_unmerge_and_owed_requests_block_the_next_drain():
    p = MergePolicy("auto", credit_steps=8)
    p.apply(Transition("drain", "x", ""))
    p.apply(Transition("merge", "x", ""))
    assert p.decide(view({"x": 99, "y": 1}, overdue=7)) is None
    t = p.decide(view({"x": 99, "y": 1}, overdue=8))
    assert t.action == "unmerge" and t.reason.startswith("credits")
    p.apply(t)
    assert p.decide(view({"x": 99, "y": 1}, owed=True)) is None
    assert p.decide(view({"x": 99, "y": 1}, owed=False)).action == "drain"


def test_measured_costs_decide_whether_a_merge_is_worth_it():
    p = MergePolicy("auto")
    for _ in range(5):
        p.observe_step(1.0, 10)  # 0.1 s per token unmerged
    p.observe_switch(1.0)
    # prior: merged saves 15% of 0.1 s per token; 640 tokens to go: 9.6 s > a merge + an unmerge (2 s)
    assert p.decide(view({"x": 10})) is not None
    assert p.decide(view({"x": 10}, work={"x": 100})) is None  # 1.5 s < 2 s: not worth it
    p.observe_switch(1000.0)
    assert p.decide(view({"x": 10})) is None  # switching now costs far more than merging saves


def test_thresholds_tune_from_measured_merged_vs_unmerged_throughput():
    p = MergePolicy("auto")
    p.observe_step(1.0, 10)
    p.apply(Transition("drain", "x", ""))
    p.apply(Transition("merge", "x", ""))
    p.observe_step(0.5, 10)  # merged: twice as fast
    p.apply(Transition("unmerge", "x", ""))
    assert p.merge_share == pytest.approx(0.75)  # it paid: merge a little earlier (additive)
    p.apply(Transition("drain", "x", ""))
    p.apply(Transition("merge", "x", ""))
    for _ in range(20):
        p.observe_step(3.0, 10)  # merged: slower than unmerged
    p.apply(Transition("unmerge", "x", ""))
    assert p.merge_share == pytest.approx(0.825)  # it did not: back off (multiplicative)


def test_merge_policy_is_validated(llama_dir):
    with pytest.raises(ConfigError, match="merge_policy"):
        tiny_engine(llama_dir, merge_policy="sometimes")


# --- tensors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_base_weights_are_restored_bit_for_bit_after_many_cycles(llama_dir, llama_adapters, dtype):
    e = tiny_engine(llama_dir, llama_adapters, max_loras=4, dtype=dtype)
    original = [lin.weight.clone() for _, lin in e.model.linears()]
    for name in ("attn4", "mlp8", "all16rs", "pattern"):
        slot, _, _ = e.slots.place(name, 1)
        e.model_runner.write_adapter(slot, e.store.get(name))
    for cycle in range(12):
        name = ("attn4", "mlp8", "all16rs", "pattern")[cycle % 4]
        e.model_runner.merge(name, e.slots.lookup(name))
        changed = sum(not torch.equal(lin.weight, w) for (_, lin), w in zip(e.model.linears(), original, strict=True))
        assert changed > 0  # the merge really changed the weights
        e.model_runner.unmerge()
        assert all(torch.equal(lin.weight, w) for (_, lin), w in zip(e.model.linears(), original, strict=True))


def assert_merge_matches_the_lora_path(e, adapter: str) -> None:
    """Merged into the base weights, `adapter` gives its LoRA path's logits (close; the adapter
    matters); unmerged again, the weights and the LoRA path's logits are bit-exact."""
    ids = e.tokenizer("merge me into the base weights please").input_ids
    base = e.next_token_logits(None, ids)
    unmerged = e.next_token_logits(adapter, ids)
    original = [lin.weight.clone() for _, lin in e.model.linears()]
    e.model_runner.merge(adapter, e.slots.lookup(adapter))
    merged = e.next_token_logits(adapter, ids)
    e.model_runner.unmerge()
    assert (unmerged - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(merged, unmerged, atol=2e-4, rtol=1e-4)
    assert all(torch.equal(lin.weight, w) for (_, lin), w in zip(e.model.linears(), original, strict=True))
    torch.testing.assert_close(e.next_token_logits(adapter, ids), unmerged, atol=0, rtol=0)


def test_merged_logits_match_the_unmerged_lora_path(llama_dir, llama_adapters):
    assert_merge_matches_the_lora_path(tiny_engine(llama_dir, llama_adapters, max_loras=2), "all16rs")


def workload() -> list[Request]:
    # one adapter dominates, then a mix (with the base model), then another single adapter
    names = ["all16rs"] * 14 + ["attn4", None, "mlp8", "pattern", "all16rs", "attn4"] + ["mlp8"] * 10
    return [Request(f"r{i}", a, f"the quick brown fox {'jumps ' * (i % 3)}{i}") for i, a in enumerate(names)]


def outputs(engine) -> dict[str, list[int]]:
    got = {}
    for r in engine.generate(workload(), SamplingParams(max_tokens=6, ignore_eos=True)):
        assert r.error is None, r.error
        got[r.id] = list(r.token_ids)
    return got


def test_greedy_tokens_equal_under_never_auto_and_always_single(llama_dir, llama_adapters):
    engines = {
        # Synchronous adapter loads: what gets merged must not depend on load timing.
        p: tiny_engine(llama_dir, llama_adapters, max_loras=2, max_num_seqs=4, merge_policy=p, adapter_load_workers=0)
        for p in ("never", "auto", "always-single")
    }
    got = {p: outputs(e) for p, e in engines.items()}
    assert len(got["never"]) == len(workload())
    assert got["auto"] == got["never"] and got["always-single"] == got["never"]
    for p in ("auto", "always-single"):
        report = engines[p].merger.report()
        assert report["merges"] >= 1, report
        assert {"merge", "unmerge"} <= {t["action"] for t in report["timeline"]}
        assert report["switch_ms_p50"] is not None and report["state"] == "unmerged"
    assert engines["never"].merger.report()["merges"] == 0


def flood_and_trickle(engine, flood: int = 90, every: int = 10, max_tokens: int = 4) -> tuple[dict, int]:
    """Keep the queue full of one adapter's requests and add one of another adapter every `every`
    steps; returns each trickle request's wait (steps from arrival to admission) and the steps run."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    others = ["attn4", None, "mlp8", "pattern"]
    added, trickle, waits, step = 0, {}, {}, 0
    while added < flood or engine.has_work():
        while added < flood and len(engine.scheduler.waiting) < 12:
            engine.add_request(Request(f"x{added}", "all16rs", f"flood {added}"), params)
            added += 1
        if step % every == 0 and added < flood:
            rid = f"t{step}"
            engine.add_request(Request(rid, others[len(trickle) % 4], f"trickle {step}"), params)
            trickle[rid] = True
        for r in engine.step():
            assert r.error is None, r.error
            if r.id in trickle:
                waits[r.id] = r.wait_steps
        step += 1
    assert set(waits) == set(trickle)
    return waits, step


def test_a_flooding_adapter_cannot_starve_a_trickle_of_others(llama_dir, llama_adapters):
    credit_steps, max_tokens = 8, 4

    def engine(policy, credits):
        return tiny_engine(
            llama_dir,
            llama_adapters,
            max_loras=2,
            max_num_seqs=4,
            merge_policy=policy,
            starvation_steps=credits,
            adapter_load_workers=0,  # waits are counted in steps: no step may wait on a load in flight
        )

    fcfs, _ = flood_and_trickle(engine("never", credit_steps), max_tokens=max_tokens)
    e = engine("auto", credit_steps)
    waits, _ = flood_and_trickle(e, max_tokens=max_tokens)
    report = e.merger.report()
    assert report["merges"] >= 2, report  # the flood was merged, and re-merged after credits forced it open
    assert any(t["reason"].startswith("credits") for t in report["timeline"])
    # A request is held back by a merge at most once (it is owed: no new drain until it is admitted),
    # for `credit_steps` steps, then one step to unmerge, then it goes first as soon as a running
    # sequence finishes (prefill + max_tokens steps). On top of the plain first-come wait:
    bound = max(fcfs.values()) + credit_steps + 1 + (max_tokens + 1)
    assert max(waits.values()) <= bound, (waits, fcfs)
    # and the bound is the credits' doing: without them the trickle waits for the flood to end
    starved, _ = flood_and_trickle(engine("auto", 10_000), max_tokens=max_tokens)
    assert max(starved.values()) > 2 * bound, (starved, bound)
