"""Helpers for the batch-runner tests: write inputs, run `run_job` on a shared engine, read outputs."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from loracli.config import EngineConfig
from loracli.engine.engine import Engine
from loracli.job import JobOptions, JobSummary, run_job
from loracli.sampling import SamplingParams


def tiny_engine(model_dir, adapters_dir=None, **kw) -> Engine:
    cfg = dict(
        model=str(model_dir),
        adapters_dir=str(adapters_dir) if adapters_dir else None,
        dtype="float32",
        device="cpu",
        max_loras=2,
        max_lora_rank=16,
        max_num_seqs=8,
    )
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def prompts(n: int, adapters=(None, "attn4", "mlp8"), **params) -> list[dict]:
    return [
        {"id": f"r{i}", "prompt": f"the quick brown fox {i}", "adapter": adapters[i % len(adapters)], **params}
        for i in range(n)
    ]


def read_output(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def by_key(records: list[dict]) -> dict:
    """Output records keyed by id (answers, engine errors) or ('line', n) (unreadable records)."""
    out = {}
    for r in records:
        key = ("line", r["line"]) if "line" in r else r.get("custom_id", r.get("id"))
        assert key not in out, f"{key} twice in the output"
        out[key] = r
    return out


def run(engine: Engine, inp, out, max_tokens: int = 4, console: Console | None = None, **options) -> JobSummary:
    defaults = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    console = console or Console(stderr=True, quiet=True)
    return run_job(
        str(inp), str(out), engine.config, defaults, console=console, options=JobOptions(**options), engine=engine
    )
