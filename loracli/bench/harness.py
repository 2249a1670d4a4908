"""`run_bench(options)`: build the workload(s), run every system on the same requests, return a `BenchReport`.

Order of work: resolve the model, dtype (loracli's auto rule, then the same explicit dtype for
every system) and thread count; build the workload points (one, the phases chained into one, or
one per sweep value); write the random adapters once into a temporary folder (removed at the
end) unless `--adapters DIR` names real ones; probe the matmul roofline; then for each point and
each system, one `Job` run in a fresh `python -m loracli.bench.worker` process (`isolate=True`,
so peak RSS is that process's alone) or in this process (`isolate=False`: no memory figures).
Systems run one after another, never concurrently. Progress lines go to the `log` console (stderr).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import EngineConfig
from ..errors import ConfigError
from .protocol import Job, Measurement
from .report import BenchReport, Point, compare, summarize
from .roofline import flops_per_token, lora_params_per_layer, probe, run_flops
from .system_names import SystemSpec, parse_systems
from .systems.llama_cpp import llama_cpp_missing
from .systems.vllm import vllm_missing
from .workload import (
    BenchRequest,
    PromptMaker,
    Workload,
    WorkloadSpec,
    file_requests,
    parse_distribution,
    parse_ints,
    parse_kinds,
    parse_phases,
    parse_range,
    parse_sweep,
    parse_targets,
    prompt_ids,
    synthetic_requests,
    write_random_adapters,
)

DEFAULT_SYSTEMS = "loracli,peft-mixed,base"
MIX_SYSTEMS = ("loracli", "loracli-ray", "base")  # the systems that serve weighted mixes and structured output
DEFAULT_MAX_LORA_RANK = EngineConfig().max_lora_rank


@dataclass
class BenchOptions:
    """The `loracli bench` options, as the CLI spells them (strings where the CLI takes lists or ranges)."""

    model: str | None = None
    adapters: str = "8"  # a count of random adapters, or a folder of real ones
    ranks: str = "16"
    targets: str = "all"
    kinds: str = "lora"
    distribution: str = "zipf:1.5"
    prompts: str = "64"  # a count of synthetic prompts, or a run-format input file
    prompt_len: str = "20-59"
    output_len: str = "32"
    ignore_eos: bool = True
    seed: int = 0
    phases: str | None = None
    sweep: str | None = None
    systems: str = DEFAULT_SYSTEMS
    baseline_batch: int = 32
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    warmup: int = 4
    isolate: bool = True
    roofline_seconds: float = 0.3  # 0 = skip the matmul probe
    command: list[str] = field(default_factory=list)


@dataclass
class Context:
    """What every point shares: the model, its tokenizer facts, dtype and the systems."""

    folder: Path
    spec: object  # ModelSpec
    tokenizer: object
    device: str
    dtype: str
    threads: int
    pad_id: int
    eos_ids: list[int]
    base_names: frozenset[str]
    systems: list[SystemSpec]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def eos_ids(tokenizer, folder: Path) -> list[int]:
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        eos = GenerationConfig.from_pretrained(str(folder), local_files_only=True).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except (OSError, ValueError):
        pass
    return sorted(ids)


def make_context(options: BenchOptions) -> Context:
    import torch

    from ..devices import resolve_device, resolve_dtype
    from ..model.loader import load_config, load_tokenizer
    from ..model_source import default_model_name, resolve_model

    EngineConfig(dtype=options.dtype, device=options.device)  # validates both with the engine's messages
    systems = parse_systems(options.systems)
    if options.baseline_batch < 1:
        raise ConfigError(f"--baseline-batch must be positive, got {options.baseline_batch}")
    device = resolve_device(options.device)
    dtype = str(resolve_dtype(options.dtype, device)).removeprefix("torch.")
    threads = options.threads or torch.get_num_threads()
    if threads < 1:
        raise ConfigError(f"--threads must be positive, got {threads}")
    folder = resolve_model(options.model)
    _, spec = load_config(folder)
    tokenizer = load_tokenizer(folder)
    eos = eos_ids(tokenizer, folder)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    name = default_model_name() if options.model in (None, "default") else folder.name
    return Context(
        folder, spec, tokenizer, str(device), dtype, threads, pad, eos, frozenset({name, folder.name, "base"}), systems
    )


def base_spec(options: BenchOptions, adapter_count: int) -> WorkloadSpec:
    return WorkloadSpec(
        adapters=adapter_count,
        ranks=parse_ints(options.ranks, "ranks"),
        targets=parse_targets(options.targets),
        kinds=parse_kinds(options.kinds),
        distribution=parse_distribution(options.distribution),
        prompts=int(options.prompts) if options.prompts.isdigit() else 1,
        prompt_len=parse_range(options.prompt_len, "prompt-len"),
        output_len=parse_range(options.output_len, "output-len"),
        ignore_eos=options.ignore_eos,
        seed=options.seed,
    )


def workload_points(options: BenchOptions, base: WorkloadSpec) -> list[tuple[str, str | None, list[WorkloadSpec]]]:
    """(label, swept value, phase specs) per point."""
    if options.sweep and options.phases:
        raise ConfigError("--sweep and --phases cannot be combined")
    if options.sweep:
        key, values = parse_sweep(options.sweep)
        return [(f"{key}={v}", v, [base.with_setting(key, v)]) for v in values]
    if options.phases:
        specs = parse_phases(options.phases, base)
        if len({(s.ranks, s.targets) for s in specs}) > 1:
            raise ConfigError("--phases: every phase must use the same ranks and targets (one adapters folder)")
        return [("", None, specs)]
    return [("", None, [base])]


def adapter_folder(root: Path, spec: WorkloadSpec) -> Path:
    return root / f"r{'-'.join(map(str, spec.ranks))}_{'-'.join(spec.targets)}_s{spec.seed}"


def build_workload(
    ctx: Context,
    options: BenchOptions,
    specs: list[WorkloadSpec],
    real_adapters: list[str] | None,
    adapters_root: Path | None,
    maker: PromptMaker | None,
) -> Workload:
    if maker is None:
        requests = file_requests(options.prompts, specs[0].output_len, options.seed, ctx.tokenizer, ctx.base_names)
        folder = options.adapters if real_adapters is not None else None
        unknown = sorted({r.adapter for r in requests if r.adapter is not None} - set(real_adapters or []))
        if unknown:
            raise ConfigError(
                f"--prompts names adapter(s) {', '.join(unknown[:5])} not found in --adapters "
                f"{folder or '(none given: pass --adapters DIR)'}"
            )
        return Workload(
            requests,
            folder,
            options.ignore_eos,
            f"{len(requests)} prompts from {options.prompts}" + (", ignore-eos" if options.ignore_eos else ""),
            [],
        )
    if real_adapters is not None:
        too_many = [s for s in specs if s.num_adapters > len(real_adapters)]
        if too_many:
            raise ConfigError(
                f"the workload needs {too_many[0].num_adapters} adapters; {options.adapters} has {len(real_adapters)}"
            )
        folder = options.adapters
    else:
        folder = str(adapter_folder(adapters_root, specs[0]))
        count = max(s.num_adapters for s in specs)
        for s in specs:  # adapters are named by kind: phases of other kinds write their own
            write_random_adapters(
                Path(folder), ctx.spec, count, s.ranks, s.targets, options.seed, str(ctx.folder), s.kinds
            )
    requests = synthetic_requests(specs, maker, real_adapters)
    description = specs[0].describe() if len(specs) == 1 else " ; ".join(s.describe() for s in specs)
    return Workload(requests, folder, options.ignore_eos, description, [s.to_dict() for s in specs])


def lora_rank_limit(max_rank: int) -> int:
    """The engine's `max_lora_rank` for a workload: the default, or the next power of two above a larger rank."""
    limit = DEFAULT_MAX_LORA_RANK
    while limit < max_rank:
        limit *= 2
    return limit


