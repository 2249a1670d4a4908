"""What each module type of an adapter holds: layers, shapes, ranks, scales and the norm of its delta.

Contract: `delta_norm(a, b, scale)` is ‖scale·B·A‖_F (A `[r, in]`, B `[out, r]`), computed in
float64 without the `[out, in]` product, from r×r matrices: |scale| · sqrt(trace((BᵀB)(AAᵀ))).
`module_summaries(cfg, meta, pairs, get)` reads one LoRA pair at a time through `get` and returns
one `ModuleSummary` per module type (`ALL_TARGET_MODULES` order, then any other by name), every finite
delta norm, and the problems of the values: tensors holding NaN or infinite values
(`adapters.nonfinite_problem`, the check `loracli run` makes when it loads the adapter).
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

from ..adapters import AdapterConfig, nonfinite_problem
from ..model.spec import ALL_TARGET_MODULES, ModelSpec
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
    """(per module type summaries, every finite delta norm, problems of the values) of the well-formed `pairs`."""
    by_module: dict[str, list[_Pair]] = {}
    for (layer, module), (ka, kb) in pairs.items():
        by_module.setdefault(module, []).append((layer, ka, kb))
    summaries, all_norms, problems = [], [], []
    for module in sorted(by_module, key=_module_order):
        summary, norms = _summarize(cfg, module, by_module[module], meta, get, problems)
        summaries.append(summary)
        all_norms += norms
    return summaries, all_norms, problems


def _module_order(module: str) -> tuple[int, str]:
    """`ALL_TARGET_MODULES` first, in their order, then any other module by name."""
    return (ALL_TARGET_MODULES + (module,)).index(module), module


def _summarize(
    cfg: AdapterConfig, module: str, pairs: list[_Pair], meta: dict[str, Meta], get: Getter, problems: list[str]
) -> tuple[ModuleSummary, list[float]]:
    """One module type's summary and its finite delta norms; appends its value problems to `problems`."""
    shapes: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    ranks, scales, norms, params = set(), set(), [], 0
    for layer, ka, kb in pairs:
        a_shape, b_shape = meta[ka][0], meta[kb][0]
        shapes.setdefault((tuple(a_shape), tuple(b_shape)), []).append(layer)
        scale = _scale(cfg, layer, module, a_shape[0])
        a, b = get(ka), get(kb)
        nonfinite = [p for p in (nonfinite_problem(ka, a), nonfinite_problem(kb, b)) if p is not None]
        problems += nonfinite
        if not nonfinite:
            norms.append(delta_norm(a, b, scale))
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


def _scale(cfg: AdapterConfig, layer: int, module: str, rank: int) -> float:
    """The pair's scale from its own rank and the config's alpha (a rank unlike the config's is a problem elsewhere)."""
    return cfg.scale(rank, cfg.module_alpha(ModelSpec.module_path(layer, module))) if rank else 0.0
