"""Prefix caching: the block manager's bookkeeping without tensors, then the engine with and without it.

Block manager: hits, the last token always computed, LRU eviction among free blocks (unnamed ones
first), identities that never share (adapters, base, merged, mixes, RoPE tables), refcounts with
forks, prompt logprobs refusing the cache, failed steps un-naming blocks, resizes. Scheduler:
only uncached tokens count against the batch budget. Engine (tiny Llama, float32): a mixed batch
of several adapters and the base model sharing a prefix gives the same greedy tokens with and
without caching (and bit-identical logprobs in deterministic mode), also under preemption, with
n > 1 samples and with merging; the tokens equal PEFT's for a request that reused cached blocks;
Gemma 2 (window, soft cap) and Phi-3 (LongRoPE) keep their outputs. Also the bench's `shared-prefix`
workload setting, the `prefix-caching` system setting and the `Counters` hit rates.
"""

from __future__ import annotations

import pytest

from loracli.config import EngineConfig
from loracli.engine.block_manager import BlockManager, chain_digests, prefix_identity
from loracli.engine.scheduler import Scheduler
from loracli.engine.sequence import Sequence
from loracli.engine.slots import SlotManager
from loracli.errors import ConfigError
from loracli.requests import AdapterMix, Request
from loracli.sampling import SamplingParams

BASE = ("base", False)


def seq(i, tokens, adapter=None, **params):
    return Sequence(i, str(i), adapter, list(tokens), SamplingParams(**params))


def test_a_freed_prefix_is_found_again_and_only_full_blocks_before_the_last_token():
    bm = BlockManager(8, 4, prefix_caching=True)
    a = seq(0, range(10))  # blocks: [0..3] [4..7] [8, 9]
    bm.allocate(a, BASE)
    assert a.num_cached == 0 and len(a.block_table) == 3
    first_two = a.block_table[:2]
    bm.free_seq(a)
    assert bm.num_free == 8  # cached blocks are free memory
    b = seq(1, [*range(8), 50, 51, 52])
    assert bm.needed(b, BASE) == (3, 8)  # the two cached blocks are free: taking them costs as much as fresh ones
    bm.allocate(b, BASE)
    assert b.block_table[:2] == first_two and b.num_cached == 8
    c = seq(2, range(8))  # exactly two full blocks, both cached: the last token must still be computed
    bm.allocate(c, BASE)
    assert c.block_table[0] == first_two[0] and c.block_table[1] != first_two[1] and c.num_cached == 4
    assert bm.refs[first_two[0]] == 2 and bm.refs[first_two[1]] == 1
    assert (bm.stats.lookup_blocks, bm.stats.hit_blocks, bm.stats.hit_tokens) == (2 + 2 + 2, 0 + 2 + 1, 12)


def test_fresh_blocks_come_from_unnamed_free_ones_first_then_the_least_recently_freed():
    bm = BlockManager(6, 2, prefix_caching=True)
    old, new = seq(0, [1, 2, 3, 4, 5]), seq(1, [7, 8, 9, 10, 11])
    bm.allocate(old, BASE)
    bm.allocate(new, BASE)
    bm.free_seq(old)  # freed first: evicted first
    bm.free_seq(new)
    assert len(bm.free) == 2 and len(bm.cached_free) == 4  # each left 2 named full blocks + 1 unnamed tail
    bm.allocate(seq(2, [20, 21, 22, 23, 24]), None)  # 3 fresh blocks: the 2 unnamed, then old's last block
    assert len(bm.cached_free) == 3
    hits_old = bm.cached_prefix(seq(3, [1, 2, 3, 4, 5, 6]), BASE)
    hits_new = bm.cached_prefix(seq(4, [7, 8, 9, 10, 11, 12]), BASE)
    assert len(hits_old) == 1 and len(hits_new) == 2  # old's tail block went first, its head block and new's stay


def test_eviction_drops_the_name_so_a_reused_block_is_never_hit():
    bm = BlockManager(2, 2, prefix_caching=True)
    a = seq(0, [1, 2, 3, 4])
    bm.allocate(a, BASE)
    bm.free_seq(a)
    b = seq(1, [9, 9, 9, 9])
    bm.allocate(b, BASE)  # takes both blocks, evicting a's names, naming its own
    assert bm.cached_prefix(seq(2, [1, 2, 3, 4, 5]), BASE) == []
    assert len(bm.cached_prefix(seq(3, [9, 9, 9, 9, 5]), BASE)) == 2


