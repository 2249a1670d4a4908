"""`MultiLoraLinear`: a fused base linear whose sub-projections each carry per-slot LoRA buffers.

The base weight `[N, in]` is the row-concatenation of sub-projections (q|k|v, gate|up, or a
single one) with out sizes `splits`. For sub-projection j and slot s the buffers hold
`A[j][s] [R, in]` and `B[j][s] [n_j, R]` (scale folded into B); `ranks[j][s]` is the real rank
(0 = the adapter in slot s does not target this module). Per token t with slot `k = slot[t]`:

    out[t] = x[t] @ W.T (+ bias) + sum_j  place_j( x[t] @ A[j][k, :r].T @ B[j][k, :, :r].T )

where place_j writes at column offset sum(splits[:j]). Tokens with slot -1 get the base only.
Buffers are allocated once per slot count (`resize`) and written only on adapter activation.
`merge(slot)` folds one slot's adapter into `weight` (keeping the original for `unmerge`).
The ops run on the first `max(ranks[j])` rank columns only (views, no copy), so a rank-16 mix
costs rank-16 FLOPs even when `max_rank` is 64. `dense` computes the base term: `F.linear`, or in
deterministic mode the row-invariant `loracli.kernels.invariant.linear`. In deterministic mode
(`LoraMeta.invariant`) the rank columns are rounded up to whole tiles of `invariant.RANK_TILE` (at
most `max_rank`), so a slot's results do not change when an adapter of another rank comes or goes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..kernels import LoraMeta, invariant, lora_expand, lora_shrink

Dense = Callable[..., torch.Tensor]  # the base term: (x, weight, bias) -> x @ weight.T (+ bias), as F.linear


class MultiLoraLinear:
    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        splits: list[int],
        names: list[str],
        in_features: int,
        n_slots: int,
        max_rank: int,
        dense: Dense = F.linear,
    ):
        self.weight = weight  # [N, in]
        self.dense = dense
        self.bias = bias  # [N] or None
        self.splits = splits
        self.names = names
        self.offsets = [sum(splits[:j]) for j in range(len(splits))]
        self.in_features = in_features
        self.max_rank = max_rank
        self.A: list[torch.Tensor] = []
        self.B: list[torch.Tensor] = []
        self.ranks: list[list[int]] = []
        self.saved: torch.Tensor | None = None  # the base weight while an adapter is merged into it
        self.resize(n_slots)

    @property
    def n_slots(self) -> int:
        return len(self.ranks[0]) if self.ranks else 0

    def resize(self, n_slots: int, keep: list[int] | None = None) -> None:
        """Reallocate buffers for `n_slots` slots; new slot i takes old slot keep[i] (or empty)."""
        dev, dt, R = self.weight.device, self.weight.dtype, self.max_rank
        old = (self.A, self.B, self.ranks)
        # Uninitialised: a slot is read only after `set_slot` wrote all of it (weights, then zeros past
        # the rank), so no zero-fill pass, and on CPU unused slots cost no resident memory.
        self.A = [torch.empty(n_slots, R, self.in_features, device=dev, dtype=dt) for _ in self.splits]
        self.B = [torch.empty(n_slots, n, R, device=dev, dtype=dt) for n in self.splits]
        self.ranks = [[0] * n_slots for _ in self.splits]
        for new, src in enumerate(keep or []):
            if src is None or src < 0:
                continue
            for j in range(len(self.splits)):
                self.A[j][new].copy_(old[0][j][src])
                self.B[j][new].copy_(old[1][j][src])
                self.ranks[j][new] = old[2][j][src]

    def merge(self, slot: int) -> bool:
        """Fold the adapter in `slot` into the base weight: W = W0 + B @ A per sub-projection.

        The delta is formed in float32 and added to W0 in float32, rounded once. W0 is kept
        (`self.saved`) so `unmerge` restores it bit for bit. Returns whether anything changed.
        """
        if self.saved is not None:
            raise RuntimeError("already merged")
        if not any(self.ranks[j][slot] for j in range(len(self.splits))):
            return False
        self.saved = self.weight.clone()
        merged = self.saved.to(torch.float32, copy=True)  # a copy even when the weight is float32
        for j, (off, n) in enumerate(zip(self.offsets, self.splits, strict=True)):
            r = self.ranks[j][slot]
            if r:
                merged[off : off + n] += self.B[j][slot, :, :r].float() @ self.A[j][slot, :r].float()
        self.weight.copy_(merged)
        return True

    def unmerge(self) -> None:
        if self.saved is not None:
            self.weight.copy_(self.saved)
            self.saved = None

    def set_slot(self, slot: int, j: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Write sub-projection j of `slot`: a [r, in], b [n_j, r] (scaled), or clear it when None."""
        r = 0 if a is None else a.shape[0]
        if r:
            self.A[j][slot, :r].copy_(a)
            self.B[j][slot, :, :r].copy_(b)
        if r < self.max_rank:  # zero past the rank: the ops may read these columns
            self.A[j][slot, r:].zero_()
            self.B[j][slot, :, r:].zero_()
        self.ranks[j][slot] = r

    def __call__(self, x: torch.Tensor, meta: LoraMeta | None) -> torch.Tensor:
        out = self.dense(x, self.weight, self.bias)  # [T, N]
        if meta is None or not meta.any_lora:
            return out
        for j in range(len(self.splits)):
            ranks = self.ranks[j]
            r = max(ranks)  # buffers are zero past each slot's rank: compute only r <= R columns
            if r == 0:
                continue
            if meta.invariant:
                r = min(self.max_rank, invariant.tiled(r, invariant.RANK_TILE))
            y = lora_shrink(x, self.A[j][:, :r], meta, ranks)  # [T, r]
            lora_expand(y, self.B[j][:, :, :r], meta, out, self.offsets[j], ranks)
        return out
