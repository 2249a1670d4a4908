"""Every Triton kernel, registered once with its reference and its cases: what `python -m loracli.selftest` runs.

    CHECKS: list[KernelCheck]     one entry per Triton kernel (form), in the order they are checked
    run_case(check, case, device) -> CaseResult   the kernel on `device` against the reference on the CPU

A `KernelCheck` is (name, case generator, reference, triton op):

    name       what the selftest prints, e.g. "sgmv_shrink"
    cases      cases(full: bool) -> list[Case]: the default small sweep, or the full one (`--full`)
    reference  reference(inputs) -> float32 CPU tensor: the spec (`kernels/reference.py` for the LoRA ops)
    triton     triton(inputs) -> tensor: the kernel's result; `inputs` are already on the device. It imports
               its Triton module inside the call, so registering a check never imports Triton.

A `Case` is a label, a dict of inputs built on the CPU (tensors, a `LoraMeta`, plain values) and the
(atol, rtol) the result must meet elementwise against the reference. `run_case` moves tensors to the
device (a `LoraMeta` is rebuilt there with `build_meta`), calls the kernel, and compares on the CPU in
float32; an exception from the kernel is a failure of that case, not a crash.

To add a kernel (a new Triton op, e.g. paged decode attention): write its reference (semantics and
shapes in the docstring), a case generator (reuse the sweep of `cases` where it fits, else a small
sweep of its own that `tests/test_kernels.py` imports too, so the tests and the selftest never drift)
and append one `KernelCheck` to `CHECKS` below. The selftest and `tests/test_selftest.py` pick it up
from here; nothing else lists kernels.

The LoRA entries check both forms of each op (SGMV for long segments, BGMV for decode), the weigh
kernel and the dispatcher's choice (`lora_shrink` / `lora_expand` of `triton_ops`) on the sweep of
`cases` (dtype x rank x tokens x adapter spread); the cases with more than one rank use heterogeneous
per-slot ranks (0 included), so the rank masking is checked too. The paged decode attention entry
runs the sweep of `paged_cases` (dtype x heads x lengths x block size x window x soft cap; the rows
no sequence owns hold NaN), shared with `tests/test_paged_attention.py`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import reference
from .cases import OFFSET, TOL, sweep, sweep_case
from .meta import LoraMeta, build_meta
from .paged import PagedMeta, build_paged_meta
from .paged_cases import DTYPES as PAGED_DTYPES
from .paged_cases import FAST_CASES as PAGED_FAST_CASES
from .paged_cases import FULL_CASES as PAGED_FULL_CASES
from .paged_cases import TOL as PAGED_TOL
from .paged_cases import make_paged_case


@dataclass(frozen=True)
class Case:
    label: str
    inputs: dict[str, Any]  # CPU tensors, a LoraMeta under "meta", plain values
    tol: tuple[float, float]  # (atol, rtol)


@dataclass(frozen=True)
class KernelCheck:
    name: str
    cases: Callable[[bool], list[Case]]
    reference: Callable[[dict[str, Any]], torch.Tensor]
    triton: Callable[[dict[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class CaseResult:
    kernel: str
    case: str
    ok: bool
    max_error: float | None  # max |result - reference| (None when the kernel raised)
    tol: tuple[float, float]
    error: str | None = None  # the exception, or the shape/dtype mismatch


def to_device(inputs: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Tensors moved to `device`; a `LoraMeta` or `PagedMeta` rebuilt there (same contents)."""
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device)
        elif isinstance(value, LoraMeta):
            w = value.token_weight
            out[key] = build_meta(value.token_slot.tolist(), device, value.invariant, None if w is None else w.tolist())
        elif isinstance(value, PagedMeta):
            tables, lens = value.block_tables.tolist(), value.seq_lens.tolist()
            out[key] = build_paged_meta(tables, lens, value.block_size, value.pad_row, len(tables[0]), device)
        else:
            out[key] = value
    return out


def run_case(check: KernelCheck, case: Case, device: torch.device | str) -> CaseResult:
    """Run one case of `check` on `device` and compare it with the reference (see module docstring)."""
    expect = check.reference(case.inputs).float().cpu()
    try:
        got = check.triton(to_device(case.inputs, device))
    except Exception as e:  # noqa: BLE001 - a kernel that raises is a failed check, reported as such
        return CaseResult(check.name, case.label, False, None, case.tol, f"{type(e).__name__}: {e}")
    if tuple(got.shape) != tuple(expect.shape):
        return CaseResult(
            check.name, case.label, False, None, case.tol, f"shape {tuple(got.shape)}, expected {tuple(expect.shape)}"
        )
    diff = (got.detach().float().cpu() - expect).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    atol, rtol = case.tol
    ok = bool(torch.isfinite(got.detach().float()).all()) and bool((diff <= atol + rtol * expect.abs()).all())
    return CaseResult(check.name, case.label, ok, err, case.tol)


