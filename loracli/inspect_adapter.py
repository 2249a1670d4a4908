"""`loracli inspect-adapter`: what a PEFT LoRA adapter holds, what it costs in the engine, and
whether `loracli run` accepts it.

Contract of `inspect_path(path, ...)`:

- `path` holding `adapter_config.json` is one adapter (mode "adapter"); any other folder is a
  folder of adapters (mode "folder"), one per sub-folder, exactly as `loracli run --adapters`
  sees them.
- Weights are read lazily with safetensors (`safe_open`, shapes and dtypes from the header,
  then one LoRA pair at a time for the norms); pickle weights (`adapter_model.bin`) are never
  unpickled unless `allow_pickle=True`, and then only with `torch.load(weights_only=True)`.
- With `model` (a path, or "default" for the embedded model) only the model's config is read,
  never its weights, and every tensor is checked against it with `adapters.check_tensors`,
  the same checks `loracli run` applies.
- The returned `InspectReport` is plain data: `to_dict()` is the stable `--json` document,
  `render()` prints it with rich. Nothing here prints on its own.
- Errors: in mode "adapter" a missing folder, malformed config or unreadable weights raise
  `AdapterError` (one line naming the file). In mode "folder" such an adapter becomes a
  report with status "error" instead, so one broken adapter does not hide the others.
- Status of an adapter: "error" (unreadable), "incompatible" (something `loracli run`
  refuses; `problems` says what, one line each), "warning" (usable, but see `warnings`, e.g.
  an all-zero untrained adapter) or "ok". `InspectReport.ok` is False when any adapter is
  "error" or "incompatible"; the CLI then exits with status 1.

The delta of a module is `scale · B @ A` (A `[r, in]`, B `[out, r]`); its Frobenius norm is
computed without the `[out, in]` product, from r×r matrices:
`‖scale·B·A‖_F = |scale| · sqrt(trace((BᵀB)(AAᵀ)))`.

Engine cost: the engine keeps, for every device slot, per layer and per target module q, k, v,
o, gate, up and down, an A buffer `[R, in]` and a B buffer `[out, R]` in the engine dtype, for
EVERY module of the model whatever the adapter targets. So one slot at rank R takes

    slot_bytes(R) = sum over layers, sum over the 7 modules of  R * (in + out) * dtype_bytes

and a budget of M bytes holds `M // slot_bytes(max_lora_rank)` slots. An adapter's own weights
(its CPU-cache footprint in the engine dtype) take `sum over its pairs of r * (in + out) *
dtype_bytes`. Slot bytes need the model's shapes, hence `model`; without it they are None.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .adapters import (
    CONFIG_NAME,
    AdapterConfig,
    check_tensors,
    parse_lora_key,
    read_adapter_config,
    read_tensors,
    weights_file,
)
from .config import MAX_LORA_RANK_LIMIT, EngineConfig
from .errors import AdapterError
from .model.spec import TARGET_MODULES, ModelSpec
from .sizes import format_bytes

SCHEMA_VERSION = 1
SLOT_BYTES_FORMULA = "sum over layers and the 7 modules q,k,v,o,gate,up,down of R*(in+out)*dtype_bytes"

_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_Meta = tuple[list[int], str]  # (shape, dtype name) of one tensor
_LAYER_NUMBER = re.compile(r"^layer (\d+) |layers\.(\d+)\.")


@dataclass
class ShapeGroup:
    """Layers of one module type whose A and B have the same shapes."""

    layers: list[int]
    a_shape: list[int]
    b_shape: list[int]


@dataclass
class ModuleSummary:
    """One module type (e.g. q_proj) across the layers the adapter targets."""

    module: str
    layers: list[int]
    ranks: list[int]
    scales: list[float]
    parameter_count: int
    shapes: list[ShapeGroup]
    delta_norm: dict[str, float] | None  # {"min", "median", "max"} of ‖scale·B·A‖_F over layers


@dataclass
class WeightsInfo:
    file: str
    format: str  # "safetensors" or "pickle"
    file_bytes: int
    tensor_count: int
    parameter_count: int
    dtypes: list[str]
    all_zero: bool
    modules: list[ModuleSummary]


@dataclass
class CostInfo:
    """What the adapter costs in the engine dtype; slot bytes need the model (else None)."""

    rank: int  # the adapter's largest rank
    own_weights_bytes: int
    slot_bytes_at_rank: int | None
    smallest_max_lora_rank: int | None  # the smallest valid --max-lora-rank that fits it


@dataclass
class AdapterReport:
    name: str
    path: str
    status: str  # "ok" | "warning" | "incompatible" | "error"
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: dict | None = None
    weights: WeightsInfo | None = None
    cost: CostInfo | None = None


@dataclass
class ModelInfo:
    source: str
    folder: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass
class EngineInfo:
    dtype: str
    dtype_bytes: int
    max_lora_rank: int
    memory_budget_bytes: int
    slot_bytes: int | None  # one slot at max_lora_rank; None without a model
    slots_in_budget: int | None
    slot_bytes_formula: str = SLOT_BYTES_FORMULA


@dataclass
class InspectReport:
    mode: str  # "adapter" | "folder"
    path: str
    model: ModelInfo | None
    engine: EngineInfo
    adapters: list[AdapterReport]

    @property
    def ok(self) -> bool:
        return all(a.status in ("ok", "warning") for a in self.adapters)

    def to_dict(self) -> dict:
        """The `--json` document (stable keys, `schema` bumps on incompatible changes)."""
        return {
            "schema": SCHEMA_VERSION,
            "mode": self.mode,
            "path": self.path,
            "ok": self.ok,
            "model": asdict(self.model) if self.model else None,
            "engine": asdict(self.engine),
            "adapters": [asdict(a) for a in self.adapters],
        }


# --- pure computations -------------------------------------------------------------------------


def delta_norm(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """‖scale·B·A‖_F from r×r Gram matrices: |scale|·sqrt(trace((BᵀB)(AAᵀ))), in float64."""
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    trace = float(((b.T @ b) * (a @ a.T)).sum())  # trace(XY) = sum(X ⊙ Yᵀ), and AAᵀ is symmetric
    return abs(scale) * math.sqrt(max(trace, 0.0))


def slot_bytes(spec: ModelSpec, rank: int, dtype_bytes: int) -> int:
    """Bytes of one engine slot at rank R: `SLOT_BYTES_FORMULA`."""
    per_layer = sum(rank * sum(spec.module_shape(m)) for m in TARGET_MODULES)
    return spec.num_layers * per_layer * dtype_bytes


def smallest_max_lora_rank(rank: int) -> int | None:
    """The smallest power of two >= rank that `--max-lora-rank` accepts; None above the limit."""
    value = 1 << max(rank - 1, 0).bit_length()
    return value if value <= MAX_LORA_RANK_LIMIT else None


def layer_span(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def merge_layer_lines(lines: list[str]) -> list[str]:
    """Fold lines that differ only by their layer number, in order of first appearance:

    "layer 0 q_proj: x", "layer 1 q_proj: x" -> "layers 0-1 q_proj: x";
    "tensor a.layers.0.b: x", "tensor a.layers.1.b: x" -> "tensor a.layers.{0-1}.b: x".
    """
    groups: dict[tuple[str, str, str], list[int]] = {}
    for line in lines:
        m = _LAYER_NUMBER.search(line)
        if m is None:
            groups.setdefault((line, "", ""), [])
            continue
        style = "prose" if m[1] is not None else "key"
        groups.setdefault((line[: m.start()], style, line[m.end() :]), []).append(int(m[1] or m[2]))
    out = []
    for (head, style, tail), layers in groups.items():
        if not layers:
            out.append(head)
        elif style == "prose":
            out.append(f"{head}layer{'s' if len(layers) > 1 else ''} {layer_span(layers)} {tail}")
        else:
            span = layer_span(layers)
            out.append(f"{head}layers.{span if len(layers) == 1 else '{' + span + '}'}.{tail}")
    return out


def config_summary(cfg: AdapterConfig) -> dict:
    return {
        "peft_type": cfg.peft_type,
        "base_model": cfg.base_model_name,
        "task_type": cfg.task_type,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "use_rslora": cfg.use_rslora,
        "scale": cfg.scale(cfg.r, cfg.lora_alpha),
        "scale_formula": "alpha/sqrt(r)" if cfg.use_rslora else "alpha/r",
        "target_modules": cfg.target_modules,
        "lora_dropout": cfg.lora_dropout,
        "bias": cfg.bias,
        "use_dora": cfg.use_dora,
        "modules_to_save": cfg.modules_to_save,
        "layers_to_transform": cfg.layers_to_transform,
        "rank_pattern": cfg.rank_pattern,
        "alpha_pattern": cfg.alpha_pattern,
    }


def target_problems(cfg: AdapterConfig) -> list[str]:
    """Plain module names in target_modules that no supported model has (regexes are skipped)."""
    known = TARGET_MODULES + ("embed_tokens", "lm_head")  # the last two are refused by `unsupported()`
    unknown = [t for t in cfg.target_modules if re.fullmatch(r"\w+", t) and t not in known]
    return [f"target_modules: {t!r} is not a module loracli can adapt ({', '.join(TARGET_MODULES)})" for t in unknown]


# --- reading -----------------------------------------------------------------------------------


@contextmanager
def _open_weights(path: Path) -> Iterator[tuple[dict[str, _Meta], Callable[[str], torch.Tensor]]]:
    """({key: (shape, dtype)}, get(key)) of a weights file; shapes come from the header only."""
    if path.suffix != ".safetensors":
        tensors = read_tensors(path)
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise AdapterError(str(path), "not a state dict of named tensors")
        meta = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}
        yield meta, tensors.__getitem__
        return
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - any header failure is a broken file to the user
        raise AdapterError(str(path), f"unreadable safetensors file, truncated or corrupt ({e})") from None
    with handle as f:
        meta = {}
        for key in f.keys():
            piece = f.get_slice(key)
            raw_dtype = piece.get_dtype()
            meta[key] = (list(piece.get_shape()), _SAFETENSORS_DTYPES.get(raw_dtype, raw_dtype))

        def get(key: str) -> torch.Tensor:
            try:
                return f.get_tensor(key)
            except Exception as e:  # noqa: BLE001
                raise AdapterError(str(path), f"cannot read tensor {key} ({e})") from None

        yield meta, get


def _lora_pairs(meta: dict[str, _Meta]) -> dict[tuple[int, str], tuple[str, str]]:
    """(layer, module) -> (key of A, key of B), for well-formed pairs only (A [r, in], B [out, r])."""
    halves: dict[tuple[int, str], dict[str, str]] = {}
    for key in meta:
        parsed = parse_lora_key(key)
        if parsed is not None:
            halves.setdefault(parsed[:2], {})[parsed[2]] = key
    pairs = {}
    for where, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            continue
        a, b = meta[ab["A"]][0], meta[ab["B"]][0]
        if len(a) == 2 and len(b) == 2 and a[0] == b[1]:
            pairs[where] = (ab["A"], ab["B"])
    return pairs


def _module_summaries(cfg: AdapterConfig, meta: dict[str, _Meta], pairs, get):
    """(per module type summaries, every finite delta norm, warnings)."""
    by_module: dict[str, list[tuple[int, str, str]]] = {}
    for (layer, module), (ka, kb) in pairs.items():
        by_module.setdefault(module, []).append((layer, ka, kb))
    summaries, all_norms, warnings = [], [], []
    for module in sorted(by_module, key=lambda m: ((TARGET_MODULES + (m,)).index(m), m)):
        shapes: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
        ranks, scales, norms, params = set(), set(), [], 0
        for layer, ka, kb in by_module[module]:
            a_shape, b_shape = meta[ka][0], meta[kb][0]
            shapes.setdefault((tuple(a_shape), tuple(b_shape)), []).append(layer)
            rank = a_shape[0]
            path = ModelSpec.module_path(layer, module)
            if cfg.module_rank(path) != rank:
                warnings.append(
                    f"layer {layer} {module}: rank {rank} in the weights, {cfg.module_rank(path)} in {CONFIG_NAME}"
                )
            scale = cfg.scale(rank, cfg.module_alpha(path)) if rank else 0.0
            norm = delta_norm(get(ka), get(kb), scale)
            if math.isfinite(norm):
                norms.append(norm)
            else:
                warnings.append(f"layer {layer} {module}: non-finite values in lora_A / lora_B")
            ranks.add(rank)
            scales.add(scale)
            params += math.prod(a_shape) + math.prod(b_shape)
        all_norms += norms
        stats = {"min": min(norms), "median": statistics.median(norms), "max": max(norms)} if norms else None
        summaries.append(
            ModuleSummary(
                module=module,
                layers=sorted(layer for layer, _, _ in by_module[module]),
                ranks=sorted(ranks),
                scales=sorted(scales),
                parameter_count=params,
                shapes=[ShapeGroup(sorted(ls), list(a), list(b)) for (a, b), ls in shapes.items()],
                delta_norm=stats,
            )
        )
    return summaries, all_norms, warnings


def inspect_adapter(
    folder: Path | str, spec: ModelSpec | None, *, max_lora_rank: int, dtype_bytes: int, allow_pickle: bool = False
) -> AdapterReport:
    """Report on one adapter folder; raises `AdapterError` when it cannot be read at all."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    path = weights_file(folder, allow_pickle)
    with _open_weights(path) as (meta, get):
        pairs = _lora_pairs(meta)
        modules, norms, warnings = _module_summaries(cfg, meta, pairs, get)
    all_zero = bool(norms) and max(norms) == 0.0
    if all_zero:
        warnings.insert(0, "every LoRA delta scale·B·A is zero: an untrained adapter (changes nothing)")
    problems = target_problems(cfg) + check_tensors(
        cfg, {k: tuple(s) for k, (s, _) in meta.items()}, spec, max_lora_rank
    )
    if spec is None:
        problems += [
            f"module {m.module!r} is not a supported target ({', '.join(TARGET_MODULES)})"
            for m in modules
            if m.module not in TARGET_MODULES
        ]
    weights = WeightsInfo(
        file=str(path),
        format="safetensors" if path.suffix == ".safetensors" else "pickle",
        file_bytes=path.stat().st_size,
        tensor_count=len(meta),
        parameter_count=sum(math.prod(s) for s, _ in meta.values()),
        dtypes=sorted({d for _, d in meta.values()}),
        all_zero=all_zero,
        modules=modules,
    )
    problems = merge_layer_lines(problems)
    status = "incompatible" if problems else "warning" if warnings else "ok"
    return AdapterReport(
        name=folder.name,
        path=str(folder),
        status=status,
        problems=problems,
        warnings=merge_layer_lines(warnings),
        config=config_summary(cfg),
        weights=weights,
        cost=_cost(meta, pairs, spec, dtype_bytes),
    )


