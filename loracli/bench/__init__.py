"""`loracli bench`: throughput and latency of loracli against other ways to serve many LoRA adapters.

Entry point: `run_bench(BenchOptions(...), log=print_to_stderr)` -> `BenchReport`; then
`render(report, console)`, then `save(report, json_path, plot_path)` (JSON, PNG). Modules:
`harness` (the orchestration: workloads, one worker per system, the report), `workload`
(synthetic or file workloads, random adapters), `system_names` (parsing `--systems`), `systems`
(the systems under test, one module per family, and their registry), `protocol` (the `Job` a
worker gets and the `Measurement` it returns), `worker` (one system in one process, measured),
`roofline` (matmul FLOP/s and FLOPs per token), `report` (validity, statistics, table, plot),
`profile` (where one decode step's time goes). torch, transformers, peft and matplotlib are
imported only when needed; peft and matplotlib come with the `bench` extra.
"""

from .harness import BenchOptions, run_bench
from .report import BenchReport, output_console, plot, render, save

__all__ = ["BenchOptions", "BenchReport", "output_console", "plot", "render", "run_bench", "save"]
