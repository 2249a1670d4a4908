"""`MultiLoraLinear`: a fused base linear whose sub-projections each carry per-slot LoRA buffers.

The base weight `[N, in]` is the row-concatenation of sub-projections (q|k|v, gate|up, or a
single one) with out sizes `splits`. For sub-projection j and slot s the buffers hold
`A[j][s] [R, in]` and `B[j][s] [n_j, R]` (scale folded into B); `ranks[j][s]` is the real rank
(0 = the adapter in slot s does not target this module). Per token t with slot `k = slot[t]`:

    out[t] = x[t] @ W.T (+ bias) + sum_j  place_j( x[t] @ A[j][k, :r].T @ B[j][k, :, :r].T )

where place_j writes at column offset sum(splits[:j]). Tokens with slot -1 get the base only.
A token of an adapter mix with parts (k_i, w_i) adds w_i times the term of slot k_i for each
part, one pass of the ops per part (`LoraMeta.passes`, weights applied by `lora_weigh`).
DoRA and biases (`adapter_extras`) add a per-slot, per-row term, from two `[S, n_j]` tables in the
weight dtype: `gm1[j][k]` = g - 1 (g = m / ||W_j + scale * B @ A||, per output row, formed once in
float32 by `set_slot` from the base weight) and `bias_delta[j][k]` (scale * lora_B bias, plus the
adapter's trained base bias minus the model's). A DoRA slot's B is stored as g * scale * B, so

    out[t] += place_j( gm1[j][k] * (x[t] @ W_j.T) + bias_delta[j][k] )     (x @ W_j.T: the dense term minus bias)

which is PEFT's y = base(x) + (g - 1) * (x @ W.T) + g * scale * (x @ A.T @ B.T) (+ its biases). The
term is a torch gather-and-multiply on the rows of tokens whose slot has one (`torch.where`: other
rows keep their bits), skipped entirely when no slot of the batch has one; in a mix it is weighted
like the part's LoRA term. Both tables are zero for plain slots; they count in `ModelSpec.slot_bytes`.
Buffers are allocated once per slot count (`resize`) and written only on adapter activation.
`merge(slot)` folds one slot's adapter into `weight` (W = (1 + gm1) * W0 + B @ A per row, PEFT's
g * (W0 + scale * B @ A)) and its bias delta into `bias`, keeping the originals for `unmerge`.
The LoRA term of all sub-projections is one shrink, x[t] @ [A[0][k, :r]; ...; A[J-1][k, :r]].T ->
y [T, J*r] (sub j's ranks at columns [j*r, j*r + r), r the largest rank of any sub-projection and
slot), then one expand per sub-projection from its columns y[:, j*r : j*r + w_j] (w_j =
max(ranks[j])), adding straight into out's columns of j. So a rank-16 mix costs rank-16 FLOPs even
when `max_rank` is 64. The ops get no ranks, every slot is read at the op's width: `set_slot`
zeroes A and B past a slot's rank, so those columns add exact zeros (for finite activations)
and no rank mask runs. The ops' weights are dense copies of the rank slices (`_operands`), made
on the first step after the adapters change and kept until `set_slot` or `resize`: a slice of a
max_rank-wide buffer has gaps between slots, which torch's bfloat16 CPU bmm would copy on every
call. They take at most the size of the buffers (r / max_rank of A, w_j / max_rank of B, nothing
for a full-width B) and are not counted in `ModelSpec.slot_bytes`. `dense` computes the base term: `F.linear`, or in
deterministic mode the row-invariant `loracli.kernels.invariant.linear`. In deterministic mode
(`LoraMeta.invariant`) r and every w_j are rounded up to whole tiles of `invariant.RANK_TILE` (at
most `max_rank`), so a slot's results do not change when an adapter of another rank comes or goes;
the shrink's J*r columns are whole tiles as well, and a column's bits do not depend on how many
tiles its GEMM has (`kernels.invariant`), so grouping the shrink changed no bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..kernels import LoraMeta, invariant, lora_expand, lora_shrink, lora_weigh

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
        self.dense_ops: dict[tuple[int, ...], tuple[torch.Tensor, list[torch.Tensor]]] = {}  # see `_operands`
        self.gm1: list[torch.Tensor] = []  # per j [S, n_j]: DoRA g - 1, zero for other slots
        self.bias_delta: list[torch.Tensor] = []  # per j [S, n_j]: the slot's bias change, zero when none
        self.dora: list[list[bool]] = []  # per j, per slot: gm1 is in use
        self.biased: list[list[bool]] = []  # per j, per slot: bias_delta is in use
        self.saved: torch.Tensor | None = None  # the base weight while an adapter is merged into it
        self.saved_bias: torch.Tensor | None = None  # the base bias while a merged adapter changed it
        self.bias_merged = False
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
        self.dense_ops = {}
        old_extras = (self.gm1, self.bias_delta, self.dora, self.biased)
        self.gm1 = [torch.zeros(n_slots, n, device=dev, dtype=dt) for n in self.splits]
        self.bias_delta = [torch.zeros(n_slots, n, device=dev, dtype=dt) for n in self.splits]
        self.dora = [[False] * n_slots for _ in self.splits]
        self.biased = [[False] * n_slots for _ in self.splits]
        for new, src in enumerate(keep or []):
            if src is None or src < 0:
                continue
            for j in range(len(self.splits)):
                self.A[j][new].copy_(old[0][j][src])
                self.B[j][new].copy_(old[1][j][src])
                self.ranks[j][new] = old[2][j][src]
                self.gm1[j][new].copy_(old_extras[0][j][src])
                self.bias_delta[j][new].copy_(old_extras[1][j][src])
                self.dora[j][new] = old_extras[2][j][src]
                self.biased[j][new] = old_extras[3][j][src]

    def merge(self, slot: int) -> bool:
        """Fold the adapter in `slot` into the base weight: W = (1 + gm1) * W0 + B @ A per sub-projection
        (gm1 = 0 but for DoRA), and its bias delta into the bias.

        The weight is formed in float32 and rounded once. W0 (and the bias, when it changes) are kept
        (`self.saved`, `self.saved_bias`) so `unmerge` restores them bit for bit. Returns whether
        anything changed.
        """
        if self.saved is not None:
            raise RuntimeError("already merged")
        subs = range(len(self.splits))
        if not any(self.ranks[j][slot] or self.dora[j][slot] or self.biased[j][slot] for j in subs):
            return False
        self.saved = self.weight.clone()
        merged = self.saved.to(torch.float32, copy=True)  # a copy even when the weight is float32
        for j, (off, n) in enumerate(zip(self.offsets, self.splits, strict=True)):
            r = self.ranks[j][slot]
            if self.dora[j][slot]:
                merged[off : off + n] *= 1 + self.gm1[j][slot].float()[:, None]  # g * W0
            if r:
                merged[off : off + n] += self.B[j][slot, :, :r].float() @ self.A[j][slot, :r].float()
        self.weight.copy_(merged)
        self._merge_bias(slot)
        return True

    def _merge_bias(self, slot: int) -> None:
        """Set `bias` to the base bias plus the slot's bias delta (a new tensor; the base one is kept)."""
        if not any(self.biased[j][slot] for j in range(len(self.splits))):
            return
        delta = torch.cat([self.bias_delta[j][slot].float() for j in range(len(self.splits))])  # [N]
        base = self.bias.float() if self.bias is not None else torch.zeros_like(delta)
        self.saved_bias, self.bias_merged = self.bias, True
        self.bias = (base + delta).to(self.weight.dtype)

    def unmerge(self) -> None:
        if self.saved is not None:
            self.weight.copy_(self.saved)
            self.saved = None
        if self.bias_merged:
            self.bias, self.saved_bias, self.bias_merged = self.saved_bias, None, False

    def set_slot(
        self,
        slot: int,
        j: int,
        a: torch.Tensor | None,
        b: torch.Tensor | None,
        magnitude: torch.Tensor | None = None,
    ) -> None:
        """Write sub-projection j of `slot`: a [r, in], b [n_j, r] (scaled), or clear it when None.

        With a DoRA `magnitude` [n_j], g is formed from the base weight, b stored as g * b, and g - 1 kept.
        """
        r = 0 if a is None else a.shape[0]
        self.dense_ops = {}
        self.dora[j][slot] = magnitude is not None and a is not None and b is not None and r > 0
        if self.dora[j][slot]:
            g = self.dora_factor(j, a, b, magnitude)  # [n_j] float32
            b = (b.float() * g[:, None]).to(self.B[j].dtype)
            self.gm1[j][slot].copy_(g - 1)
        else:
            self.gm1[j][slot].zero_()
        if r:
            self.A[j][slot, :r].copy_(a)
            self.B[j][slot, :, :r].copy_(b)
        if r < self.max_rank:  # zero past the rank: the ops may read these columns
            self.A[j][slot, r:].zero_()
            self.B[j][slot, :, r:].zero_()
        self.ranks[j][slot] = r

    def dora_factor(self, j: int, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        """g [n_j] = magnitude / ||W0_j + b @ a|| per output row (bias excluded, W0 the unmerged base), float32."""
        off, n = self.offsets[j], self.splits[j]
        base = (self.saved if self.saved is not None else self.weight)[off : off + n].float()  # [n_j, in]
        norm = torch.linalg.norm(base + b.float() @ a.float(), dim=1)
        return magnitude.to(device=norm.device, dtype=torch.float32) / norm

    def set_bias(self, slot: int, j: int, added: torch.Tensor | None, replaced: torch.Tensor | None) -> None:
        """Write sub-projection j's bias change for `slot`: `added` [n_j] (scale * lora_B bias) plus
        `replaced` [n_j] (the adapter's bias for this module) minus the model's base bias; None: none."""
        off, n = self.offsets[j], self.splits[j]
        delta = torch.zeros(n, dtype=torch.float32, device=self.weight.device)
        if added is not None:
            delta += added.to(delta)
        base = self.saved_bias if self.bias_merged else self.bias
        if replaced is not None:
            delta += replaced.to(delta) - (base[off : off + n].float() if base is not None else 0)
        self.bias_delta[j][slot].copy_(delta)
        self.biased[j][slot] = bool(delta.any())

    def __call__(self, x: torch.Tensor, meta: LoraMeta | None) -> torch.Tensor:
        out = self.dense(x, self.weight, self.bias)  # [T, N]
        if meta is None or not meta.any_lora:
            return out
        extras = [self._extra_term(j, out, meta) for j in range(len(self.splits))]  # from the dense term
        self._add_lora(x, out, meta)
        for j, extra in enumerate(extras):
            if extra is not None:
                rows, term = extra
                cols = out[:, self.offsets[j] : self.offsets[j] + self.splits[j]]
                cols.copy_(torch.where(rows[:, None], cols + term, cols))
        return out

    def _rank_columns(self, ranks: list[int], meta: LoraMeta) -> int:
        """The rank columns an op computes for `ranks`: their max (buffers are zero past each slot's rank),
        in deterministic mode rounded up to whole `invariant.RANK_TILE`s (at most `max_rank`)."""
        r = max(ranks)
        return min(self.max_rank, invariant.tiled(r, invariant.RANK_TILE)) if meta.invariant and r else r

    def _add_lora(self, x: torch.Tensor, out: torch.Tensor, meta: LoraMeta) -> None:
        """out[:, place_j] += each token's x @ A[j].T @ B[j].T for every sub-projection j (weighted per part
        of a mix): one shrink of all J sub-projections at once, then one expand per sub-projection."""
        widths = [self._rank_columns(ranks, meta) for ranks in self.ranks]  # each expand's rank columns
        r = max(widths)  # the shrink's rank columns per sub-projection
        if r == 0:
            return
        A, B = self._operands(r, widths)  # [S, J*r, in], per j [S, n_j, widths[j]]
        for part in meta.passes():  # one pass, or one per adapter of a mix (weighted)
            y = lora_shrink(x, A, part)  # [T, J*r]: sub j's ranks at columns [j*r, j*r + r)
            if part.token_weight is not None:  # a batch with mixes: each token's weight for this part
                lora_weigh(y, part)
            for j, w in enumerate(widths):
                if w:
                    lora_expand(y[:, j * r : j * r + w], B[j], part, out, self.offsets[j])

    def _operands(self, r: int, widths: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(A [S, J*r, in], per j B[j] [S, n_j, widths[j]]): the ops' weights, dense (no gaps between slots).

        A stacks the first r rank rows of every sub-projection, sub j at rows [j*r, j*r + r). The rank
        slices of the buffers have gaps between slots, which torch's bfloat16 CPU bmm copies on every
        call; so the operands are copied here once per rank width and reused until `set_slot` or `resize`
        changes a buffer (at r = max_rank, a B, or the A of a single sub-projection, is the buffer itself).
        """
        key = (r, *widths)
        ops = self.dense_ops.get(key)
        if ops is None:
            A = torch.cat([a[:, :r] for a in self.A], dim=1) if len(self.A) > 1 else self.A[0][:, :r].contiguous()
            B = [b[:, :, :w].contiguous() for b, w in zip(self.B, widths, strict=True)]
            ops = self.dense_ops[key] = (A, B)
        return ops

    def _extra_term(self, j: int, out: torch.Tensor, meta: LoraMeta) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows [T] bool, term [T, n_j]): gm1 * (x @ W_j.T) + bias_delta of each token's slot, on the rows
        of tokens whose slot has either (weighted in a mix); None when no slot of the batch has one."""
        rows: torch.Tensor | None = None
        term: torch.Tensor | None = None
        for part in meta.passes():
            used = [s for s, _, _ in part.runs if self.dora[j][s] or self.biased[j][s]]
            if not used:
                continue
            slot = part.token_slot.clamp(min=0)  # [T]; rows outside `used` are masked out below
            t = self.bias_delta[j][slot]  # [T, n_j]
            if any(self.dora[j][s] for s in used):
                t = t + self.gm1[j][slot] * self._dense_without_bias(j, out)
            if part.token_weight is not None:
                t = t * part.token_weight[:, None].to(t.dtype)
            mask = torch.isin(part.token_slot, torch.tensor(used, device=slot.device))
            rows = mask if rows is None else rows | mask
            term = t if term is None else term + t
        return None if term is None or rows is None else (rows, term)

    def _dense_without_bias(self, j: int, out: torch.Tensor) -> torch.Tensor:
        """x @ W_j.T [T, n_j]: sub-projection j of the dense term, its bias taken off (as PEFT's DoRA does)."""
        off, n = self.offsets[j], self.splits[j]
        cols = out[:, off : off + n]
        return cols - self.bias[off : off + n] if self.bias is not None else cols
