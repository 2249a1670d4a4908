"""From raw measurements to results: validity, throughput, latency percentiles, the table, JSON, the plot.

- `check_outputs(records, requests, ignore_eos)`: the problems of a system's outputs: a missing,
  duplicated or unknown request id, an error, or a wrong length (with ignore-eos exactly
  `max_tokens` tokens, else 1..`max_tokens`). A system with any problem is `invalid`: its time
  is kept in the JSON but it gets no tokens/s.
- `summarize(measurement, requests, ignore_eos)` -> `SystemResult`: output tokens/s = output tokens
  / wall time of the timed run; TTFT and end-to-end latency p50/p99 (linear-interpolated
  percentiles) in seconds from the start of the timed run (every request arrives at that start);
  per phase, tokens / (its last finish - the previous phases' last finish).
- `compare(results, ...)`: the ratios to `peft-mixed` and to `base` (tokens/s over tokens/s), and the
  arithmetic rate over the whole run (`run_flops_per_s`: the workload's prefill + decode FLOPs, `roofline.
  run_flops`, over the timed wall seconds) as a fraction of the best probed matmul rate
  (`run_matmul_fraction`, the table's "run % of matmul"); `decode_only_matmul_fraction` is the older,
  decode-only figure (tokens/s x FLOPs per decode token; prefill not counted), kept in the JSON.
- `render(report, console)`: the machine, the roofline and one table per workload point, with a line
  for each system whose timed run was oversubscribed (`SystemResult.cpu`, from the worker).
- `report.to_dict()`: every number; `plot(report, path)`: PNG (matplotlib, Agg): bars per system,
  or for a sweep tokens/s against the swept value, one line per system; `save` writes both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..cpu_usage import oversubscribed_note
from ..quantiles import percentile
from .protocol import Measurement, Record
from .workload import BenchRequest

STATUS_STYLE = {"ok": "green", "invalid": "red", "failed": "red", "skipped": "yellow"}


def check_outputs(records: Sequence[Record], requests: Sequence[BenchRequest], ignore_eos: bool) -> list[str]:
    expected = {r.id: r for r in requests}
    seen: set[str] = set()
    problems = []
    for rec in records:
        req = expected.get(rec.id)
        if req is None:
            problems.append(f"{rec.id}: not a request of the workload")
            continue
        if rec.id in seen:
            problems.append(f"{rec.id}: answered twice")
        seen.add(rec.id)
        n = len(rec.tokens)
        if rec.error:
            problems.append(f"{rec.id}: {rec.error}")
        elif ignore_eos and n != req.max_tokens:
            problems.append(f"{rec.id}: {n} tokens, expected exactly {req.max_tokens}")
        elif not 1 <= n <= req.max_tokens:
            problems.append(f"{rec.id}: {n} tokens, expected 1..{req.max_tokens}")
    missing = [rid for rid in expected if rid not in seen]
    if missing:
        problems.append(f"{len(missing)} request(s) without a result (first: {missing[0]})")
    return problems


@dataclass
class SystemResult:
    name: str
    status: str  # ok | invalid | failed | skipped
    note: str = ""
    requests: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    tokens_per_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    minority_wait_p99_s: float | None = None  # requests not of the most common adapter: arrival -> first token
    minority_wait_max_s: float | None = None
    peak_rss_mib: float | None = None
    rss_delta_mib: float | None = None
    load_s: float = 0.0
    warmup_s: float = 0.0
    counters: dict = field(default_factory=dict)
    phases: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    vs_peft_mixed: float | None = None
    vs_base: float | None = None
    run_flops_per_s: float | None = None  # the run's FLOPs (prefill + decode) / wall_s
    run_matmul_fraction: float | None = None  # run_flops_per_s / the best probed matmul rate
    decode_only_matmul_fraction: float | None = None  # tokens/s x decode FLOPs per token / that rate (no prefill)
    cpu: dict = field(default_factory=dict)  # the worker's cpu_usage over the timed run (protocol.Measurement.cpu)


def phase_rates(records: Sequence[Record], requests: Sequence[BenchRequest]) -> list[dict]:
    phase_of = {r.id: r.phase for r in requests}
    phases = sorted(set(phase_of.values()))
    out, before = [], 0.0
    for p in phases:
        mine = [rec for rec in records if phase_of.get(rec.id) == p]
        tokens = sum(len(rec.tokens) for rec in mine)
        end = max((rec.latency for rec in mine), default=before)
        span = end - before
        out.append(
            {
                "phase": p,
                "requests": len(mine),
                "output_tokens": tokens,
                "end_s": end,
                "tokens_per_s": tokens / span if span > 0 else None,
            }
        )
        before = max(before, end)
    return out


def minority_waits(records: Sequence[Record], requests: Sequence[BenchRequest]) -> list[float]:
    """Waits (engine arrival to first token) of the requests whose adapter is not the most common one."""
    adapter_of = {r.id: r.adapter for r in requests}
    counts: dict = {}
    for r in requests:
        counts[r.adapter] = counts.get(r.adapter, 0) + 1
    top = max(counts, key=counts.__getitem__) if counts else None
    return [rec.wait for rec in records if rec.wait is not None and adapter_of.get(rec.id) != top]


def summarize(m: Measurement, requests: Sequence[BenchRequest], ignore_eos: bool) -> SystemResult:
    base = dict(
        name=m.system,
        load_s=m.load_seconds,
        warmup_s=m.warmup_seconds,
        counters=m.counters,
        peak_rss_mib=m.peak_rss_mib,
        rss_delta_mib=m.rss_delta_mib,
        cpu=m.cpu,
    )
    if m.skipped:
        return SystemResult(status="skipped", note=m.skipped, **base)
    if m.error:
        return SystemResult(status="failed", note=m.error, **base)
    problems = check_outputs(m.records, requests, ignore_eos)
    tokens = sum(len(r.tokens) for r in m.records)
    ttfts = [r.ttft for r in m.records if r.ttft is not None]
    lats = [r.latency for r in m.records]
    waits = minority_waits(m.records, requests)
    result = SystemResult(
        status="invalid" if problems else "ok",
        requests=len(m.records),
        output_tokens=tokens,
        wall_s=m.wall,
        tokens_per_s=None if problems or m.wall <= 0 else tokens / m.wall,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        latency_p50_s=percentile(lats, 50),
        latency_p99_s=percentile(lats, 99),
        minority_wait_p99_s=percentile(waits, 99),
        minority_wait_max_s=max(waits, default=None),
        phases=phase_rates(m.records, requests),
        problems=problems,
        note=f"{len(problems)} problem(s): {problems[0]}" if problems else "",
        **base,
    )
    return result


def compare(
    results: Sequence[SystemResult],
    flops_per_token: float | None,
    peak_flops: float | None,
    run_flops: dict | None = None,
) -> None:
    """Fill in the ratios to peft-mixed and base, and the arithmetic rates and their fractions of the
    matmul rate, in place. `run_flops` is `RunFlops.to_dict()` of the workload; `base` runs no LoRA
    and is credited its FLOPs without the LoRA part."""
    rates = {r.name: r.tokens_per_s for r in results}
    for r in results:
        if r.tokens_per_s is None:
            continue
        if rates.get("peft-mixed"):
            r.vs_peft_mixed = r.tokens_per_s / rates["peft-mixed"]
        if rates.get("base"):
            r.vs_base = r.tokens_per_s / rates["base"]
        if flops_per_token and peak_flops:
            r.decode_only_matmul_fraction = r.tokens_per_s * flops_per_token / peak_flops
        if run_flops and r.wall_s > 0:
            total = run_flops["total"] - (run_flops["lora"] if r.name == "base" else 0.0)
            r.run_flops_per_s = total / r.wall_s
            if peak_flops:
                r.run_matmul_fraction = r.run_flops_per_s / peak_flops


@dataclass
class Point:
    """One workload (a sweep value, or the whole run) and every system's result on it."""

    label: str
    value: str | None
    workload: dict
    flops_per_token: dict  # roofline.flops_per_token of the workload: one decode token, prefill not counted
    systems: list[SystemResult]
    run_flops: dict = field(default_factory=dict)  # roofline.RunFlops of the workload: prefill and decode


