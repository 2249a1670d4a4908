"""Weighted adapter mixes per request (`{"adapter": {"a": 0.7, "b": 0.5}}`).

Parsing (native and OpenAI Batch forms, one-line errors naming file, line and field); the slot
bookkeeping without tensors (a mix waits until all its adapters are resident; slots count distinct
adapters); deterministic mode (a mixed token's bits do not follow the batch); and parity: a tiny
random Llama with three PEFT adapters of ranks 4, 8 and 16, a batch mixing weighted mixes, plain
adapters and the base model, against PEFT's `add_weighted_adapter(..., combination_type="cat")`
per mix, alone: greedy tokens equal and float32 logits close; outputs and stats name the mix.
"""

from __future__ import annotations

import json

import pytest
import torch
from loracli.kernels import build_passes, torch_ops
from runs import read_output, run, tiny_engine, write_jsonl
from test_engine_vs_peft import assert_close_logits, greedy

from loracli.config import EngineConfig
from loracli.engine.block_manager import BlockManager
from loracli.engine.scheduler import Scheduler
from loracli.engine.sequence import Sequence
from loracli.engine.slots import SlotManager
from loracli.model.lora_linear import MultiLoraLinear
from loracli.requests import AdapterMix, RecordError, Request, parse_record
from loracli.sampling import SamplingParams

BASE = frozenset({"base"})


def parse(obj, base_names=BASE):
    return parse_record(json.dumps(obj), 3, "in.jsonl", base_names)


def refused(obj) -> str:
    with pytest.raises(RecordError) as e:
        parse(obj)
    message = str(e.value)
    assert "\n" not in message
    return message


# ---- parsing -----------------------------------------------------------------------------------


def test_native_mix_keeps_order_and_names_the_mix():
    req = parse({"id": "m", "prompt": "hi", "adapter": {"shout": 0.7, "brief": 0.5}})
    assert req.mix == AdapterMix((("shout", 0.7), ("brief", 0.5)))
    assert req.adapter == "shout*0.7+brief*0.5"
    assert req.adapters == ("shout", "brief")


def test_native_single_adapter_with_a_weight_and_any_finite_number():
    assert parse({"prompt": "hi", "adapter": {"shout": 0.5}}).adapter == "shout*0.5"
    req = parse({"prompt": "hi", "adapter": {"a": 1, "b": -0.3, "c": 0}})
    assert req.mix.parts == (("a", 1.0), ("b", -0.3), ("c", 0.0))
    assert req.adapter == "a*1.0+b*-0.3+c*0.0"


def test_plain_and_base_requests_have_no_mix():
    assert parse({"prompt": "hi", "adapter": "shout"}).adapters == ("shout",)
    assert parse({"prompt": "hi"}).adapters == ()
    assert parse({"prompt": "hi", "adapter": "shout"}).mix is None


@pytest.mark.parametrize(
    "adapter, where, says",
    [
        ({}, "field 'adapter'", "non-empty object of adapter names and weights"),
        ({"a": "0.5"}, "field 'adapter.a'", 'weight must be a finite number, got "0.5"'),
        ({"a": True}, "field 'adapter.a'", "weight must be a finite number"),
        ({"a": None}, "field 'adapter.a'", "weight must be a finite number"),
        ({"a": 1e400}, "field 'adapter.a'", "weight must be a finite number"),
        ({"a": [1]}, "field 'adapter.a'", "weight must be a finite number"),
        ({"": 1}, "field 'adapter'", "adapter names must be non-empty strings"),
        ([["a", 1]], "field 'adapter'", "an object of adapter names and weights, or null"),
    ],
)
def test_native_bad_mixes_are_one_line_errors(adapter, where, says):
    message = refused({"prompt": "hi", "adapter": adapter})
    assert message.startswith(f"in.jsonl:3: {where}: "), message
    assert says in message


def test_nan_weight_is_refused():
    with pytest.raises(RecordError, match=r"in.jsonl:3: field 'adapter.a': weight must be a finite number"):
        parse_record('{"prompt": "hi", "adapter": {"a": NaN}}', 3, "in.jsonl")


def openai(body: dict) -> dict:
    return {"custom_id": "c1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi", **body}}


