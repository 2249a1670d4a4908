"""The CPU path: grouped GEMMs in plain torch, same semantics as `reference`.

Two strategies; `use_bmm` picks one per op and step (cached on the meta). With `meta.invariant`
(deterministic mode) both compute a token's row with the same GEMM, whose bits do not follow the
batch: the grid's width, and each run's rows in ``runs`` (`shrink_tiled`, `expand_tiled`), are
padded to whole tiles of `invariant.ROW_TILE`; every slot uses all R rank columns (the caller pads
R to whole `invariant.RANK_TILE`s, see `MultiLoraLinear`; with `ranks`, columns past a slot's rank
are masked); the expand adds into `out` with one rounding. Measured here: such a GEMM gives a row the same bits whatever
the rows per slot, the number of slots and the rank width, and `mm` equals one item of `bmm`
(`addmm_` one of `baddbmm_`), so the cost model may still pick either strategy.

* ``runs``: one GEMM per slot run on contiguous slices (plus one gather of the batch and one
  gather-back of the results when `meta.order` is set). With `ranks`, every slot runs at its
  real rank `ranks[slot]`, so rank padding costs memory, never FLOPs; without (`MultiLoraLinear`,
  whose buffers are zero past each slot's rank), every slot runs at the op's R columns. But
  each run is one small GEMM call per op, and on CPU a small GEMM has a fixed cost of ~5 us (fp32)
  to ~20 us (bf16), which dominates short runs.
* ``bmm``: tokens padded into a [G, L] grid (G used slots, L = most tokens of one slot), then one
  `bmm` per op however many slots there are. `ranks`, when given, are applied as a mask; either
  way a slot of rank r < R costs R columns of FLOPs, and padding cells cost FLOPs too. When the tokens are already
  sorted by slot in equal counts (the model runner's usual batch) the grid is `x` itself: no copy.
  The expand adds into `out` in the bmm (`baddbmm_`), so the sum is rounded once either way.

The choice is a cost model: bmm unless its padding FLOPs exceed the fixed cost of the GEMM calls
it saves. Measured (`python -m loracli.kernels.bench --strategy auto runs bmm`): bmm wins for every
step sorted by slot, decode and prefill, by 1.5-4x at decode in bf16; runs win prefill with skewed
(zipf) slot sizes, where the grid is mostly padding. Scatters use gathers (`index_select` of the
results through an inverse permutation), never `index_add_`, which is ~15x slower on CPU.
`torch.compile` of the bmm path was measured slower than eager (guards + extern GEMM calls) and
is not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import invariant
from .meta import LoraMeta

# Fixed cost of one small GEMM call in FLOPs of a skinny bmm, per dtype (see `use_bmm`), measured on
# AVX-512/AMX with one thread: ~22 us x ~150 GFLOP/s in bf16, ~5.5 us x ~65 GFLOP/s in fp32. Dtypes
# missing here always take the runs: in fp16 torch's CPU bmm is ~10x slower per FLOP than its mm.
GEMM_CALL_FLOPS = {torch.bfloat16: 3e6, torch.float32: 4e5}


@dataclass(frozen=True)
class SlotGrid:
    """Tokens laid out as a [G, L] grid, row g holding the tokens of `slots[g]` (see module docstring).

    Results come back per token by gathering cells through `dst`; the grid's results get one extra
    all-zero cell, G*L, which is where slot -1 tokens read from (so they get zeros for free).
    """

    slots: tuple[int, ...]  # G used slots, ascending
    width: int  # L: the most tokens any used slot has
    identity: bool  # x itself is the grid: tokens sorted by slot, equal counts, no slot -1
    slot_index: torch.Tensor | None  # [G] int64 slots to gather weights of, None when slots == range(G)
    src: torch.Tensor  # [G*L] token feeding each cell; padding cells repeat a real token of their row
    dst: torch.Tensor  # [T] cell of each token, G*L (the zero cell) for slot -1 tokens
    lora_tokens: int  # tokens with a slot


def slot_grid(meta: LoraMeta) -> SlotGrid:
    """The [G, L] grid of `meta` (built once per step)."""
    return meta.cached("torch.grid", lambda: _build_grid(meta))


def _build_grid(meta: LoraMeta) -> SlotGrid:
    slots = meta.token_slot.tolist()
    members: dict[int, list[int]] = {}
    for t, s in enumerate(slots):
        if s >= 0:
            members.setdefault(s, []).append(t)
    used = sorted(members)
    width = max(len(m) for m in members.values())
    if meta.invariant:
        width = invariant.tiled(width)
    src = []
    dst = [len(used) * width] * len(slots)
    for g, s in enumerate(used):
        row = members[s]
        src.extend(row[min(j, len(row) - 1)] for j in range(width))
        for j, t in enumerate(row):
            dst[t] = g * width + j
    dev = meta.token_slot.device

    def index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=dev)

    return SlotGrid(
        slots=tuple(used),
        width=width,
        identity=src == list(range(len(slots))),
        slot_index=None if used == list(range(len(used))) else index(used),
        src=index(src),
        dst=index(dst),
        lora_tokens=sum(len(m) for m in members.values()),
    )


def inverse_order(meta: LoraMeta) -> torch.Tensor:
    """[T] int64 position of each token in `meta.order` (built once per step)."""

    def build() -> torch.Tensor:
        inv = torch.empty_like(meta.order)
        inv[meta.order] = torch.arange(meta.num_tokens, device=meta.order.device)
        return inv

    return meta.cached("torch.inverse_order", build)


def lora_rows(meta: LoraMeta) -> torch.Tensor:
    """[n] int64 the tokens with a slot, ascending (built once per step)."""
    return meta.cached("torch.lora_rows", lambda: (meta.token_slot >= 0).nonzero().flatten())


def use_bmm(meta: LoraMeta, D: int, R: int, dtype: torch.dtype) -> bool:
    """Whether one bmm beats one GEMM per run for a GEMM of R x D per token (D = in for shrink, N for expand).

    The bmm wastes the FLOPs of its padding cells, the runs pay a fixed cost per extra GEMM call.
    """
    key = ("torch.use_bmm", D, R, dtype)
    choice = meta.cache.get(key)
    if choice is None:
        call_flops = GEMM_CALL_FLOPS.get(dtype)
        grid = slot_grid(meta)
        padding_flops = 2 * (len(grid.slots) * grid.width - grid.lora_tokens) * R * D
        saved_flops = (len(meta.runs) - 1) * call_flops if call_flops is not None else -1.0
        choice = meta.cache[key] = padding_flops <= saved_flops
    return choice


def _rank_of(ranks: Sequence[int] | None, slot: int, R: int) -> int:
    return R if ranks is None else int(ranks[slot])


def _short_rank_mask(meta: LoraMeta, ranks: Sequence[int] | None, R: int) -> torch.Tensor | None:
    """[T, R] bool, True at columns >= the token's slot rank (and on slot -1 rows); None if none is short."""
    if ranks is None:
        return None
    grid = slot_grid(meta)
    short = tuple(map(ranks.__getitem__, grid.slots))
    if min(short) == R:
        return None

    def build() -> torch.Tensor:
        dev = meta.token_slot.device
        rank = torch.zeros(meta.max_slot + 2, dtype=torch.int64, device=dev)  # index -1 -> rank 0
        rank[list(grid.slots)] = torch.tensor(short, dtype=torch.int64, device=dev)
        return torch.arange(R, device=dev)[None, :] >= rank[meta.token_slot][:, None]

    return meta.cached(("torch.short_rank_mask", R, short), build)


