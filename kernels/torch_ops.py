"""The CPU path: grouped GEMMs in plain torch, same semantics as `reference`.

Two strategies, picked per step from the slot layout (`strategy`, cached on the meta):

* ``runs``: one GEMM per slot run on contiguous slices (plus one gather/scatter of the whole
  batch when `meta.order` is set). FLOPs are exactly the useful ones and every slot runs at its
  real rank `ranks[slot]`, so rank padding costs memory, never FLOPs. Each run costs two small
  GEMM calls, whose fixed cost (~10-30 us on CPU, worst in bf16) dominates short runs.
* ``bmm``: tokens padded into a [G, L] grid (G used slots, L = most tokens of one slot), then one
  `bmm` for the shrink and one for the expand, whatever the number of slots. Ranks are applied as
  a mask, so a slot of rank r < R costs R columns of FLOPs, and padding cells cost FLOPs too; when
  tokens are already sorted by slot in equal counts (the usual decode batch) no gather is needed.

`bmm` wins when runs are short (decode), `runs` when they are long (prefill): see
`kernels/bench.py` for the measurements behind `BMM_MAX_TOKENS_PER_SLOT`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .meta import LoraMeta

BMM_MAX_TOKENS_PER_SLOT = 64  # bmm when the grid width L is at most this ...
BMM_MAX_PADDING = 2.0  # ... and the grid has at most this many cells per LoRA token


@dataclass(frozen=True)
class SlotGrid:
    """Tokens laid out as a [G, L] grid, row g holding the tokens of `slots[g]` (see module docstring)."""

    slots: tuple[int, ...]  # G used slots, ascending
    width: int  # L: the most tokens any used slot has
    identity: bool  # x itself is the grid: tokens sorted by slot, equal counts, no slot -1
    slot_index: torch.Tensor | None  # [G] int64 slots to gather weights of, None when slots == range(G)
    src: torch.Tensor  # [G*L] token feeding each cell; padding cells repeat a real token of their row
    dst: torch.Tensor  # [T] cell of each token (slot -1 tokens point at cell 0 and are masked)
    cells: torch.Tensor | None  # [n] cells holding real tokens, None when every cell is real
    tokens: torch.Tensor  # [n] token of each real cell
    has_free: bool  # some token has slot -1


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
    src, cells, tokens = [], [], []
    dst = [0] * len(slots)
    for g, s in enumerate(used):
        row = members[s]
        for j in range(width):
            src.append(row[min(j, len(row) - 1)])
        for j, t in enumerate(row):
            dst[t] = g * width + j
            cells.append(g * width + j)
            tokens.append(t)
    identity = src == list(range(len(slots)))
    dev = meta.token_slot.device

    def index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=dev)

    return SlotGrid(
        slots=tuple(used),
        width=width,
        identity=identity,
        slot_index=None if used == list(range(len(used))) else index(used),
        src=index(src),
        dst=index(dst),
        cells=None if len(cells) == len(src) else index(cells),
        tokens=index(tokens),
        has_free=-1 in slots,
    )


def strategy(meta: LoraMeta) -> str:
    """'bmm' for short runs (decode-like steps), 'runs' otherwise; see module docstring."""
    return meta.cached("torch.strategy", lambda: _pick_strategy(meta))


def _pick_strategy(meta: LoraMeta) -> str:
    grid = slot_grid(meta)
    cells = len(grid.slots) * grid.width
    lora_tokens = grid.tokens.numel()
    if grid.width <= BMM_MAX_TOKENS_PER_SLOT and cells <= BMM_MAX_PADDING * lora_tokens:
        return "bmm"
    return "runs"


def _rank_of(ranks: Sequence[int] | None, slot: int, R: int) -> int:
    return R if ranks is None else int(ranks[slot])


def _drop_mask(meta: LoraMeta, ranks: Sequence[int] | None, R: int) -> torch.Tensor | None:
    """[T, R] bool, True where y must be zero (slot -1 rows, columns >= the slot's rank); None if nowhere."""
    grid = slot_grid(meta)
    short = ranks is not None and any(int(ranks[s]) < R for s in grid.slots)
    if not short and not grid.has_free:
        return None
    key = ("torch.drop", R, None if ranks is None else tuple(int(ranks[s]) for s in grid.slots))

    def build() -> torch.Tensor:
        dev = meta.token_slot.device
        rank = torch.zeros(meta.max_slot + 2, dtype=torch.int64, device=dev)  # index -1 -> rank 0
        for s in grid.slots:
            rank[s] = _rank_of(ranks, s, R)
        limit = rank[meta.token_slot]  # [T]
        return torch.arange(R, device=dev)[None, :] >= limit[:, None]

    return meta.cached(key, build)


def _grid_weights(W: torch.Tensor, grid: SlotGrid) -> torch.Tensor:
    """W[slots of the grid]: a slice when they are 0..G-1, else a gather."""
    if grid.slot_index is None:
        return W[: len(grid.slots)]
    return W.index_select(0, grid.slot_index)


def shrink_bmm(
    x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: Sequence[int] | None = None
) -> torch.Tensor:
    """`lora_shrink` as one bmm over the slot grid."""
    grid = slot_grid(meta)
    T, K = x.shape
    G, L, R = len(grid.slots), grid.width, A.shape[1]
    xg = x if grid.identity else x.index_select(0, grid.src)  # [G*L, K]
    yg = torch.bmm(xg.view(G, L, K), _grid_weights(A, grid).transpose(1, 2))  # [G, L, R]
    y = yg.view(T, R) if grid.identity else yg.view(G * L, R).index_select(0, grid.dst)  # [T, R]
    drop = _drop_mask(meta, ranks, R)
    return y if drop is None else y.masked_fill_(drop, 0)


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
    drop = _drop_mask(meta, ranks, R)
    yk = y if drop is None else y.masked_fill(drop, 0)  # [T, R], columns past the rank zeroed
    Bt = _grid_weights(B, grid).transpose(1, 2)  # [G, R, N]
    view = out.narrow(1, offset, N)  # [T, N]
    if grid.identity:
        view.view(G, L, N).baddbmm_(yk.view(G, L, R), Bt)
        return
    upd = torch.bmm(yk.index_select(0, grid.src).view(G, L, R), Bt).view(G * L, N)
    if grid.cells is not None:
        upd = upd.index_select(0, grid.cells)  # [n, N]
    view.index_add_(0, grid.tokens, upd)


def shrink_runs(
    x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: Sequence[int] | None = None
) -> torch.Tensor:
    """`lora_shrink` as one GEMM per slot run, at each slot's real rank."""
    T, R = x.shape[0], A.shape[1]
    src = x if meta.order is None else x.index_select(0, meta.order)  # [T, K] sorted by slot
    ys = x.new_zeros(T, R)
    for slot, s, e in meta.runs:
        r = _rank_of(ranks, slot, R)
        if r == R:
            torch.mm(src[s:e], A[slot].T, out=ys[s:e])
        elif r > 0:
            ys[s:e, :r] = src[s:e] @ A[slot, :r].T
    if meta.order is None:
        return ys
    return torch.empty_like(ys).index_copy_(0, meta.order, ys)


def expand_runs(
    y: torch.Tensor,
    B: torch.Tensor,
    meta: LoraMeta,
    out: torch.Tensor,
    offset: int = 0,
    ranks: Sequence[int] | None = None,
) -> None:
    """`lora_expand` as one GEMM per slot run, at each slot's real rank."""
    N, R = B.shape[1], B.shape[2]
    view = out.narrow(1, offset, N)  # [T, N]
    if meta.order is None:
        for slot, s, e in meta.runs:
            r = _rank_of(ranks, slot, R)
            if r > 0:
                view[s:e].addmm_(y[s:e, :r], B[slot, :, :r].T)
        return
    first = meta.runs[0][1]  # sorted order puts slot -1 tokens first, the runs cover the rest
    ys = y.index_select(0, meta.order[first:])  # [n, R]
    upd = y.new_zeros(ys.shape[0], N)
    for slot, s, e in meta.runs:
        r = _rank_of(ranks, slot, R)
        if r > 0:
            torch.mm(ys[s - first:e - first, :r], B[slot, :, :r].T, out=upd[s - first:e - first])
    view.index_add_(0, meta.order[first:], upd)


def lora_shrink(
    x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: Sequence[int] | None = None
) -> torch.Tensor:
    """y[T, R] = x[t] @ A[slot[t], :r].T per token, zero rows for slot -1; see `reference`."""
    if not meta.runs:
        return x.new_zeros(x.shape[0], A.shape[1])
    if strategy(meta) == "bmm":
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
    if strategy(meta) == "bmm":
        expand_bmm(y, B, meta, out, offset, ranks)
    else:
        expand_runs(y, B, meta, out, offset, ranks)
