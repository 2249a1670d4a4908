"""Was the machine oversubscribed during a run? The CPU time other work took on this process's CPUs.

    start = cpu_sample()  ...run...  usage = cpu_usage(start, cpu_sample(), torch_threads())  -> dict (JobSummary.cpu)
    oversubscribed_note(usage) -> the stderr line when it was, else None

The signal: between the two samples, the busy time (user, nice, system, irq, softirq and steal)
that Linux's /proc/stat counts on the CPUs this process may run on (`os.sched_getaffinity`), minus
this process's own CPU time (`resource.getrusage`, all its threads), over the wall time: `others_cpus`,
how many of those CPUs other processes (and a hypervisor's steal) kept busy on average. The run was
oversubscribed when `threads + others_cpus > cpus + OVERSUBSCRIBED_MARGIN`: the compute threads
and the other work did not fit on the CPUs, so OpenMP's threads were descheduled and every barrier
of a step waited for them (on 2 cores a second busy process cut a 2-thread run from 230 to 55
tok/s: issue 21). The margin (half a CPU) keeps light background work (a shell, a logger) from
counting.

Why not the load average: it is a one-minute exponential average (a short run barely moves it),
counts this process's own threads, and on a container shows the whole host. Why not this process's
CPU time against wall x threads: a thread also idles while Python runs the scheduler or tokenizes,
and with OMP_WAIT_POLICY=active a waiting thread burns CPU, so neither a low nor a high figure means
contention. Limits: Linux only (elsewhere `oversubscribed` is None); child processes of this one
count as other work (the local engine has none; `--ray` runs are not measured); a container without a
cpuset sees host CPUs in /proc/stat, which the affinity set then matches. The 1-minute load average
at both ends is kept next to it, for reference. No torch: this module is light.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

OVERSUBSCRIBED_MARGIN = 0.5  # CPUs of other work tolerated beyond a full machine
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system [idle iowait] irq softirq steal; guest is inside user


@dataclass(frozen=True)
class CpuSample:
    wall: float  # time.monotonic()
    own_cpu: float  # seconds of CPU this process used (user + system, all threads)
    busy: float | None  # seconds the affinity CPUs were busy (/proc/stat), None where unreadable
    load: float | None  # 1-minute load average


def affinity() -> set[int]:
    """The CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def busy_seconds(stat_text: str, cpus: set[int], ticks_per_second: float) -> float | None:
    """Busy seconds summed over the `cpuN` lines of /proc/stat for N in `cpus` (None if none match)."""
    total, seen = 0, False
    for line in stat_text.splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(v) for v in values]
        total += sum(ticks[i] for i in BUSY_FIELDS if i < len(ticks))
        seen = True
    return total / ticks_per_second if seen else None


def cpu_sample() -> CpuSample:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        busy = busy_seconds(Path("/proc/stat").read_text(), affinity(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        busy = None
    try:
        load: float | None = os.getloadavg()[0]
    except OSError:
        load = None
    return CpuSample(time.monotonic(), usage.ru_utime + usage.ru_stime, busy, load)


@dataclass(frozen=True)
class CpuUsage:
    cpus: int  # CPUs this process may run on
    threads: int | None  # compute threads the run used (torch's), None when unknown
    wall_s: float
    own_cpu_s: float
    others_cpus: float | None  # mean CPUs busy with other work (see the module docstring)
    oversubscribed: bool | None  # None: not measurable here (no /proc/stat, or threads unknown)
    load_before: float | None
    load_after: float | None


def cpu_usage(start: CpuSample, end: CpuSample, threads: int | None, cpus: int | None = None) -> dict:
    """What happened on this process's CPUs between `start` and `end` (`CpuUsage` as a dict)."""
    cpus = cpus or len(affinity())
    wall = max(end.wall - start.wall, 1e-9)
    own = end.own_cpu - start.own_cpu
    others = None
    if start.busy is not None and end.busy is not None:
        others = max(0.0, (end.busy - start.busy) - own) / wall
    over = None if others is None or threads is None else threads + others > cpus + OVERSUBSCRIBED_MARGIN
    usage = CpuUsage(
        cpus,
        threads,
        round(wall, 3),
        round(own, 3),
        None if others is None else round(others, 3),
        over,
        start.load,
        end.load,
    )
    return asdict(usage)


def torch_threads() -> int | None:
    """torch's intra-op thread count when torch is already imported (this module never imports it)."""
    torch = sys.modules.get("torch")
    return None if torch is None else int(torch.get_num_threads())


def oversubscribed_note(usage: dict) -> str | None:
    """One line for stderr when the run was oversubscribed, else None."""
    if not usage.get("oversubscribed"):
        return None
    return (
        f"note: the machine was oversubscribed during the run: {usage['threads']} compute threads, and other "
        f"work kept {usage['others_cpus']:.2f} of the {usage['cpus']} CPUs busy on average; throughput suffers "
        "(fewer threads, or a quieter machine, may run faster)"
    )