def job_for(ctx: Context, system: SystemSpec, workload: Workload, options: BenchOptions) -> Job:
    from ..adapters import read_adapter_config

    ranks = (
        [read_adapter_config(Path(workload.adapters_dir) / n).r for n in workload.adapter_names]
        if workload.adapters_dir
        else []
    )
    requests = [{**asdict(r), "ids": prompt_ids(ctx.tokenizer, r)} for r in workload.requests]
    return Job(
        system=system.name,
        model=str(ctx.folder),
        adapters_dir=workload.adapters_dir,
        dtype=ctx.dtype,
        device=ctx.device,
        threads=ctx.threads,
        baseline_batch=options.baseline_batch,
        ignore_eos=workload.ignore_eos,
        max_lora_rank=lora_rank_limit(max(ranks, default=1)),
        pad_id=ctx.pad_id,
        eos_ids=ctx.eos_ids,
        requests=requests,
        warmup=options.warmup,
    )


def run_isolated(job: Job) -> Measurement:
    """The job in a fresh worker process; its stdout and stderr both go to our stderr."""
    with tempfile.TemporaryDirectory(prefix="loracli-bench-job-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(asdict(job)))
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(job.threads),
        }
        proc = subprocess.run(
            [sys.executable, "-m", "loracli.bench.worker", str(job_path), str(out_path)], env=env, stdout=2, check=False
        )
        if not out_path.is_file():
            return Measurement(job.system, error=f"worker process exited with status {proc.returncode}")
        return Measurement.from_dict(json.loads(out_path.read_text()))


