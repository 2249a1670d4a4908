"""`loracli bench`: throughput and latency of loracli against other ways to serve many LoRA adapters.

Entry point: `run_bench(BenchOptions(...), log=print_to_stderr)` -> `BenchReport`; then
`render(report, console)`, then `save(report, json_path, plot_path)` (JSON, PNG). Modules:
`workload` (synthetic or file workloads, random adapters), `systems` (the systems under test),
`worker` (one system in one process, measured), `roofline` (matmul FLOP/s and FLOPs per token),
`report` (validity, statistics, table, plot), `run` (the orchestration). torch, transformers,
peft and matplotlib are imported only when needed; peft and matplotlib come with the `bench` extra.
"""

from .report import BenchReport, output_console, plot, render, save
from .run import BenchOptions, run_bench

__all__ = ["BenchOptions", "BenchReport", "output_console", "plot", "render", "run_bench", "save"]
