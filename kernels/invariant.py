"""Batch-invariant dense ops for deterministic mode: a row's bits never depend on the other rows.

    linear(x[T, K], weight[N, K], bias=None) -> [T, N]   x @ weight.T (+ bias)
    silu(x) -> x / (1 + exp(-x)), computed in float32, returned in x's dtype
    tiled(n, tile=ROW_TILE) -> n rounded up to whole tiles (rows of a GEMM; LoRA rank columns: RANK_TILE)

A BLAS library picks its kernel and blocking from a GEMM's shape, so a row of `x @ W.T` can get
other bits when the batch has another number of rows. Measured on an AMD EPYC (AVX-512 BF16, no
AMX) with torch 2.13: MKL's float32 GEMM gives a row other bits at 1-3 rows, and the last rows
other bits at 5-7 and 9-11 rows, than at any multiple of 4 rows (1 to 16 threads); oneDNN's
bfloat16 GEMM gave the same bits at every row count. So `linear` runs every GEMM on a row count
that is a multiple of `ROW_TILE` = 16 (a margin over the 4 measured, and the row count of an AMX
tile, since the CPU under this project changes between machines), in `pieces`: a short input is
copied into a zero-padded one; a long one (`SPLIT_ROWS` and more) runs its whole tiles in place
and only its last partial tile padded, so no large copy is made. The kernel then sees only row
counts it treats alike, and a row's result depends on that row alone. Padding costs up to 15 rows
of FLOPs, which a small GEMM (bound by reading the weight) hardly notices. The LoRA ops
(`torch_ops`) and the attention (`loracli.model.fixed_attention`) use the same row tile; there,
too, whole tiles of rows gave the same bits whatever the number of items of a batched GEMM, and
`mm` the same bits as one item of `bmm`. LoRA's rank columns need wider tiles (`RANK_TILE` = 16):
a shrink to 4 or 8 columns gave other bits than to 16, while 16, 32, 48 and 64 (columns past a
slot's rank holding zeros) gave the same. Other CPUs (AMX, whose tiles have 16 rows) may need
other tiles: there the `--dtype auto` probe finds bfloat16 not invariant and picks float32.
`tests/test_determinism.py` and `tests/test_kernels.py` check these properties; the `--dtype
auto` probe (`loracli.devices`) checks the linear again on the machine it runs on.

`torch.nn.functional.silu` is not row-invariant in float32: its vectorized and scalar loops use
different formulas, and which elements take the scalar tail depends on the tensor's size and the
thread split. `silu` spells the formula out in float32 ops that are the same on both paths.
"""

from __future__ import annotations

import torch

ROW_TILE = 16
RANK_TILE = 16
SPLIT_ROWS = 64  # from this many rows, pad the last partial tile alone rather than copy all of them


def tiled(n: int, tile: int = ROW_TILE) -> int:
    """`n` rounded up to a multiple of `tile` (at least one tile)."""
    return max(1, -(-n // tile)) * tile


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` [T, ...] with zero rows appended up to `tiled(T)`; `x` itself when it needs none."""
    n = x.shape[0]
    rows = tiled(n)
    if rows == n:
        return x
    out = x.new_empty(rows, *x.shape[1:])
    out[:n] = x
    out[n:].zero_()
    return out


def pieces(n: int) -> list[tuple[int, int]]:
    """n rows as GEMMs of whole tiles, (first, end): from `SPLIT_ROWS` rows on, the whole tiles in
    place and the last partial tile padded on its own; below, all n rows padded."""
    whole = n - n % ROW_TILE if n >= SPLIT_ROWS else 0
    return [(a, b) for a, b in ((0, whole), (whole, n)) if b > a]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with row t depending on x[t] only (see the module docstring)."""
    out = x.new_empty(tiled(x.shape[0]), weight.shape[0])
    for a, b in pieces(x.shape[0]):
        rows, into = pad_rows(x[a:b]), out[a : a + tiled(b - a)]
        if bias is None:  # F.linear's own GEMMs: mm, or addmm with the bias
            torch.mm(rows, weight.T, out=into)
        else:
            torch.addmm(bias, rows, weight.T, out=into)
    return out[: x.shape[0]]


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) as x / (1 + exp(-x)) in float32, one formula for every element."""
    h = x.float()
    e = torch.neg(h).exp_().add_(1)  # in place from here on: the same ops and bits, fewer allocations
    return torch.div(h, e, out=e).to(x.dtype)