def _grid_weights(W: torch.Tensor, grid: SlotGrid) -> torch.Tensor:
    """W[slots of the grid]: a slice when they are 0..G-1, else a gather."""
    if grid.slot_index is not None:
        return W.index_select(0, grid.slot_index)
    return W if W.shape[0] == len(grid.slots) else W[: len(grid.slots)]


def _grid_bmm(grid: SlotGrid, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[G*L + 1, Y]: a[src] as [G, L, X] times w [G, X, Y], plus the all-zero cell G*L."""
    G, L = len(grid.slots), grid.width
    res = a.new_empty(G * L + 1, w.shape[2])
    res[-1].zero_()
    torch.bmm(a.index_select(0, grid.src).view(G, L, -1), w, out=res[:-1].view(G, L, -1))
    return res


def shrink_bmm(x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: Sequence[int] | None = None) -> torch.Tensor:
    """`lora_shrink` as one bmm over the slot grid."""
    grid = slot_grid(meta)
    T, K = x.shape
    G, L, R = len(grid.slots), grid.width, A.shape[1]
    At = _grid_weights(A, grid).transpose(1, 2)  # [G, K, R]
    if grid.identity:
        y = torch.bmm(x.view(G, L, K), At).view(T, R)
    else:
        y = _grid_bmm(grid, x, At).index_select(0, grid.dst)  # [T, R]
    short = _short_rank_mask(meta, ranks, R)
    return y if short is None else y.masked_fill_(short, 0)


def expand_bmm(
    y: torch.Tensor,
    B: torch.Tensor,
    meta: LoraMeta,
    out: torch.Tensor,
    offset: int = 0,
    ranks: Sequence[int] | None = None,
) -> None:
    """`lora_expand` as one bmm over the slot grid."""
    grid = slot_grid(meta)
    G, L = len(grid.slots), grid.width
    N, R = B.shape[1], B.shape[2]
    short = _short_rank_mask(meta, ranks, R)
    yk = y if short is None else y.masked_fill(short, 0)  # [T, R], columns past the rank zeroed
    Bt = _grid_weights(B, grid).transpose(1, 2)  # [G, R, N]
    view = out.narrow(1, offset, N)  # [T, N]
    if grid.identity:
        view.view(G, L, N).baddbmm_(yk.view(G, L, R), Bt)
        return
    acc = view.index_select(0, grid.src).view(G, L, N)
    acc.baddbmm_(yk.index_select(0, grid.src).view(G, L, R), Bt)
    rows = lora_rows(meta)
    view.index_copy_(0, rows, acc.view(G * L, N).index_select(0, grid.dst.index_select(0, rows)))


def shrink_runs(x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: Sequence[int] | None = None) -> torch.Tensor:
    """`lora_shrink` as one GEMM per slot run, at each slot's real rank (`meta.invariant`: `shrink_tiled`)."""
    if meta.invariant:
        return shrink_tiled(x, A, meta, ranks)
    T, R = x.shape[0], A.shape[1]
    src = x if meta.order is None else x.index_select(0, meta.order)  # [T, K] sorted by slot
    ys = x.new_zeros(T, R)
    for slot, s, e in meta.runs:
        r = _rank_of(ranks, slot, R)
        if r == R:
            torch.mm(src[s:e], A[slot].T, out=ys[s:e])
        elif r > 0:
            ys[s:e, :r] = src[s:e] @ A[slot, :r].T
    return ys if meta.order is None else ys.index_select(0, inverse_order(meta))


@dataclass(frozen=True)
class TilePlan:
    """Deterministic mode's one-GEMM-per-run layout, every GEMM on a whole number of row tiles.

    A run of `invariant.SPLIT_ROWS` tokens or more, contiguous in token order, computes its whole
    tiles in place (`direct`); every other token (short runs, the last partial tile of long ones,
    runs that are not contiguous) is gathered into one buffer (`src`) where each run's part is
    padded to whole tiles (`spans`), its results read back through `rows` / `cells`.
    """

    direct: tuple[tuple[int, int, int], ...]  # (slot, first token, end token), whole tiles in place
    spans: tuple[tuple[int, int, int], ...]  # (slot, first row, end row) of the buffer
    src: torch.Tensor  # [P] token feeding each buffer row; padding rows repeat a real token of the run
    rows: torch.Tensor  # [n] the tokens computed in the buffer
    cells: torch.Tensor  # [n] their buffer rows


def tile_plan(meta: LoraMeta) -> TilePlan:
    """The `TilePlan` of `meta` (built once per step)."""

    def build() -> TilePlan:
        direct, spans, src, rows, cells = [], [], [], [], []
        for slot, s, e in meta.runs:
            tokens = list(range(s, e)) if meta.order is None else meta.order[s:e].tolist()
            n = e - s
            whole = n - n % invariant.ROW_TILE if meta.order is None and n >= invariant.SPLIT_ROWS else 0
            if whole:
                direct.append((slot, s, s + whole))
            rest = tokens[whole:]
            if rest:
                first, width = len(src), invariant.tiled(len(rest))
                src.extend(rest[min(j, len(rest) - 1)] for j in range(width))
                spans.append((slot, first, first + width))
                rows.extend(rest)
                cells.extend(range(first, first + len(rest)))
        dev = meta.token_slot.device

        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=dev)

        return TilePlan(tuple(direct), tuple(spans), index(src), index(rows), index(cells))

    return meta.cached("torch.tile_plan", build)


