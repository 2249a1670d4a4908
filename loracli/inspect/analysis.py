"""`inspect_path`: the report on one adapter folder or a folder of adapters, and the checks behind it.

Contract of `inspect_path(path, ...)`:

- `path` holding `adapter_config.json` is one adapter (mode "adapter"); any other folder is a
  folder of adapters (mode "folder"), one per sub-folder, exactly as `loracli run` sees them.
- Weights are read lazily (`weights.open_weights`); pickle weights are never unpickled unless
  `allow_pickle=True`, and then only with `torch.load(weights_only=True)`.
- With `model` (a path, or "default" for the embedded model) only the model's config is read,
  never its weights, and every tensor is checked against it with `adapters.check_tensors` and
  `adapters.nonfinite_problem`, the same checks `loracli run` applies: an adapter's `problems`
  are exactly what `run` refuses, its `warnings` what `run` serves anyway; without `model` only
  what no supported model accepts is refused.
- Nothing is printed; the result is an `InspectReport` (report.py).
- Errors: options are validated by `EngineConfig` (its errors and messages). In mode "adapter" a
  missing folder, malformed config or unreadable weights raise `AdapterError` (one line naming
  the file). In mode "folder" such an adapter becomes a report with status "error" instead, so
  one broken adapter does not hide the others.

Engine cost (in the engine dtype): an adapter's own weights take `lora_pair_bytes` summed over
its pairs plus 4 bytes per value of its DoRA magnitude and bias vectors (`extras_bytes`; held in
float32) (its CPU-cache footprint); one engine slot at rank R takes `ModelSpec.slot_bytes`, which
needs the model's shapes (None without `model`) and includes the per-row DoRA and bias tables every
slot holds (`slot_table_bytes`); a budget of M bytes holds `M // slot_bytes(max_lora_rank)` slots.
`WeightsInfo.extras` counts the adapter's vectors by kind (`adapter_extras.parse_extra_key`).
`WeightsInfo.vocab` lists its parts on embed_tokens / lm_head (`adapter_vocab`: embedding and head
LoRA, saved matrices) with their bytes; their sum, `CostInfo.vocab_bytes` (part of the own weights),
is what the engine holds for them outside the slots at most and reserves in a memory budget
(`adapter_vocab.vocab_bytes`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapter_extras import parse_extra_key
from ..adapter_vocab import KIND_NAMES, vocab_bytes, vocab_keys
from ..adapters import CONFIG_NAME, AdapterConfig, check_tensors, lora_pairs, read_adapter_config, weights_file
from ..config import MAX_LORA_RANK_LIMIT, EngineConfig
from ..devices import dtype_name, resolve_device, resolve_dtype
from ..errors import AdapterError
from ..model.spec import ModelSpec, lora_pair_bytes
from ..ranks import next_power_of_two
from .lines import merge_layer_lines
from .modules import module_summaries
from .report import (
    AdapterReport,
    CostInfo,
    EngineInfo,
    InspectReport,
    ModelInfo,
    ModuleSummary,
    VocabPart,
    WeightsInfo,
)
from .weights import Meta, open_weights

if TYPE_CHECKING:
    import torch

ZERO_WARNING = "every LoRA delta scale·B·A is zero: an untrained adapter (changes nothing)"


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
    spec, model_info = load_model_info(model, allow_pickle) if model is not None else (None, None)
    one = dict(max_lora_rank=max_lora_rank, dtype_bytes=dt.itemsize, allow_pickle=allow_pickle)
    if (path / CONFIG_NAME).is_file():
        mode, reports = "adapter", [inspect_adapter(path, spec, **one)]
    else:
        mode, reports = "folder", [_inspect_or_error(sub, spec, **one) for sub in _adapter_folders(path)]
    engine = _engine_info(dt, max_lora_rank, memory_budget, spec)
    return InspectReport(mode=mode, path=str(path), model=model_info, engine=engine, adapters=reports)


def inspect_adapter(
    folder: Path | str, spec: ModelSpec | None, *, max_lora_rank: int, dtype_bytes: int, allow_pickle: bool = False
) -> AdapterReport:
    """Report on one adapter folder; raises `AdapterError` when it cannot be read at all."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    path = weights_file(folder, allow_pickle)
    with open_weights(path) as (meta, get):
        shapes = {k: tuple(s) for k, (s, _) in meta.items()}
        pairs = lora_pairs(shapes)
        modules, norms, value_problems = module_summaries(cfg, meta, pairs, get)
    all_zero = bool(norms) and max(norms) == 0.0
    findings = check_tensors(cfg, shapes, spec, max_lora_rank)
    problems = merge_layer_lines(findings.problems + value_problems)
    warnings = merge_layer_lines(([ZERO_WARNING] if all_zero else []) + findings.warnings)
    return AdapterReport(
        name=folder.name,
        path=str(folder),
        status="incompatible" if problems else "warning" if warnings else "ok",
        problems=problems,
        warnings=warnings,
        config=config_summary(cfg),
        weights=_weights_info(path, meta, modules, all_zero, _extra_counts(shapes), _vocab_parts(shapes, dtype_bytes)),
        cost=_cost(shapes, pairs, spec, dtype_bytes),
    )


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
        "lora_bias": cfg.lora_bias,
        "modules_to_save": cfg.modules_to_save,
        "layers_to_transform": cfg.layers_to_transform,
        "rank_pattern": cfg.rank_pattern,
        "alpha_pattern": cfg.alpha_pattern,
    }