def test_different_identities_never_share():
    tokens = list(range(9))
    shout, brief = seq(0, tokens, "shout"), seq(1, tokens, "brief")
    base = seq(2, tokens)
    mix = seq(3, tokens, "shout*0.5")
    mix.mix = AdapterMix((("shout", 0.5),))
    mix_other_weight = seq(4, tokens, "shout*0.7")
    mix_other_weight.mix = AdapterMix((("shout", 0.7),))
    identities = [
        prefix_identity(shout),
        prefix_identity(brief),
        prefix_identity(base),
        prefix_identity(shout, merged="shout"),
        prefix_identity(mix),
        prefix_identity(mix_other_weight),
        prefix_identity(shout, long_rope=True),
    ]
    assert len(set(identities)) == len(identities)
    assert prefix_identity(brief, merged="shout") == prefix_identity(brief)  # another adapter's merge: unchanged
    assert prefix_identity(base, merged="shout") == prefix_identity(base)
    bm = BlockManager(64, 4, prefix_caching=True)
    for i, ident in enumerate(identities):
        s = seq(10 + i, tokens)
        bm.allocate(s, ident)
        assert s.num_cached == 0, ident
    again = seq(99, tokens)
    bm.allocate(again, identities[0])
    assert again.num_cached == 8


def test_forks_share_cached_blocks_and_refcounts_return_to_zero():
    bm = BlockManager(16, 4, prefix_caching=True)
    warm = seq(0, range(12))
    bm.allocate(warm, BASE)
    parent = seq(1, range(14))
    bm.allocate(parent, BASE)
    assert parent.num_cached == 12 and parent.block_table[:3] == warm.block_table
    kids = [seq(2 + i, range(14)) for i in range(3)]
    copies = [bm.fork(parent, k) for k in kids]
    assert all(c is not None and c[0] == parent.block_table[3] for c in copies)
    assert all(bm.refs[b] == 5 for b in warm.block_table)  # warm, parent and three forks
    for s in [warm, parent, *kids]:
        bm.free_seq(s)
    assert bm.refs == {} and bm.num_free == 16 and len(bm.cached_free) == 3


def test_prompt_logprobs_requests_neither_hit_nor_name_blocks():
    bm = BlockManager(16, 4, prefix_caching=True)
    bm.allocate(seq(0, range(9)), BASE)
    asks = seq(1, range(9), prompt_logprobs=1)
    bm.allocate(asks, BASE)
    assert asks.num_cached == 0 and not set(asks.block_table) & set(bm.key_of)
    asks.prompt_logprobs = []  # once it has them (a recompute after preemption) the cache is fine
    bm.free_seq(asks)
    bm.allocate(asks, BASE)
    assert asks.num_cached == 8


def test_caching_off_and_no_identity_never_hit():
    off = BlockManager(16, 4, prefix_caching=False)
    off.allocate(seq(0, range(9)), BASE)
    again = seq(1, range(9))
    off.allocate(again, BASE)
    assert again.num_cached == 0 and off.key_of == {}
    on = BlockManager(16, 4, prefix_caching=True)
    on.allocate(seq(0, range(9)), BASE)
    anonymous = seq(1, range(9))
    on.allocate(anonymous, None)
    assert anonymous.num_cached == 0


def test_forget_takes_a_failed_steps_blocks_out_of_the_cache():
    bm = BlockManager(16, 4, prefix_caching=True)
    a = seq(0, range(9))
    bm.allocate(a, BASE)
    bm.forget(a)
    bm.free_seq(a)
    assert bm.key_of == {} and bm.block_of == {} and len(bm.cached_free) == 0
    b = seq(1, range(9))
    bm.allocate(b, BASE)
    assert b.num_cached == 0


def test_resize_keeps_names_of_blocks_in_use_and_drops_the_free_ones():
    bm = BlockManager(8, 2, prefix_caching=True)
    gone = seq(0, [5, 5, 5, 5, 5])
    bm.allocate(gone, BASE)
    bm.free_seq(gone)
    kept = seq(1, [1, 2, 3, 4, 5])
    bm.allocate(kept, BASE)
    bm.resize(4, [kept])
    assert all(b < 4 for b in kept.block_table) and bm.num_free == 1
    assert bm.cached_prefix(seq(2, [5, 5, 5, 5, 5]), BASE) == []  # free rows were not copied
    assert bm.cached_prefix(seq(3, [1, 2, 3, 4, 9]), BASE) == kept.block_table[:2]