def test_openai_mix_in_body_adapter_weights():
    req = parse(openai({"model": "base", "adapter_weights": {"shout": 0.7, "brief": 0.5}}))
    assert req.adapter == "shout*0.7+brief*0.5" and req.adapters == ("shout", "brief")
    assert req.model == "base" and req.unknown_fields == []


def test_openai_mix_needs_the_base_model_in_body_model():
    message = refused(openai({"model": "shout", "adapter_weights": {"shout": 0.7}}))
    assert message.startswith("in.jsonl:3: field 'body.model': must name the base model (base)")
    # without the base model's names (a caller that does not know them) body.model is taken as written
    assert parse(openai({"model": "shout", "adapter_weights": {"a": 1}}), frozenset()).adapter == "a*1.0"


@pytest.mark.parametrize(
    "weights, where",
    [({}, "body.adapter_weights"), ({"a": "x"}, "body.adapter_weights.a"), ("a", "body.adapter_weights")],
)
def test_openai_bad_adapter_weights(weights, where):
    assert refused(openai({"model": "base", "adapter_weights": weights})).startswith(f"in.jsonl:3: field '{where}': ")


# ---- slot bookkeeping, no tensors ----------------------------------------------------------------


def scheduler(n_slots: int, bad=()):
    loads: list[str] = []

    def ensure(name):
        loads.append(name)
        return f"{name} is broken" if name in bad else None

    cfg = EngineConfig(max_loras=n_slots, max_num_seqs=8, block_size=4)
    return Scheduler(cfg, BlockManager(100, 4), SlotManager(n_slots), ensure), loads


def seq(i: int, adapter) -> Sequence:
    if isinstance(adapter, dict):
        mix = AdapterMix(tuple(adapter.items()))
        return Sequence(i, str(i), mix.name, list(range(5)), SamplingParams(max_tokens=4), mix=mix)
    return Sequence(i, str(i), adapter, list(range(5)), SamplingParams(max_tokens=4))


def finish(sched, seqs) -> None:
    for s in seqs:
        sched.finish(s)


def test_a_mix_waits_until_all_its_adapters_fit():
    sched, loads = scheduler(2)
    for i, a in enumerate(["a", {"b": 0.5, "c": 0.5}, "d"]):
        sched.add(seq(i, a))
    first = sched.schedule()
    assert [s.adapter for s in first.seqs] == ["a", "d"]  # one slot free: the mix (two) cannot start
    assert [s.adapter for s in sched.waiting] == ["b*0.5+c*0.5"]
    assert loads == ["a", "d"]
    finish(sched, first.seqs)
    second = sched.schedule()
    (mix,) = second.seqs
    assert sorted(second.activations, key=lambda a: a[1]) == [(0, "b"), (1, "c")]
    assert mix.part_slots == [0, 1] and mix.slot == 0
    assert sched.slots.users == [1, 1]
    assert sched.pending_adapters(8) == {"b", "c"}
    sched.finish(mix)
    assert sched.slots.users == [0, 0] and mix.part_slots == [] and mix.slot == -1


def test_placing_a_mix_never_evicts_its_own_resident_adapter():
    sched, _ = scheduler(2)
    sched.add(seq(0, "a"))
    finish(sched, sched.schedule().seqs)  # a resident, least recently used
    sched.add(seq(1, "x"))
    finish(sched, sched.schedule().seqs)
    sched.add(seq(2, {"a": 0.5, "b": 2.0}))
    batch = sched.schedule()
    assert batch.activations == [(1, "b")]  # x was evicted, not a (the LRU)
    assert batch.seqs[0].part_slots == [0, 1]
    assert sched.slots.stats.evictions == 1 and sched.slots.stats.hits == 1


def test_slots_count_distinct_adapters_not_mixes():
    sched, _ = scheduler(3)
    for i, a in enumerate([{"a": 0.7, "b": 0.5}, {"b": 1.0, "c": -0.3}, "a", {"c": 0.2}, None, "d"]):
        sched.add(seq(i, a))
    batch = sched.schedule()
    assert len(batch.seqs) == 5 and [s.adapter for s in sched.waiting] == ["d"]
    assert sorted(sched.slots.resident()) == ["a", "b", "c"]
    assert sched.slots.users == [2, 2, 2]


