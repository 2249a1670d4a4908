"""Scale: a 20k-line input (100k with -m slow) streams through a 1-layer tiny model with bounded
memory. A child process measures its own peak RSS (VmHWM) after a 2k-line warm-up run and again
after the big run; the growth must stay far below what keeping every record or result would take.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json, sys, torch
from pathlib import Path
from rich.console import Console
from loracli.config import EngineConfig
from loracli.engine.engine import Engine
from loracli.sampling import SamplingParams
from loracli.job import JobOptions, run_job

def hwm_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

model, warm, big, out = sys.argv[1:5]
torch.set_num_threads(1)
engine = Engine(EngineConfig(model=model, dtype="float32", device="cpu", max_num_seqs=64))
defaults = SamplingParams(max_tokens=1, ignore_eos=True)
quiet = Console(stderr=True, quiet=True)
run_job(warm, out + ".warm", engine.config, defaults, console=quiet, engine=engine)
before = hwm_mib()
s = run_job(big, out, engine.config, defaults, console=quiet, options=JobOptions(), engine=engine)
print(json.dumps({"before": before, "after": hwm_mib(), "requests": s.requests, "failed": s.failed,
                  "seconds": s.wall_seconds}))
"""


PROMPT = "what is the capital of france? tell me a story about a robot who learns to paint, in one line"


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    from tiny import make_model

    return make_model(tmp_path_factory.mktemp("one_layer") / "model", "llama", seed=0, layers=1)


def write_lines(path, n: int, bad_every: int = 1000) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            if i % bad_every == 7:
                f.write('{"id": "broken", "prompt": \n')
            else:
                f.write(json.dumps({"id": f"req-{i:07d}", "prompt": f"{PROMPT} {i % 97}"}) + "\n")


def run_big(one_layer, tmp_path, n: int) -> dict:
    warm, big, out = tmp_path / "warm.jsonl", tmp_path / "big.jsonl", tmp_path / "out.jsonl"
    write_lines(warm, 2000)
    write_lines(big, n)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(one_layer), str(warm), str(big), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert p.returncode == 0, p.stderr
    stats = json.loads(p.stdout.strip().splitlines()[-1])
    ids, lines = set(), 0
    with open(out, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            lines += 1
            ids.add(rec["id"] if "line" not in rec else ("line", rec["line"]))
    assert lines == len(ids) == n == stats["requests"]
    assert stats["failed"] == n // 1000
    stats["growth"] = stats["after"] - stats["before"]
    print(
        f"\n{n} lines: peak RSS {stats['before']:.0f} -> {stats['after']:.0f} MiB "
        f"(+{stats['growth']:.1f}), {stats['seconds']:.0f}s"
    )
    return stats


def test_20k_lines_with_bounded_memory(one_layer, tmp_path):
    stats = run_big(one_layer, tmp_path, 20_000)
    assert stats["growth"] < 10, stats  # measured: +2 MiB; holding the 20k results instead: +27 MiB


@pytest.mark.slow
def test_100k_lines_with_bounded_memory(one_layer, tmp_path):
    stats = run_big(one_layer, tmp_path, 100_000)
    assert stats["growth"] < 16, stats  # the id tables: ~5 MiB at 100k