def test_chain_digests_depend_on_every_earlier_token():
    a = chain_digests([1, 2, 3, 4, 5, 6], 2, [])
    b = chain_digests([9, 2, 3, 4, 5, 6], 2, [])
    assert len(a) == 3 and all(x != y for x, y in zip(a, b, strict=True))
    assert chain_digests([1, 2, 3, 4, 5, 6, 7, 8], 2, a[:2]) == chain_digests([1, 2, 3, 4, 5, 6, 7, 8], 2, [])


def test_scheduler_counts_only_uncached_tokens_against_the_budget():
    cfg = EngineConfig(max_num_seqs=8, max_batched_tokens=24, block_size=4)
    blocks = BlockManager(64, 4, prefix_caching=True)
    sched = Scheduler(cfg, blocks, SlotManager(2), lambda name: None)
    prefix = list(range(100, 120))
    sched.add(seq(0, [*prefix, 1, 2]))
    first = sched.schedule()
    assert [s.seq_id for s in first.seqs] == [0]
    for i in range(1, 5):
        sched.add(seq(i, [*prefix, i, i]))
    second = sched.schedule()  # 22 tokens each, 20 cached: all four fit in a 24-token budget
    assert [s.seq_id for s in second.seqs] == [1, 2, 3, 4] and all(s.num_cached == 20 for s in second.seqs)
    sched.back_off(second)  # out of memory: the batch's blocks leave the cache, it waits again
    assert all(s.block_table == [] for s in second.seqs) and len(sched.waiting) == 4


def test_the_shared_prefix_workload_starts_every_prompt_with_the_same_tokens(llama_dir):
    from loracli.bench.workload import PromptMaker, WorkloadSpec, synthetic_requests
    from loracli.model.loader import load_tokenizer

    tok = load_tokenizer(llama_dir)
    spec = WorkloadSpec(prompts=6, prompt_len=(3, 8)).with_setting("shared-prefix", "40")
    reqs = synthetic_requests([spec], PromptMaker(tok))
    ids = [tok(r.prompt)["input_ids"] for r in reqs]
    assert all(i[:40] == ids[0][:40] for i in ids) and len({tuple(i[40:]) for i in ids}) == 6
    assert all(r.prompt_len == len(i) and 40 + 3 <= len(i) <= 40 + 8 for r, i in zip(reqs, ids, strict=True))
    assert "after a shared 40-tok prefix" in spec.describe()
    plain = synthetic_requests([WorkloadSpec(prompts=6, prompt_len=(3, 8))], PromptMaker(tok))
    assert all(r.prompt.endswith(p.prompt) for r, p in zip(reqs, plain, strict=True))  # the same tails


def test_the_bench_setting_prefix_caching_sets_the_engine_field():
    from loracli.bench.system_names import parse_systems

    off, on = parse_systems("loracli:prefix-caching=false,loracli")
    assert dict(off.overrides) == {"enable_prefix_caching": False} and on.overrides == ()
    assert dict(parse_systems("loracli:enable-prefix-caching=0")[0].overrides) == {"enable_prefix_caching": False}
    with pytest.raises(ConfigError, match="prefix-caching must be true or false"):
        parse_systems("loracli:prefix-caching=maybe")


def test_counters_give_hit_rates_and_add_up_over_workers():
    from loracli.results import Counters

    assert Counters().prefix_cache()["block_hit_rate"] is None
    one = Counters(prefill_tokens=100, prefix_lookup_blocks=10, prefix_hit_blocks=5, prefix_saved_tokens=80)
    one.add(Counters(prefill_tokens=100, prefix_lookup_blocks=10, prefix_hit_blocks=0, prefix_saved_tokens=0))
    report = one.prefix_cache()
    assert (report["block_hit_rate"], report["token_hit_rate"], report["saved_tokens"]) == (0.25, 0.4, 80)


def test_enable_prefix_caching_is_validated():
    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        EngineConfig(enable_prefix_caching="yes")


# --- the engine ------------------------------------------------------------------------------------

PREFIX = "you are a helpful assistant who answers every question about the world with care and " * 3
TAILS = ["the quick brown fox", "what is the capital of france?", "hello", "tell me a story about a robot"]
ADAPTERS = ["attn4", "mlp8", None, "pattern"]


