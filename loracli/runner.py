"""`run_file`: what `loracli run` does, as a library call — stream an input file through the
engine into a results file, with a progress bar on stderr and a summary at the end.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .config import EngineConfig
from .engine.engine import Engine
from .engine.sequence import SamplingParams
from .outputs import ResultWriter
from .requests import read_records


@dataclass
class RunSummary:
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_seconds: float = 0.0
    load_seconds: float = 0.0
    tokens_per_second: float = 0.0
    per_adapter: dict[str, int] = field(default_factory=dict)
    adapter_disk_loads: int = 0
    adapter_cpu_hits: int = 0
    slot_activations: int = 0
    slot_evictions: int = 0
    preemptions: int = 0
    steps: int = 0
    model: str = ""
    dtype: str = ""
    device: str = ""


def count_lines(path: str) -> int | None:
    """Cheap total for the progress bar: newline count of a plain file under 1 GiB, else None."""
    p = Path(path)
    if path == "-" or p.suffix == ".gz" or not p.is_file() or p.stat().st_size > (1 << 30):
        return None
    with p.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def run_file(input_path: str, output_path: str, config: EngineConfig, defaults: SamplingParams,
             stats_path: str | None = None, console: Console | None = None) -> RunSummary:
    console = console or Console(stderr=True)
    if input_path != "-" and not Path(input_path).is_file():
        from .errors import ConfigError

        raise ConfigError(f"input file not found: {input_path}")
    t0 = time.perf_counter()
    engine = Engine(config, progress=True)
    load_s = time.perf_counter() - t0
    summary = RunSummary(load_seconds=load_s, model=engine.model_name, dtype=str(engine.dtype).replace("torch.", ""),
                         device=str(engine.device))
    records = read_records(input_path, engine.base_names)
    total = count_lines(input_path)
    progress = Progress(TextColumn("[bold]loracli run"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[tps]:>7.1f} tok/s  adapters {task.fields[res]}"),
                        TimeElapsedColumn(), console=console, disable=not console.is_terminal)
    t1 = time.perf_counter()
    with ResultWriter(output_path, engine.model_name) as writer, progress:
        task = progress.add_task("run", total=total, tps=0.0, res="")
        for result in engine.generate(records, defaults):
            writer.write(result)
            summary.requests += 1
            summary.failed += result.error is not None
            summary.completion_tokens += result.completion_tokens
            elapsed = time.perf_counter() - t1
            progress.update(task, advance=1, tps=summary.completion_tokens / max(elapsed, 1e-9),
                            res=f"{len(engine.slots.resident())}/{engine.slots.n_slots}")
    st = engine.stats
    summary.wall_seconds = time.perf_counter() - t1
    summary.succeeded = summary.requests - summary.failed
    summary.prompt_tokens = st.prompt_tokens
    summary.tokens_per_second = summary.completion_tokens / max(summary.wall_seconds, 1e-9)
    summary.per_adapter = dict(sorted(st.per_adapter.items()))
    summary.adapter_disk_loads = engine.store.stats.disk_loads
    summary.adapter_cpu_hits = engine.store.stats.cpu_hits
    summary.slot_activations = engine.slots.stats.activations
    summary.slot_evictions = engine.slots.stats.evictions
    summary.preemptions = engine.scheduler.preemptions
    summary.steps = st.steps
    if stats_path:
        Path(stats_path).write_text(json.dumps(asdict(summary), indent=2) + "\n", encoding="utf-8")
    return summary
