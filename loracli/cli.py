"""The `loracli` command line: thin commands (parse -> one library call -> print).

Results and `--json` documents go to stdout; logs and progress to stderr. One error handler
(`main`) turns every `LoracliError` into one line on stderr and its exit status (2 for usage or
config errors); tracebacks only with `LORACLI_DEBUG=1`. `loracli run` exits 1 when some
records failed.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from typing import Annotated

import typer
from rich.console import Console

from .config import EngineConfig
from .errors import LoracliError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Serve many LoRA adapters of one base model at once, in batch.",
)
err = Console(stderr=True)
LOCAL_RAY = "local"


def optional_ray_address(argv: list[str]) -> list[str]:
    """`--ray` takes an optional value: alone (or before an option or a non-address) it means a local Ray."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--ray":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or not (nxt in ("auto", LOCAL_RAY) or ":" in nxt):
                out.append(LOCAL_RAY)
    return out


@app.callback()
def _root() -> None:
    """loracli: one base model, many LoRA adapters, one batched engine."""


@app.command()
def run(
    input: Annotated[
        str,
        typer.Argument(
            help="Prompts: JSONL (native or OpenAI Batch form; .gz; - for stdin) or a .parquet/.csv/.tsv/.arrow table"
        ),
    ],
    adapters: Annotated[str | None, typer.Option(help="Folder with one PEFT adapter per sub-folder")] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="Results JSONL; - for stdout")] = "-",
    model: Annotated[str | None, typer.Option(help="HF model folder or GGUF file (default: SmolLM2-135M)")] = None,
    max_tokens: Annotated[int, typer.Option(help="Default max new tokens per request")] = 256,
    temperature: Annotated[float, typer.Option(help="Default temperature; 0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Default nucleus sampling top-p")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for requests that give none")] = 0,
    ignore_eos: Annotated[bool, typer.Option(help="Generate max_tokens whatever the EOS")] = False,
    dtype: Annotated[str, typer.Option(help="auto|float32|bfloat16|float16")] = "auto",
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
    max_loras: Annotated[int, typer.Option(help="Adapter slots on the device")] = 8,
    max_lora_rank: Annotated[int, typer.Option(help="Largest adapter rank (power of two <= 512)")] = 64,
    max_cpu_loras: Annotated[int | None, typer.Option(help="Adapters kept in the CPU cache")] = None,
    min_loras: Annotated[int | None, typer.Option(help="Fewest adapter slots (default: --max-loras)")] = None,
    dynamic_slots: Annotated[
        bool | None,
        typer.Option(
            "--dynamic-slots/--no-dynamic-slots",
            help="Resize slots with the adapter mix (default: on when --min-loras < --max-loras)",
        ),
    ] = None,
    pin: Annotated[str | None, typer.Option(help="Adapters loaded at start and never evicted, e.g. a,b")] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            help="One budget for weights, slots, KV cache and buffers, e.g. 2GiB; slots and KV trade inside it"
        ),
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None, typer.Option(help="CUDA: budget as a fraction of device memory")
    ] = None,
    slot_cooldown: Annotated[int, typer.Option(help="Steps of low demand before slots shrink")] = 32,
    verify_slots: Annotated[bool, typer.Option(help="Debug: check every slot's weights after each resize")] = False,
    merge_policy: Annotated[
        str, typer.Option(help="auto|never|always-single: merge a dominant adapter into the base weights")
    ] = "auto",
    starvation_steps: Annotated[
        int, typer.Option(help="Most steps a request is held back by slot contention or a merge before it goes first")
    ] = 64,
    max_num_seqs: Annotated[int, typer.Option(help="Most sequences in one batch")] = 64,
    max_batched_tokens: Annotated[int, typer.Option(help="Most prompt tokens in one prefill step")] = 4096,
    max_model_len: Annotated[int | None, typer.Option(help="Context length cap (default: the model's)")] = None,
    kv_cache_memory: Annotated[str, typer.Option(help="Bytes for the KV cache, e.g. 512MiB, 2GiB")] = "1GiB",
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickle (.bin) weights: only for trusted files")] = False,
    stats: Annotated[str | None, typer.Option(help="Write a JSON summary of the run here")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout")] = False,
    errors: Annotated[str | None, typer.Option(help="Write failed records here, not to the output")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start over: replace an existing output")] = False,
    strict: Annotated[bool, typer.Option(help="Check the whole input first; run nothing if bad")] = False,
    prompt_field: Annotated[str | None, typer.Option(help="Input column holding the prompt")] = None,
    adapter_field: Annotated[str | None, typer.Option(help="Input column holding the adapter name")] = None,
    id_field: Annotated[str | None, typer.Option(help="Input column holding the record id")] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Run on Ray engine replicas: --ray alone starts a local Ray; "
            "--ray ADDRESS joins a cluster (auto, host:port, ray://...)"
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="--ray: engine replicas (Ray actors)")] = 2,
    worker_cpus: Annotated[float, typer.Option(help="--ray: CPUs (and torch threads) per worker")] = 1.0,
    worker_gpus: Annotated[
        float | None, typer.Option(help="--ray: GPUs per worker (default: 1 if the cluster has GPUs)")
    ] = None,
    routing: Annotated[
        str, typer.Option(help="--ray: affinity (keep an adapter's requests on the workers holding it) or round-robin")
    ] = "affinity",
    ship_adapters: Annotated[
        bool,
        typer.Option(
            help="--ray: send adapter files to the workers through Ray's object store (no shared filesystem needed)"
        ),
    ] = False,
) -> None:
    """Run every prompt of INPUT through the base model and its adapters; write one result per line.

    Rerun the same command to resume an interrupted run (see docs/FAILURES.md).
    """
    from .cluster.pool import ClusterOptions
    from .engine.sequence import SamplingParams
    from .requests import FieldMap
    from .runner import RunOptions, run_file, stop_message, summary_line, worker_lines
    from .signals import exit_status, resume_command
    from .sizes import parse_bytes

    config = EngineConfig(
        model=model,
        adapters_dir=adapters,
        dtype=dtype,
        device=device,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        max_cpu_loras=max_cpu_loras,
        max_num_seqs=max_num_seqs,
        max_batched_tokens=max_batched_tokens,
        max_model_len=max_model_len,
        kv_cache_memory=parse_bytes(kv_cache_memory, "--kv-cache-memory"),
        allow_pickle=allow_pickle,
        seed=seed,
        min_loras=min_loras,
        dynamic_slots=dynamic_slots,
        pinned=tuple(p.strip() for p in (pin or "").split(",") if p.strip()),
        memory_budget=parse_bytes(memory_budget, "--memory-budget") if memory_budget else None,
        gpu_memory_utilization=gpu_memory_utilization,
        slot_cooldown_steps=slot_cooldown,
        verify_slots=verify_slots,
        merge_policy=merge_policy,
        starvation_steps=starvation_steps,
    )
    if max_tokens < 1:
        raise typer.BadParameter("must be positive", param_hint="--max-tokens")
    defaults = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=None, ignore_eos=ignore_eos
    )
    options = RunOptions(
        stats_path=stats,
        errors_path=errors,
        overwrite=overwrite,
        strict=strict,
        fields=FieldMap(prompt_field, adapter_field, id_field),
        command=sys.argv[1:],
        exit_after_stop=True,
    )
    if ray is not None:
        options.cluster = ClusterOptions(
            None if ray == LOCAL_RAY else ray, workers, worker_cpus, worker_gpus, routing, ship_adapters
        )
    summary = run_file(input, output, config, defaults, console=err, options=options)
    if json_out and output != "-":
        print(json.dumps(asdict(summary)))
    if summary.interrupted is not None:
        message = stop_message(summary, output, resume_command(sys.argv[1:]))
        err.print(message, highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(exit_status(summary.interrupted))
    err.print(summary_line(summary, output), highlight=False, soft_wrap=True, markup=False)
    if summary.cluster:
        err.print(worker_lines(summary.cluster), highlight=False, soft_wrap=True, markup=False)
    if summary.any_failed:
        raise typer.Exit(1)


@app.command("inspect-adapter")
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
    from .inspect_adapter import inspect_path, render
    from .sizes import parse_bytes

    budget = parse_bytes(memory_budget, "--memory-budget")
    report = inspect_path(
        path, model=model, max_lora_rank=max_lora_rank, memory_budget=budget, dtype=dtype, allow_pickle=allow_pickle
    )
    if json_out:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render(report, Console())
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def bench(
    model: Annotated[str | None, typer.Option(help="HF model folder or GGUF file (default: SmolLM2-135M)")] = None,
    adapters: Annotated[str, typer.Option(help="Random adapters to make, or a folder of real ones")] = "8",
    ranks: Annotated[str, typer.Option(help="Ranks of the random adapters, cycled, e.g. 8,16")] = "16",
    targets: Annotated[str, typer.Option(help="Targets of the random adapters: all, or e.g. q_proj,v_proj")] = "all",
    distribution: Annotated[
        str, typer.Option(help="Adapter popularity: distinct|uniform|skewed|identical|round-robin|zipf:ALPHA")
    ] = "zipf:1.5",
    prompts: Annotated[str, typer.Option(help="Synthetic prompts to make, or a run-format JSONL file")] = "64",
    prompt_len: Annotated[str, typer.Option(help="Prompt tokens: N or a range like 20-59")] = "20-59",
    output_len: Annotated[str, typer.Option(help="Output tokens: N or a range like 32-63")] = "32",
    ignore_eos: Annotated[bool, typer.Option(help="Generate exactly the output length whatever the EOS")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the workload and of the random adapters")] = 0,
    phases: Annotated[str | None, typer.Option(help="Chained workloads: 'adapters=2,prompts=64;adapters=16'")] = None,
    sweep: Annotated[str | None, typer.Option(help="One workload setting over values: adapters=1,2,4,8")] = None,
    systems: Annotated[
        str, typer.Option(help="loracli[:KEY=VALUE...], base, peft-mixed, peft-grouped, merged-swap, vllm, or all")
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
    from .bench import BenchOptions, output_console, render, run_bench, save

    options = BenchOptions(
        model=model,
        adapters=adapters,
        ranks=ranks,
        targets=targets,
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


def main() -> None:
    debug = os.environ.get("LORACLI_DEBUG") == "1"
    try:
        app(args=optional_ray_address(sys.argv[1:]), prog_name="loracli")
    except LoracliError as e:
        if debug:
            raise
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the one handler: a line, or the traceback with LORACLI_DEBUG=1
        if debug:
            raise
        err.print(
            f"[red]error:[/red] {type(e).__name__}: {e} (LORACLI_DEBUG=1 for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