@dataclass
class BenchReport:
    command: str
    date: str
    machine: dict
    roofline: list[dict]
    sweep: str | None
    points: list[Point]
    notes: list[str] = field(default_factory=list)

    @property
    def peak_flops(self) -> float | None:
        return max((p["flops_per_s"] for p in self.roofline), default=None)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def any_bad(self) -> bool:
        """Some system failed or gave invalid outputs (skipped ones do not count)."""
        return any(s.status in ("failed", "invalid") for p in self.points for s in p.systems)


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if value is None else fmt.format(value)


def _pair(a: float | None, b: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if a is None else f"{fmt.format(a)} / {_num(b, fmt)}"


def _slots(r: SystemResult) -> str:
    c = r.counters
    if "slot_activations" in c:
        resizes = f", {c['slot_resizes']} resizes" if c.get("slot_resizes") else ""
        merges = f", {c['merges']} merges" if c.get("merges") else ""
        cached = c.get("prefix_saved_tokens")
        prefix = f", {cached / c['prefill_tokens']:.0%} of prefill tokens cached" if cached else ""
        return f"{c['slot_activations']} / {c['slot_evictions']}{resizes}{merges}{prefix}"
    if "adapter_switches" in c:
        return f"{c['adapter_switches']} switches"
    return "—"


def _memory(r: SystemResult) -> str:
    if r.peak_rss_mib is None:
        return "—"
    return f"{r.peak_rss_mib:.0f} (+{r.rss_delta_mib:.0f})"


def machine_line(report: BenchReport) -> str:
    m = report.machine
    return (
        f"{m['cpu']} ({m['logical_cpus']} logical CPUs), {m['threads']} torch threads, {m['dtype']} on "
        f"{m['device']}, torch {m['torch']}; load average {m['load_before']} before, {m['load_after']} after"
    )


def roofline_lines(report: BenchReport) -> list[str]:
    lines = [f"matmul {p['shape']}: {p['flops_per_s'] / 1e9:.1f} GFLOP/s" for p in report.roofline]
    for point in report.points:
        f = point.flops_per_token
        if f:
            lines.append(
                f"{point.label or 'workload'}: {f['total'] / 1e6:.1f} MFLOP per generated token (dense "
                f"{f['dense'] / 1e6:.1f} + lm_head {f['lm_head'] / 1e6:.1f} + attention "
                f"{f['attention'] / 1e6:.2f} at context {f['context']:.0f} + LoRA {f['lora'] / 1e6:.2f})"
            )
        run = point.run_flops
        if run:
            lines.append(
                f"{point.label or 'workload'}: {run['total'] / 1e9:.1f} GFLOP in the run = prefill "
                f"{run['prefill'] / 1e9:.1f} ({run['prefill_tokens']} prompt tokens) + decode "
                f"{run['decode'] / 1e9:.1f} ({run['decode_tokens']} decode-step tokens), LoRA "
                f"{run['lora'] / 1e9:.2f} of it; run % of matmul = these FLOPs / run seconds / the best matmul rate"
            )
    return lines


def table(point: Point, title: str):
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in (
        "system",
        "status",
        "tok/s",
        "vs peft-mixed",
        "vs base",
        "TTFT p50/p99 s",
        "latency p50/p99 s",
        "minority wait p99/max s",
        "peak RSS MiB (+Δ)",
        "run % of matmul",
        "slots act/evict",
    ):
        t.add_column(col, justify="left" if col in ("system", "status") else "right")
    for r in point.systems:
        style = STATUS_STYLE.get(r.status, "")
        t.add_row(
            r.name,
            f"[{style}]{r.status}[/{style}]",
            _num(r.tokens_per_s),
            _num(r.vs_peft_mixed, "{:.2f}x"),
            _num(r.vs_base, "{:.2f}x"),
            _pair(r.ttft_p50_s, r.ttft_p99_s, "{:.1f}"),
            _pair(r.latency_p50_s, r.latency_p99_s, "{:.1f}"),
            _pair(r.minority_wait_p99_s, r.minority_wait_max_s, "{:.1f}"),
            _memory(r),
            _num(None if r.run_matmul_fraction is None else 100 * r.run_matmul_fraction, "{:.1f}%"),
            _slots(r),
        )
    return t


def output_console(stderr: bool = False):
    """A rich console for the table: the terminal's width, or 160 columns when writing to a file or pipe."""
    from rich.console import Console

    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=160)