def test_slot_table_can_place_all():
    slots = SlotManager(2)
    slots.place("a", 1)
    slots.acquire(0, 1)
    assert slots.can_place_all(("a", "b")) and not slots.can_place_all(("b", "c"))
    slots.place("b", 2)  # resident, unused
    assert slots.can_place_all(("b", "c")) is False  # c would have to evict b
    assert slots.can_place_all(("c",))


def test_a_broken_part_fails_every_request_that_needs_it():
    sched, _ = scheduler(3, bad={"y"})
    for i, a in enumerate([{"a": 0.5, "y": 0.5}, "y", {"y": 1.0}, "a"]):
        sched.add(seq(i, a))
    batch = sched.schedule()
    assert [s.adapter for s, _ in batch.failed] == ["a*0.5+y*0.5", "y", "y*1.0"]
    assert {reason for _, reason in batch.failed} == {"y is broken"}
    assert [s.adapter for s in batch.seqs] == ["a"]


# ---- deterministic mode: a mixed token's bits do not follow the batch ------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariant_mixed_token_same_bits_in_any_batch(dtype):
    from loracli.kernels import invariant

    gen = torch.Generator().manual_seed(0)
    lin = MultiLoraLinear(
        (torch.randn(48, 64, generator=gen) * 0.1).to(dtype), None, [48], ["q_proj"], 64, 4, 16, invariant.linear
    )
    for s, r in enumerate((4, 8, 16, 2)):
        a = (torch.randn(r, 64, generator=gen) * 0.2).to(dtype)
        lin.set_slot(s, 0, a, (torch.randn(48, r, generator=gen) * 0.2).to(dtype))
    # token parts: (slot, weight) per token; token 0 is a mix of slots 0 and 2
    parts = [[(0, 0.7), (2, -0.3)], [(1, 1.0)], [], [(3, 0.5), (1, 2.0), (0, 1.0)], [(0, 1.0)], [(2, 0.25)]] * 3
    x = torch.randn(len(parts), 64, generator=gen).to(dtype)

    def forward(rows: list[int]):
        depth = max(len(parts[t]) for t in rows)
        passes = [
            (
                [parts[t][k][0] if k < len(parts[t]) else -1 for t in rows],
                [parts[t][k][1] if k < len(parts[t]) else 1.0 for t in rows],
            )
            for k in range(depth)
        ]
        return lin(x[rows], build_passes(passes, invariant=True))

    everything = forward(list(range(len(parts))))
    alone = forward([0])
    assert torch.equal(everything[0], alone[0])
    assert torch.equal(everything[3], forward([3, 4])[0])
    assert not torch.equal(everything[0], forward([4])[0])


def test_cpu_weigh_costs_little_next_to_the_shrink():
    """The weight is one multiply of [T, r] per pass: cheaper than the shrink it follows."""
    import time

    from loracli.kernels import build_meta

    T, K, R = 256, 2048, 16
    x, A = torch.randn(T, K), torch.randn(4, R, K)
    meta = build_meta([t % 4 for t in sorted(range(T), key=lambda t: t % 4)], token_weight=[0.5] * T)

    def best(fn) -> float:
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    y = torch_ops.lora_shrink(x, A, meta)
    assert best(lambda: torch_ops.lora_weigh(y, meta)) < best(lambda: torch_ops.lora_shrink(x, A, meta))


# ---- parity with PEFT's add_weighted_adapter(combination_type="cat") ---------------------------------

MIXES = {"m1": {"attn4": 0.7, "mlp8": 0.5}, "m2": {"attn4": 0.5}, "m3": {"mlp8": 1.0, "all16rs": -0.3}}
ROUTES = [*MIXES.values(), "all16rs", None]
PROMPTS = ["the quick brown fox", "tell me a story about a robot who learns to paint and"]
MAX_TOKENS = 8


