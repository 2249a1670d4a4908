"""Triton kernels for the multi-LoRA ops: the CUDA path, same semantics as `reference`.

Two forms of each op, both reading the step's layout from `LoraMeta`:

* SGMV (segmented gather matrix-vector, after Punica): the tokens of one slot run form a segment
  (`meta.runs`, through `meta.order` when the runs are not slices). Grid = (row blocks x column
  blocks, segments); a program multiplies a [BLOCK_M, K] tile of its segment's tokens with the
  slot's weights using `tl.dot`. For prefill, where segments are long.
* BGMV (batched gather matrix-vector): grid = (tokens, column blocks); a program does one token's
  vector-matrix product with multiply + `tl.sum`, so no row of a tile is padding. For decode,
  where segments hold a few tokens. `lora_shrink` / `lora_expand` pick BGMV when segments average
  fewer than `BGMV_MAX_TOKENS_PER_SEGMENT` tokens.

Dtypes: fp16 and bf16 tiles go to `tl.dot` as they are (tensor cores), fp32 tiles with
`input_precision="ieee"` (true fp32, no tf32); every sum accumulates in fp32 and `out` gets one
rounding of `out + update`. Operands share one dtype (checked by the dispatcher).

Heterogeneous ranks: A [S, R, K] and B [S, N, R] are padded to the largest rank R. Each program
looks up its slot's rank r (`ranks` as an int32 device table, cached on the meta per ranks
tuple) and masks the rank dimension to r: weight loads past r are skipped, so rank
padding costs no memory traffic, and the expand loops over r, not R. The tile FLOPs still round
up to BLOCK_R (>= 16, a `tl.dot` minimum), which is cheap: these ops are memory-bound. The shrink
writes zeros in y past r; programs whose whole rank block lies past r exit at once.

Block sizes come from `triton.autotune` on CUDA (small config lists keyed on the problem sizes;
the expand restores `out` between trials since it adds in place). Under TRITON_INTERPRET=1 (the
CPU test mode) each kernel has a single config, so nothing is benchmarked, and bf16 tiles are cast
to fp32 before `tl.dot`, which the interpreter does not implement for bf16 (triton#11584).
Triton 3.9 reads TRITON_INTERPRET when `@triton.jit` decorates a function, and triton.language's
own helpers (tl.zeros, ...) are decorated by `import triton`: the variable must be set before
triton is first imported, which this module checks.

`lora_weigh` is one elementwise kernel (grid: tokens x rank blocks), fp32 product rounded to
nearest even; the interpreter truncates that rounding in bf16 (one ulp; the tests allow it there).

Device tables built lazily per step and cached on the meta: segment slot/start/length (int32),
and rank tables. `meta.order` and `meta.token_slot` are used as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .meta import LoraMeta

INTERPRET = bool(triton.knobs.runtime.interpret)  # read once: it decides how the kernels below are built
BGMV_MAX_TOKENS_PER_SEGMENT = 16  # below this average segment length, per-token kernels win
MAX_BLOCK_R = 64  # rank tile; larger ranks take several tiles


def _language_interpreted() -> bool:
    """Whether triton.language's own jit helpers (tl.zeros, ...) were built for the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


if INTERPRET and not _language_interpreted():
    raise ImportError(
        "TRITON_INTERPRET=1 was set after triton was imported: Triton decides interpreted vs compiled "
        "when `import triton` defines its own jit helpers, so set it before importing triton"
    )


def _configs(interpret: dict, cuda: list[tuple[dict, int]]) -> list[triton.Config]:
    """The autotune configs: one fixed config in the interpreter, the CUDA list otherwise."""
    if INTERPRET:
        return [triton.Config(interpret, num_warps=1)]
    return [triton.Config(kw, num_warps=warps) for kw, warps in cuda]


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    """a @ b in fp32: true fp32 products when DOT_F32, else native (fp16/bf16) tensor-core inputs."""
    if DOT_F32:
        res = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        res = tl.dot(a, b)
    return res