def _cost(meta: dict[str, _Meta], pairs, spec: ModelSpec | None, dtype_bytes: int) -> CostInfo | None:
    """The adapter's own bytes (r*(in+out) per pair) and, with a model, one slot at its rank."""
    if not pairs:
        return None
    shapes = [(meta[ka][0], meta[kb][0]) for ka, kb in pairs.values()]
    rank = max(a[0] for a, _ in shapes)
    own = sum(a[0] * (a[1] + b[0]) for a, b in shapes) * dtype_bytes
    return CostInfo(
        rank=rank,
        own_weights_bytes=own,
        slot_bytes_at_rank=slot_bytes(spec, rank, dtype_bytes) if spec else None,
        smallest_max_lora_rank=smallest_max_lora_rank(rank),
    )


def _error_report(folder: Path, error: AdapterError) -> AdapterReport:
    try:
        config = config_summary(read_adapter_config(folder))
    except AdapterError:
        config = None
    return AdapterReport(name=folder.name, path=str(folder), status="error", problems=[str(error)], config=config)


def engine_dtype(name: str) -> torch.dtype:
    """The dtype `loracli run --dtype NAME` would use on this machine's default device."""
    from .engine.engine import resolve_device, resolve_dtype

    return resolve_dtype(name, resolve_device("auto"))