def shared_prefix_requests(adapters=ADAPTERS, **params):
    return [
        Request(f"{a}-{i}", a, PREFIX + t, params={"max_tokens": 6, "ignore_eos": True, **params})
        for a in adapters
        for i, t in enumerate(TAILS)
    ]


def common_prefix(engine, reqs) -> int:
    """Tokens every request's prompt starts with."""
    ids = [engine.tokenize(r) for r in reqs]
    return next((i for i, column in enumerate(zip(*ids, strict=False)) if len(set(column)) > 1), min(map(len, ids)))


def run(engine, reqs):
    results = list(engine.generate(reqs))
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    return {r.id: r for r in results}


@pytest.fixture(scope="module")
def engines(llama_dir, llama_adapters, one_thread):
    from test_engine_vs_peft import make_engine

    def make(**kw):
        return make_engine(llama_dir, llama_adapters, **{"block_size": 4, "num_kv_blocks": 600, **kw})

    return make


@pytest.mark.parametrize("max_num_seqs", [16, 3])
def test_mixed_adapters_and_base_give_the_same_tokens_with_and_without_caching(engines, max_num_seqs):
    reqs = shared_prefix_requests()
    off = run(engines(enable_prefix_caching=False, max_num_seqs=max_num_seqs), reqs)
    on_engine = engines(max_num_seqs=max_num_seqs, merge_policy="never")  # a merged adapter is an identity of its own
    on = run(on_engine, reqs)
    assert {k: r.token_ids for k, r in on.items()} == {k: r.token_ids for k, r in off.items()}
    c = on_engine.counters()
    # every request but the first of each of the 4 identities finds the shared prefix's full blocks
    prefix_blocks = common_prefix(on_engine, reqs) // 4
    assert prefix_blocks >= 10
    assert c.prefix_hit_blocks >= 3 * 4 * prefix_blocks, c
    assert c.prefix_saved_tokens == 4 * c.prefix_hit_blocks and c.prefill_tokens > c.prefix_saved_tokens


def test_different_adapters_never_share_blocks(engines):
    engine = engines(max_num_seqs=1)
    run(engine, [Request(f"{a}", a, PREFIX, params={"max_tokens": 2}) for a in ADAPTERS])
    assert engine.counters().prefix_hit_blocks == 0
    run(engine, [Request("again", "mlp8", PREFIX + "hello", params={"max_tokens": 2})])
    assert engine.counters().prefix_hit_blocks > 0


def test_deterministic_mode_gives_bit_identical_logprobs(engines):
    reqs = shared_prefix_requests(logprobs=3)
    off = run(engines(enable_prefix_caching=False, deterministic=True), reqs)
    on_engine = engines(deterministic=True)
    on = run(on_engine, reqs)
    assert on_engine.counters().prefix_hit_blocks > 0
    for key, res in off.items():
        assert on[key].token_ids == res.token_ids
        assert [(t.id, t.logprob, [u.logprob for u in t.top]) for t in on[key].logprobs] == [
            (t.id, t.logprob, [u.logprob for u in t.top]) for t in res.logprobs
        ], key


def test_preemption_under_memory_pressure_keeps_outputs(engines):
    reqs = shared_prefix_requests(adapters=["attn4", None])
    roomy = run(engines(enable_prefix_caching=False), reqs)
    tight = engines(num_kv_blocks=60)
    squeezed = run(tight, reqs)
    assert {k: r.token_ids for k, r in squeezed.items()} == {k: r.token_ids for k, r in roomy.items()}
    assert tight.scheduler.preemptions > 0 and tight.counters().prefix_hit_blocks > 0


def test_n_samples_and_prompt_logprobs_with_caching(engines):
    reqs = shared_prefix_requests(adapters=["mlp8"], n=3, temperature=0.0)
    reqs.append(Request("plp", "mlp8", PREFIX + "hello", params={"max_tokens": 3, "prompt_logprobs": 1}))
    off = run(engines(enable_prefix_caching=False), reqs)
    on = run(engines(), reqs)
    for key, res in off.items():
        assert on[key].token_ids == res.token_ids, key
        assert [c.token_ids for c in on[key].choices] == [c.token_ids for c in res.choices], key
    plp_on, plp_off = on["plp"].prompt_logprobs, off["plp"].prompt_logprobs
    assert len(plp_on) == len(plp_off) and plp_on[0] is None
    assert [p.id for p in plp_on[1:]] == [p.id for p in plp_off[1:]]
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(plp_on[1:], plp_off[1:], strict=True))