def shrink_tiled(x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: Sequence[int] | None = None) -> torch.Tensor:
    """`lora_shrink` in deterministic mode: one GEMM per run on whole row tiles (`TilePlan`) over
    all R rank columns (masked after): the very GEMM one item of the tiled grid's bmm runs
    (measured: mm equals bmm item for item), so a token's bits do not depend on the strategy."""
    plan, R = tile_plan(meta), A.shape[1]
    ys = x.new_zeros(x.shape[0], R)
    for slot, s, e in plan.direct:
        if _rank_of(ranks, slot, R):
            torch.mm(x[s:e], A[slot].T, out=ys[s:e])
    if plan.spans:
        xs = x.index_select(0, plan.src)
        buf = x.new_zeros(xs.shape[0], R)
        for slot, a, b in plan.spans:
            if _rank_of(ranks, slot, R):
                torch.mm(xs[a:b], A[slot].T, out=buf[a:b])
        ys.index_copy_(0, plan.rows, buf.index_select(0, plan.cells))
    short = _short_rank_mask(meta, ranks, R)
    return ys if short is None else ys.masked_fill_(short, 0)


def expand_tiled(
    y: torch.Tensor,
    B: torch.Tensor,
    meta: LoraMeta,
    out: torch.Tensor,
    offset: int = 0,
    ranks: Sequence[int] | None = None,
) -> None:
    """`lora_expand` in deterministic mode: as `shrink_tiled`, adding into `out` with one rounding
    (`addmm_`, which equals one item of `baddbmm_`)."""
    plan, N, R = tile_plan(meta), B.shape[1], B.shape[2]
    short = _short_rank_mask(meta, ranks, R)
    yk = y if short is None else y.masked_fill(short, 0)
    view = out.narrow(1, offset, N)  # [T, N]
    for slot, s, e in plan.direct:
        if _rank_of(ranks, slot, R):
            view[s:e].addmm_(yk[s:e], B[slot].T)
    if plan.spans:
        acc, ys = view.index_select(0, plan.src), yk.index_select(0, plan.src)
        for slot, a, b in plan.spans:
            if _rank_of(ranks, slot, R):
                acc[a:b].addmm_(ys[a:b], B[slot].T)
        view.index_copy_(0, plan.rows, acc.index_select(0, plan.cells))