def run_here(job: Job) -> Measurement:
    from .worker import measure

    return measure(job)


def uses_dora(workload: Workload) -> bool:
    from ..adapters import read_adapter_config

    folder = workload.adapters_dir
    return folder is not None and any(read_adapter_config(Path(folder) / n).use_dora for n in workload.adapter_names)


def adapter_configs(workload: Workload) -> dict:
    from ..adapters import read_adapter_config

    folder = workload.adapters_dir
    return {n: read_adapter_config(Path(folder) / n) for n in workload.adapter_names} if folder else {}


def lora_targets(ctx: Context, configs: dict) -> list[str]:
    """The per-layer linears any adapter targets (embedding / lm_head LoRA are not in the per-layer count)."""
    linear = set(ctx.spec.target_modules)
    return sorted({t for c in configs.values() for t in c.target_modules if t in linear})


def token_flops(ctx: Context, workload: Workload) -> dict:
    """FLOPs of one generated (decode) token at the workload's mean context (`roofline.flops_per_token`)."""
    reqs = workload.requests
    mean_prompt = sum(r.prompt_len for r in reqs) / len(reqs)
    mean_out = sum(r.max_tokens for r in reqs) / len(reqs)
    with_adapter = [r for r in reqs if r.adapter is not None]
    configs = adapter_configs(workload)
    ranks = [sum(configs[name].r for name in r.adapters) for r in with_adapter]  # a mix costs its parts' sum
    rank = sum(ranks) / len(ranks) if ranks else 0.0
    return flops_per_token(
        ctx.spec, mean_prompt + (mean_out + 1) / 2, rank, lora_targets(ctx, configs), len(with_adapter) / len(reqs)
    ).to_dict()


def workload_flops(ctx: Context, workload: Workload) -> dict:
    """FLOPs of the whole workload, prefill and decode (`roofline.run_flops`); every request makes
    `max_tokens` tokens (exact with ignore-eos, an upper bound without)."""
    params = {  # each adapter's LoRA parameters per layer, on the linears it targets
        name: lora_params_per_layer(ctx.spec, c.r, lora_targets(ctx, {name: c}))
        for name, c in adapter_configs(workload).items()
    }
    requests = ((r.prompt_len, r.max_tokens, sum(params[n] for n in r.adapters)) for r in workload.requests)
    return run_flops(ctx.spec, requests).to_dict()