def test_merging_keeps_outputs_with_caching(engines):
    """Deterministic mode, so merged and unmerged KV differ in their bits: a block computed while the
    adapter was merged must not serve it unmerged (or the reverse), or the logprobs would differ."""
    # attn4 runs unmerged first, then (after the base requests) alone and merged: its cached blocks must not serve it
    reqs = shared_prefix_requests(adapters=["attn4", None, "attn4", "attn4"], logprobs=1)
    reqs = [Request(f"{r.id}-{i}", r.adapter, r.prompt, params=r.params) for i, r in enumerate(reqs)]
    # Synchronous adapter loads: the two engines must admit (and merge) in the same order whatever the load timing.
    common = dict(max_num_seqs=4, merge_policy="always-single", deterministic=True, adapter_load_workers=0)
    plain = engines(enable_prefix_caching=False, **common)
    off = run(plain, reqs)
    merging = engines(**common)
    on = run(merging, reqs)
    for key, res in off.items():
        assert on[key].token_ids == res.token_ids, key
        assert [t.logprob for t in on[key].logprobs] == [t.logprob for t in res.logprobs], key
    assert merging.merger.report()["merges"] >= 1 and merging.counters().prefix_hit_blocks > 0
    timelines = [[(t["step"], t["action"]) for t in e.merger.report()["timeline"]] for e in (merging, plain)]
    assert timelines[0] == timelines[1]  # the same merges at the same steps: the bits must agree


def test_a_cached_prefix_gives_peft_tokens(llama_dir, llama_adapters, engines):
    from test_engine_vs_peft import reference

    engine = engines(max_num_seqs=1)
    warm = Request("w", "all16rs", PREFIX + "hello", params={"max_tokens": 8})
    probe = Request("p", "all16rs", PREFIX + "a cat", params={"max_tokens": 8})
    run(engine, [warm])
    got = run(engine, [probe])["p"]
    assert engine.counters().prefix_hit_blocks > 0
    ids = engine.tokenize(probe)
    ref_tokens, _ = reference(llama_dir, llama_adapters, "all16rs", ids, 8)
    assert got.token_ids == ref_tokens


@pytest.mark.parametrize("case", ["gemma2", "phi3"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_windows_soft_caps_and_longrope_keep_outputs(case, deterministic, tmp_path, one_thread):
    """Gemma 2 (sliding window 8, attention soft cap) and Phi-3 (LongRoPE switching at 64 tokens):
    requests sharing a prefix, some shorter and some longer than the switch, one at a time so each
    finds the earlier ones' blocks."""
    from runs import tiny_engine
    from test_families import CASES, make_family_model
    from tiny import make_adapter

    model_dir = make_family_model(tmp_path / "model", case)
    make_adapter(model_dir, tmp_path / "adapters" / "low", r=4, targets=CASES[case][2], seed=21)
    prefix = "tell me a story about a robot who learns to paint and the sea "
    tails = ["hello", "and then the robot went home to sleep for a very long time in the dark night"]
    reqs = [
        Request(f"{a}-{i}", a, prefix + t, params={"max_tokens": 12, "ignore_eos": True, "logprobs": 1})
        for i, t in enumerate(tails * 2)
        for a in (None, "low")
    ]
    common = dict(max_num_seqs=1, block_size=4, deterministic=deterministic)
    off = run(tiny_engine(model_dir, tmp_path / "adapters", enable_prefix_caching=False, **common), reqs)
    engine = tiny_engine(model_dir, tmp_path / "adapters", **common)
    on = run(engine, reqs)
    lengths = [len(engine.tokenize(r)) for r in reqs]
    if case == "phi3":
        assert min(lengths) < 64 < max(lengths)  # both sides of the LongRoPE switch
    else:
        assert min(lengths) > 2 * 8  # past the sliding window
    assert engine.counters().prefix_hit_blocks > 0
    for key, res in off.items():
        assert on[key].token_ids == res.token_ids, key
        ours, theirs = ([t.logprob for t in r.logprobs] for r in (on[key], res))
        if deterministic:
            assert ours == theirs, key
        else:
            assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-4, key