def load_model_info(model: str, allow_pickle: bool) -> tuple[ModelSpec, ModelInfo]:
    """The model's shapes from its config only (the weights are never read)."""
    from .model.loader import load_config
    from .model_source import resolve_model

    folder = resolve_model(model, allow_pickle=allow_pickle)
    _, spec = load_config(folder)
    return spec, ModelInfo(
        source=model,
        folder=str(folder),
        model_type=spec.model_type,
        num_layers=spec.num_layers,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
    )


def inspect_path(
    path: Path | str,
    *,
    model: str | None = None,
    max_lora_rank: int = 64,
    memory_budget: int = 1 << 30,
    dtype: str = "auto",
    allow_pickle: bool = False,
) -> InspectReport:
    """Inspect one adapter folder or a folder of adapters (see the module docstring)."""
    EngineConfig(max_lora_rank=max_lora_rank, dtype=dtype)  # the same validation (and messages) as `run`
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(str(path), "adapter folder not found" if not path.exists() else "not a folder")
    dt = engine_dtype(dtype)
    dtype_bytes = dt.itemsize
    spec, model_info = load_model_info(model, allow_pickle) if model is not None else (None, None)
    one = dict(max_lora_rank=max_lora_rank, dtype_bytes=dtype_bytes, allow_pickle=allow_pickle)
    if (path / CONFIG_NAME).is_file():
        mode, reports = "adapter", [inspect_adapter(path, spec, **one)]
    else:
        folders = sorted(p for p in path.iterdir() if p.is_dir())
        if not folders:
            raise AdapterError(str(path), f"no {CONFIG_NAME} and no adapter sub-folders")
        mode, reports = "folder", []
        for sub in folders:
            try:
                reports.append(inspect_adapter(sub, spec, **one))
            except AdapterError as e:
                reports.append(_error_report(sub, e))
    per_slot = slot_bytes(spec, max_lora_rank, dtype_bytes) if spec else None
    engine = EngineInfo(
        dtype=str(dt).removeprefix("torch."),
        dtype_bytes=dtype_bytes,
        max_lora_rank=max_lora_rank,
        memory_budget_bytes=memory_budget,
        slot_bytes=per_slot,
        slots_in_budget=memory_budget // per_slot if per_slot else None,
    )
    return InspectReport(mode=mode, path=str(path), model=model_info, engine=engine, adapters=reports)