def peft_model(model_dir, adapters_dir):
    """One PeftModel with the three adapters and one `cat` adapter per mix."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapters_dir / "attn4"), adapter_name="attn4")
    for name in ("mlp8", "all16rs"):
        model.load_adapter(str(adapters_dir / name), adapter_name=name)
    for key, mix in MIXES.items():
        model.add_weighted_adapter(list(mix), list(mix.values()), key, combination_type="cat")
    return model.eval()


def peft_run(model, route, prompt_ids):
    """Greedy tokens and the last step's float32 logits, alone (one prompt, no padding)."""
    name = next((k for k, m in MIXES.items() if m == route), route)
    if name is None:
        with model.disable_adapter():
            tokens, logits = greedy(model, prompt_ids, MAX_TOKENS)
    else:
        model.set_adapter(name)
        tokens, logits = greedy(model, prompt_ids, MAX_TOKENS)
    return tokens, logits[-1]


def mix_of(route) -> AdapterMix | None:
    return AdapterMix(tuple(route.items())) if isinstance(route, dict) else None


@pytest.mark.parametrize("deterministic", [True, False])
def test_mixed_batch_matches_peft_cat_per_request(llama_dir, llama_adapters, deterministic):
    engine = tiny_engine(  # synchronous loads: every request is admitted in the first step
        llama_dir, llama_adapters, max_loras=3, max_num_seqs=16, deterministic=deterministic, adapter_load_workers=0
    )
    reqs = []
    for i, (route, prompt) in enumerate((r, p) for r in ROUTES for p in PROMPTS):
        mix = mix_of(route)
        adapter = mix.name if mix is not None else route
        params = {"max_tokens": MAX_TOKENS, "ignore_eos": True}
        reqs.append(Request(id=f"r{i}", adapter=adapter, prompt=prompt, params=params, mix=mix))
    results = {r.id: r for r in engine.generate(reqs)}
    assert engine.counts.steps < MAX_TOKENS + 2  # one batch: every request ran alongside the others
    model = peft_model(llama_dir, llama_adapters)
    outs = set()
    for req in reqs:
        res = results[req.id]
        assert res.error is None, res.error
        assert res.adapter == req.adapter
        prompt_ids = engine.tokenize(req)
        ref_tokens, ref_logits = peft_run(model, req.mix and dict(req.mix.parts) or req.adapter, prompt_ids)
        assert res.token_ids == ref_tokens, (req.adapter, res.token_ids, ref_tokens)
        ours = engine.next_token_logits(req.adapter, prompt_ids + res.token_ids[:-1], mix=req.mix)
        assert_close_logits(ours, ref_logits, req.adapter)
        outs.add(tuple(res.token_ids))
    assert len(outs) == len(reqs)  # every mix and prompt gives its own tokens: the weights matter
    assert engine.counters().per_adapter["attn4*0.7+mlp8*0.5"] == len(PROMPTS)


def test_output_records_and_stats_name_the_mix(llama_dir, llama_adapters, tmp_path):
    engine = tiny_engine(llama_dir, llama_adapters, max_loras=2)
    inp = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "n", "prompt": "hello", "adapter": {"attn4": 0.7, "mlp8": 0.5}},
            {
                "custom_id": "o",
                "url": "/v1/completions",
                "method": "POST",
                "body": {"model": "base", "prompt": "hello", "adapter_weights": {"attn4": 0.7, "mlp8": 0.5}},
            },
            {"id": "big", "prompt": "hello", "adapter": {"attn4": 1, "mlp8": 1, "all16rs": 1}},
            {"id": "who", "prompt": "hello", "adapter": {"attn4": 1, "nope": 1}},
            {"id": "bad", "prompt": "hello", "adapter": {}},
        ],
    )
    summary = run(engine, inp, tmp_path / "out.jsonl", errors_path=str(tmp_path / "errors.jsonl"))
    out = {r.get("custom_id", r.get("id")): r for r in read_output(tmp_path / "out.jsonl")}
    assert set(out) == {"n", "o"}
    assert out["n"]["adapter"] == "attn4*0.7+mlp8*0.5" and out["n"]["usage"]["completion_tokens"] == 4
    assert out["o"]["response"]["body"]["model"] == "base"
    assert out["o"]["response"]["body"]["choices"][0]["text"] == out["n"]["text"]
    errors = {r.get("id", r.get("line")): r for r in read_output(tmp_path / "errors.jsonl")}
    assert errors["big"]["error"]["type"] == "unsupported_mix"
    big = "3: field 'adapter': the mix needs 3 adapters in slots at once; max_loras is 2"
    assert errors["big"]["error"]["message"] == f"{inp}:{big}"
    assert errors["big"]["adapter"] == "attn4*1.0+mlp8*1.0+all16rs*1.0"
    assert errors["who"]["error"]["type"] == "unknown_adapter" and "'nope'" in errors["who"]["error"]["message"]
    assert "in.jsonl:5: field 'adapter': must be a non-empty object" in errors["bad"]["error"]["message"]
    assert summary.counters.per_adapter == {"attn4*0.7+mlp8*0.5": 2}


