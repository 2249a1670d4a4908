"""`loracli run --ray` on a local Ray instance with 2 workers and the tiny model: the same output as
one process, a worker killed mid-run with every request answered once, affinity routing loading
fewer adapters than round-robin on a skewed workload, the CLI end to end, and a clear error
without Ray."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray
from rich.console import Console
from runs import by_key, read_output, tiny_engine, write_jsonl

from loracli.bench import BenchOptions, run_bench
from loracli.cli import optional_ray_address
from loracli.cluster.options import ClusterOptions
from loracli.cluster.pool import ClusterError, RayPool, import_ray
from loracli.config import EngineConfig
from loracli.errors import ConfigError
from loracli.job import JobOptions, run_job
from loracli.sampling import SamplingParams


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def many_adapters(llama_adapters, tmp_path_factory):
    """Eight adapters: copies of the four shared ones under two names each."""
    root = tmp_path_factory.mktemp("eight")
    for i, src in enumerate(sorted(p for p in llama_adapters.iterdir() if p.is_dir()) * 2):
        shutil.copytree(src, root / f"a{i}")
    return root


def _config(model_dir, adapters_dir, **kw) -> EngineConfig:
    cfg = dict(
        model=str(model_dir),
        adapters_dir=str(adapters_dir),
        dtype="float32",
        device="cpu",
        max_loras=2,
        max_lora_rank=16,
        max_num_seqs=4,
        max_cpu_loras=8,
    )
    cfg.update(kw)
    return EngineConfig(**cfg)


def _skewed(n: int) -> list[dict]:
    """About half the requests for a0, the rest spread over a1..a7 and the base model, in random order."""
    rng = random.Random(0)
    names = ["a0"] * 8 + [f"a{i}" for i in range(1, 8)] + [None]
    return [{"id": f"r{i}", "prompt": f"the quick brown fox {i}", "adapter": rng.choice(names)} for i in range(n)]


def _run(engine, inp, out, **options):
    defaults = SamplingParams(max_tokens=6, ignore_eos=True)
    return run_job(
        str(inp),
        str(out),
        engine.config,
        defaults,
        console=Console(stderr=True, quiet=True),
        options=JobOptions(**options),
        engine=engine,
    )


def _local_reference(llama_dir, adapters, inp, tmp_path) -> dict:
    engine = tiny_engine(llama_dir, adapters, max_num_seqs=4, max_cpu_loras=8)
    _run(engine, inp, tmp_path / "local.jsonl")
    return by_key(read_output(tmp_path / "local.jsonl"))


def test_two_workers_match_one_process_and_affinity_loads_fewer_adapters(local_ray, llama_dir, many_adapters, tmp_path):
    records = _skewed(96)
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    expected = _local_reference(llama_dir, many_adapters, inp, tmp_path)
    loads, clusters = {}, {}
    for routing in ("affinity", "round-robin"):
        pool = RayPool(_config(llama_dir, many_adapters), ClusterOptions(workers=2, routing=routing))
        try:
            summary = _run(pool, inp, tmp_path / f"{routing}.jsonl", stats_path=str(tmp_path / f"{routing}.json"))
        finally:
            pool.close()
        got = by_key(read_output(tmp_path / f"{routing}.jsonl"))
        assert got == expected, routing
        cluster = summary.cluster
        assert cluster["routing"] == routing and cluster["resent"] == 0
        per_worker = cluster["per_worker"]
        assert [w["requests"] for w in per_worker] and sum(w["requests"] for w in per_worker) == 96
        assert all(w["requests"] > 0 for w in per_worker), per_worker  # both workers did work
        assert summary.counters.disk_loads == sum(w["adapters_loaded"] for w in per_worker)
        assert cluster["adapter_bytes_read"] > 0 and cluster["request_bytes_sent"] > 0
        loads[routing] = summary.counters.disk_loads
        clusters[routing] = cluster
    print(loads, {k: (v["stolen"], v["starved"]) for k, v in clusters.items()})
    # Round-robin: request k to worker k mod 2; each worker loads each distinct adapter it gets once (caches of 8).
    assert loads["round-robin"] == sum(len({r["adapter"] for r in records[w::2]} - {None}) for w in (0, 1)) > 8
    assert loads["affinity"] < loads["round-robin"], loads


def test_a_worker_killed_mid_run_and_every_request_answered_once(local_ray, llama_dir, many_adapters, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", _skewed(80))
    expected = _local_reference(llama_dir, many_adapters, inp, tmp_path)
    pool = RayPool(_config(llama_dir, many_adapters), ClusterOptions(workers=2))
    killed = []

    def kill_worker_0(w, reply):
        if w == 0 and not killed and reply.results:
            ray.kill(pool.handles[0])  # it still has requests in flight, and gets more before the pool knows
            killed.append(len(pool.sent[0]))

    pool.on_reply = kill_worker_0
    try:
        summary = _run(pool, inp, tmp_path / "out.jsonl")
    finally:
        pool.close()
    got = by_key(read_output(tmp_path / "out.jsonl"))  # asserts no id twice
    assert got == expected
    assert killed and summary.requests == 80 and summary.succeeded == 80
    cluster = summary.cluster
    assert not cluster["per_worker"][0]["alive"] and cluster["per_worker"][1]["alive"]
    assert cluster["resent"] > 0
    assert sum(w["requests"] for w in cluster["per_worker"]) == 80


def test_shipped_adapters_need_no_shared_folder(local_ray, llama_dir, many_adapters, tmp_path):
    adapters = tmp_path / "adapters"
    shutil.copytree(many_adapters, adapters)
    (adapters / "a0" / "README.md").write_text("not needed to load: never shipped")
    (adapters / "broken").mkdir()  # a config and no weights: the same error as a local run, naming this folder
    shutil.copy(adapters / "a0" / "adapter_config.json", adapters / "broken")
    records = _skewed(40) + [{"id": "bad", "prompt": "hi", "adapter": "broken"}]
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    expected = _local_reference(llama_dir, adapters, inp, tmp_path)
    assert str(adapters / "broken") in json.dumps(expected["bad"])
    pool = RayPool(_config(llama_dir, adapters, pinned=("a0",)), ClusterOptions(workers=2, ship_adapters=True))
    try:
        folders = [Path(d["adapters_folder"]) for d in ray.get([h.describe.remote() for h in pool.handles])]
        summary = _run(pool, inp, tmp_path / "out.jsonl")
    finally:
        pool.close()
    assert all(f != adapters and f.name.startswith("loracli-adapters-") for f in folders)
    assert not any(f.exists() for f in folders)  # the workers removed their copies
    assert by_key(read_output(tmp_path / "out.jsonl")) == expected
    cluster = summary.cluster
    per_worker = cluster["per_worker"]
    # Every adapter a worker was sent, it loaded once (its CPU cache holds all eight); `broken` went to one.
    assert sum(w["adapters_shipped"] for w in per_worker) == sum(w["adapters_loaded"] for w in per_worker) + 1
    named = {r["adapter"] for r in records} - {None}
    files = {n: [adapters / n / "adapter_config.json", adapters / n / "adapter_model.safetensors"] for n in named}
    size = {n: sum(f.stat().st_size for f in fs if f.exists()) for n, fs in files.items()}
    assert cluster["adapter_bytes_read_by_driver"] == sum(size.values())  # each read once, README never
    assert cluster["adapter_bytes_shipped"] == sum(w["adapter_bytes_shipped"] for w in per_worker)
    assert sum(size.values()) <= cluster["adapter_bytes_shipped"] < 2 * sum(size.values())
    assert all(w["adapters_shipped"] >= 1 and "a0" in w["holds"] for w in per_worker)  # pinned: sent at start


def test_a_broken_pinned_adapter_stops_the_start_naming_the_drivers_folder(
    local_ray, llama_dir, many_adapters, tmp_path
):
    adapters = tmp_path / "adapters"
    shutil.copytree(many_adapters, adapters)
    (adapters / "a1" / "adapter_model.safetensors").unlink()
    config = _config(llama_dir, adapters, pinned=("a1",))
    copies_before = set(Path(tempfile.gettempdir()).glob("loracli-adapters-*"))
    with pytest.raises(ClusterError, match="a Ray worker failed to start") as e:
        RayPool(config, ClusterOptions(workers=2, ship_adapters=True))
    assert str(adapters / "a1") in str(e.value) and "loracli-adapters-" not in str(e.value)
    assert set(Path(tempfile.gettempdir()).glob("loracli-adapters-*")) == copies_before  # no copy left behind


@pytest.mark.parametrize("then_every_worker_dies", [False, True])
def test_ctrl_c_under_ray_keeps_finished_results_and_a_rerun_completes(
    local_ray, llama_dir, many_adapters, tmp_path, then_every_worker_dies
):
    # Long enough answers that a worker's call returns with requests still in flight on it.
    inp = write_jsonl(tmp_path / "in.jsonl", [{**r, "max_tokens": 48} for r in _skewed(64)])
    expected = _local_reference(llama_dir, many_adapters, inp, tmp_path)
    out = tmp_path / "out.jsonl"
    pool = RayPool(_config(llama_dir, many_adapters), ClusterOptions(workers=2))
    signalled = []

    def ctrl_c(w, reply):
        if reply.results and all(pool.sent) and not signalled:  # both workers have requests in flight
            signalled.append(w)
            os.kill(os.getpid(), signal.SIGINT)
            if then_every_worker_dies:  # a stop, not "all workers failed": the lost requests wait for the rerun
                for h in pool.handles:
                    ray.kill(h)

    pool.on_reply = ctrl_c
    try:
        first = _run(pool, inp, out)
    finally:
        pool.close()
    assert first.interrupted == signal.SIGINT
    alive = [w["alive"] for w in first.cluster["per_worker"]]
    if then_every_worker_dies:  # the worker whose reply stopped the run may never be called again: only the
        assert alive[1 - signalled[0]] is False  # other one, whose call was in flight, is surely seen dead
    else:
        assert alive == [True, True]
    partial = by_key(read_output(out))
    assert 0 < len(partial) < 64 and all(expected[k] == v for k, v in partial.items())
    pool = RayPool(_config(llama_dir, many_adapters), ClusterOptions(workers=2))
    try:
        second = _run(pool, inp, out)
    finally:
        pool.close()
    assert second.interrupted is None and second.requests == 64 - len(partial)
    assert by_key(read_output(out)) == expected  # each id once


def test_cli_run_with_ray_and_shipped_adapters_writes_the_same_file(llama_dir, many_adapters, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", _skewed(24))
    expected = _local_reference(llama_dir, many_adapters, inp, tmp_path)
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    cmd = [
        sys.executable,
        "-m",
        "loracli",
        "run",
        str(inp),
        "--model",
        str(llama_dir),
        "--adapters",
        str(many_adapters),
        "-o",
        str(out),
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--max-loras",
        "2",
        "--max-lora-rank",
        "16",
        "--max-num-seqs",
        "4",
        "--max-cpu-loras",
        "8",
        "--stats",
        str(stats),
        "--ray",
        "--workers",
        "2",
        "--ship-adapters",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert by_key(read_output(out)) == expected
    assert "affinity routing over 2 Ray workers" in proc.stderr
    assert "worker 1:" in proc.stderr and "MiB of adapters shipped" in proc.stderr
    assert json.loads(stats.read_text())["cluster"]["ship_adapters"] is True


def test_bench_measures_ray_workers_beside_one_process(local_ray, llama_dir):
    name = "loracli-ray:workers=2:ship-adapters=true:max-loras=2"
    options = BenchOptions(
        model=str(llama_dir),
        adapters="3",
        prompts="8",
        prompt_len="4-8",
        output_len="3",
        threads=1,
        warmup=2,
        roofline_seconds=0,
        dtype="float32",
        isolate=False,
        systems=f"loracli,{name}",
    )
    copies_before = set(Path(tempfile.gettempdir()).glob("loracli-adapters-*"))
    by_name = {s.name: s for s in run_bench(options).points[0].systems}
    local, remote = by_name["loracli"], by_name[name]
    assert local.status == remote.status == "ok", (local.note, remote.note, remote.problems)
    assert remote.output_tokens == local.output_tokens == 8 * 3
    assert remote.counters["disk_loads"] >= 1 and remote.counters["request_bytes"] > 0
    assert remote.counters["result_bytes"] > 0 and remote.counters["resent"] == 0
    assert remote.counters["shipped_bytes"] > 0 and remote.counters["adapter_bytes"] > 0
    assert set(Path(tempfile.gettempdir()).glob("loracli-adapters-*")) == copies_before  # the pool was closed


def test_ray_address_is_optional_on_the_command_line():
    assert optional_ray_address(["run", "in.jsonl", "--ray"]) == ["run", "in.jsonl", "--ray", "local"]
    assert optional_ray_address(["run", "x", "--ray", "--workers", "2"]) == [
        "run",
        "x",
        "--ray",
        "local",
        "--workers",
        "2",
    ]
    assert optional_ray_address(["run", "x", "--ray", "auto"]) == ["run", "x", "--ray", "auto"]
    assert optional_ray_address(["run", "x", "--ray", "10.0.0.1:6379"]) == ["run", "x", "--ray", "10.0.0.1:6379"]
    assert optional_ray_address(["run", "--ray", "in.jsonl"]) == ["run", "--ray", "local", "in.jsonl"]


def test_missing_ray_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'loracli\[ray\]'"):
        import_ray()


@pytest.mark.parametrize("bad", [dict(workers=0), dict(worker_cpus=0), dict(routing="random"), dict(worker_gpus=-1)])
def test_cluster_options_are_validated(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))) as info:
        ClusterOptions(**bad)
    assert info.value.fields == tuple(bad)
