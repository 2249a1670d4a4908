"""`loracli bench`: workload generation (pure), validity checks, the roofline formula, and tiny-model
smoke runs of every system through the library (in-process) and through the CLI (subprocess,
each system in its own worker process)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from loracli.bench import BenchOptions, plot, run_bench
from loracli.bench.harness import busy_note, lora_rank_limit
from loracli.bench.protocol import Measurement, Record
from loracli.bench.report import SystemResult, check_outputs, compare, percentile, summarize
from loracli.bench.roofline import flops_per_token, request_flops, run_flops
from loracli.bench.system_names import ALL_KINDS, KINDS, engine_settings, parse_system, parse_systems, setting_value
from loracli.bench.systems import BUILDERS
from loracli.bench.workload import (
    BenchRequest,
    Distribution,
    PromptMaker,
    WorkloadSpec,
    assign_adapters,
    draw_lengths,
    parse_distribution,
    parse_phases,
    parse_range,
    parse_sweep,
    synthetic_requests,
    write_random_adapters,
    zipf_weights,
)
from loracli.config import EngineConfig
from loracli.errors import ConfigError
from loracli.model.spec import TARGET_MODULES, ModelSpec

TINY = dict(
    prompt_len="4-8", output_len="3", threads=1, baseline_batch=4, warmup=2, roofline_seconds=0.01, dtype="float32"
)


def counts(dist: str, n_adapters: int, n: int, seed: int = 0) -> Counter:
    return Counter(assign_adapters(parse_distribution(dist), n_adapters, n, random.Random(seed)))


# --- workload generation -------------------------------------------------------------------------------


def test_distribution_names():
    assert parse_distribution("skewed") == Distribution("zipf", 1.5)
    assert parse_distribution("zipf:0.8") == Distribution("zipf", 0.8)
    assert str(parse_distribution("zipf:2")) == "zipf:2"
    assert parse_distribution("dominant:0.95") == Distribution("dominant", 0.95)
    assert str(parse_distribution("dominant:0.95")) == "dominant:0.95"
    for bad in ("zipf", "zipf:-1", "zipf:x", "popular", "", "dominant:0", "dominant:1.5", "dominant:x"):
        with pytest.raises(ConfigError):
            parse_distribution(bad)


def test_identical_uses_one_adapter_and_distinct_all_different():
    assert counts("identical", 8, 100) == Counter({0: 100})
    assert WorkloadSpec(adapters=8, distribution=parse_distribution("identical")).num_adapters == 1
    distinct = assign_adapters(parse_distribution("distinct"), 50, 50, random.Random(0))
    assert sorted(distinct) == list(range(50))
    assert WorkloadSpec(adapters=8, prompts=50, distribution=parse_distribution("distinct")).num_adapters == 50
    with pytest.raises(ConfigError):
        assign_adapters(parse_distribution("distinct"), 8, 50, random.Random(0))


def test_round_robin_cycles_through_the_adapters():
    assert assign_adapters(parse_distribution("round-robin"), 4, 10, random.Random(0)) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert counts("round-robin", 4, 256) == Counter({0: 64, 1: 64, 2: 64, 3: 64})


def test_dominant_gives_adapter_zero_its_share_and_spreads_the_rest_evenly():
    c = counts("dominant:0.95", 8, 20000)
    assert abs(c[0] / 20000 - 0.95) < 0.01
    others = [c[k] for k in range(1, 8)]
    assert min(others) > 0.6 * max(others)
    assert counts("dominant:1", 8, 100) == Counter({0: 100})


def test_uniform_is_roughly_flat():
    c = counts("uniform", 8, 16000)
    assert set(c) == set(range(8))
    assert all(abs(v - 2000) < 200 for v in c.values()), c


def test_zipf_follows_its_law_and_is_skewed():
    n = 20000
    c = counts("zipf:1.5", 8, n)
    expected = zipf_weights(8, 1.5)
    for k in range(8):
        assert abs(c[k] / n - expected[k]) < 0.015, (k, c[k] / n, expected[k])
    assert c[0] > 10 * c[7]
    assert counts("zipf:3", 8, n)[0] > counts("zipf:1.5", 8, n)[0] > counts("uniform", 8, n)[0]


def test_assignment_is_reproducible_from_the_seed():
    assert counts("zipf:1.2", 8, 500, seed=3) == counts("zipf:1.2", 8, 500, seed=3)
    a = assign_adapters(parse_distribution("uniform"), 8, 200, random.Random(1))
    b = assign_adapters(parse_distribution("uniform"), 8, 200, random.Random(2))
    assert a != b


def test_ranges():
    assert parse_range("64", "x") == (64, 64)
    assert parse_range("20-59", "x") == (20, 59)
    for bad in ("0", "5-3", "a", "1-2-3", "-4"):
        with pytest.raises(ConfigError):
            parse_range(bad, "x")
    lengths = draw_lengths((20, 59), 2000, random.Random(0))
    assert min(lengths) == 20 and max(lengths) == 59


def test_phases_and_sweep_settings():
    base = WorkloadSpec()
    phases = parse_phases("adapters=2,prompts=64;adapters=16,prompts=32,distribution=uniform;adapters=1", base)
    assert [(p.adapters, p.prompts, str(p.distribution)) for p in phases] == [
        (2, 64, "zipf:1.5"),
        (16, 32, "uniform"),
        (1, base.prompts, "zipf:1.5"),
    ]
    assert base.with_setting("ranks", "8,16").ranks == (8, 16)
    assert parse_phases("ranks=8+16", base)[0].ranks == (8, 16)
    assert parse_sweep("adapters=1,2,4") == ("adapters", ["1", "2", "4"])
    for bad in ("adapters", "adapters=", "=1,2"):
        with pytest.raises(ConfigError):
            parse_sweep(bad)
    with pytest.raises(ConfigError):
        base.with_setting("temperature", "1")
    with pytest.raises(ConfigError):
        parse_phases("adapters", base)


def test_synthetic_prompts_have_exact_lengths_and_are_reproducible(llama_dir):
    from loracli.model.loader import load_tokenizer

    tok = load_tokenizer(llama_dir)
    maker = PromptMaker(tok)
    spec = WorkloadSpec(adapters=4, prompts=40, prompt_len=(3, 12), output_len=(2, 5), seed=7)
    reqs = synthetic_requests([spec], maker)
    assert [r.id for r in reqs] == [f"p0-{i}" for i in range(40)]
    for r in reqs:
        assert 3 <= r.prompt_len <= 12 and 2 <= r.max_tokens <= 5
        assert len(tok(r.prompt)["input_ids"]) == r.prompt_len
    assert {r.adapter for r in reqs} <= {f"lora{i:03d}" for i in range(4)}
    again = synthetic_requests([spec], maker)
    assert [(r.prompt, r.adapter, r.max_tokens) for r in again] == [(r.prompt, r.adapter, r.max_tokens) for r in reqs]
    other = synthetic_requests([WorkloadSpec(adapters=4, prompts=40, prompt_len=(3, 12), seed=8)], maker)
    assert [r.prompt for r in other] != [r.prompt for r in reqs]
    chained = synthetic_requests([WorkloadSpec(adapters=1, prompts=3), WorkloadSpec(adapters=0, prompts=2)], maker)
    assert [(r.id, r.phase, r.adapter) for r in chained] == [
        ("p0-0", 0, "lora000"),
        ("p0-1", 0, "lora000"),
        ("p0-2", 0, "lora000"),
        ("p1-0", 1, None),
        ("p1-1", 1, None),
    ]


def test_random_adapters_load_and_are_reproducible(llama_dir, tmp_path):
    from loracli.adapters import load_adapter
    from loracli.model.loader import load_config

    _, spec = load_config(llama_dir)
    names = write_random_adapters(tmp_path, spec, 3, (4, 8), ("q_proj", "down_proj"), seed=0)
    assert names == ["lora000", "lora001", "lora002"]
    w1 = load_adapter(tmp_path / "lora001", spec)
    assert w1.max_rank == 8 and set(m for _, m in w1.modules) == {"q_proj", "down_proj"}
    assert all(b.abs().sum() > 0 for _, b in w1.modules.values())
    assert load_adapter(tmp_path / "lora002", spec).max_rank == 4
    a = load_adapter(tmp_path / "lora000", spec).modules[(0, "q_proj")][0]
    write_random_adapters(tmp_path / "again", spec, 1, (4, 8), ("q_proj", "down_proj"), seed=0)
    assert (load_adapter(tmp_path / "again" / "lora000", spec).modules[(0, "q_proj")][0] == a).all()


# --- systems, validity, statistics, roofline ------------------------------------------------------------


def test_system_names():
    spec = parse_system("loracli:max-loras=4:max-num-seqs=16")
    assert spec.kind == "loracli" and dict(spec.overrides) == {"max_loras": 4, "max_num_seqs": 16}
    assert dict(parse_system("loracli:max-cpu-loras=none").overrides) == {"max_cpu_loras": None}
    assert [s.name for s in parse_systems("all")] == list(ALL_KINDS)
    assert [s.name for s in parse_systems("loracli,base,loracli")] == ["loracli", "base"]
    ray = parse_system("loracli-ray:workers=2:routing=round-robin:max-loras=4:worker-cpus=0.5")
    assert dict(ray.cluster) == {"workers": 2, "routing": "round-robin", "worker_cpus": 0.5}
    assert dict(ray.overrides) == {"max_loras": 4}
    for bad in (
        "loracli:nope=1",
        "loracli:max-loras=0",
        "loracli:max-loras=x",
        "loracli:model=x",
        "peft-mixed:max-loras=2",
        "tgi",
        "loracli:max-loras",
        "loracli:workers=2",
        "loracli-ray:workers=0",
        "loracli-ray:routing=random",
        "loracli-ray:workers=x",
    ):
        with pytest.raises(ConfigError):
            parse_system(bad)
    assert lora_rank_limit(16) == 64 and lora_rank_limit(100) == 128
    assert set(BUILDERS) == set(KINDS)


def test_settings_are_read_as_their_field_type():
    def overrides(settings: str) -> dict:
        return dict(parse_system(f"loracli:{settings}").overrides)

    assert overrides("gpu-memory-utilization=0.5") == {"gpu_memory_utilization": 0.5}
    assert overrides("gpu_memory_utilization=1") == {"gpu_memory_utilization": 1.0}
    assert overrides("gpu-memory-utilization=none:max-model-len=None") == {
        "gpu_memory_utilization": None,
        "max_model_len": None,
    }
    assert overrides("memory-budget=1100MiB:kv-cache-memory=2GiB") == {
        "memory_budget": 1100 * 2**20,
        "kv_cache_memory": 2 * 2**30,
    }
    assert overrides("memory-budget=none") == {"memory_budget": None}
    assert overrides("allow-pickle=true:verify-slots=0:dynamic-slots=none") == {
        "allow_pickle": True,
        "verify_slots": False,
        "dynamic_slots": None,
    }
    assert overrides("merge-policy=never:pinned=a+b") == {"merge_policy": "never", "pinned": ("a", "b")}
    ray = parse_system("loracli-ray:worker-gpus=none:ship-adapters=true")
    assert dict(ray.cluster) == {"worker_gpus": None, "ship_adapters": True}
    for name in engine_settings():  # every settable field has a parser for its type
        setting_value(EngineConfig, name, "1")
    for settings, field_name in (
        ("gpu-memory-utilization=half", "gpu_memory_utilization"),
        ("max-model-len=long", "max_model_len"),
        ("max-loras=x", "max_loras"),
        ("memory-budget=lots", "memory_budget"),
        ("allow-pickle=maybe", "allow_pickle"),
    ):
        with pytest.raises(ConfigError) as e:
            parse_system(f"loracli:{settings}")
        setting = field_name.replace("_", "-")
        assert f"--systems: {setting} " in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert e.value.fields == ()  # the bench's own vocabulary: the CLI rewrites nothing
    with pytest.raises(ConfigError):
        parse_system("loracli:gpu-memory-utilization=1.5")  # the engine's own range check


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99


def test_wrong_lengths_make_a_system_invalid_not_timed():
    reqs = [BenchRequest("a", None, 4), BenchRequest("b", "x", 4)]
    good = [Record("a", [1, 2, 3, 4], 0.1, 1.0), Record("b", [5, 6, 7, 8], 0.2, 2.0)]
    assert check_outputs(good, reqs, ignore_eos=True) == []
    ok = summarize(Measurement("s", good, wall=2.0), reqs, ignore_eos=True)
    assert ok.status == "ok" and ok.tokens_per_s == 4.0 and ok.latency_p50_s == 1.5
    short = [good[0], Record("b", [5, 6], 0.2, 2.0)]
    assert check_outputs(short, reqs, ignore_eos=False) == []
    bad = summarize(Measurement("s", short, wall=2.0), reqs, ignore_eos=True)
    assert bad.status == "invalid" and bad.tokens_per_s is None and "expected exactly 4" in bad.note
    assert check_outputs(good[:1], reqs, ignore_eos=True)  # a missing request
    assert check_outputs(good + good[:1], reqs, ignore_eos=True)  # a duplicate
    errored = [good[0], Record("b", [], None, 1.0, error="boom")]
    assert summarize(Measurement("s", errored, wall=1.0), reqs, ignore_eos=True).status == "invalid"
    assert summarize(Measurement("s", error="RuntimeError: x"), reqs, ignore_eos=True).status == "failed"


def test_flops_per_token_formula():
    spec = ModelSpec(
        "llama",
        num_layers=30,
        hidden=576,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        intermediate=1536,
        vocab_size=49152,
        rms_eps=1e-5,
        max_position=8192,
        tie_embeddings=True,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        sliding_window=None,
    )
    f = flops_per_token(spec, context=100, lora_rank=16, targets=TARGET_MODULES, adapter_share=0.5)
    assert f.dense == 2 * 30 * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536)
    assert f.lm_head == 2 * 576 * 49152
    assert f.attention == 4 * 30 * 576 * 100
    assert f.lora == 2 * 30 * 16 * (1152 + 768 + 768 + 1152 + 3 * 2112) * 0.5
    assert f.total == f.dense + f.lm_head + f.attention + f.lora


TINY_SPEC = dict(  # q = 2 heads x 4 = 8, kv = 1 x 4 = 4
    num_layers=2,
    hidden=8,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    intermediate=16,
    vocab_size=10,
    rms_eps=1e-5,
    max_position=64,
    tie_embeddings=True,
    qkv_bias=False,
    o_bias=False,
    mlp_bias=False,
    sliding_window=None,
)


def test_run_flops_count_prefill_and_decode_by_hand():
    """A request of 3 prompt tokens and 2 output tokens on a 2-layer model, counted by hand: per token
    and layer the linears are 8x(8+4+4) + 8x8 + 3x8x16 = 576 multiply-adds (dense 2 x 2 x 576 = 2304
    FLOPs), lm_head 2 x 8 x 10 = 160, LoRA 2 x 2 x 5 = 20 with 5 LoRA parameters per layer, and one
    attended position costs 4 x 2 layers x 8 = 64 (q.k and the weighted v)."""
    spec = ModelSpec("llama", **TINY_SPEC)
    f = request_flops(spec, prompt_len=3, output_len=2, lora_params=5)
    # prefill: 3 tokens x (dense + LoRA), attending to 1, 2 and 3 positions, lm_head once (the first output)
    assert f.prefill == 3 * (2304 + 20) + 64 * (1 + 2 + 3) + 160
    # decode: one step (output token 1 goes in at position 3, attending to 4 positions) with its lm_head
    assert f.decode == 2304 + 20 + 160 + 64 * 4
    assert (f.lora, f.prefill_tokens, f.decode_tokens) == (20 * 4, 3, 1)
    assert f.total == 7516 + 2740
    one_token = request_flops(spec, prompt_len=3, output_len=1)  # the answer comes from the prefill alone
    assert one_token.decode == 0 and one_token.prefill == 3 * 2304 + 64 * 6 + 160
    both = run_flops(spec, [(3, 2, 5), (3, 1, 0)])
    assert both.to_dict() == {
        "prefill": f.prefill + one_token.prefill,
        "decode": f.decode,
        "lora": 80,
        "prefill_tokens": 6,
        "decode_tokens": 1,
        "total": f.total + one_token.total,
    }


def test_run_rate_is_the_runs_flops_over_its_seconds():
    """`compare` credits each system the workload's FLOPs over its own wall time (base: without LoRA),
    next to the older decode-only figure."""
    loracli = SystemResult("loracli", "ok", wall_s=2.0, tokens_per_s=50.0)
    base = SystemResult("base", "ok", wall_s=1.0, tokens_per_s=100.0)
    invalid = SystemResult("peft-mixed", "invalid", wall_s=1.0)
    run = {"prefill": 600.0, "decode": 400.0, "lora": 100.0, "total": 1000.0}
    compare([loracli, base, invalid], flops_per_token=4.0, peak_flops=1000.0, run_flops=run)
    assert loracli.run_flops_per_s == 500.0 and loracli.run_matmul_fraction == 0.5
    assert base.run_flops_per_s == 900.0 and base.run_matmul_fraction == 0.9
    assert loracli.decode_only_matmul_fraction == 50.0 * 4.0 / 1000.0
    assert invalid.run_flops_per_s is None and invalid.run_matmul_fraction is None


def test_busy_note():
    assert busy_note("0.50 0.40 0.30", 2) is None
    assert "busy" in busy_note("3.10 2.00 1.00", 2)


# --- smoke runs on the tiny model -----------------------------------------------------------------------


def test_every_system_in_process_with_phases(llama_dir, tmp_path):
    options = BenchOptions(
        model=str(llama_dir),
        adapters="3",
        phases="adapters=2,prompts=4;adapters=3,prompts=3",
        systems="all,loracli:max-loras=1",
        isolate=False,
        **TINY,
    )
    report = run_bench(options)
    point = report.points[0]
    by_name = {s.name: s for s in point.systems}
    assert list(by_name) == [*ALL_KINDS, "loracli:max-loras=1"]
    assert point.workload["requests"] == 7
    for name, s in by_name.items():
        if name in ("vllm", "llama-cpp"):  # skipped where not installed (tests/test_bench_llama_cpp.py)
            assert s.status in ("skipped", "ok"), s.note
            continue
        assert s.status == "ok", (name, s.note, s.problems)
        assert s.output_tokens == 7 * 3 and s.tokens_per_s > 0
        assert 0 < s.ttft_p50_s <= s.latency_p99_s
        assert [p["requests"] for p in s.phases] == [4, 3]
    assert by_name["peft-mixed"].vs_peft_mixed == 1.0 and by_name["base"].vs_base == 1.0
    assert by_name["loracli:max-loras=1"].counters["slot_activations"] >= 1
    assert by_name["base"].counters["slot_activations"] == 0
    assert report.roofline and point.flops_per_token["total"] > 0
    assert point.run_flops["decode_tokens"] == 7 * 2 and 7 * 4 <= point.run_flops["prefill_tokens"] <= 7 * 8
    assert by_name["loracli"].run_matmul_fraction > 0 and by_name["loracli"].run_flops_per_s > 0
    json.dumps(report.to_dict())
    plot(report, str(tmp_path / "bars.png"))
    assert (tmp_path / "bars.png").stat().st_size > 1000


def test_sweep_in_process_plots_lines(llama_dir, tmp_path):
    options = BenchOptions(
        model=str(llama_dir), prompts="4", sweep="adapters=1,2", systems="loracli", isolate=False, **TINY
    )
    report = run_bench(options)
    assert report.sweep == "adapters" and [p.value for p in report.points] == ["1", "2"]
    assert [set(p.workload["adapters"]) <= {f"lora{i:03d}" for i in range(int(p.value))} for p in report.points] == [
        True,
        True,
    ]
    assert all(p.systems[0].status == "ok" for p in report.points)
    plot(report, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_bad_options_are_config_errors(llama_dir):
    for kw in (
        dict(distribution="popular"),
        dict(systems="tgi"),
        dict(sweep="adapters=1", phases="prompts=2"),
        dict(prompts="missing.jsonl"),
        dict(adapters="no/such/dir"),
    ):
        with pytest.raises(ConfigError):
            run_bench(BenchOptions(model=str(llama_dir), isolate=False, **{**TINY, **kw}))


def test_cli_with_a_prompts_file_and_real_adapters(llama_dir, llama_adapters, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"id": "a", "adapter": "attn4", "prompt": "the quick brown fox"},
        {"id": "b", "adapter": "pattern", "prompt": "hello world", "max_tokens": 2},
        {"id": "c", "adapter": None, "messages": [{"role": "user", "content": "tell me a story"}]},
        {"id": "d", "adapter": "all16rs", "prompt": "numbers one two"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "loracli",
            "bench",
            "--model",
            str(llama_dir),
            "--adapters",
            str(llama_adapters),
            "--prompts",
            str(prompts),
            "--output-len",
            "3",
            "--systems",
            "loracli,merged-swap",
            "--threads",
            "1",
            "--dtype",
            "float32",
            "--warmup",
            "1",
            "--roofline-seconds",
            "0.01",
            "--json",
            "-",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    systems = {s["name"]: s for s in report["points"][0]["systems"]}
    for s in systems.values():
        assert s["status"] == "ok", s
        assert s["output_tokens"] == 3 + 2 + 3 + 3
        assert s["peak_rss_mib"] > 0 and s["rss_delta_mib"] >= 0  # measured in its own process
    assert report["points"][0]["workload"]["adapter_counts"] == {"attn4": 1, "pattern": 1, "<base>": 1, "all16rs": 1}
    assert report["machine"]["threads"] == 1 and report["machine"]["dtype"] == "float32"
    assert "tok/s" in p.stderr  # the table goes to stderr when the JSON takes stdout


def test_random_adapters_of_every_kind_load_as_their_kind(llama_dir, tmp_path):
    """`--kinds`: each kind's random adapter is what PEFT would save for it, and loracli loads it as such."""
    from loracli.adapters import load_adapter
    from loracli.bench.adapter_kinds import KINDS
    from loracli.model.loader import load_config

    _, spec = load_config(llama_dir)
    names = write_random_adapters(tmp_path, spec, len(KINDS), (4,), ("q_proj", "down_proj"), seed=0, kinds=KINDS)
    assert names == [f"{k}{i:03d}" for i, k in enumerate(KINDS)]
    loaded = {k: load_adapter(tmp_path / n, spec) for k, n in zip(KINDS, names, strict=True)}
    assert loaded["lora"].is_plain_lora
    assert len(loaded["dora"].magnitudes) == 2 * spec.num_layers
    assert len(loaded["bias"].lora_biases) == 2 * spec.num_layers
    assert loaded["vocab"].has_vocab and loaded["saved-head"].has_vocab
    assert not any(loaded[k].is_plain_lora for k in KINDS[1:])


