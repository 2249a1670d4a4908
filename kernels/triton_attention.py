"""Paged decode attention in Triton: the CUDA path, same semantics as `reference.paged_decode_attention`.

    paged_decode_attention(q [B, Hq, D], kv [2, rows, Hkv, D], meta: PagedMeta, scale, window, softcap) -> [B, Hq, D]

Grid = (sequences, KV heads). A program holds the G query heads that share its KV head (GQA:
K/V are read once for all of them, padded to `BLOCK_G` >= 16 rows for `tl.dot`) and walks its
sequence's visible keys (the last `window` ones with a window) in tiles of `BLOCK_N` keys, reading
each key's row through the block table where it lies in the cache: no gathered copy. Online
softmax (running max and sum, flash-attention style) in float32; the scores' and the
values' products accumulate in float32; out is rounded once to the model dtype. Masked loads
never touch rows past the sequence's length, so stale cache rows are never read.

Dtypes as in `triton_ops`: fp16/bf16 tiles go to `tl.dot` natively, fp32 with
`input_precision="ieee"`; under TRITON_INTERPRET=1 (the CPU test mode) every tile is cast to fp32
first (the interpreter has no bf16 dot). tanh (soft cap) is spelled with `exp`, which both the
compiler and the interpreter have. Importing this module imports `triton_ops`, which checks that
TRITON_INTERPRET was set before Triton's first import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged import PagedMeta
from .triton_ops import INTERPRET

BLOCK_N = 16  # keys per tile; one cache block of the default size


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    kv_ptr,
    table_ptr,
    lens_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_kv2,
    stride_kvr,
    stride_kvh,
    stride_tb,
    stride_ob,
    stride_oh,
    scale,
    window,
    softcap,
    block_size,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_CAP: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(lens_ptr + b).to(tl.int32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(n - window, 0)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < D
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :]
    q = tl.load(q_rows, mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if DOT_F32:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, n, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < n
        block = tl.load(table_ptr + b.to(tl.int64) * stride_tb + j // block_size, mask=j_ok, other=0)
        row = block.to(tl.int64) * block_size + j % block_size
        at = kv_ptr + row[:, None] * stride_kvr + h * stride_kvh + d[None, :]
        kv_ok = j_ok[:, None] & d_ok[None, :]
        k = tl.load(at, mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(at + stride_kv2, mask=kv_ok, other=0.0)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale  # [BLOCK_G, BLOCK_N] float32
        if HAS_CAP:
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        s = tl.where(j_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    out = acc / total[:, None]
    o_rows = out_ptr + b.to(tl.int64) * stride_ob + (h * G + g)[:, None] * stride_oh + d[None, :]
    tl.store(o_rows, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def paged_decode_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    meta: PagedMeta,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """[B, Hq, D]: see the module docstring and `reference.paged_decode_attention`."""
    B, Hq, D = q.shape
    Hkv = kv.shape[2]
    G = Hq // Hkv
    if q.stride(2) != 1 or kv.stride(3) != 1:
        raise ValueError("paged_decode_attention wants q and kv with a contiguous head dim")
    tables = meta.block_tables
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    _paged_decode_kernel[(B, Hkv)](
        q,
        kv,
        tables,
        meta.seq_lens,
        out,
        q.stride(0),
        q.stride(1),
        kv.stride(0),
        kv.stride(1),
        kv.stride(2),
        tables.stride(0),
        out.stride(0),
        out.stride(1),
        float(scale),
        int(window or 0),
        float(softcap or 1.0),
        meta.block_size,
        G=G,
        D=D,
        BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        HAS_WINDOW=window is not None,
        HAS_CAP=softcap is not None,
        DOT_F32=INTERPRET or q.dtype == torch.float32,
    )
    return out