@triton.jit
def _segment_rows(tok_ptr, seg_start_ptr, seg, seg_len, pid_m, HAS_ORDER: tl.constexpr, BLOCK_M: tl.constexpr):
    """(token index [BLOCK_M] int64, row mask [BLOCK_M]) of row block pid_m of segment seg."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seg_len
    pos = tl.load(seg_start_ptr + seg) + rows
    if HAS_ORDER:
        tok = tl.load(tok_ptr + pos, mask=row_ok, other=0)
    else:
        tok = pos
    return tok.to(tl.int64), row_ok


@triton.autotune(
    configs=_configs(
        {"BLOCK_M": 32, "BLOCK_K": 128},
        [
            ({"BLOCK_M": 16, "BLOCK_K": 128}, 4),
            ({"BLOCK_M": 32, "BLOCK_K": 64}, 4),
            ({"BLOCK_M": 64, "BLOCK_K": 64}, 4),
            ({"BLOCK_M": 64, "BLOCK_K": 128}, 8),
        ],
    ),
    key=["K", "R", "len_bucket"],
)
@triton.jit
def _sgmv_shrink_kernel(
    x_ptr,
    a_ptr,
    y_ptr,
    tok_ptr,
    seg_slot_ptr,
    seg_start_ptr,
    seg_len_ptr,
    rank_ptr,
    K,
    R,
    len_bucket,
    sx_t,
    sx_k,
    sa_s,
    sa_r,
    sa_k,
    sy_t,
    sy_r,
    HAS_ORDER: tl.constexpr,
    HAS_RANKS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # y[tok, cols] = x[tok, :] @ A[slot, cols, :].T for one [BLOCK_M, BLOCK_R] tile of one segment
    seg = tl.program_id(1)
    r_blocks = (R + BLOCK_R - 1) // BLOCK_R
    pid_m = tl.program_id(0) // r_blocks
    pid_r = tl.program_id(0) % r_blocks
    seg_len = tl.load(seg_len_ptr + seg)
    if pid_m * BLOCK_M >= seg_len:
        return
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rank = R
    if HAS_RANKS:
        rank = tl.load(rank_ptr + slot)
    if pid_r * BLOCK_R >= rank:
        return  # y is zero-initialised
    tok, row_ok = _segment_rows(tok_ptr, seg_start_ptr, seg, seg_len, pid_m, HAS_ORDER, BLOCK_M)
    cols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < rank
    a_base = a_ptr + slot * sa_s
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xt = tl.load(
            x_ptr + tok[:, None] * sx_t + ks[None, :] * sx_k, mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )  # [BLOCK_M, BLOCK_K]
        at = tl.load(
            a_base + cols[None, :] * sa_r + ks[:, None] * sa_k, mask=k_ok[:, None] & col_ok[None, :], other=0.0
        )  # [BLOCK_K, BLOCK_R]
        acc += _dot(xt, at, DOT_F32)
    tl.store(
        y_ptr + tok[:, None] * sy_t + cols[None, :] * sy_r,
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (cols[None, :] < R),
    )


@triton.autotune(
    configs=_configs(
        {"BLOCK_M": 32, "BLOCK_N": 64},
        [
            ({"BLOCK_M": 16, "BLOCK_N": 64}, 4),
            ({"BLOCK_M": 32, "BLOCK_N": 128}, 4),
            ({"BLOCK_M": 64, "BLOCK_N": 64}, 4),
            ({"BLOCK_M": 64, "BLOCK_N": 128}, 8),
        ],
    ),
    key=["N", "R", "len_bucket"],
    restore_value=["out_ptr"],
)
@triton.jit
def _sgmv_expand_kernel(
    y_ptr,
    b_ptr,
    out_ptr,
    tok_ptr,
    seg_slot_ptr,
    seg_start_ptr,
    seg_len_ptr,
    rank_ptr,
    N,
    R,
    offset,
    len_bucket,
    sy_t,
    sy_r,
    sb_s,
    sb_n,
    sb_r,
    so_t,
    so_n,
    HAS_ORDER: tl.constexpr,
    HAS_RANKS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # out[tok, offset + ns] += y[tok, :rank] @ B[slot, ns, :rank].T for one [BLOCK_M, BLOCK_N] tile
    seg = tl.program_id(1)
    n_blocks = (N + BLOCK_N - 1) // BLOCK_N
    pid_m = tl.program_id(0) // n_blocks
    pid_n = tl.program_id(0) % n_blocks
    seg_len = tl.load(seg_len_ptr + seg)
    if pid_m * BLOCK_M >= seg_len:
        return
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rank = R
    if HAS_RANKS:
        rank = tl.load(rank_ptr + slot)
    if rank == 0:
        return
    tok, row_ok = _segment_rows(tok_ptr, seg_start_ptr, seg, seg_len, pid_m, HAS_ORDER, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    b_base = b_ptr + slot * sb_s
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < rank
        yt = tl.load(
            y_ptr + tok[:, None] * sy_t + rs[None, :] * sy_r, mask=row_ok[:, None] & r_ok[None, :], other=0.0
        )  # [BLOCK_M, BLOCK_R]
        bt = tl.load(
            b_base + ns[None, :] * sb_n + rs[:, None] * sb_r, mask=r_ok[:, None] & n_ok[None, :], other=0.0
        )  # [BLOCK_R, BLOCK_N]
        acc += _dot(yt.to(b_ptr.dtype.element_ty), bt, DOT_F32)
    o_ptrs = out_ptr + tok[:, None] * so_t + (offset + ns)[None, :] * so_n
    o_mask = row_ok[:, None] & n_ok[None, :]
    o = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (o.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.autotune(
    configs=_configs({"BLOCK_K": 128}, [({"BLOCK_K": 128}, 2), ({"BLOCK_K": 256}, 4), ({"BLOCK_K": 512}, 4)]),
    key=["K", "R"],
)
@triton.jit
def _bgmv_shrink_kernel(
    x_ptr,
    a_ptr,
    y_ptr,
    slot_ptr,
    rank_ptr,
    K,
    R,
    sx_t,
    sx_k,
    sa_s,
    sa_r,
    sa_k,
    sy_t,
    sy_r,
    HAS_RANKS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # y[t, cols] = x[t, :] @ A[slot[t], cols, :].T for one token and one rank block
    t = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    rank = R
    if HAS_RANKS:
        rank = tl.load(rank_ptr + slot)
    if pid_r * BLOCK_R >= rank:
        return
    cols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < rank
    a_base = a_ptr + slot * sa_s
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xk = tl.load(x_ptr + t * sx_t + ks * sx_k, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
        at = tl.load(
            a_base + cols[:, None] * sa_r + ks[None, :] * sa_k, mask=col_ok[:, None] & k_ok[None, :], other=0.0
        ).to(tl.float32)  # [BLOCK_R, BLOCK_K]
        acc += at * xk[None, :]
    tl.store(y_ptr + t * sy_t + cols * sy_r, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=cols < R)


@triton.autotune(
    configs=_configs({"BLOCK_N": 128}, [({"BLOCK_N": 64}, 2), ({"BLOCK_N": 128}, 4), ({"BLOCK_N": 256}, 4)]),
    key=["N", "R"],
    restore_value=["out_ptr"],
)
@triton.jit
def _bgmv_expand_kernel(
    y_ptr,
    b_ptr,
    out_ptr,
    slot_ptr,
    rank_ptr,
    N,
    R,
    offset,
    sy_t,
    sy_r,
    sb_s,
    sb_n,
    sb_r,
    so_t,
    so_n,
    HAS_RANKS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # out[t, offset + ns] += y[t, :rank] @ B[slot[t], ns, :rank].T for one token and one column block
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    rank = R
    if HAS_RANKS:
        rank = tl.load(rank_ptr + slot)
    if rank == 0:
        return
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    b_base = b_ptr + slot * sb_s
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < rank
        yr = tl.load(y_ptr + t * sy_t + rs * sy_r, mask=r_ok, other=0.0).to(tl.float32)  # [BLOCK_R]
        bt = tl.load(
            b_base + ns[:, None] * sb_n + rs[None, :] * sb_r, mask=n_ok[:, None] & r_ok[None, :], other=0.0
        ).to(tl.float32)  # [BLOCK_N, BLOCK_R]
        acc += bt * yr[None, :]
    o_ptrs = out_ptr + t * so_t + (offset + ns) * so_n
    o = tl.load(o_ptrs, mask=n_ok, other=0.0)
    tl.store(o_ptrs, (o.to(tl.float32) + tl.sum(acc, axis=1)).to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _weigh_kernel(y_ptr, w_ptr, R, sy_t, sy_r, BLOCK_R: tl.constexpr):
    # y[t, rs] = y[t, rs] * w[t] in fp32, rounded once into y's dtype, for one token and one rank block
    t = tl.program_id(0).to(tl.int64)
    rs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rs < R
    w = tl.load(w_ptr + t)
    ptrs = y_ptr + t * sy_t + rs * sy_r
    y = tl.load(ptrs, mask=r_ok, other=0.0).to(tl.float32)
    tl.store(ptrs, (y * w).to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=r_ok)


@dataclass(frozen=True)
class Segments:
    """`meta.runs` as device tables (int32), one entry per segment."""

    slot: torch.Tensor  # [G]
    start: torch.Tensor  # [G] first position in the (sorted) token order
    length: torch.Tensor  # [G]
    max_len: int
    lora_tokens: int


def segments(meta: LoraMeta) -> Segments:
    """The segment tables of `meta`, on its device (built once per step)."""

    def build() -> Segments:
        slot, start, length = zip(*((s, b, e - b) for s, b, e in meta.runs), strict=True)
        table = torch.tensor([slot, start, length], dtype=torch.int32).to(meta.token_slot.device)
        return Segments(table[0], table[1], table[2], max(length), sum(length))

    return meta.cached("triton.segments", build)


def _rank_table(meta: LoraMeta, ranks: Sequence[int] | None) -> torch.Tensor | None:
    """ranks as an int32 device tensor indexed by slot, cached per step and ranks; None for None."""
    if ranks is None:
        return None
    key = ("triton.ranks", tuple(ranks))
    return meta.cached(key, lambda: torch.tensor(key[1], dtype=torch.int32).to(meta.token_slot.device))


def _check_device(*tensors: torch.Tensor) -> None:
    """Raise unless every tensor is on CUDA, or the kernels run in the interpreter."""
    if not INTERPRET and not all(t.is_cuda for t in tensors):
        raise RuntimeError(
            "Triton LoRA kernels need CUDA tensors; for CPU tensors (Triton's interpreter) set "
            "TRITON_INTERPRET=1 before triton is first imported"
        )


def _dot_f32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _block_r(R: int) -> int:
    return min(max(16, triton.next_power_of_2(R)), MAX_BLOCK_R)


def use_bgmv(meta: LoraMeta) -> bool:
    """Per-token kernels when segments are short (decode), segment kernels otherwise."""
    seg = segments(meta)
    return seg.lora_tokens < BGMV_MAX_TOKENS_PER_SEGMENT * len(meta.runs)


def sgmv_shrink(x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: Sequence[int] | None = None) -> torch.Tensor:
    """`lora_shrink` with one program per (segment, row block, rank block)."""
    _check_device(x, A)
    T, K = x.shape
    R = A.shape[1]
    y = x.new_zeros(T, R)
    if not meta.runs:
        return y
    seg, rank = segments(meta), _rank_table(meta, ranks)
    block_r = _block_r(R)

    def grid(cfg: dict) -> tuple[int, int]:
        return triton.cdiv(seg.max_len, cfg["BLOCK_M"]) * triton.cdiv(R, block_r), len(meta.runs)

    _sgmv_shrink_kernel[grid](
        x,
        A,
        y,
        meta.order if meta.order is not None else seg.start,
        seg.slot,
        seg.start,
        seg.length,
        rank if rank is not None else seg.slot,
        K,
        R,
        triton.next_power_of_2(seg.max_len),
        x.stride(0),
        x.stride(1),
        A.stride(0),
        A.stride(1),
        A.stride(2),
        y.stride(0),
        y.stride(1),
        HAS_ORDER=meta.order is not None,
        HAS_RANKS=rank is not None,
        DOT_F32=_dot_f32(x.dtype),
        BLOCK_R=block_r,
    )
    return y


def sgmv_expand(
    y: torch.Tensor,
    B: torch.Tensor,
    meta: LoraMeta,
    out: torch.Tensor,
    offset: int = 0,
    ranks: Sequence[int] | None = None,
) -> None:
    """`lora_expand` with one program per (segment, row block, column block)."""
    _check_device(y, B, out)
    if not meta.runs:
        return
    N, R = B.shape[1], B.shape[2]
    seg, rank = segments(meta), _rank_table(meta, ranks)

    def grid(cfg: dict) -> tuple[int, int]:
        return triton.cdiv(seg.max_len, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), len(meta.runs)

    _sgmv_expand_kernel[grid](
        y,
        B,
        out,
        meta.order if meta.order is not None else seg.start,
        seg.slot,
        seg.start,
        seg.length,
        rank if rank is not None else seg.slot,
        N,
        R,
        offset,
        triton.next_power_of_2(seg.max_len),
        y.stride(0),
        y.stride(1),
        B.stride(0),
        B.stride(1),
        B.stride(2),
        out.stride(0),
        out.stride(1),
        HAS_ORDER=meta.order is not None,
        HAS_RANKS=rank is not None,
        DOT_F32=_dot_f32(B.dtype),
        BLOCK_R=_block_r(R),
    )


def bgmv_shrink(x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: Sequence[int] | None = None) -> torch.Tensor:
    """`lora_shrink` with one program per (token, rank block)."""
    _check_device(x, A)
    T, K = x.shape
    R = A.shape[1]
    y = x.new_zeros(T, R)
    if not meta.runs:
        return y
    rank = _rank_table(meta, ranks)
    block_r = _block_r(R)
    _bgmv_shrink_kernel[(T, triton.cdiv(R, block_r))](
        x,
        A,
        y,
        meta.token_slot,
        rank if rank is not None else meta.token_slot,
        K,
        R,
        x.stride(0),
        x.stride(1),
        A.stride(0),
        A.stride(1),
        A.stride(2),
        y.stride(0),
        y.stride(1),
        HAS_RANKS=rank is not None,
        BLOCK_R=block_r,
    )
    return y


def bgmv_expand(
    y: torch.Tensor,
    B: torch.Tensor,
    meta: LoraMeta,
    out: torch.Tensor,
    offset: int = 0,
    ranks: Sequence[int] | None = None,
) -> None:
    """`lora_expand` with one program per (token, column block)."""
    _check_device(y, B, out)
    if not meta.runs:
        return
    N, R = B.shape[1], B.shape[2]
    rank = _rank_table(meta, ranks)

    def grid(cfg: dict) -> tuple[int, int]:
        return y.shape[0], triton.cdiv(N, cfg["BLOCK_N"])

    _bgmv_expand_kernel[grid](
        y,
        B,
        out,
        meta.token_slot,
        rank if rank is not None else meta.token_slot,
        N,
        R,
        offset,
        y.stride(0),
        y.stride(1),
        B.stride(0),
        B.stride(1),
        B.stride(2),
        out.stride(0),
        out.stride(1),
        HAS_RANKS=rank is not None,
        BLOCK_R=_block_r(R),
    )


def lora_shrink(x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: Sequence[int] | None = None) -> torch.Tensor:
    """y[T, R] = x[t] @ A[slot[t], :r].T per token, zero elsewhere; see `reference`."""
    if meta.runs and use_bgmv(meta):
        return bgmv_shrink(x, A, meta, ranks)
    return sgmv_shrink(x, A, meta, ranks)


def lora_expand(
    y: torch.Tensor,
    B: torch.Tensor,
    meta: LoraMeta,
    out: torch.Tensor,
    offset: int = 0,
    ranks: Sequence[int] | None = None,
) -> None:
    """out[t, offset:offset+N] += y[t, :r] @ B[slot[t], :, :r].T in place; see `reference`."""
    if meta.runs and use_bgmv(meta):
        bgmv_expand(y, B, meta, out, offset, ranks)
    else:
        sgmv_expand(y, B, meta, out, offset, ranks)


def lora_weigh(y: torch.Tensor, meta: LoraMeta) -> None:
    """y[t] *= token_weight[t] in place (fp32 product, one rounding); see `reference`."""
    w = meta.token_weight
    if w is None or y.numel() == 0:
        return
    _check_device(y, w)
    R = y.shape[1]
    block = min(max(16, triton.next_power_of_2(R)), 1024)
    _weigh_kernel[(y.shape[0], triton.cdiv(R, block))](y, w, R, y.stride(0), y.stride(1), BLOCK_R=block)
