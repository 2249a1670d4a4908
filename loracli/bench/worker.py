"""Run one system on one workload and measure it: `python -m loracli.bench.worker JOB.json OUT.json`.

Contract: reads a `Job` (JSON), sets the torch thread count, loads the system (timed as
`load_seconds`), runs a short warm-up (`warmup_requests`, not timed), then the timed run, and
writes a `Measurement` (JSON) to OUT. Run in its own process (the default), `peak_rss_mib` is
the process's `ru_maxrss` high-water mark and `rss_delta_mib` that peak minus the high-water mark
after the imports, before any model was loaded: the memory the system itself needed (with
`loracli-ray`, plus the Ray workers' peaks: they are the system's memory too). In-process
(`measure(job, isolated=False)`, for tests) both are None. A system that raises is reported with
`error` (a missing vllm with `skipped`), never as a crash of the benchmark. Progress goes to stderr.
`cpu` is `loracli.cpu_usage` over the timed run (the job's thread count as the compute threads): how
much other work shared the CPUs and whether that oversubscribed them. A system that runs in other
processes (`loracli-ray`, `llama-cpp`) has its own work counted as other work there.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import time
import traceback
import warnings
from dataclasses import asdict

from ..cpu_usage import cpu_sample, cpu_usage
from .protocol import Job, Measurement
from .system_names import parse_system
from .systems import build_system


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def warmup_requests(requests: list[dict], n: int) -> list[dict]:
    """Up to n requests, one per adapter first (order of first use), each cut to 4 output tokens."""
    if n <= 0:
        return []
    seen: set[str | None] = set()
    firsts, rest = [], []
    for r in requests:
        (rest if r["adapter"] in seen else firsts).append(r)
        seen.add(r["adapter"])
    chosen = (firsts + rest)[:n]
    return [{**r, "id": f"warmup-{i}", "max_tokens": min(4, r["max_tokens"])} for i, r in enumerate(chosen)]


def measure(job: Job, isolated: bool = False) -> Measurement:
    import torch

    importlib.import_module("transformers")  # library imports are not the system's memory
    torch.set_num_threads(job.threads)
    baseline = maxrss_mib()
    m = Measurement(job.system)
    system = None
    try:
        t = time.perf_counter()
        system = build_system(job)
        m.load_seconds = time.perf_counter() - t
        t = time.perf_counter()
        system.run(warmup_requests(job.requests, job.warmup))
        m.warmup_seconds = time.perf_counter() - t
        start = cpu_sample()
        timed = system.run(job.requests)
        m.cpu = cpu_usage(start, cpu_sample(), job.threads)
        m.records, m.wall, m.counters = timed.records, timed.wall, timed.counters
    except ImportError as e:
        if parse_system(job.system).kind != "vllm":
            raise
        m.skipped = f"import vllm failed ({e}): skipped"
    except Exception as e:  # noqa: BLE001 - a failing system is a result of the benchmark, not its end
        m.error = f"{type(e).__name__}: {e}"
        log(traceback.format_exc())
    if isolated:
        elsewhere = system.elsewhere_rss_mib() if system is not None else 0.0
        m.peak_rss_mib = maxrss_mib() + elsewhere
        m.rss_delta_mib = m.peak_rss_mib - baseline
    if system is not None:
        try:
            system.close()
        except Exception as e:  # noqa: BLE001 - as above: reported, not a crash
            m.error = m.error or f"closing: {type(e).__name__}: {e}"
            log(traceback.format_exc())
    return m


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, not results
    job_path, out_path = argv
    with open(job_path, encoding="utf-8") as f:
        job = Job(**json.load(f))
    m = measure(job, isolated=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(asdict(m), f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
