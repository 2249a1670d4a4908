"""`loracli run --ray` on a local Ray instance with 2 workers and the tiny model: the same output as
one process, a worker killed mid-run with every request answered once, affinity routing loading
fewer adapters than round-robin on a skewed workload, the CLI end to end, and a clear error
without Ray."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys

import pytest
import ray
from rich.console import Console
from runs import by_key, read_output, tiny_engine, write_jsonl

from loracli.cli import optional_ray_address
from loracli.cluster.pool import ClusterOptions, RayPool, import_ray
from loracli.config import EngineConfig
from loracli.engine.sequence import SamplingParams
from loracli.errors import ConfigError
from loracli.runner import RunOptions, run_file


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
    cfg = dict(model=str(model_dir), adapters_dir=str(adapters_dir), dtype="float32", device="cpu", max_loras=2,
               max_lora_rank=16, max_num_seqs=4, max_cpu_loras=8)
    cfg.update(kw)
    return EngineConfig(**cfg)


def _skewed(n: int) -> list[dict]:
    """About half the requests for a0, the rest spread over a1..a7 and the base model, in random order."""
    rng = random.Random(0)
    names = ["a0"] * 8 + [f"a{i}" for i in range(1, 8)] + [None]
    return [{"id": f"r{i}", "prompt": f"the quick brown fox {i}", "adapter": rng.choice(names)} for i in range(n)]


def _run(engine, inp, out, **options):
    defaults = SamplingParams(max_tokens=6, ignore_eos=True)
    return run_file(str(inp), str(out), engine.config, defaults, console=Console(stderr=True, quiet=True),
                    options=RunOptions(**options), engine=engine)


def _local_reference(llama_dir, adapters, inp, tmp_path) -> dict:
    engine = tiny_engine(llama_dir, adapters, max_num_seqs=4, max_cpu_loras=8)
    _run(engine, inp, tmp_path / "local.jsonl")
    return by_key(read_output(tmp_path / "local.jsonl"))


def test_two_workers_match_one_process_and_affinity_loads_fewer_adapters(local_ray, llama_dir, many_adapters,
                                                                         tmp_path):
    records = _skewed(96)
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    expected = _local_reference(llama_dir, many_adapters, inp, tmp_path)
    loads = {}
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
        assert summary.adapter_disk_loads == sum(w["adapters_loaded"] for w in per_worker)
        assert cluster["adapter_bytes_read"] > 0 and cluster["request_bytes_sent"] > 0
        loads[routing] = summary.adapter_disk_loads
    print(loads)
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


def test_cli_run_with_ray_writes_the_same_file(llama_dir, many_adapters, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", _skewed(24))
    expected = _local_reference(llama_dir, many_adapters, inp, tmp_path)
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "loracli", "run", str(inp), "--model", str(llama_dir), "--adapters",
           str(many_adapters), "-o", str(out), "--max-tokens", "6", "--ignore-eos", "--dtype", "float32",
           "--device", "cpu", "--max-loras", "2", "--max-lora-rank", "16", "--max-num-seqs", "4",
           "--max-cpu-loras", "8", "--stats", str(stats), "--ray", "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert by_key(read_output(out)) == expected
    assert "affinity routing over 2 Ray workers" in proc.stderr
    assert "worker 1:" in proc.stderr


def test_ray_address_is_optional_on_the_command_line():
    assert optional_ray_address(["run", "in.jsonl", "--ray"]) == ["run", "in.jsonl", "--ray", "local"]
    assert optional_ray_address(["run", "x", "--ray", "--workers", "2"]) == ["run", "x", "--ray", "local",
                                                                           "--workers", "2"]
    assert optional_ray_address(["run", "x", "--ray", "auto"]) == ["run", "x", "--ray", "auto"]
    assert optional_ray_address(["run", "x", "--ray", "10.0.0.1:6379"]) == ["run", "x", "--ray", "10.0.0.1:6379"]
    assert optional_ray_address(["run", "--ray", "in.jsonl"]) == ["run", "--ray", "local", "in.jsonl"]


def test_missing_ray_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'loracli\[ray\]'"):
        import_ray()


@pytest.mark.parametrize("bad", [dict(workers=0), dict(worker_cpus=0), dict(routing="random"),
                                 dict(worker_gpus=-1)])
def test_cluster_options_are_validated(bad):
    with pytest.raises(ConfigError, match="--"):
        ClusterOptions(**bad)
