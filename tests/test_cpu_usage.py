"""Oversubscription reporting (`loracli/cpu_usage.py`) and the thread / OpenMP wait-policy probe
(`loracli/thread_probe.py`). The probe's figures decide nothing yet; here only its mechanics are tested."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from runs import prompts, run, tiny_engine, write_jsonl

from loracli import thread_probe
from loracli.cpu_usage import (
    OVERSUBSCRIBED_MARGIN,
    CpuSample,
    busy_seconds,
    cpu_sample,
    cpu_usage,
    oversubscribed_note,
)

PROC_STAT = """cpu  300 10 100 5000 20 0 5 15 0 0
cpu0 100 5 50 2500 10 0 2 3 0 0
cpu1 200 5 50 2500 10 0 3 12 0 0
intr 4187520 0 0
ctxt 4573226
"""


def test_busy_seconds_sums_the_affinity_cpus_without_idle_and_iowait():
    # cpu0: 100 + 5 + 50 + 0 + 2 + 3 = 160 ticks; cpu1: 200 + 5 + 50 + 0 + 3 + 12 = 270
    assert busy_seconds(PROC_STAT, {0}, 100) == 1.6
    assert busy_seconds(PROC_STAT, {1}, 100) == 2.7
    assert busy_seconds(PROC_STAT, {0, 1}, 100) == 4.3
    assert busy_seconds(PROC_STAT, {5}, 100) is None


def test_usage_arithmetic():
    start = CpuSample(wall=10.0, own_cpu=1.0, busy=100.0, load=0.5)
    end = CpuSample(wall=12.0, own_cpu=5.0, busy=106.0, load=1.9)  # 6 s busy on our CPUs, 4 of them ours
    quiet = cpu_usage(start, end, threads=2, cpus=2)
    assert quiet["others_cpus"] == 1.0 and quiet["own_cpu_s"] == 4.0 and quiet["wall_s"] == 2.0
    assert quiet["oversubscribed"] is True  # 2 threads + 1 CPU of other work > 2 CPUs + the margin
    assert cpu_usage(start, end, threads=1, cpus=2)["oversubscribed"] is False  # 1 + 1 fits on 2
    light = CpuSample(wall=12.0, own_cpu=5.0, busy=100.0 + 4 + 2 * OVERSUBSCRIBED_MARGIN, load=None)
    assert cpu_usage(start, light, threads=2, cpus=2)["oversubscribed"] is False  # within the margin
    unknown = cpu_usage(start, CpuSample(12.0, 5.0, None, None), threads=2, cpus=2)
    assert unknown["others_cpus"] is None and unknown["oversubscribed"] is None
    assert cpu_usage(start, end, threads=None, cpus=2)["oversubscribed"] is None
    note = oversubscribed_note(quiet)
    assert note.startswith("note: the machine was oversubscribed") and "1.00 of the 2 CPUs" in note
    assert oversubscribed_note(cpu_usage(start, end, threads=1, cpus=2)) is None and oversubscribed_note({}) is None


def test_a_spinning_co_tenant_is_seen():
    """A process spinning on one of our CPUs for a second shows up as about one CPU of other work (Linux)."""
    cpus = len(os.sched_getaffinity(0))
    start = cpu_sample()
    spinner = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"]
    )
    try:
        time.sleep(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    usage = cpu_usage(start, cpu_sample(), threads=cpus)
    assert usage["others_cpus"] >= 0.6, usage  # the spinner, plus whatever else runs here
    assert usage["oversubscribed"] is True


def test_job_summary_reports_cpu_usage(llama_dir, tmp_path):
    engine = tiny_engine(llama_dir)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3, adapters=(None,)))
    summary = run(engine, inp, tmp_path / "out.jsonl", stats_path=str(tmp_path / "stats.json"))
    cpu = summary.cpu
    assert cpu["cpus"] >= 1 and cpu["threads"] >= 1 and cpu["wall_s"] > 0 and cpu["own_cpu_s"] > 0
    assert set(cpu) == {
        "cpus",
        "threads",
        "wall_s",
        "own_cpu_s",
        "others_cpus",
        "oversubscribed",
        "load_before",
        "load_after",
    }
    assert json.loads((tmp_path / "stats.json").read_text())["cpu"] == cpu


# --- the probe -------------------------------------------------------------------------------------------


def test_candidate_threads():
    assert thread_probe.candidate_threads(1) == [1]
    assert thread_probe.candidate_threads(2) == [1, 2]
    assert thread_probe.candidate_threads(8) == [1, 7, 8]


def test_one_probe_run_in_a_child_process():
    assert thread_probe._child("passive", 1, 0.05) > 0


def test_probe_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("LORACLI_CACHE", str(tmp_path))
    calls = []

    def fake(seconds):
        calls.append(seconds)
        return {"runs": [], "best_quiet": {"threads": 2, "policy": "passive"}}

    monkeypatch.setattr(thread_probe, "measure_threads", fake)
    first = thread_probe.thread_probe(0.1)
    assert thread_probe.thread_probe(0.1) == first and calls == [0.1]
    stored = json.loads((tmp_path / thread_probe.PROBE_FILE).read_text())
    assert stored[thread_probe.probe_key()] == first
    thread_probe.thread_probe(0.2, refresh=True)
    assert calls == [0.1, 0.2]


def test_bench_results_carry_the_workers_cpu_usage_and_say_when_oversubscribed():
    from rich.console import Console

    from loracli.bench.protocol import Measurement, Record
    from loracli.bench.report import BenchReport, Point, render, summarize
    from loracli.bench.workload import BenchRequest

    busy = cpu_usage(CpuSample(0.0, 0.0, 0.0, None), CpuSample(1.0, 1.0, 2.5, None), threads=2, cpus=2)
    m = Measurement("loracli", [Record("a", [1, 2], 0.1, 0.5)], wall=1.0, cpu=busy)
    result = summarize(m, [BenchRequest("a", None, 2)], ignore_eos=True)
    assert result.cpu == busy and result.cpu["oversubscribed"] is True
    machine = dict(cpu="x", logical_cpus=2, threads=2, dtype="float32", device="cpu", torch="t", python="p")
    report = BenchReport("c", "d", {**machine, "load_before": "1", "load_after": "1"}, [], None, [])
    report.points.append(Point("", None, {"description": "w"}, {}, [result]))
    console = Console(record=True, width=200)
    render(report, console)
    assert "loracli: the machine was oversubscribed during the run: 2 compute threads" in console.export_text()
