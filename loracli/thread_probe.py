"""`python -m loracli.thread_probe`: do the thread count and OpenMP's wait policy matter here? Measured, cached.

Contract: `thread_probe()` returns this machine's figures: from `<cache root>/cpu_threads.json`
under a key of the CPU (model name, flags), the torch version and the CPU count
(`devices.machine_key` plus the count), else measured by `measure_threads()` and cached, like the
`--dtype auto` probe of `loracli.devices`. `--refresh` measures again.

What is measured: a decode-like step (`STEP_LAYERS` times: [64 x 576] @ [576 x 1536], SiLU x up,
[64 x 1536] @ [1536 x 576], residual add, RMS norm; float32, SmolLM2-135M's shapes at batch 64):
many small parallel regions, each ending at an OpenMP barrier, which is where a descheduled thread
stalls the rest. Each (OMP_WAIT_POLICY, thread count) pair runs in its own child process (the policy
is read when the OpenMP runtime starts), for thread counts `candidate_threads(cpus)`, twice: on the
machine as it is ("quiet") and with one co-tenant process spinning on a CPU ("busy", a process this
probe starts and stops). Each run reports ms per step (best of 3 rounds of about `seconds` / 3).
`best_quiet` and `best_busy` name the fastest pair of each condition.

Nothing reads the result to choose defaults: the engine still takes torch's thread count (one per
core) and the OpenMP runtime's default wait policy. The probe exists so that a measurement on a
quiet machine can decide them (docs/PERFORMANCE.md says how); "quiet" figures taken while other
processes run are not that measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from .cpu_usage import affinity

PROBE_FILE = "cpu_threads.json"
POLICIES = ("passive", "active")
STEP_LAYERS = 8  # a quarter of SmolLM2-135M: the same barriers per FLOP, a cheaper probe
ROWS, HIDDEN, INTERMEDIATE = 64, 576, 1536
PROBE_SECONDS = 0.6  # timing per run


def candidate_threads(cpus: int) -> list[int]:
    """1, one fewer than the CPUs, and all of them (deduplicated, ascending)."""
    return sorted({1, max(1, cpus - 1), cpus})


def step_ms(seconds: float) -> float:
    """Milliseconds per decode-like step in this process (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, HIDDEN, generator=gen)
    up = torch.randn(2 * INTERMEDIATE, HIDDEN, generator=gen) * HIDDEN**-0.5
    down = torch.randn(HIDDEN, INTERMEDIATE, generator=gen) * INTERMEDIATE**-0.5

    def step() -> None:
        h = x
        for _ in range(STEP_LAYERS):
            gate, u = F.linear(h, up).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * u, down)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)

    step()
    best = float("inf")
    for _ in range(3):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 3 or calls == 0:
            step()
            calls += 1
        best = min(best, elapsed / calls)
    return best * 1e3


def _child(policy: str, threads: int, seconds: float) -> float:
    """One run in a fresh process with OMP_WAIT_POLICY and the thread count set before torch starts."""
    env = {**os.environ, "OMP_WAIT_POLICY": policy.upper(), "OMP_NUM_THREADS": str(threads)}
    code = (
        f"import torch; torch.set_num_threads({threads}); "
        f"from loracli.thread_probe import step_ms; print(step_ms({seconds}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def measure_threads(seconds: float = PROBE_SECONDS) -> dict[str, Any]:
    """Every (policy, threads) pair, quiet and with one spinning co-tenant; the fastest of each."""
    import torch

    cpus = len(affinity())
    runs = []
    for busy in (False, True):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for policy in POLICIES:
                for threads in candidate_threads(cpus):
                    ms = _child(policy, threads, seconds)
                    runs.append({"co_tenant": busy, "policy": policy, "threads": threads, "step_ms": round(ms, 3)})
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()

    def best(busy: bool) -> dict[str, Any]:
        return min((r for r in runs if r["co_tenant"] == busy), key=lambda r: r["step_ms"])

    return {"cpus": cpus, "torch": torch.__version__, "runs": runs, "best_quiet": best(False), "best_busy": best(True)}


def probe_key() -> str:
    from .devices import machine_key

    return f"{machine_key()}-{len(affinity())}cpus"


def thread_probe(seconds: float = PROBE_SECONDS, refresh: bool = False) -> dict[str, Any]:
    """This machine's figures: from the cache, else measured and cached (a cache that cannot be written
    only costs measuring again)."""
    from .devices import cached_probe
    from .model_source import cache_root

    return cached_probe(cache_root() / PROBE_FILE, probe_key(), lambda: measure_threads(seconds), refresh)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loracli.thread_probe", description=__doc__.splitlines()[0])
    p.add_argument("--refresh", action="store_true", help="measure again instead of reading the cache")
    p.add_argument("--seconds", type=float, default=PROBE_SECONDS, help="timing per run")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = p.parse_args(argv)
    result = thread_probe(a.seconds, a.refresh)
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    for r in result["runs"]:
        where = "with a co-tenant" if r["co_tenant"] else "as the machine is"
        print(f"{r['threads']} threads, OMP_WAIT_POLICY={r['policy']:<7} {where:<18} {r['step_ms']:8.2f} ms per step")
    for name in ("best_quiet", "best_busy"):
        b = result[name]
        print(f"{name}: {b['threads']} threads, {b['policy']} ({b['step_ms']:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