# --- rendering ---------------------------------------------------------------------------------


def _fmt_num(x: float) -> str:
    return f"{x:.4g}"


_STATUS_STYLE = {"ok": "green", "warning": "yellow", "incompatible": "red", "error": "bold red"}


def _kv_table():
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    return table


def _config_rows(table, cfg: dict) -> None:
    table.add_row("PEFT type", f"{cfg['peft_type']} (task {cfg['task_type'] or '-'})")
    table.add_row("base model", str(cfg["base_model"] or "-"))
    table.add_row(
        "rank / alpha",
        f"r={cfg['r']}, lora_alpha={_fmt_num(cfg['lora_alpha'])}, "
        f"scale {_fmt_num(cfg['scale'])} ({cfg['scale_formula']})",
    )
    table.add_row("targets", ", ".join(cfg["target_modules"]) or "-")
    table.add_row("dropout / bias", f"{_fmt_num(cfg['lora_dropout'])} / {cfg['bias']}")
    for key in ("use_dora", "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern"):
        if cfg[key]:
            table.add_row(key, str(cfg[key]))


def _modules_table(weights: WeightsInfo):
    from rich.table import Table

    table = Table(title="‖scale·B·A‖_F per module over layers", title_justify="left", box=None, padding=(0, 1))
    for col in ("shapes", "scale", "min", "median", "max"):
        table.add_column(col, justify="left" if col == "shapes" else "right")
    for m in weights.modules:
        shapes = "\n".join(
            f"{len(g.layers)} layer{'s' if len(g.layers) > 1 else ''} × {m.module} A {g.a_shape}, B {g.b_shape}"
            for g in m.shapes
        )
        norms = [_fmt_num(m.delta_norm[k]) for k in ("min", "median", "max")] if m.delta_norm else ["-"] * 3
        table.add_row(shapes, ", ".join(_fmt_num(s) for s in m.scales), *norms)
    return table