def smallest_max_lora_rank(rank: int) -> int | None:
    """The smallest power of two >= rank that `max_lora_rank` accepts; None above the limit."""
    value = next_power_of_two(rank)
    return value if value <= MAX_LORA_RANK_LIMIT else None


def engine_dtype(name: str) -> torch.dtype:
    """The dtype `loracli run` would use for dtype `name` on this machine's default device."""
    return resolve_dtype(name, resolve_device("auto"))


def load_model_info(model: str, allow_pickle: bool) -> tuple[ModelSpec, ModelInfo]:
    """The model's shapes from its config only (the weights are never read)."""
    from ..model.loader import load_config
    from ..model_source import resolve_model

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


def _adapter_folders(path: Path) -> list[Path]:
    folders = sorted(p for p in path.iterdir() if p.is_dir())
    if not folders:
        raise AdapterError(str(path), f"no {CONFIG_NAME} and no adapter sub-folders")
    return folders


def _inspect_or_error(folder: Path, spec: ModelSpec | None, **one) -> AdapterReport:
    """`inspect_adapter`, or a report with status "error" when the adapter cannot be read."""
    try:
        return inspect_adapter(folder, spec, **one)
    except AdapterError as error:
        try:
            config = config_summary(read_adapter_config(folder))
        except AdapterError:
            config = None
        return AdapterReport(name=folder.name, path=str(folder), status="error", problems=[str(error)], config=config)


def _extra_counts(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """How many DoRA magnitude / lora_B bias / base bias vectors the weights hold, by kind."""
    counts: dict[str, int] = {}
    for parsed in filter(None, map(parse_extra_key, shapes)):
        counts[parsed[2]] = counts.get(parsed[2], 0) + 1
    return counts


def _vocab_parts(shapes: dict[str, tuple[int, ...]], dtype_bytes: int) -> list[VocabPart]:
    """The adapter's tensors on embed_tokens / lm_head, with their bytes in the engine dtype."""
    return [
        VocabPart(module, KIND_NAMES[kind], list(shapes[key]), math.prod(shapes[key]) * dtype_bytes)
        for (module, kind), key in sorted(vocab_keys(shapes).items())
    ]


def _weights_info(
    path: Path,
    meta: dict[str, Meta],
    modules: list[ModuleSummary],
    all_zero: bool,
    extras: dict[str, int],
    vocab: list[VocabPart],
) -> WeightsInfo:
    return WeightsInfo(
        file=str(path),
        format="safetensors" if path.suffix == ".safetensors" else "pickle",
        file_bytes=path.stat().st_size,
        tensor_count=len(meta),
        parameter_count=sum(math.prod(s) for s, _ in meta.values()),
        dtypes=sorted({d for _, d in meta.values()}),
        all_zero=all_zero,
        extras=extras,
        vocab=vocab,
        modules=modules,
    )


def _cost(
    shapes: dict[str, tuple[int, ...]],
    pairs: dict[tuple[int, str], tuple[str, str]],
    spec: ModelSpec | None,
    dtype_bytes: int,
) -> CostInfo | None:
    """The adapter's own bytes (`lora_pair_bytes` over its pairs, its vectors and vocabulary parts) and, with a
    model, one slot at its rank."""
    vocab = vocab_bytes(shapes, dtype_bytes, tied=spec is not None and spec.tie_embeddings)
    if not pairs and not vocab:
        return None
    ab = [(shapes[ka], shapes[kb]) for ka, kb in pairs.values()]
    rank = max((a[0] for a, _ in ab), default=0)
    extras = sum(4 * math.prod(shape) for key, shape in shapes.items() if parse_extra_key(key))
    return CostInfo(
        rank=rank,
        own_weights_bytes=sum(lora_pair_bytes(a[0], a[1], b[0], dtype_bytes) for a, b in ab) + extras + vocab,
        extras_bytes=extras,
        vocab_bytes=vocab,
        slot_bytes_at_rank=spec.slot_bytes(rank, dtype_bytes) if spec else None,
        smallest_max_lora_rank=smallest_max_lora_rank(rank),
    )


def _engine_info(dt: torch.dtype, max_lora_rank: int, memory_budget: int, spec: ModelSpec | None) -> EngineInfo:
    per_slot = spec.slot_bytes(max_lora_rank, dt.itemsize) if spec else None
    return EngineInfo(
        dtype=dtype_name(dt),
        dtype_bytes=dt.itemsize,
        max_lora_rank=max_lora_rank,
        memory_budget_bytes=memory_budget,
        slot_bytes=per_slot,
        slots_in_budget=memory_budget // per_slot if per_slot else None,
        slot_table_bytes=spec.slot_tables_bytes(dt.itemsize) if spec else None,
    )
