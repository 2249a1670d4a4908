"""Configuration field -> command-line flag: the one place that knows how the CLI spells a setting.

Library errors name configuration fields (`LoracliError.fields`, e.g. `max_cpu_loras`); the CLI's
error handler prints `describe(error)`, which rewrites exactly those names into the flags a user
typed (`--max-cpu-loras`). A field with no entry in `FLAGS` stays as it is. `NO_FLAG` lists the
fields of the option dataclasses that deliberately have no flag, and `CLI_ONLY` the flags that set
no library field: tests/test_cli_flags.py checks the three against the typer commands and the
dataclasses, so a new field or flag needs a decision here. Plain data; imports nothing heavy.
"""

from __future__ import annotations

import re

FLAGS: dict[str, str] = {
    # loracli.config.EngineConfig (`run`; model, dtype, device, max_lora_rank, memory_budget and
    # allow_pickle also name the same settings of `inspect-adapter` and `bench`)
    "model": "--model",
    "adapters_dir": "--adapters",
    "dtype": "--dtype",
    "device": "--device",
    "max_loras": "--max-loras",
    "max_lora_rank": "--max-lora-rank",
    "max_cpu_loras": "--max-cpu-loras",
    "adapter_load_workers": "--adapter-load-workers",
    "max_num_seqs": "--max-num-seqs",
    "max_batched_tokens": "--max-batched-tokens",
    "max_model_len": "--max-model-len",
    "kv_cache_memory": "--kv-cache-memory",
    "allow_pickle": "--allow-pickle",
    "seed": "--seed",
    "starvation_steps": "--starvation-steps",
    "min_loras": "--min-loras",
    "dynamic_slots": "--dynamic-slots",
    "pinned": "--pin",
    "memory_budget": "--memory-budget",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "slot_cooldown_steps": "--slot-cooldown",
    "verify_slots": "--verify-slots",
    "merge_policy": "--merge-policy",
    "deterministic": "--deterministic",
    "enable_prefix_caching": "--prefix-caching",
    "mixed_prefill": "--mixed-prefill",
    # loracli.sampling.SamplingParams: the defaults of `run` (`seed` above: the run's seed)
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "ignore_eos": "--ignore-eos",
    "n": "--n",
    "top_k": "--top-k",
    "min_p": "--min-p",
    "presence_penalty": "--presence-penalty",
    "frequency_penalty": "--frequency-penalty",
    "repetition_penalty": "--repetition-penalty",
    "min_tokens": "--min-tokens",
    "include_stop_str_in_output": "--include-stop-str-in-output",
    # loracli.cluster.options.ClusterOptions (`run --ray`)
    "address": "--ray",
    "workers": "--workers",
    "worker_cpus": "--worker-cpus",
    "worker_gpus": "--worker-gpus",
    "routing": "--routing",
    "ship_adapters": "--ship-adapters",
    # loracli.job: run_job's arguments and JobOptions
    "input_path": "INPUT",
    "output_path": "--output",
    "stats_path": "--stats",
    "errors_path": "--errors",
    "overwrite": "--overwrite",
    "strict": "--strict",
    "checkpoint_seconds": "--checkpoint-seconds",
    # loracli.bench.BenchOptions (`bench`; model, dtype, device, seed, ignore_eos above)
    "adapters": "--adapters",
    "ranks": "--ranks",
    "targets": "--targets",
    "kinds": "--kinds",
    "distribution": "--distribution",
    "prompts": "--prompts",
    "prompt_len": "--prompt-len",
    "output_len": "--output-len",
    "phases": "--phases",
    "sweep": "--sweep",
    "systems": "--systems",
    "baseline_batch": "--baseline-batch",
    "threads": "--threads",
    "warmup": "--warmup",
    "isolate": "--isolate",
    "roofline_seconds": "--roofline-seconds",
}

# Fields of EngineConfig, SamplingParams, ClusterOptions, JobOptions and BenchOptions with no flag:
# engine internals, per-record settings, and what the command fills in itself.
NO_FLAG = frozenset(
    {
        "block_size",
        "num_kv_blocks",
        "resize_window_steps",
        "max_resizes",
        "stop",  # SamplingParams: per record only
        "logit_bias",  # SamplingParams: per record only (token ids belong to one model's vocabulary)
        "stop_token_ids",  # SamplingParams: per record only
        "structure",  # SamplingParams: per record only (a schema, regex, choice or grammar)
        "logprobs",  # SamplingParams: per record only (its output shape follows the record's form)
        "prompt_logprobs",  # SamplingParams: per record only
        "fields",  # JobOptions: a FieldMap, from --prompt-field/--adapter-field/--id-field
        "command",
        "exit_after_stop",
        "cluster",  # JobOptions: a ClusterOptions, from --ray and the options after it
        "progress_seconds",  # JobOptions: the plain progress line's period when stderr is not a terminal
    }
)

# Parameters (flags, or an argument's metavar) that set no library field of their own.
CLI_ONLY: dict[str, frozenset[str]] = {
    "run": frozenset({"--json", "--prompt-field", "--adapter-field", "--id-field"}),
    "inspect-adapter": frozenset({"PATH", "--json"}),
    "bench": frozenset({"--json", "--plot"}),
}


def flag(field: str) -> str:
    """The flag of a configuration field, or the field itself when the CLI has none."""
    return FLAGS.get(field, field)


def describe(error: BaseException) -> str:
    """`str(error)` with each name in `error.fields` that has a flag rewritten into that flag.

    Only whole identifiers are rewritten, in one pass: not `max_loras` inside `max_loras_x`,
    `cfg.max_loras` or `--max_loras`, nor a field's name as a piece of a path (`runs/model/out`,
    `model.gguf`); a sentence's final `.` is no obstacle. A leading `path: ` of an `AdapterError`
    is left alone.
    """
    text = str(error)
    fields = getattr(error, "fields", None) or ()
    if isinstance(fields, str):
        fields = (fields,)
    names = sorted({f for f in fields if f in FLAGS}, key=len, reverse=True)
    if not names:
        return text
    head = ""
    path = getattr(error, "path", None)
    if isinstance(path, str) and text.startswith(f"{path}: "):
        head, text = text[: len(path) + 2], text[len(path) + 2 :]
    pattern = re.compile(r"(?<![\w./\\-])(" + "|".join(map(re.escape, names)) + r")(?![\w/\\-]|\.\w)")
    return head + pattern.sub(lambda m: FLAGS[m[1]], text)