# ---- the LoRA ops --------------------------------------------------------------------------------------


def _ranks(R: int, S: int, seed: int) -> list[int] | None:
    """Heterogeneous per-slot ranks in [0, R] (None = every slot of rank R, for R = 1)."""
    if R == 1:
        return None
    rng = random.Random(seed)
    return [R, 0, *(rng.randint(1, R) for _ in range(S - 2))][:S] if S >= 2 else [R]


def lora_cases(full: bool) -> list[Case]:
    """One case per entry of `cases.sweep(full)`, with mix weights and heterogeneous ranks."""
    out = []
    for dname, R, T, spread in sweep(full):
        case = sweep_case(dname, R, T, spread)
        S = case["A"].shape[0]
        ranks = _ranks(R, S, R * 1000 + T)
        rng = random.Random(T + 7 * R)
        weights = [rng.choice([0.0, 1.0, rng.uniform(-1, 1.5)]) for _ in range(T)]
        slots = case["meta"].token_slot.tolist()
        case["weighted"] = build_meta(slots, token_weight=weights)
        case["ranks"] = ranks
        label = f"{dname} R={R} T={T} {spread}" + (" ranks=mixed" if ranks else "")
        out.append(Case(label, case, TOL[case["x"].dtype]))
    return out


def _triton_ops():
    from . import triton_ops

    return triton_ops


def _shrink_reference(c: dict) -> torch.Tensor:
    return reference.lora_shrink(c["x"].float(), c["A"].float(), c["meta"], c["ranks"])


def _expand_reference(c: dict) -> torch.Tensor:
    out = c["out"].to(torch.float32, copy=True)  # the case's `out` stays as built
    reference.lora_expand(c["y"].float(), c["B"].float(), c["meta"], out, OFFSET, c["ranks"])
    return out


def _weigh_reference(c: dict) -> torch.Tensor:
    y = c["y"].clone()
    reference.lora_weigh(y, c["weighted"])
    return y


def _shrink(form: str) -> Callable[[dict], torch.Tensor]:
    def run(c: dict) -> torch.Tensor:
        return getattr(_triton_ops(), form)(c["x"], c["A"], c["meta"], c["ranks"])

    return run


def _expand(form: str) -> Callable[[dict], torch.Tensor]:
    def run(c: dict) -> torch.Tensor:
        out = c["out"].clone()
        getattr(_triton_ops(), form)(c["y"], c["B"], c["meta"], out, OFFSET, c["ranks"])
        return out

    return run


def _weigh(c: dict) -> torch.Tensor:
    y = c["y"].clone()
    _triton_ops().lora_weigh(y, c["weighted"])
    return y


# ---- paged decode attention ----------------------------------------------------------------------------


def paged_cases(full: bool) -> list[Case]:
    """`paged_cases.FAST_CASES` (or `FULL_CASES`): dtype x heads x lengths x block size x window x cap."""
    out = []
    for dname, hq, hkv, lens, bs, window, cap in PAGED_FULL_CASES if full else PAGED_FAST_CASES:
        case: dict[str, Any] = make_paged_case(PAGED_DTYPES[dname], hq, hkv, lens, bs)
        case.update(scale=case["q"].shape[-1] ** -0.5, window=window, softcap=cap)
        label = f"{dname} heads={hq}/{hkv} lens={'/'.join(map(str, lens))} block={bs} window={window} softcap={cap}"
        out.append(Case(label, case, PAGED_TOL[case["q"].dtype]))
    return out


def _paged_reference(c: dict) -> torch.Tensor:
    return reference.paged_decode_attention(c["q"], c["kv"].float(), c["meta"], c["scale"], c["window"], c["softcap"])


def _paged_attention(c: dict) -> torch.Tensor:
    from . import triton_attention

    return triton_attention.paged_decode_attention(c["q"], c["kv"], c["meta"], c["scale"], c["window"], c["softcap"])


CHECKS: list[KernelCheck] = [
    KernelCheck("sgmv_shrink", lora_cases, _shrink_reference, _shrink("sgmv_shrink")),
    KernelCheck("bgmv_shrink", lora_cases, _shrink_reference, _shrink("bgmv_shrink")),
    KernelCheck("lora_shrink", lora_cases, _shrink_reference, _shrink("lora_shrink")),
    KernelCheck("sgmv_expand", lora_cases, _expand_reference, _expand("sgmv_expand")),
    KernelCheck("bgmv_expand", lora_cases, _expand_reference, _expand("bgmv_expand")),
    KernelCheck("lora_expand", lora_cases, _expand_reference, _expand("lora_expand")),
    KernelCheck("lora_weigh", lora_cases, _weigh_reference, _weigh),
    KernelCheck("paged_decode_attention", paged_cases, _paged_reference, _paged_attention),
]
