"""Batch-invariant dense ops for deterministic mode: a row's bits never depend on the other rows.

    linear(x[T, K], weight[N, K], bias=None) -> [T, N]   x @ weight.T (+ bias)
    silu(x) -> x / (1 + exp(-x)), computed in float32, returned in x's dtype
    tiled(n) -> n rounded up to whole tiles of ROW_TILE (rows of a GEMM, rank columns of LoRA)

A BLAS library picks its kernel and blocking from a GEMM's shape, so a row of `x @ W.T` can get
other bits when the batch has another number of rows. Measured on an AMD EPYC (AVX-512 BF16, no
AMX) with torch 2.13: MKL's float32 GEMM gives a row other bits at 1-3 rows, and the last rows
other bits at 5-7 and 9-11 rows, than at any multiple of 4 rows (1 to 16 threads); oneDNN's
bfloat16 GEMM gave the same bits at every row count. So `linear` runs every GEMM on a
row count that is a multiple of `ROW_TILE` (16: a margin over the 4 measured, and a whole AMX
tile): a short input is copied into a zero-padded one, a long one (`SPLIT_ROWS` and more) runs as
two GEMMs writing into one output, its whole tiles of rows in place and its last partial tile
padded, so no large copy is made. The kernel then sees only row counts it treats alike, and a
row's result depends on that row alone. The padding costs at most 15 rows of FLOPs, which a small
GEMM (bound by reading the weight) hardly notices. The LoRA ops' batched GEMMs use the same tile for their rows and
rank columns (`torch_ops`); there, too, a multiple of 16 gave the same bits whatever the number
of slots, the rows per slot and the rank width (columns past a slot's rank hold zeros).
`tests/test_determinism.py` and `tests/test_kernels.py` check these properties; the `--dtype
auto` probe (`loracli.devices`) checks the linear again on the machine it runs on.

`torch.nn.functional.silu` is not row-invariant in float32: its vectorized and scalar loops use
different formulas, and which elements take the scalar tail depends on the tensor's size and the
thread split. `silu` spells the formula out in float32 ops that are the same on both paths.
"""

from __future__ import annotations

import torch

ROW_TILE = 16
SPLIT_ROWS = 256  # from this many rows, pad the last partial tile alone rather than copy the input


def tiled(n: int) -> int:
    """`n` rounded up to a multiple of `ROW_TILE` (at least one tile)."""
    return max(1, -(-n // ROW_TILE)) * ROW_TILE


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with row t depending on x[t] only (see the module docstring)."""
    n = x.shape[0]
    whole = n - n % ROW_TILE if n >= SPLIT_ROWS else 0
    out = x.new_empty(tiled(n), weight.shape[0])
    if whole:
        _gemm(x[:whole], weight, bias, out[:whole])
    if whole < n or not n:
        _gemm(pad_rows(x[whole:]), weight, bias, out[whole:])
    return out[:n]


def _gemm(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """F.linear's own GEMM (mm, or addmm with the bias), written into `out`."""
    if bias is None:
        torch.mm(a, weight.T, out=out)
    else:
        torch.addmm(bias, a, weight.T, out=out)


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) as x / (1 + exp(-x)) in float32, one formula for every element."""
    h = x.float()
    return (h / torch.exp(-h).add_(1)).to(x.dtype)