def _issues(console, adapter_reports: list[AdapterReport], prefix: bool) -> None:
    from rich.markup import escape

    for a in adapter_reports:
        head = f"{escape(a.name)}: " if prefix else ""
        for p in a.problems:
            console.print(f"  [red]✗[/red] {head}{escape(p)}", highlight=False, soft_wrap=True)
        for w in a.warnings:
            console.print(f"  [yellow]![/yellow] {head}{escape(w)}", highlight=False, soft_wrap=True)


def _render_adapter(report: InspectReport, a: AdapterReport, console) -> None:
    from rich.markup import escape

    style = _STATUS_STYLE[a.status]
    console.print(f"[bold]{escape(a.name)}[/bold]  {escape(a.path)}  [{style}]{a.status}[/{style}]", highlight=False)
    table = _kv_table()
    if a.config:
        _config_rows(table, a.config)
    w = a.weights
    if w:
        table.add_row("weights", f"{escape(Path(w.file).name)}, {format_bytes(w.file_bytes)} on disk")
        table.add_row("tensors", f"{w.tensor_count} tensors, {w.parameter_count:,} parameters, {', '.join(w.dtypes)}")
    console.print(table)
    if w and w.modules:
        console.print(_modules_table(w))
    e, c = report.engine, a.cost
    if c:
        cost = _kv_table()
        cost.add_row("own weights", f"{format_bytes(c.own_weights_bytes)} at rank {c.rank} ({e.dtype})")
        fits = c.smallest_max_lora_rank
        cost.add_row("fits", f"--max-lora-rank >= {fits}" if fits else f"rank above {MAX_LORA_RANK_LIMIT}")
        if c.slot_bytes_at_rank is not None:
            cost.add_row(f"slot at rank {c.rank}", format_bytes(c.slot_bytes_at_rank))
        _slot_rows(cost, e)
        console.print("[bold]engine cost[/bold]")
        console.print(cost)
    _model_line(report, console)
    _issues(console, [a], prefix=False)


