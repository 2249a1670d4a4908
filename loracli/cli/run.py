"""`loracli run`: flags -> `EngineConfig`, default `SamplingParams`, `JobOptions` (+ `ClusterOptions`
with `--ray`) -> `loracli.job.run_job` -> the summary on stderr (or `--json` on stdout)."""

from __future__ import annotations

from typing import Annotated

import typer

LOCAL_RAY = "local"

IO = "Input and output"
MODEL = "Model and batching"
SAMPLING = "Sampling (defaults for records that give none)"
SLOTS = "Adapters and slots"
MEMORY = "Memory"
MERGING = "Merging"
RAY = "Scale-out (Ray)"


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


def _pins(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


RAY_ONLY = ("workers", "worker_cpus", "worker_gpus", "routing", "ship_adapters")  # ClusterOptions fields = params


def _refuse_ray_options_without_ray(ctx: typer.Context) -> None:
    """A `RAY_ONLY` option given on the command line without `--ray`: a `ConfigError` naming it, one line."""
    from ..errors import ConfigError

    sources = {name: ctx.get_parameter_source(name) for name in RAY_ONLY}
    given = [name for name, source in sources.items() if source is not None and source.name == "COMMANDLINE"]
    if given:
        verb, them = ("applies", "it") if len(given) == 1 else ("apply", "them")
        message = f"{', '.join(given)} {verb} only to a run with address; add address, or drop {them}"
        raise ConfigError(message, fields=(*given, "address"))


def run_command(
    ctx: typer.Context,
    input: Annotated[
        str,
        typer.Argument(
            help="Prompts: JSONL (native or OpenAI Batch form; .gz; - for stdin) or a .parquet/.csv/.tsv/.arrow table; "
            "a path or a URL (s3://, hf://datasets/...)"
        ),
    ],
    # --- input and output
    output: Annotated[
        str,
        typer.Option(
            "-o", "--output", help="Results JSONL or .parquet, a path or a URL; - for stdout", rich_help_panel=IO
        ),
    ] = "-",
    checkpoint_seconds: Annotated[
        float,
        typer.Option(help="Parquet or URL output: publish finished results at least this often", rich_help_panel=IO),
    ] = 60.0,
    errors: Annotated[
        str | None, typer.Option(help="Write failed records here, not to the output", rich_help_panel=IO)
    ] = None,
    stats: Annotated[str | None, typer.Option(help="Write a JSON summary of the run here", rich_help_panel=IO)] = None,
    json_out: Annotated[
        bool,
        typer.Option("--json", help="Print the summary as JSON on stdout (-o -: its last line)", rich_help_panel=IO),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Start over: replace an existing output", rich_help_panel=IO)] = False,
    strict: Annotated[
        bool, typer.Option(help="Check the whole input first; run nothing if bad", rich_help_panel=IO)
    ] = False,
    prompt_field: Annotated[
        str | None, typer.Option(help="Input column holding the prompt", rich_help_panel=IO)
    ] = None,
    adapter_field: Annotated[
        str | None, typer.Option(help="Input column holding the adapter name", rich_help_panel=IO)
    ] = None,
    id_field: Annotated[str | None, typer.Option(help="Input column holding the record id", rich_help_panel=IO)] = None,
    # --- model and batching
    model: Annotated[
        str | None,
        typer.Option(help="HF model folder or GGUF file (default: SmolLM2-135M)", rich_help_panel=MODEL),
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto|float32|bfloat16|float16", rich_help_panel=MODEL)] = "auto",
    device: Annotated[str, typer.Option(help="auto|cpu|cuda", rich_help_panel=MODEL)] = "auto",
    deterministic: Annotated[
        bool | None,
        typer.Option(
            "--deterministic/--no-deterministic",
            help="Batch-invariant kernels: a request's tokens do not depend on what else is in its batch "
            "(default: on, except in float32)",
            rich_help_panel=MODEL,
        ),
    ] = None,
    prefix_caching: Annotated[
        bool,
        typer.Option(
            "--prefix-caching/--no-prefix-caching",
            help="Reuse the KV cache of a prompt prefix already computed for the same adapter (outputs unchanged)",
            rich_help_panel=MODEL,
        ),
    ] = True,
    mixed_prefill: Annotated[
        bool,
        typer.Option(
            "--mixed-prefill/--no-mixed-prefill",
            help="Run new prompts in the same step as the running sequences' next tokens (outputs unchanged)",
            rich_help_panel=MODEL,
        ),
    ] = True,
    allow_pickle: Annotated[
        bool, typer.Option(help="Allow pickle (.bin) weights: only for trusted files", rich_help_panel=MODEL)
    ] = False,
    max_num_seqs: Annotated[int, typer.Option(help="Most sequences in one batch", rich_help_panel=MODEL)] = 128,
    max_batched_tokens: Annotated[
        int,
        typer.Option(
            help="Most tokens in one step (prompts, and the decoding sequences of a mixed step)", rich_help_panel=MODEL
        ),
    ] = 4096,
    max_model_len: Annotated[
        int | None, typer.Option(help="Context length cap (default: the model's)", rich_help_panel=MODEL)
    ] = None,
    starvation_steps: Annotated[
        int,
        typer.Option(
            help="Most steps a request is held back by slot contention or a merge before it goes first",
            rich_help_panel=MODEL,
        ),
    ] = 64,
    # --- sampling
    max_tokens: Annotated[int, typer.Option(help="Default max new tokens per request", rich_help_panel=SAMPLING)] = 256,
    temperature: Annotated[float, typer.Option(help="Default temperature; 0 = greedy", rich_help_panel=SAMPLING)] = 0.0,
    top_p: Annotated[float, typer.Option(help="Default nucleus sampling top-p", rich_help_panel=SAMPLING)] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for requests that give none", rich_help_panel=SAMPLING)] = 0,
    ignore_eos: Annotated[
        bool, typer.Option(help="Generate max_tokens whatever the EOS", rich_help_panel=SAMPLING)
    ] = False,
    n: Annotated[
        int, typer.Option("--n", help="Samples per request (the prompt's KV shared)", rich_help_panel=SAMPLING)
    ] = 1,
    top_k: Annotated[int, typer.Option(help="Keep the k best tokens; 0 = all", rich_help_panel=SAMPLING)] = 0,
    min_p: Annotated[
        float, typer.Option(help="Drop tokens below min-p x the top token's probability", rich_help_panel=SAMPLING)
    ] = 0.0,
    presence_penalty: Annotated[
        float, typer.Option(help="OpenAI presence penalty, in [-2, 2]", rich_help_panel=SAMPLING)
    ] = 0.0,
    frequency_penalty: Annotated[
        float, typer.Option(help="OpenAI frequency penalty, in [-2, 2]", rich_help_panel=SAMPLING)
    ] = 0.0,
    repetition_penalty: Annotated[
        float, typer.Option(help="vLLM repetition penalty (> 0; 1 = none), prompt + output", rich_help_panel=SAMPLING)
    ] = 1.0,
    min_tokens: Annotated[
        int,
        typer.Option(help="Tokens before EOS, stop tokens or stop strings may end a request", rich_help_panel=SAMPLING),
    ] = 0,
    include_stop_str_in_output: Annotated[
        bool, typer.Option(help="Keep the matched stop string or stop token in the text", rich_help_panel=SAMPLING)
    ] = False,
    # --- adapters and slots
    adapters: Annotated[
        str | None,
        typer.Option(
            help="Folder with one PEFT adapter per sub-folder, a folder URL (s3://..., hf://org/repo), "
            "or a manifest (.json/.yaml) of names -> paths, URLs, Hub repos",
            rich_help_panel=SLOTS,
        ),
    ] = None,
    max_loras: Annotated[int, typer.Option(help="Adapter slots on the device", rich_help_panel=SLOTS)] = 8,
    max_lora_rank: Annotated[
        int, typer.Option(help="Largest adapter rank (power of two <= 512)", rich_help_panel=SLOTS)
    ] = 64,
    max_cpu_loras: Annotated[
        int | None, typer.Option(help="Adapters kept in the CPU cache", rich_help_panel=SLOTS)
    ] = None,
    adapter_load_workers: Annotated[
        int,
        typer.Option(
            help="Threads reading queued requests' adapters ahead of their turn; 0 = read in the step",
            rich_help_panel=SLOTS,
        ),
    ] = 2,
    min_loras: Annotated[
        int | None, typer.Option(help="Fewest adapter slots (default: --max-loras)", rich_help_panel=SLOTS)
    ] = None,
    dynamic_slots: Annotated[
        bool | None,
        typer.Option(
            "--dynamic-slots/--no-dynamic-slots",
            help="Resize slots with the adapter mix (default: on when --min-loras < --max-loras)",
            rich_help_panel=SLOTS,
        ),
    ] = None,
    pin: Annotated[
        str | None,
        typer.Option(help="Adapters loaded at start and never evicted, e.g. a,b", rich_help_panel=SLOTS),
    ] = None,
    slot_cooldown: Annotated[
        int, typer.Option(help="Steps of low demand before slots shrink", rich_help_panel=SLOTS)
    ] = 32,
    verify_slots: Annotated[
        bool, typer.Option(help="Debug: check every slot's weights after each resize", rich_help_panel=SLOTS)
    ] = False,
    # --- memory
    memory_budget: Annotated[
        str | None,
        typer.Option(
            help="One budget for weights, slots, KV cache and buffers, e.g. 2GiB; slots and KV trade inside it",
            rich_help_panel=MEMORY,
        ),
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None, typer.Option(help="CUDA: budget as a fraction of device memory", rich_help_panel=MEMORY)
    ] = None,
    kv_cache_memory: Annotated[
        str, typer.Option(help="Bytes for the KV cache, e.g. 512MiB, 2GiB", rich_help_panel=MEMORY)
    ] = "1GiB",
    # --- merging
    merge_policy: Annotated[
        str,
        typer.Option(
            help="auto|never|always-single: merge a dominant adapter into the base weights", rich_help_panel=MERGING
        ),
    ] = "auto",
    # --- scale-out
    ray: Annotated[
        str | None,
        typer.Option(
            help="Run on Ray engine replicas: --ray alone starts a local Ray; "
            "--ray ADDRESS joins a cluster (auto, host:port, ray://...)",
            rich_help_panel=RAY,
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="--ray: engine replicas (Ray actors)", rich_help_panel=RAY)] = 2,
    worker_cpus: Annotated[
        float, typer.Option(help="--ray: CPUs (and torch threads) per worker", rich_help_panel=RAY)
    ] = 1.0,
    worker_gpus: Annotated[
        float | None,
        typer.Option(help="--ray: GPUs per worker (default: 1 if the cluster has GPUs)", rich_help_panel=RAY),
    ] = None,
    routing: Annotated[
        str,
        typer.Option(
            help="--ray: affinity (keep an adapter's requests on the workers holding it) or round-robin",
            rich_help_panel=RAY,
        ),
    ] = "affinity",
    ship_adapters: Annotated[
        bool,
        typer.Option(
            help="--ray: send adapter files to the workers through Ray's object store (no shared filesystem needed)",
            rich_help_panel=RAY,
        ),
    ] = False,
) -> None:
    """Run every prompt of INPUT through the base model and its adapters; write one result per line.

    Rerun the same command to resume an interrupted run (see docs/FAILURES.md).
    """
    import json
    import sys
    from dataclasses import asdict

    from rich.console import Console

    from ..cluster.options import ClusterOptions
    from ..config import EngineConfig
    from ..cpu_usage import oversubscribed_note
    from ..job import JobOptions, run_job, stop_message, summary_line, worker_lines
    from ..requests import FieldMap
    from ..sampling import SamplingParams
    from ..signals import exit_status, resume_command
    from ..sizes import parse_bytes

    if ray is None:
        _refuse_ray_options_without_ray(ctx)
    err = Console(stderr=True)
    config = EngineConfig(
        model=model,
        adapters_dir=adapters,
        dtype=dtype,
        device=device,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        max_cpu_loras=max_cpu_loras,
        adapter_load_workers=adapter_load_workers,
        max_num_seqs=max_num_seqs,
        max_batched_tokens=max_batched_tokens,
        max_model_len=max_model_len,
        kv_cache_memory=parse_bytes(kv_cache_memory, "--kv-cache-memory"),
        allow_pickle=allow_pickle,
        seed=seed,
        min_loras=min_loras,
        dynamic_slots=dynamic_slots,
        pinned=_pins(pin),
        memory_budget=parse_bytes(memory_budget, "--memory-budget") if memory_budget else None,
        gpu_memory_utilization=gpu_memory_utilization,
        slot_cooldown_steps=slot_cooldown,
        verify_slots=verify_slots,
        merge_policy=merge_policy,
        starvation_steps=starvation_steps,
        deterministic=deterministic,
        enable_prefix_caching=prefix_caching,
        mixed_prefill=mixed_prefill,
    )
    defaults = SamplingParams(  # refuses what a record may not set either (loracli/sampling.py)
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=None,
        ignore_eos=ignore_eos,
        n=n,
        top_k=top_k,
        min_p=min_p,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        repetition_penalty=repetition_penalty,
        min_tokens=min_tokens,
        include_stop_str_in_output=include_stop_str_in_output,
    )
    options = JobOptions(
        stats_path=stats,
        errors_path=errors,
        overwrite=overwrite,
        strict=strict,
        fields=FieldMap(prompt_field, adapter_field, id_field),
        command=sys.argv[1:],
        exit_after_stop=True,
        checkpoint_seconds=checkpoint_seconds,
    )
    if ray is not None:
        options.cluster = ClusterOptions(
            address=None if ray == LOCAL_RAY else ray,
            workers=workers,
            worker_cpus=worker_cpus,
            worker_gpus=worker_gpus,
            routing=routing,
            ship_adapters=ship_adapters,
        )
    summary = run_job(input, output, config, defaults, console=err, options=options)
    if json_out:  # after the results: with `-o -` the summary is stdout's last line
        print(json.dumps(asdict(summary)), flush=True)
    if summary.interrupted is not None:
        message = stop_message(summary, output, resume_command(sys.argv[1:]))
        err.print(message, highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(exit_status(summary.interrupted))
    err.print(summary_line(summary, output), highlight=False, soft_wrap=True, markup=False)
    busy = oversubscribed_note(summary.cpu)
    if busy:
        err.print(busy, highlight=False, soft_wrap=True, markup=False)
    if summary.cluster:
        err.print(worker_lines(summary.cluster), highlight=False, soft_wrap=True, markup=False)
    if summary.any_failed:
        raise typer.Exit(1)