def expand_runs(
    y: torch.Tensor,
    B: torch.Tensor,
    meta: LoraMeta,
    out: torch.Tensor,
    offset: int = 0,
    ranks: Sequence[int] | None = None,
) -> None:
    """`lora_expand` as one GEMM per slot run, at each slot's real rank (`meta.invariant`: `expand_tiled`)."""
    if meta.invariant:
        expand_tiled(y, B, meta, out, offset, ranks)
        return
    N, R = B.shape[1], B.shape[2]
    view = out.narrow(1, offset, N)  # [T, N]
    if meta.order is None:
        for slot, s, e in meta.runs:
            r = _rank_of(ranks, slot, R)
            if r > 0:
                view[s:e].addmm_(y[s:e, :r], B[slot, :, :r].T)
        return
    ys = y.index_select(0, meta.order)  # [T, R] sorted by slot
    upd = y.new_zeros(meta.num_tokens, N)  # sorted; rows of slot -1 tokens (sorted first) stay zero
    for slot, s, e in meta.runs:
        r = _rank_of(ranks, slot, R)
        if r > 0:
            torch.mm(ys[s:e, :r], B[slot, :, :r].T, out=upd[s:e])
    view.add_(upd.index_select(0, inverse_order(meta)))


def lora_shrink(x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: Sequence[int] | None = None) -> torch.Tensor:
    """y[T, R] = x[t] @ A[slot[t], :r].T per token, zero rows for slot -1; see `reference`."""
    if not meta.runs:
        return x.new_zeros(x.shape[0], A.shape[1])
    if use_bmm(meta, A.shape[2], A.shape[1], x.dtype):
        return shrink_bmm(x, A, meta, ranks)
    return shrink_runs(x, A, meta, ranks)


def lora_expand(
    y: torch.Tensor,
    B: torch.Tensor,
    meta: LoraMeta,
    out: torch.Tensor,
    offset: int = 0,
    ranks: Sequence[int] | None = None,
) -> None:
    """out[t, offset:offset+N] += y[t, :r] @ B[slot[t], :, :r].T in place; see `reference`."""
    if not meta.runs:
        return
    if use_bmm(meta, B.shape[1], B.shape[2], y.dtype):
        expand_bmm(y, B, meta, out, offset, ranks)
    else:
        expand_runs(y, B, meta, out, offset, ranks)


def lora_weigh(y: torch.Tensor, meta: LoraMeta) -> None:
    """y[t] *= token_weight[t] in place (the product in float32, rounded once); see `reference`."""
    if meta.token_weight is not None:
        torch.mul(y, meta.token_weight[:, None], out=y)
