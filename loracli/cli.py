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
from typing import Annotated, Optional

import typer
from rich.console import Console

from .config import EngineConfig
from .errors import LoracliError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Serve many LoRA adapters of one base model at once, in batch.")
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """loracli: one base model, many LoRA adapters, one batched engine."""


@app.command()
def run(
    input: Annotated[str, typer.Argument(help="JSONL prompts (native or OpenAI Batch form); - for stdin")],
    adapters: Annotated[Optional[str], typer.Option(help="Folder with one PEFT adapter per sub-folder")] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="Results JSONL; - for stdout")] = "-",
    model: Annotated[Optional[str], typer.Option(help="HF model folder or GGUF file (default: SmolLM2-135M)")] = None,
    max_tokens: Annotated[int, typer.Option(help="Default max new tokens per request")] = 256,
    temperature: Annotated[float, typer.Option(help="Default temperature; 0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Default nucleus sampling top-p")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for requests that give none")] = 0,
    ignore_eos: Annotated[bool, typer.Option(help="Generate max_tokens whatever the EOS")] = False,
    dtype: Annotated[str, typer.Option(help="auto|float32|bfloat16|float16")] = "auto",
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
    max_loras: Annotated[int, typer.Option(help="Adapter slots on the device")] = 8,
    max_lora_rank: Annotated[int, typer.Option(help="Largest adapter rank (power of two <= 512)")] = 64,
    max_cpu_loras: Annotated[Optional[int], typer.Option(help="Adapters kept in the CPU cache")] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Most sequences in one batch")] = 64,
    max_batched_tokens: Annotated[int, typer.Option(help="Most prompt tokens in one prefill step")] = 4096,
    max_model_len: Annotated[Optional[int], typer.Option(help="Context length cap (default: the model's)")] = None,
    kv_cache_memory: Annotated[str, typer.Option(help="Bytes for the KV cache, e.g. 512MiB, 2GiB")] = "1GiB",
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickle (.bin) weights: only for trusted files")] = False,
    stats: Annotated[Optional[str], typer.Option(help="Write a JSON summary of the run here")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout")] = False,
) -> None:
    """Run every prompt of INPUT through the base model and its adapters; write one result per line."""
    from .engine.sequence import SamplingParams
    from .runner import run_file
    from .sizes import parse_bytes

    config = EngineConfig(model=model, adapters_dir=adapters, dtype=dtype, device=device, max_loras=max_loras,
                          max_lora_rank=max_lora_rank, max_cpu_loras=max_cpu_loras, max_num_seqs=max_num_seqs,
                          max_batched_tokens=max_batched_tokens, max_model_len=max_model_len,
                          kv_cache_memory=parse_bytes(kv_cache_memory, "--kv-cache-memory"),
                          allow_pickle=allow_pickle, seed=seed)
    if max_tokens < 1:
        raise typer.BadParameter("must be positive", param_hint="--max-tokens")
    defaults = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=None,
                              ignore_eos=ignore_eos)
    summary = run_file(input, output, config, defaults, stats_path=stats, console=err)
    if json_out and output != "-":
        print(json.dumps(asdict(summary)))
    err.print(f"{summary.succeeded}/{summary.requests} requests ok, {summary.completion_tokens} tokens in "
              f"{summary.wall_seconds:.1f}s ({summary.tokens_per_second:.1f} tok/s)"
              + (f", {summary.failed} failed" if summary.failed else "")
              + ("" if output == "-" else f" -> {output}"))
    if summary.failed:
        raise typer.Exit(1)


def main() -> None:
    debug = os.environ.get("LORACLI_DEBUG") == "1"
    try:
        app()
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
        err.print(f"[red]error:[/red] {type(e).__name__}: {e} (LORACLI_DEBUG=1 for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(2)