def test_a_sweep_over_kinds_and_a_mix_in_one_run(llama_dir, tmp_path):
    """`--sweep set=...`: plain, DoRA and weighted-mix points in one run; PEFT is measured where it can
    serve the workload and skipped, with the reason, where it cannot (DoRA in a mixed batch, mixes)."""
    options = BenchOptions(
        model=str(llama_dir),
        adapters="2",
        prompts="4",
        sweep="set=kinds:lora,kinds:dora,mix:2",
        systems="loracli,peft-mixed",
        isolate=False,
        **TINY,
    )
    report = run_bench(options)
    assert [p.value for p in report.points] == ["kinds:lora", "kinds:dora", "mix:2"]
    status = [{s.name: s.status for s in p.systems} for p in report.points]
    assert status == [
        {"loracli": "ok", "peft-mixed": "ok"},
        {"loracli": "ok", "peft-mixed": "skipped"},
        {"loracli": "ok", "peft-mixed": "skipped"},
    ]
    assert "DoRA" in report.points[1].systems[1].note and "mixes" in report.points[2].systems[1].note
    assert set(report.points[1].workload["adapters"]) <= {"dora000", "dora001"}
    assert set(report.points[2].workload["adapter_counts"]) <= {"lora000*0.5+lora001*0.5", "lora001*0.5+lora000*0.5"}
    with pytest.raises(ConfigError, match="set: expected KEY:VALUE"):
        WorkloadSpec().with_setting("set", "mix")


def test_a_sweep_with_and_without_a_schema_on_every_request(llama_dir):
    """`--sweep set=structured:none,structured:json`: the same workload with and without structured
    output; loracli runs both (every request to its max_tokens: the point is valid), PEFT only the first."""
    pytest.importorskip("xgrammar")
    options = BenchOptions(
        model=str(llama_dir),
        adapters="2",
        prompts="4",
        sweep="set=structured:none,structured:json",
        systems="loracli,peft-mixed",
        isolate=False,
        **TINY,
    )
    report = run_bench(options)
    status = [{s.name: s.status for s in p.systems} for p in report.points]
    assert status == [{"loracli": "ok", "peft-mixed": "ok"}, {"loracli": "ok", "peft-mixed": "skipped"}]
    assert report.points[1].workload["structured_requests"] == 4 and "structured" in report.points[1].systems[1].note
    with pytest.raises(ConfigError, match="structured must be one of none, json"):
        WorkloadSpec().with_setting("structured", "yaml")
