"""`loracli bench`: flags -> `BenchOptions` -> `run_bench` -> a table (stdout, or stderr with
`--json -`), the JSON and the plot."""

from __future__ import annotations

from typing import Annotated

import typer


def bench_command(
    model: Annotated[str | None, typer.Option(help="HF model folder or GGUF file (default: SmolLM2-135M)")] = None,
    adapters: Annotated[str, typer.Option(help="Random adapters to make, or a folder of real ones")] = "8",
    ranks: Annotated[str, typer.Option(help="Ranks of the random adapters, cycled, e.g. 8,16")] = "16",
    targets: Annotated[str, typer.Option(help="Targets of the random adapters: all, or e.g. q_proj,v_proj")] = "all",
    kinds: Annotated[
        str, typer.Option(help="Kinds of the random adapters, cycled: lora, dora, bias, vocab, saved-head")
    ] = "lora",
    distribution: Annotated[
        str, typer.Option(help="Adapter popularity: distinct|uniform|skewed|identical|round-robin|zipf:ALPHA")
    ] = "zipf:1.5",
    prompts: Annotated[str, typer.Option(help="Synthetic prompts to make, or a run-format JSONL file")] = "64",
    prompt_len: Annotated[str, typer.Option(help="Prompt tokens: N or a range like 20-59")] = "20-59",
    output_len: Annotated[str, typer.Option(help="Output tokens: N or a range like 32-63")] = "32",
    ignore_eos: Annotated[bool, typer.Option(help="Generate exactly the output length whatever the EOS")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the workload and of the random adapters")] = 0,
    phases: Annotated[str | None, typer.Option(help="Chained workloads: 'adapters=2,prompts=64;adapters=16'")] = None,
    sweep: Annotated[
        str | None,
        typer.Option(help="One workload setting over values: adapters=1,2,4,8 (several: set=kinds:lora,mix:2)"),
    ] = None,
    systems: Annotated[
        str,
        typer.Option(
            help="loracli[:KEY=VALUE...], base, peft-mixed, peft-grouped, merged-swap, vllm, "
            "llama-cpp[:server=PATH:convert=PATH...], or all"
        ),
    ] = "loracli,peft-mixed,base",
    baseline_batch: Annotated[int, typer.Option(help="Static batch size of the transformers systems")] = 32,
    dtype: Annotated[str, typer.Option(help="auto|float32|bfloat16|float16, the same for every system")] = "auto",
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch threads for every system (default: torch's)")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up requests per system")] = 4,
    isolate: Annotated[bool, typer.Option(help="Each system in its own process (peak memory per system)")] = True,
    roofline_seconds: Annotated[float, typer.Option(help="Time per matmul probe; 0 skips the roofline")] = 0.3,
    plot: Annotated[str | None, typer.Option(help="Write a PNG chart here")] = None,
    json_out: Annotated[str | None, typer.Option("--json", help="Write all numbers as JSON here; - = stdout")] = None,
) -> None:
    """Measure loracli against transformers+PEFT baselines on one workload; exit 1 if a system fails."""
    import sys

    from rich.console import Console

    from ..bench import BenchOptions, output_console, render, run_bench, save

    err = Console(stderr=True)
    options = BenchOptions(
        model=model,
        adapters=adapters,
        ranks=ranks,
        targets=targets,
        kinds=kinds,
        distribution=distribution,
        prompts=prompts,
        prompt_len=prompt_len,
        output_len=output_len,
        ignore_eos=ignore_eos,
        seed=seed,
        phases=phases,
        sweep=sweep,
        systems=systems,
        baseline_batch=baseline_batch,
        dtype=dtype,
        device=device,
        threads=threads,
        warmup=warmup,
        isolate=isolate,
        roofline_seconds=roofline_seconds,
        command=sys.argv[2:],
    )
    report = run_bench(options, log=lambda m: err.print(m, highlight=False, soft_wrap=True, markup=False))
    render(report, output_console(stderr=json_out == "-"))
    save(report, json_out, plot)
    if report.any_bad:
        raise typer.Exit(1)