def _slot_rows(table, e: EngineInfo) -> None:
    if e.slot_bytes is None:
        table.add_row(f"slot at rank {e.max_lora_rank}", "needs --model (a slot spans every module)")
        return
    table.add_row(f"slot at rank {e.max_lora_rank}", f"{format_bytes(e.slot_bytes)} ({e.dtype})")
    table.add_row("slots in budget", f"{e.slots_in_budget} in {format_bytes(e.memory_budget_bytes)}")


def _model_line(report: InspectReport, console) -> None:
    from rich.markup import escape

    m = report.model
    if m is None:
        console.print("[dim]not checked against a model: pass --model PATH (or --model default)[/dim]")
        return
    model = f"{escape(m.source)} ({m.model_type}, {m.num_layers} layers)"
    if report.mode == "folder":
        good = sum(a.status in ("ok", "warning") for a in report.adapters)
        console.print(f"{good} of {len(report.adapters)} adapters compatible with {model}", highlight=False)
    elif report.ok:
        console.print(f"[green]compatible[/green] with {model}", highlight=False)
    else:
        console.print(f"[red]not compatible[/red] with {model}", highlight=False)


def _render_folder(report: InspectReport, console) -> None:
    from rich.table import Table

    table = Table(title=report.path, title_justify="left")
    for col in ("adapter", "r", "alpha", "targets", "params", "size", "status"):
        table.add_column(col, justify="right" if col in ("r", "alpha", "params", "size") else "left")
    for a in report.adapters:
        cfg, w = a.config or {}, a.weights
        style = _STATUS_STYLE[a.status]
        table.add_row(
            a.name,
            str(cfg.get("r", "-")),
            _fmt_num(cfg["lora_alpha"]) if cfg else "-",
            ", ".join(cfg.get("target_modules", [])) or "-",
            f"{w.parameter_count:,}" if w else "-",
            format_bytes(w.file_bytes) if w else "-",
            f"[{style}]{a.status}[/{style}]",
        )
    console.print(table)
    _issues(console, report.adapters, prefix=True)
    cost = _kv_table()
    _slot_rows(cost, report.engine)
    console.print(cost)
    _model_line(report, console)


def render(report: InspectReport, console) -> None:
    """Print the human report with rich: a detailed view for one adapter, a table for a folder."""
    if report.mode == "adapter":
        _render_adapter(report, report.adapters[0], console)
    else:
        _render_folder(report, console)
