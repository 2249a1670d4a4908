"""What each module type of an adapter holds: layers, shapes, ranks, scales and the norm of its delta.

Contract: `delta_norm(a, b, scale)` is ‖scale·B·A‖_F (A `[r, in]`, B `[out, r]`), computed in
float64 without the `[out, in]` product, from r×r matrices: |scale| · sqrt(trace((BᵀB)(AAᵀ))).
`module_summaries(cfg, meta, pairs, get)` reads one LoRA pair at a time through `get` and returns
one `ModuleSummary` per module type (`TARGET_MODULES` order, then any other by name), every finite
delta norm, and warnings: a rank that differs from the config's, non-finite values.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

from ..adapters import CONFIG_NAME, AdapterConfig
from ..model.spec import TARGET_MODULES, ModelSpec
from .report import ModuleSummary, ShapeGroup
from .weights import Getter, Meta

if TYPE_CHECKING:
    import torch

_Pair = tuple[int, str, str]  # (layer, key of A, key of B)


def delta_norm(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """‖scale·B·A‖_F from r×r Gram matrices: |scale|·sqrt(trace((BᵀB)(AAᵀ))), in float64."""
    import torch

    a = a.to(torch.float64)
    b = b.to(torch.float64)
    trace = float(((b.T @ b) * (a @ a.T)).sum())  # trace(XY) = sum(X ⊙ Yᵀ), and AAᵀ is symmetric
    return abs(scale) * math.sqrt(max(trace, 0.0))


def module_summaries(
    cfg: AdapterConfig, meta: dict[str, Meta], pairs: dict[tuple[int, str], tuple[str, str]], get: Getter
) -> tuple[list[ModuleSummary], list[float], list[str]]:
    """(per module type summaries, every finite delta norm, warnings) of the well-formed `pairs`."""
    by_module: dict[str, list[_Pair]] = {}
    for (layer, module), (ka, kb) in pairs.items():
        by_module.setdefault(module, []).append((layer, ka, kb))
    summaries, all_norms, warnings = [], [], []
    for module in sorted(by_module, key=_module_order):
        summary, norms = _summarize(cfg, module, by_module[module], meta, get, warnings)
        summaries.append(summary)
        all_norms += norms
    return summaries, all_norms, warnings


def _module_order(module: str) -> tuple[int, str]:
    """`TARGET_MODULES` first, in their order, then any other module by name."""
    return (TARGET_MODULES + (module,)).index(module), module


def _summarize(
    cfg: AdapterConfig, module: str, pairs: list[_Pair], meta: dict[str, Meta], get: Getter, warnings: list[str]
) -> tuple[ModuleSummary, list[float]]:
    """One module type's summary and its finite delta norms; appends its warnings to `warnings`."""
    shapes: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    ranks, scales, norms, params = set(), set(), [], 0
    for layer, ka, kb in pairs:
        a_shape, b_shape = meta[ka][0], meta[kb][0]
        shapes.setdefault((tuple(a_shape), tuple(b_shape)), []).append(layer)
        scale = _scale(cfg, layer, module, a_shape[0], warnings)
        norm = delta_norm(get(ka), get(kb), scale)
        if math.isfinite(norm):
            norms.append(norm)
        else:
            warnings.append(f"layer {layer} {module}: non-finite values in lora_A / lora_B")
        ranks.add(a_shape[0])
        scales.add(scale)
        params += math.prod(a_shape) + math.prod(b_shape)
    summary = ModuleSummary(
        module=module,
        layers=sorted(layer for layer, _, _ in pairs),
        ranks=sorted(ranks),
        scales=sorted(scales),
        parameter_count=params,
        shapes=[ShapeGroup(sorted(ls), list(a), list(b)) for (a, b), ls in shapes.items()],
        delta_norm={"min": min(norms), "median": statistics.median(norms), "max": max(norms)} if norms else None,
    )
    return summary, norms


def _scale(cfg: AdapterConfig, layer: int, module: str, rank: int, warnings: list[str]) -> float:
    """The pair's scale from its own rank and the config's alpha; warns when the config gives another rank."""
    path = ModelSpec.module_path(layer, module)
    if cfg.module_rank(path) != rank:
        warnings.append(f"layer {layer} {module}: rank {rank} in the weights, {cfg.module_rank(path)} in {CONFIG_NAME}")
    return cfg.scale(rank, cfg.module_alpha(path)) if rank else 0.0
