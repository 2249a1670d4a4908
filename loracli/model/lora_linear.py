"""`MultiLoraLinear`: a fused base linear whose sub-projections each carry per-slot LoRA buffers.

The base weight `[N, in]` is the row-concatenation of sub-projections (q|k|v, gate|up, or a
single one) with out sizes `splits`. Sub-projection j of slot s holds an adapter's A_js [r_js, in]
and B_js [n_j, r_js] (scale folded into B); `ranks[j][s]` = r_js is the real rank (0 = the adapter
in slot s does not target this module). Per token t with slot `k = slot[t]`:

    out[t] = x[t] @ W.T (+ bias) + sum_j  place_j( x[t] @ A_jk.T @ B_jk.T )

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
`merge(slot)` folds one slot's adapter into `weight` (W = (1 + gm1) * W0 + B @ A per row, PEFT's
g * (W0 + scale * B @ A)) and its bias delta into `bias`, keeping the originals for `unmerge`.

Layout: the buffers are the ops' operands, at the width the slots' adapters need (`layout`):

    A     [S, J*r, in]      sub j's rank rows at [j*r, j*r + r)
    B[j]  [S, n_j, w_j]

w_j = the largest rank of sub-projection j over the slots, r = max_j w_j; in deterministic mode
(the row-invariant dense term, `loracli.kernels.invariant.linear`) every w_j is rounded up to whole
tiles of `invariant.RANK_TILE` (at most `max_rank`), so a slot's results do not change when an
adapter of another rank comes or goes (a column's bits do not depend on how many tiles its GEMM
has). A slot's adapter takes the first r_js rows / columns of its part, zeros the rest, so the ops
read every slot at the full width without rank masks (the zeros add exact zeros for finite
activations). The LoRA term of all sub-projections is one shrink, x @ A[k].T -> y [T, J*r], then
one expand per sub-projection from its columns y[:, j*r : j*r + w_j], adding straight into out's
columns of j: a rank-16 mix costs rank-16 FLOPs even when `max_rank` is 64. A and the B[j] are
contiguous views of the first elements of flat buffers allocated by `resize` at `max_rank`
everywhere (`_storage`: the size `ModelSpec.slot_bytes` counts), so no other copy of them is
made; when the widths change (`set_slot`, or `fit` once per adapter written), `_relayout` moves the
written slots in place. The buffers are uninitialised: a slot is read only once `set_slot` wrote it
(zeros first, then its parts), so on CPU the pages of unused slots and past the prefix in use are
never made resident. `dense` computes the base term: `F.linear`, or in deterministic mode
`invariant.linear`.
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
        # deterministic mode (the row-invariant dense term): rank columns in whole tiles
        self.rank_tile = invariant.RANK_TILE if dense is invariant.linear else 1
        self.bias = bias  # [N] or None
        self.splits = splits
        self.names = names
        self.offsets = [sum(splits[:j]) for j in range(len(splits))]
        self.in_features = in_features
        self.max_rank = max_rank
        self.width = 0  # r: rank rows of each sub-projection in A
        self.widths = [0] * len(splits)  # w_j: rank columns of B[j]
        self.stores: tuple[torch.Tensor, list[torch.Tensor]] = (weight.new_empty(0), [])  # see `_storage`
        self.A = weight.new_empty(0, 0, in_features)  # [S, J*r, in]: sub j's rows at [j*r, j*r + r)
        self.B: list[torch.Tensor] = [weight.new_empty(0, n, 0) for n in splits]  # per j [S, n_j, w_j]
        self.ranks: list[list[int]] = []
        self.written: list[bool] = []  # per slot: `set_slot` wrote it (else it holds garbage, never read)
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

    def layout(self, ranks: list[list[int]]) -> tuple[int, list[int]]:
        """(r, [w_j]) for slot ranks `ranks[j][s]`: w_j = the largest rank of sub-projection j, in
        deterministic mode rounded up to whole `invariant.RANK_TILE`s (at most `max_rank`); r = max w_j."""
        tops = [max(rs, default=0) for rs in ranks]
        widths = [min(self.max_rank, invariant.tiled(top, self.rank_tile)) if top else 0 for top in tops]
        return max(widths, default=0), widths

    def slot_rows(self, j: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of sub-projection j of `slot`: (A rows [r, in], B [n_j, w_j]); the slot's adapter in the
        first `ranks[j][slot]` rows / columns, zeros past them."""
        r = self.width
        return self.A[slot, j * r : j * r + r], self.B[j][slot]

    def _storage(self, n_slots: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Flat buffers for `n_slots` slots at `max_rank` everywhere (what `ModelSpec.slot_bytes` counts),
        laid out at any width in a prefix (`_views`). Uninitialised: a slot is read only once `set_slot`
        wrote it, so on CPU the pages past the prefix in use, and unused slots, are never made resident."""
        dev, dt, R = self.weight.device, self.weight.dtype, self.max_rank
        a = torch.empty(n_slots * len(self.splits) * R * self.in_features, device=dev, dtype=dt)
        return a, [torch.empty(n_slots * n * R, device=dev, dtype=dt) for n in self.splits]

    def _views(self, n_slots: int, width: int, widths: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(A [S, J*r, in], per j B[j] [S, n_j, w_j]): contiguous views of the storage's first elements."""
        a, bs = self.stores
        J = len(self.splits)
        A = a[: n_slots * J * width * self.in_features].view(n_slots, J * width, self.in_features)
        B = [b[: n_slots * n * w].view(n_slots, n, w) for b, n, w in zip(bs, self.splits, widths, strict=True)]
        return A, B

    def buffer_bytes(self) -> int:
        """Bytes allocated for the slots: A and B at `max_rank`, the DoRA and bias tables."""
        tensors = (self.stores[0], *self.stores[1], *self.gm1, *self.bias_delta)
        return sum(t.numel() * t.element_size() for t in tensors)

    def _place_a(self, A: torch.Tensor, width: int, slot: int, old: torch.Tensor) -> None:
        """Write a slot's old A rows `old` [J*r_old, in] into A (laid out at `width`), zeros past them."""
        n, r_old = min(self.width, width), self.width
        for j in range(len(self.splits)):
            A[slot, j * width : j * width + n].copy_(old[j * r_old : j * r_old + n])
            A[slot, j * width + n : j * width + width].zero_()

    @staticmethod
    def _place_b(b: torch.Tensor, slot: int, old: torch.Tensor) -> None:
        """Write a slot's old B columns `old` [n_j, w_old] into b (laid out at its width), zeros past them."""
        w = min(old.shape[-1], b.shape[-1])
        b[slot, :, :w].copy_(old[:, :w])
        b[slot, :, w:].zero_()

    def fit(self, slot: int, ranks: list[int]) -> None:
        """Lay the buffers out for `slot` to take an adapter of rank ranks[j] in each sub-projection j, before
        its `set_slot` calls (which then change no layout): one relayout at most per adapter written. The
        slot's ranks are set now; its weights are stale until those calls."""
        for j, r in enumerate(ranks):
            self.ranks[j][slot] = r
        self._follow_ranks()

    def _follow_ranks(self) -> None:
        """Lay the buffers out again if `ranks` now need other widths."""
        width, widths = self.layout(self.ranks)
        if (width, widths) != (self.width, self.widths):
            self._relayout(width, widths)

    def _relayout(self, width: int, widths: list[int]) -> None:
        """Lay the written slots out again at `width` / `widths`, in place in the same storage. A slot's
        region moves up when it widens and down when it narrows, so the slots are moved from the last
        when a buffer widens and from the first when it narrows: a move never overwrites a slot not yet
        moved (each slot goes through a copy of its own, the one part it may overlap)."""
        A, B = self._views(self.n_slots, width, widths)
        written = [s for s, done in enumerate(self.written) if done]
        if width != self.width:
            for slot in written[::-1] if width > self.width else written:
                self._place_a(A, width, slot, self.A[slot].clone())
        for j, (b, old) in enumerate(zip(B, self.B, strict=True)):
            if widths[j] != self.widths[j]:
                for slot in written[::-1] if widths[j] > self.widths[j] else written:
                    self._place_b(b, slot, old[slot].clone())
        self.A, self.B, self.width, self.widths = A, B, width, widths

    def resize(self, n_slots: int, keep: list[int] | None = None) -> None:
        """Reallocate buffers for `n_slots` slots; new slot i takes old slot keep[i] (or empty)."""
        keep = [src if src is not None and src >= 0 else None for src in keep or []]
        keep += [None] * (n_slots - len(keep))
        ranks = [[self.ranks[j][src] if src is not None else 0 for src in keep] for j in range(len(self.splits))]
        width, widths = self.layout(ranks)
        dev, dt = self.weight.device, self.weight.dtype
        old_A, old_B = self.A, self.B
        self.stores = self._storage(n_slots)
        A, B = self._views(n_slots, width, widths)
        gm1 = [torch.zeros(n_slots, n, device=dev, dtype=dt) for n in self.splits]
        bias_delta = [torch.zeros(n_slots, n, device=dev, dtype=dt) for n in self.splits]
        for dst, src in enumerate(keep):
            if src is None:
                continue
            self._place_a(A, width, dst, old_A[src])
            for j, b in enumerate(B):
                self._place_b(b, dst, old_B[j][src])
                gm1[j][dst].copy_(self.gm1[j][src])
                bias_delta[j][dst].copy_(self.bias_delta[j][src])
        old_flags = (self.dora, self.biased, self.written)
        self.dora = [[src is not None and old_flags[0][j][src] for src in keep] for j in range(len(self.splits))]
        self.biased = [[src is not None and old_flags[1][j][src] for src in keep] for j in range(len(self.splits))]
        self.written = [src is not None and old_flags[2][src] for src in keep]
        self.A, self.B, self.width, self.widths = A, B, width, widths
        self.ranks, self.gm1, self.bias_delta = ranks, gm1, bias_delta

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
                a, b = self.slot_rows(j, slot)
                merged[off : off + n] += b[:, :r].float() @ a[:r].float()
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
        self.dora[j][slot] = magnitude is not None and a is not None and b is not None and r > 0
        if self.dora[j][slot]:
            g = self.dora_factor(j, a, b, magnitude)  # [n_j] float32
            b = (b.float() * g[:, None]).to(self.B[j].dtype)
            self.gm1[j][slot].copy_(g - 1)
        else:
            self.gm1[j][slot].zero_()
        if not self.written[slot]:  # every sub-projection of a slot the ops may read holds zeros or an adapter
            self.written[slot] = True
            self.A[slot].zero_()
            for buffer in self.B:
                buffer[slot].zero_()
        self.ranks[j][slot] = r
        self._follow_ranks()
        rows, cols = self.slot_rows(j, slot)
        if r:
            rows[:r].copy_(a)
            cols[:, :r].copy_(b)
        rows[r:].zero_()  # zero past the rank: the ops read these rows and columns
        cols[:, r:].zero_()

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

    def _add_lora(self, x: torch.Tensor, out: torch.Tensor, meta: LoraMeta) -> None:
        """out[:, place_j] += each token's x @ A[j].T @ B[j].T for every sub-projection j (weighted per part
        of a mix): one shrink of all J sub-projections at once, then one expand per sub-projection."""
        r = self.width
        if r == 0:
            return
        for part in meta.passes():  # one pass, or one per adapter of a mix (weighted)
            y = lora_shrink(x, self.A, part)  # [T, J*r]: sub j's ranks at columns [j*r, j*r + r)
            if part.token_weight is not None:  # a batch with mixes: each token's weight for this part
                lora_weigh(y, part)
            for j, w in enumerate(self.widths):
                if w:
                    lora_expand(y[:, j * r : j * r + w], self.B[j], part, out, self.offsets[j])

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
