"""Where one decode step's time goes: `python -m loracli.bench.profile [--adapters DIR] [--batch 64]`.

Contract: builds an `Engine` (the default model unless `--model`), admits `--batch` requests
(adapters of `--adapters` assigned round-robin, or the base model), prefills them, runs
`--warmup` decode steps, times `--steps` decode steps (wall clock, mean), then runs the same
number under `torch.profiler` and splits the operators' self CPU time into buckets:

    base matmul   aten::mm / addmm / linear (the shared base projections and the lm_head)
    lora          aten::bmm / baddbmm / addmm_ (the shrink/expand ops of `loracli.kernels`)
    attention     every op inside decode attention's profiler range (`model.attention.DECODE_RANGE`:
                  the paged attention op, or deterministic mode's gather, GEMMs and softmax), plus
                  SDPA, aten::index and the KV write (index_copy_) wherever they run
    sampling      max / argmax / isfinite pieces on the logits
    other         everything else (norms, RoPE, SiLU, copies, Python-side tensor building)

It also reports the base matmuls' achieved FLOP/s (dense + lm_head FLOPs of the step over the
profiled base matmul time) against `roofline.matmul_rate` measured at [batch x hidden] x
[hidden x intermediate] in the same process. Profiling adds overhead to small ops, so the
buckets are shares of the profiled time; the step time printed first is unprofiled. With
adapters it last times their activation: disk -> CPU cache (a fresh `AdapterStore`) and CPU
cache -> device slot (`ModelRunner.write_adapter`), medians in ms.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

BUCKETS = {
    "base matmul": ("aten::mm", "aten::addmm", "aten::linear"),
    "lora": ("aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::addmm_"),
    "attention": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::index",
        "aten::index_copy_",
        "aten::_scaled_dot_product_attention_math",
        "aten::_efficient_attention_forward",
        "aten::_scaled_dot_product_flash_attention",
    ),
    "sampling": ("aten::max", "aten::argmax", "aten::isfinite", "aten::abs", "aten::ne", "aten::eq", "aten::all"),
}
# Composite ops whose time is already counted in their children's self time.
COMPOSITES = ("aten::linear", "aten::matmul")


IN_ATTENTION = "attention/"  # prefix of the ops that ran inside decode attention's range (`self_times`)


def bucket_of(op: str) -> str:
    if op.startswith(IN_ATTENTION):
        return "attention"
    for name, ops in BUCKETS.items():
        if op in ops:
            return name
    return "other"


def split(self_us: dict[str, float]) -> dict[str, float]:
    """Operator -> self microseconds  =>  bucket -> share of the total (sums to 1)."""
    totals: dict[str, float] = defaultdict(float)
    for op, us in self_us.items():
        totals[bucket_of(op)] += us
    whole = sum(totals.values()) or 1.0
    return {name: totals[name] / whole for name in (*BUCKETS, "other")}


def self_times(events, attention_range: str) -> dict[str, float]:
    """Profiler events (`name`, `self_cpu_time_total`, `cpu_parent`) -> op -> self microseconds, the
    ops inside a range named `attention_range` (and the range itself) keyed `IN_ATTENTION` + name;
    composites are left out."""
    out: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name in COMPOSITES:
            continue
        node, inside = e, False
        while node is not None and not inside:
            inside, node = node.name == attention_range, node.cpu_parent
        out[(IN_ATTENTION if inside else "") + e.name] += e.self_cpu_time_total
    return dict(out)


def _requests(names: list[str | None], batch: int):
    from ..requests import Request

    topics = ("rivers", "music", "volcanoes", "bread", "chess", "bridges", "comets", "bees")
    return [
        Request(
            str(i),
            names[i % len(names)],
            f"Write a short note about {topics[i % len(topics)]} number {i}, with one example.",
        )
        for i in range(batch)
    ]


def profile_decode(
    model: str | None,
    adapters: str | None,
    batch: int,
    steps: int,
    warmup: int,
    dtype: str,
    max_lora_rank: int,
    deterministic: bool | None = None,
) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ..config import EngineConfig
    from ..engine.engine import Engine
    from ..model.attention import DECODE_RANGE
    from ..sampling import SamplingParams
    from .roofline import flops_per_token, matmul_rate

    engine = Engine(
        EngineConfig(
            model=model,
            adapters_dir=adapters,
            dtype=dtype,
            max_num_seqs=batch,
            max_lora_rank=max_lora_rank,
            max_loras=8,
            deterministic=deterministic,
        )
    )
    names: list[str | None] = list(engine.store.names()) or [None]
    params = SamplingParams(max_tokens=1 + warmup + 2 * steps + 1, ignore_eos=True)
    for req in _requests(names, batch):
        failure = engine.add_request(req, params)
        if failure is not None:
            raise RuntimeError(f"request {req.id}: {failure.error}")
    while engine.scheduler.waiting:
        engine.step()
    for _ in range(warmup):
        engine.step()
    running = len(engine.scheduler.running)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step_s = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    self_us = self_times(prof.events(), DECODE_RANGE)
    shares = split(self_us)
    base_us = sum(us for op, us in self_us.items() if bucket_of(op) == "base matmul") / steps
    spec = engine.spec
    context = sum(len(s) for s in engine.scheduler.running) / max(1, running)
    f = flops_per_token(spec, context)
    achieved = (f.dense + f.lm_head) * running / (base_us * 1e-6) if base_us else 0.0
    peak = matmul_rate(running, spec.hidden, spec.intermediate, engine.dtype)
    activation = activation_ms(engine, [n for n in names if n]) if adapters else {}
    return {
        "activation_ms": activation,
        "model": engine.model_name,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "deterministic": engine.model.deterministic,
        "threads": torch.get_num_threads(),
        "batch": running,
        "adapters": [n for n in names if n],
        "step_ms": step_s * 1e3,
        "tokens_per_s": running / step_s,
        "shares": shares,
        "base_matmul_gflops": achieved / 1e9,
        "matmul_rate_gflops": peak / 1e9,
        "base_matmul_share_of_rate": achieved / peak if peak else 0.0,
        "probe_shape": f"[{running}x{spec.hidden}]x[{spec.hidden}x{spec.intermediate}]",
    }


def activation_ms(engine, names: list[str], rounds: int = 3) -> dict:
    """Median ms of loading each adapter from disk (a fresh CPU cache) and of writing it into slot 0.

    Run after the profiled steps: it overwrites slot 0, so the engine must not step again.
    """
    import statistics

    from ..adapter_store import AdapterStore

    store = AdapterStore(
        engine.config.adapters_dir,
        engine.spec,
        max_cpu_loras=len(names),
        max_lora_rank=engine.config.max_lora_rank,
        dtype=engine.dtype,
    )
    disk, write = [], []
    for name in names:
        t0 = time.perf_counter()
        store.get(name)
        disk.append(time.perf_counter() - t0)
    for _ in range(rounds):
        for name in names:
            weights = store.get(name)
            t0 = time.perf_counter()
            engine.model_runner.write_adapter(0, weights)
            write.append(time.perf_counter() - t0)
    return {"disk_to_cpu": 1e3 * statistics.median(disk), "cpu_to_slot": 1e3 * statistics.median(write)}


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"{result['model']} {result['dtype']}{', deterministic' if result['deterministic'] else ''}, "
        f"{result['threads']} threads, batch {result['batch']}, "
        f"adapters {', '.join(result['adapters']) or 'none'}: decode step {result['step_ms']:.1f} ms "
        f"= {result['tokens_per_s']:.1f} tok/s"
    )
    table = Table(title="decode step, share of profiled operator time")
    table.add_column("bucket")
    table.add_column("share", justify="right")
    for name, share in result["shares"].items():
        table.add_row(name, f"{100 * share:.1f}%")
    console.print(table)
    console.print(
        f"base matmuls at {result['base_matmul_gflops']:.1f} GFLOP/s = "
        f"{100 * result['base_matmul_share_of_rate']:.0f}% of the measured matmul rate "
        f"({result['matmul_rate_gflops']:.1f} GFLOP/s at {result['probe_shape']})"
    )
    act = result["activation_ms"]
    if act:
        console.print(
            f"adapter activation, median: disk -> CPU cache {act['disk_to_cpu']:.1f} ms, "
            f"CPU cache -> slot {act['cpu_to_slot']:.2f} ms"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--adapters", default=None, help="adapters folder (round-robin over its adapters)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--deterministic", choices=("auto", "on", "off"), default="auto", help="EngineConfig.deterministic")
    p.add_argument("--json", default=None, help="also write the numbers here")
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    deterministic = {"auto": None, "on": True, "off": False}[a.deterministic]
    result = profile_decode(a.model, a.adapters, a.batch, a.steps, a.warmup, a.dtype, a.max_lora_rank, deterministic)
    render(result)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
