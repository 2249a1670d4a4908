"""`loracli inspect-adapter`: flags -> `loracli.inspect.inspect_path` -> a rich report that spells
configuration fields as flags (or `--json` on stdout)."""

from __future__ import annotations

from typing import Annotated

import typer


def inspect_adapter_command(
    path: Annotated[str, typer.Argument(help="An adapter folder, or a folder of adapter sub-folders")],
    model: Annotated[str | None, typer.Option(help="Check against a model: folder, GGUF, 'default'")] = None,
    max_lora_rank: Annotated[int, typer.Option(help="Engine rank for slot sizes (power of two <= 512)")] = 64,
    memory_budget: Annotated[str, typer.Option(help="Device memory for adapter slots, e.g. 1GiB")] = "1GiB",
    dtype: Annotated[str, typer.Option(help="Engine dtype: auto|float32|bfloat16|float16")] = "auto",
    allow_pickle: Annotated[bool, typer.Option(help="Read pickle (.bin) weights: trusted only")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout")] = False,
) -> None:
    """Show an adapter's config, weights, norms, engine cost and compatibility; exit 1 if incompatible."""
    import json

    from rich.console import Console

    from ..inspect import inspect_path, render
    from ..sizes import parse_bytes
    from .flags import FLAGS

    budget = parse_bytes(memory_budget, "--memory-budget")
    report = inspect_path(
        path, model=model, max_lora_rank=max_lora_rank, memory_budget=budget, dtype=dtype, allow_pickle=allow_pickle
    )
    if json_out:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render(report, Console(), flags=FLAGS)
    if not report.ok:
        raise typer.Exit(1)
