"""Multi-LoRA ops (installed as `loracli.kernels`).

    lora_shrink(x[T, in], A[S, R, in], meta, ranks) -> y[T, R]
    lora_expand(y[T, R], B[S, N, R], meta, out[T, M], offset, ranks)   # adds in place
    lora_weigh(y[T, R], meta)                                          # y[t] *= meta.token_weight[t]

    paged_decode_attention(q[B, Hq, D], kv[2, rows, Hkv, D], paged: PagedMeta, scale, window, softcap) -> [B, Hq, D]

`paged_decode_attention` is a decode step's attention over the paged KV cache, where the keys lie
(`build_paged_meta`, once per step for all layers); its backends follow the same choice as the
LoRA ops below (`torch_attention` on CPU, `triton_attention` on CUDA, `reference`).

Adapter mixes chain one `LoraMeta` per part (`build_passes`, `LoraMeta.passes`): shrink, weigh,
expand per pass.

`meta` comes from `build_meta(token_slot)`, once per step for all layers. Slot -1 = no LoRA.
The exact semantics and shapes are in `reference` (the spec every backend is tested against).

Backends: Triton kernels (`triton_ops`) for CUDA tensors, grouped GEMMs in torch (`torch_ops`)
for CPU tensors, and for CUDA tensors too where Triton is not installed (it comes with the `gpu`
extra; a one-time warning says so). `LORACLI_LORA_BACKEND=reference|torch|triton` forces one
(read at every call). Forcing `triton` with CPU tensors runs the kernels in Triton's interpreter:
TRITON_INTERPRET=1, which must be set before triton is first imported, so it is set here when
triton is not imported yet (for tests; the interpreter is slow). Triton is imported only when its
backend is first used, so this package imports where Triton is absent.

Every Triton kernel is registered once in `checks.CHECKS` (name, case generator, reference, Triton
op), which `python -m loracli.selftest` runs on the device: a new kernel adds its entry there.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

import torch

from . import reference, torch_attention, torch_ops
from .meta import LoraMeta, build_meta, build_passes
from .paged import PagedMeta, build_paged_meta

BACKENDS = ("reference", "torch", "triton")
BACKEND_ENV = "LORACLI_LORA_BACKEND"

__all__ = [
    "BACKENDS",
    "LoraMeta",
    "backend_for",
    "PagedMeta",
    "build_meta",
    "build_paged_meta",
    "build_passes",
    "lora_expand",
    "lora_shrink",
    "lora_weigh",
    "paged_decode_attention",
]


def backend_for(t: torch.Tensor) -> str:
    """The backend that runs ops on `t`: the forced one if `LORACLI_LORA_BACKEND` is set, else by device."""
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
        return forced
    return "triton" if t.is_cuda and _triton_installed() else "torch"


@functools.cache
def _triton_installed() -> bool:
    """Whether Triton can be imported (checked once, without importing it); warns once if not."""
    if importlib.util.find_spec("triton") is not None:
        return True
    logging.getLogger("loracli").warning(
        "Triton is not installed: LoRA ops on CUDA run in torch (pip install 'loracli[gpu]' for the kernels)"
    )
    return False


def _triton_ops(t: torch.Tensor) -> ModuleType:
    """Import `triton_ops`, asking for the interpreter first when the kernels will see CPU tensors."""
    if not t.is_cuda and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import triton_ops

    return triton_ops


def _module(t: torch.Tensor) -> ModuleType:
    name = backend_for(t)
    if name == "torch":
        return torch_ops
    if name == "reference":
        return reference
    return _triton_ops(t)


def lora_shrink(x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: Sequence[int] | None = None) -> torch.Tensor:
    """y[T, R]: y[t, :r] = x[t] @ A[slot[t], :r].T, zero elsewhere (r = ranks[slot] or R)."""
    reference.check_shrink(x, A, meta, ranks)
    return _module(x).lora_shrink(x, A, meta, ranks)


def lora_expand(
    y: torch.Tensor,
    B: torch.Tensor,
    meta: LoraMeta,
    out: torch.Tensor,
    offset: int = 0,
    ranks: Sequence[int] | None = None,
) -> None:
    """out[t, offset:offset+N] += y[t, :r] @ B[slot[t], :, :r].T in place; nothing for slot -1."""
    reference.check_expand(y, B, meta, out, offset, ranks)
    _module(y).lora_expand(y, B, meta, out, offset, ranks)


def lora_weigh(y: torch.Tensor, meta: LoraMeta) -> None:
    """y[t] *= meta.token_weight[t] in place (nothing when it is None): a mix part's weight."""
    reference.check_weigh(y, meta)
    _module(y).lora_weigh(y, meta)


def paged_decode_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    paged: PagedMeta,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """[B, Hq, D]: each sequence's query over its keys in the paged cache (`reference.paged_decode_attention`)."""
    reference.check_paged_decode(q, kv, paged, window, softcap)
    name = backend_for(q)
    if name == "torch":
        ops: ModuleType = torch_attention
    elif name == "reference":
        ops = reference
    else:
        _triton_ops(q)  # sets TRITON_INTERPRET first for CPU tensors
        from . import triton_attention as ops
    return ops.paged_decode_attention(q, kv, paged, scale, window, softcap)