def test_a_mix_refuses_adapters_beyond_plain_lora(llama_dir, llama_adapters, monkeypatch):
    from types import SimpleNamespace

    from loracli.engine.engine import NOT_PLAIN_LORA

    engine = tiny_engine(llama_dir, llama_adapters, max_loras=2)
    mix = AdapterMix((("attn4", 0.5), ("mlp8", 0.5)))
    req = Request(id="m", adapter=mix.name, prompt="hello", mix=mix)
    assert engine._check_mix(mix) is None
    plain = engine.store.get

    for part in NOT_PLAIN_LORA:

        def with_extra(name, count_hit=True, part=part):
            weights = plain(name, count_hit=count_hit)
            return SimpleNamespace(**{**vars(weights), part: {(0, "q_proj"): 1}}) if name == "mlp8" else weights

        monkeypatch.setattr(engine.store, "get", with_extra)
        refused = engine.check(req, SamplingParams())
        assert refused.kind == "unsupported_mix" and refused.field == "adapter"
        assert refused.message == f"adapter 'mlp8' has {part}: a mix takes plain LoRA adapters only"


def test_a_mix_is_never_a_merge_candidate_and_keeps_a_running_batch_unmerged():
    from loracli.engine.merge_policy import MergePolicy
    from loracli.engine.merger import Merger

    merger = Merger(MergePolicy("always-single"), None)
    mixes = [seq(i, {"a": 0.5, "b": 0.5}) for i in range(6)]
    assert merger.policy.decide(merger.view(mixes, [])) is None  # only mix requests: nothing to merge
    plain = [seq(10 + i, "a") for i in range(20)]
    policy = MergePolicy("auto")
    drain = policy.decide(merger.view(plain, mixes[:1]))
    assert drain is not None and (drain.action, drain.adapter) == ("drain", "a")
    policy.apply(drain)
    assert policy.decide(merger.view(plain, mixes[:1])) is None  # a running mix: no merge yet
    merge = policy.decide(merger.view(plain, plain[:2]))
    assert merge is not None and merge.action == "merge"


def test_ray_routes_a_mix_by_its_first_adapter():
    from loracli.cluster.routing import AffinityRouter, route_key

    mix = AdapterMix((("b", 0.5), ("a", 0.5)))
    req = Request(id="m", adapter=mix.name, prompt="hi", mix=mix)
    assert route_key(req) == "b" and req.adapters == ("b", "a")
    router = AffinityRouter(2, min_queue=0)
    router.holds(1, ["b"])
    router.add(req)
    assert router.take(0, 4) == []
    assert router.take(1, 4) == [req]


def test_dynamic_slots_grow_to_fit_a_mix_and_its_tokens_stay_the_same(llama_dir, llama_adapters):
    mix = AdapterMix((("attn4", 0.7), ("mlp8", 0.5), ("all16rs", -0.3)))
    reqs = [
        Request(id=str(i), adapter=a, prompt="hello there", params={"max_tokens": 4, "ignore_eos": True}, mix=m)
        for i, (a, m) in enumerate([("attn4", None), (mix.name, mix), (None, None), (mix.name, mix)])
    ]
    fixed = {r.id: r.token_ids for r in tiny_engine(llama_dir, llama_adapters, max_loras=3).generate(reqs)}
    engine = tiny_engine(llama_dir, llama_adapters, max_loras=3, min_loras=1)
    growing = {r.id: (r.error, r.token_ids) for r in engine.generate(reqs)}
    assert growing == {k: (None, v) for k, v in fixed.items()}
    assert engine.slots.n_slots == 3