def run_point(ctx: Context, options: BenchOptions, workload: Workload, log) -> list:
    results = []
    for i, system in enumerate(ctx.systems, 1):
        requests: list[BenchRequest] = workload.requests
        llama_cpp_problem = (
            llama_cpp_missing(dict(system.settings), str(ctx.folder), bool(workload.adapter_names))
            if system.kind == "llama-cpp"
            else None
        )
        if system.kind == "vllm" and vllm_missing():
            m = Measurement(system.name, skipped=vllm_missing())
        elif llama_cpp_problem:
            m = Measurement(system.name, skipped=llama_cpp_problem)
        elif system.kind not in MIX_SYSTEMS and any(r.mix for r in requests):
            m = Measurement(system.name, skipped="weighted adapter mixes are served by loracli only: skipped")
        elif system.kind not in MIX_SYSTEMS and any(r.structure for r in requests):
            m = Measurement(system.name, skipped="structured output is measured on loracli only: skipped")
        elif system.kind == "peft-mixed" and uses_dora(workload):
            m = Measurement(system.name, skipped="PEFT refuses DoRA adapters in a mixed batch (adapter_names): skipped")
        else:
            log(f"[{i}/{len(ctx.systems)}] {system.name}: {len(requests)} requests ...")
            job = job_for(ctx, system, workload, options)
            m = run_isolated(job) if options.isolate else run_here(job)
        r = summarize(m, requests, workload.ignore_eos)
        rate = f"{r.tokens_per_s:.1f} tok/s" if r.tokens_per_s is not None else r.note
        log(
            f"[{i}/{len(ctx.systems)}] {system.name}: {r.status}, {rate} (load {r.load_s:.1f}s, warm-up "
            f"{r.warmup_s:.1f}s, run {r.wall_s:.1f}s)"
        )
        results.append(r)
    return results


def real_adapter_names(options: BenchOptions) -> list[str] | None:
    if options.adapters.isdigit():
        return None
    folder = Path(options.adapters)
    if not folder.is_dir():
        raise ConfigError(f"--adapters must be a count or a folder of adapters, got {options.adapters!r}")
    names = sorted(p.name for p in folder.iterdir() if (p / "adapter_config.json").is_file())
    if not names:
        raise ConfigError(f"--adapters: no adapter (sub-folder with adapter_config.json) in {folder}")
    return names


def run_bench(options: BenchOptions, log=lambda message: None) -> BenchReport:
    """Run the benchmark described by `options`; `log(str)` receives progress lines."""
    real = real_adapter_names(options)
    synthetic = options.prompts.isdigit()
    if not synthetic and (options.sweep or options.phases):
        raise ConfigError("--sweep and --phases need synthetic prompts (--prompts N), not a file")
    if not synthetic and not Path(options.prompts).is_file():
        raise ConfigError(f"--prompts must be a count or an input file, got {options.prompts!r}")
    base = base_spec(options, len(real) if real is not None else int(options.adapters))
    points = workload_points(options, base)
    ctx = make_context(options)
    import torch

    torch.set_num_threads(ctx.threads)
    load_before = load_average()
    log(f"model {ctx.folder}, {ctx.dtype} on {ctx.device}, {ctx.threads} threads")
    maker = PromptMaker(ctx.tokenizer) if synthetic else None
    roof = (
        probe(ctx.spec, getattr(torch, ctx.dtype), ctx.device, options.roofline_seconds)
        if options.roofline_seconds > 0
        else []
    )
    root = Path(tempfile.mkdtemp(prefix="loracli-bench-adapters-")) if real is None and synthetic else None
    out_points = []
    try:
        for label, value, specs in points:
            if label:
                log(f"== {label}")
            workload = build_workload(ctx, options, specs, real, root, maker)
            results = run_point(ctx, options, workload, log)
            flops = token_flops(ctx, workload)
            out_points.append(Point(label, value, workload.to_dict(), flops, results, workload_flops(ctx, workload)))
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    machine = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": ctx.threads,
        "dtype": ctx.dtype,
        "device": ctx.device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_before": load_before,
        "load_after": load_average(),
    }
    report = BenchReport(
        " ".join(["loracli", "bench", *options.command]),
        dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine,
        roof,
        parse_sweep(options.sweep)[0] if options.sweep else None,
        out_points,
    )
    for point in report.points:
        compare(point.systems, point.flops_per_token["total"], report.peak_flops, point.run_flops)
    busy = busy_note(load_before, os.cpu_count() or 1)
    if busy:
        report.notes.append(busy)
    return report


def busy_note(load: str, cpus: int) -> str | None:
    """A warning when the machine was already busy before the run (1-minute load average >= CPUs)."""
    try:
        one_minute = float(load.split()[0])
    except (ValueError, IndexError):
        return None
    if one_minute < cpus:
        return None
    return (
        f"the machine was busy (load average {one_minute:.2f} on {cpus} logical CPUs): timings are noisy; "
        "compare systems by the ratios of one run, not by absolute numbers"
    )