def render(report: BenchReport, console) -> None:
    console.print(machine_line(report), highlight=False, soft_wrap=True)
    for line in roofline_lines(report):
        console.print(line, highlight=False, soft_wrap=True)
    for point in report.points:
        title = f"{point.label}: {point.workload['description']}" if point.label else point.workload["description"]
        console.print(table(point, title))
        for r in point.systems:
            if r.note:
                console.print(f"{r.name}: {r.note}", highlight=False, soft_wrap=True, markup=False)
            busy = oversubscribed_note(r.cpu)
            if busy:
                console.print(f"{r.name}: {busy.removeprefix('note: ')}", highlight=False, soft_wrap=True, markup=False)
            if len(r.phases) > 1:
                rates = ", ".join(f"phase {p['phase']}: {_num(p['tokens_per_s'])} tok/s" for p in r.phases)
                console.print(f"{r.name}: {rates}", highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True, markup=False)


def _numeric(values: Sequence[str | None]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def plot(report: BenchReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    names = list(dict.fromkeys(s.name for p in report.points for s in p.systems))
    if report.sweep and len(report.points) > 1:
        values = [p.value for p in report.points]
        xs = _numeric(values) or list(range(len(values)))
        for name in names:
            ys = [next((s.tokens_per_s for s in p.systems if s.name == name), None) for p in report.points]
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
        ax.set_xlabel(report.sweep)
        if _numeric(values) and max(xs) / max(min(xs), 1e-9) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(v) for v in values])
        ax.legend()
    else:
        point = report.points[0]
        rates = [s.tokens_per_s or 0.0 for s in point.systems]
        bars = ax.bar([s.name for s in point.systems], rates, color="tab:blue")
        for bar, s in zip(bars, point.systems, strict=True):
            label = f"{s.tokens_per_s:.0f}" if s.tokens_per_s is not None else s.status
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
        ax.tick_params(axis="x", labelrotation=20)
    ax.set_ylabel("output tokens/s")
    ax.set_title(
        f"loracli bench: {report.points[0].workload['description']}"
        if len(report.points) == 1
        else f"loracli bench: sweep over {report.sweep}",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    fig.text(0.01, 0.01, machine_line(report), fontsize=6, alpha=0.7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def save(report: BenchReport, json_path: str | None, plot_path: str | None) -> None:
    """Write the JSON (`-` = stdout) and the plot, each when asked for."""
    if json_path == "-":
        print(json.dumps(report.to_dict(), indent=2))
    elif json_path:
        Path(json_path).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    if plot_path:
        plot(report, plot_path)
