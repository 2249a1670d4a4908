"""`python -m loracli.selftest`: check every Triton kernel on this machine, then time a decode step.

Contract:
- Kernel checks: every entry of `loracli.kernels.checks.CHECKS` (the one list of Triton kernels:
  the LoRA ops' SGMV/BGMV forms, the dispatcher and the weigh kernel, and any kernel registered
  there later) runs each of its cases against its reference (`kernels/reference.py`): one line per
  check (kernel x case), `ok` or `FAIL`, with the largest absolute error. With CUDA the kernels run
  compiled on the GPU; without it they run on the CPU in Triton's interpreter. TRITON_INTERPRET=1
  must be set before triton is first imported: `main` sets it when triton is not imported yet, and
  re-executes this module with it set when something imported triton first.
- The sweep: by default the small one (`kernels.cases.FAST_CASES`, the one `tests/test_kernels.py`
  runs); `--full` adds every dtype x rank x tokens x spread (`cases.sweep(True)`; slow in the interpreter)
  and each other kernel's full sweep.
  `--kernel NAME` (repeatable) checks only the named entries of `CHECKS`; an unknown name is an error.
- Decode microbenchmark (skipped with `--no-bench`): an `Engine` on a model with random weights and
  SmolLM2-135M's shape (`--layers` of them; or `--model` names a real one, e.g. `default`), with
  `--adapters` random LoRA adapters of rank 8 on every projection, round-robin over `--batch`
  requests: prefill, `--warmup` decode steps, then `--steps` timed ones; prints ms per step and
  tok/s (batch / step time). On CUDA the LoRA ops run the Triton kernels; on the CPU the torch path.
  The dtype is the engine's `auto` pick unless `--dtype`. `--quick` changes the defaults to 2 layers,
  batch 8, 1 + 3 steps (what CI runs: the whole command in about a minute on 2 busy CPU cores);
  `--layers`, `--batch`, `--steps` and `--warmup` given explicitly still apply.
- Output: lines on stdout, or with `--json` one JSON object (`checks`, `bench`, `device`, `ok`).
  Exit status 0 when every check passed, 1 on any mismatch (or kernel error), 2 when no check
  could run (Triton not installed).
Nothing here claims results for a device: it measures the one it runs on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

INTERPRET_ENV = "TRITON_INTERPRET"
SMOLLM2_SHAPE = dict(  # SmolLM2-135M's transformers config, minus the layer count
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
PROMPT_WORDS = 40  # tokens per microbenchmark prompt (one word-level token each)
BENCH_DEFAULTS = {"layers": 30, "batch": 64, "steps": 8, "warmup": 3}  # SmolLM2-135M at a decode batch of 64
QUICK_DEFAULTS = {"layers": 2, "batch": 8, "steps": 3, "warmup": 1}  # --quick (CI)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loracli.selftest", description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the full kernel sweep (slow in the interpreter)")
    p.add_argument("--kernel", action="append", default=[], help="check only this kernel (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of lines")
    p.add_argument("--quick", action="store_true", help="small microbenchmark defaults: 2 layers, batch 8, 3 steps")
    p.add_argument("--no-bench", action="store_true", help="skip the decode microbenchmark")
    p.add_argument("--model", default=None, help="a model for the microbenchmark (default: random weights)")
    p.add_argument("--layers", type=int, help="layers of the random model (default 30, as SmolLM2-135M)")
    p.add_argument("--batch", type=int, help="sequences decoded per step (default 64)")
    p.add_argument("--adapters", type=int, default=4, help="random adapters (0: the base model only)")
    p.add_argument("--steps", type=int, help="timed decode steps (default 8)")
    p.add_argument("--warmup", type=int, help="decode steps before timing (default 3)")
    p.add_argument("--dtype", default="auto", help="the engine's dtype (auto: the engine's pick)")
    a = p.parse_args(argv)
    for name, value in (QUICK_DEFAULTS if a.quick else BENCH_DEFAULTS).items():
        if getattr(a, name) is None:  # what the user set wins over --quick
            setattr(a, name, value)
    for name in ("layers", "batch", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.adapters < 0 or a.warmup < 0:
        p.error("--adapters and --warmup must be at least 0")
    return a


def needs_reexec(cuda: bool) -> bool:
    """Whether the kernels would run compiled on the CPU: triton imported before TRITON_INTERPRET was set."""
    if cuda or os.environ.get(INTERPRET_ENV) == "1":
        return False
    if "triton" in sys.modules:
        return True
    os.environ[INTERPRET_ENV] = "1"
    return False


def run_checks(full: bool, device: str, emit, only: list[str] | None = None) -> list[dict[str, Any]]:
    """The registered checks' cases on `device` (those named in `only`, when given); `emit(line)` gets
    one line per check. An unknown name in `only` is a ValueError."""
    from .kernels.checks import CHECKS, run_case

    known = [c.name for c in CHECKS]
    unknown = sorted(set(only or ()) - set(known))
    if unknown:
        raise ValueError(f"--kernel {unknown[0]!r} is not a registered kernel (known: {', '.join(known)})")
    results = []
    cases_of: dict[Any, list] = {}
    for check in (c for c in CHECKS if not only or c.name in only):
        if check.cases not in cases_of:  # checks of one op share their cases: built once
            cases_of[check.cases] = check.cases(full)
        cases = cases_of[check.cases]
        for case in cases:
            r = run_case(check, case, device)
            results.append(asdict(r))
            detail = r.error or f"max |err| {r.max_error:.2e} (atol {r.tol[0]:g}, rtol {r.tol[1]:g})"
            emit(f"{'ok  ' if r.ok else 'FAIL'} {r.kernel:<14} {r.case:<32} {detail}")
    return results


def random_model(folder: Path, layers: int, seed: int = 0) -> Path:
    """A Llama model of SmolLM2-135M's shape with random weights (bf16) and a word-level tokenizer."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    shape = SMOLLM2_SHAPE
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 1000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(str(folder))
    LlamaConfig(num_hidden_layers=layers, bos_token_id=1, eos_token_id=1, **shape).save_pretrained(str(folder))
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head = hidden // shape["num_attention_heads"]
    kv = head * shape["num_key_value_heads"]

    def rand(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims, generator=gen) * dims[-1] ** -0.5).bfloat16()

    tensors = {"model.embed_tokens.weight": rand(shape["vocab_size"], hidden), "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(hidden, hidden),
            p + "self_attn.k_proj.weight": rand(kv, hidden),
            p + "self_attn.v_proj.weight": rand(kv, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, hidden),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        }
    save_file({k: v.bfloat16().contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def decode_bench(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Time `a.steps` decode steps of `a.batch` sequences (see the module docstring)."""
    import torch

    from .bench.workload import write_random_adapters
    from .config import EngineConfig
    from .engine.engine import Engine
    from .model.loader import load_config
    from .model.spec import TARGET_MODULES
    from .requests import Request
    from .sampling import SamplingParams

    model = a.model if a.model is not None else str(random_model(work / "model", a.layers))
    adapters_dir = None
    if a.adapters:
        from .model_source import resolve_model

        folder = resolve_model(model)
        _, spec = load_config(folder)
        adapters_dir = work / "adapters"
        write_random_adapters(adapters_dir, spec, a.adapters, [8], TARGET_MODULES, seed=0, base_model=str(folder))
    t0 = time.perf_counter()
    engine = Engine(
        EngineConfig(
            model=model,
            adapters_dir=None if adapters_dir is None else str(adapters_dir),
            dtype=a.dtype,
            max_num_seqs=a.batch,
            max_loras=max(1, a.adapters),
        )
    )
    load_s = time.perf_counter() - t0
    names: list[str | None] = list(engine.store.names()) or [None]
    params = SamplingParams(max_tokens=a.warmup + a.steps + 2, ignore_eos=True, temperature=0.0)
    for i in range(a.batch):
        words = " ".join(f"w{2 + (i * 7 + j) % 990}" for j in range(PROMPT_WORDS)) if a.model is None else None
        prompt = words or f"Write a short note about topic number {i}, with one example."
        failure = engine.add_request(Request(str(i), names[i % len(names)], prompt), params)
        if failure is not None:
            raise RuntimeError(f"microbenchmark request {i}: {failure.error}")
    while engine.scheduler.waiting:
        engine.step()
    for _ in range(a.warmup):
        engine.step()
    running = len(engine.scheduler.running)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        engine.step()
    sync()
    step_s = (time.perf_counter() - t0) / a.steps
    return {
        "model": "random weights, SmolLM2-135M shape" if a.model is None else engine.model_name,
        "layers": engine.spec.num_layers,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": str(engine.device),
        "threads": torch.get_num_threads(),
        "batch": running,
        "adapters": a.adapters,
        "load_s": round(load_s, 3),
        "step_ms": round(step_s * 1e3, 3),
        "tokens_per_s": round(running / step_s, 1),
    }


def bench_line(b: dict[str, Any]) -> str:
    return (
        f"decode {b['model']}, {b['layers']} layers, {b['dtype']} on {b['device']}, {b['threads']} threads, "
        f"batch {b['batch']}, {b['adapters']} adapters: {b['step_ms']:.1f} ms per step = {b['tokens_per_s']:.1f} tok/s"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if needs_reexec(cuda):
        env = {**os.environ, INTERPRET_ENV: "1"}
        os.execve(sys.executable, [sys.executable, "-m", "loracli.selftest", *argv], env)
    device = "cuda" if cuda else "cpu"
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        if not a.json:
            print(line, flush=True)

    mode = f"compiled on {torch.cuda.get_device_name()}" if cuda else "on the CPU in Triton's interpreter"
    report: dict[str, Any] = {"device": device, "triton": mode, "checks": [], "bench": None}
    from importlib.util import find_spec

    if find_spec("triton") is None:
        emit("triton is not installed (pip install 'loracli[gpu]'): no kernel can be checked")
        report["ok"] = False
        if a.json:
            print(json.dumps(report, indent=2))
        return 2
    emit(f"Triton kernels {mode}, against the float32 reference ({'full' if a.full else 'default'} sweep)")
    try:
        report["checks"] = run_checks(a.full, device, emit, a.kernel)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [c for c in report["checks"] if not c["ok"]]
    emit(f"{len(report['checks']) - len(failed)}/{len(report['checks'])} kernel checks passed")
    if not a.no_bench:
        with tempfile.TemporaryDirectory(prefix="loracli-selftest-") as tmp:
            report["bench"] = decode_bench(a, Path(tmp))
        emit(bench_line(report["bench"]))
    report["ok"] = not failed
    if a.json:
        print(json.dumps(report, indent=2))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
