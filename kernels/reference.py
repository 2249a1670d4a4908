"""The specification of the multi-LoRA ops: slow, obvious, float32. Every backend is tested against it.

Shapes (T tokens, S slots, R max rank, K = in features, N = one sub-projection's out features):

    x          [T, K]     activations, one row per token
    A          [S, R, K]  LoRA down-projections, slot s uses rows A[s, :ranks[s]]
    B          [S, N, R]  LoRA up-projections (scale already folded in), slot s uses B[s, :, :ranks[s]]
    y          [T, R]     shrink result
    out        [T, M]     output the expand adds into, at columns [offset, offset + N), M >= offset + N
    meta       LoraMeta   from `build_meta(token_slot)`; only `meta.token_slot` is read here (and
                          `meta.token_weight` [T] float32 by `lora_weigh`)
    ranks      optional sequence indexed by slot, 0 <= ranks[s] <= R; None means every slot has rank R

Semantics, for every token t with slot s = token_slot[t] and r = ranks[s]:

    lora_shrink:  y[t, :r] = x[t] @ A[s, :r].T      y[t, r:] = 0
    lora_expand:  out[t, offset:offset + N] += y[t, :r] @ B[s, :, :r].T   (y[t, r:] is ignored)

    lora_weigh:   y[t, :] = y[t, :] * token_weight[t]   (in place; no change when token_weight is None)

lora_weigh is how adapter mixes run (`LoraMeta.passes`): per pass, shrink, weigh, expand, so a
token with parts (s_i, w_i) gets out[t] += sum_i w_i * (x[t] @ A[s_i].T @ B[s_i].T), each pass's
expand rounded once into out, the passes added in order. Its product is taken in float32 and
rounded once into y's dtype; rows of slot -1 stay zero. Cost: a batch without mixes has one pass
and no weights (nothing extra runs); pass k > 0 holds only the tokens with a k-th part (the
others have slot -1, which every backend skips), and the weigh is one multiply of [T, r] per
pass, far below the shrink's [T, K] x [K, r] (tests/test_adapter_mixes.py times both).

Tokens with slot -1 get y[t] = 0 and leave out[t] untouched; so do slots of rank 0. The operands
of one op share one floating dtype (x and A; y, B and out). The sums are taken in float32; shrink
returns y in x's dtype and expand rounds the float32 sum `out + update` once into out's dtype.
Columns of out outside [offset, offset + N) never change. The argument checks here are shared by
every backend (the dispatcher calls them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .meta import LoraMeta


def _check_slots(meta: LoraMeta, T: int, S: int, R: int, ranks: Sequence[int] | None) -> None:
    """Raise ValueError unless meta covers T tokens, uses slots < S, and ranks fit in [0, R]."""
    if meta.num_tokens != T:
        raise ValueError(f"meta describes {meta.num_tokens} tokens, the input has {T}")
    if meta.max_slot >= S:
        raise ValueError(f"token slot {meta.max_slot} out of range for {S} slots")
    if ranks is not None:
        if len(ranks) < meta.max_slot + 1:
            raise ValueError(f"ranks has {len(ranks)} entries, slot {meta.max_slot} is used")
        if ranks and not 0 <= min(ranks) <= max(ranks) <= R:
            raise ValueError(f"ranks must lie in [0, {R}], got {list(ranks)}")


def check_shrink(x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: Sequence[int] | None) -> None:
    """Validate the arguments of `lora_shrink` (see module docstring); raise ValueError."""
    if x.dim() != 2 or A.dim() != 3 or x.shape[1] != A.shape[2]:
        raise ValueError(f"lora_shrink wants x [T, K] and A [S, R, K], got {tuple(x.shape)} and {tuple(A.shape)}")
    if x.dtype != A.dtype:
        raise ValueError(f"lora_shrink wants one dtype, got x {x.dtype} and A {A.dtype}")
    _check_slots(meta, x.shape[0], A.shape[0], A.shape[1], ranks)


def check_expand(
    y: torch.Tensor,
    B: torch.Tensor,
    meta: LoraMeta,
    out: torch.Tensor,
    offset: int,
    ranks: Sequence[int] | None,
) -> None:
    """Validate the arguments of `lora_expand` (see module docstring); raise ValueError."""
    if y.dim() != 2 or B.dim() != 3 or out.dim() != 2 or y.shape[1] != B.shape[2]:
        raise ValueError(
            f"lora_expand wants y [T, R], B [S, N, R], out [T, M], got "
            f"{tuple(y.shape)}, {tuple(B.shape)}, {tuple(out.shape)}"
        )
    if not y.dtype == B.dtype == out.dtype:
        raise ValueError(f"lora_expand wants one dtype, got y {y.dtype}, B {B.dtype}, out {out.dtype}")
    if out.shape[0] != y.shape[0]:
        raise ValueError(f"out has {out.shape[0]} rows, y has {y.shape[0]}")
    if not 0 <= offset <= out.shape[1] - B.shape[1]:
        raise ValueError(f"columns [{offset}, {offset + B.shape[1]}) do not fit in out's {out.shape[1]}")
    _check_slots(meta, y.shape[0], B.shape[0], B.shape[2], ranks)


def check_weigh(y: torch.Tensor, meta: LoraMeta) -> None:
    """Validate the arguments of `lora_weigh` (see module docstring); raise ValueError."""
    if y.dim() != 2:
        raise ValueError(f"lora_weigh wants y [T, R], got {tuple(y.shape)}")
    w = meta.token_weight
    if w is not None and (w.dim() != 1 or w.shape[0] != y.shape[0] or w.dtype != torch.float32):
        raise ValueError(f"token_weight must be float32 [{y.shape[0]}], got {w.dtype} {tuple(w.shape)}")


def _slot_rows(meta: LoraMeta, ranks: Sequence[int] | None, R: int) -> list[tuple[torch.Tensor, int, int]]:
    """(token indices, slot, rank) for every slot used by some token, in slot order."""
    slots = meta.token_slot.cpu()
    groups = []
    for s in sorted(set(slots.tolist()) - {-1}):
        rows = (slots == s).nonzero().flatten()
        groups.append((rows, s, R if ranks is None else int(ranks[s])))
    return groups


def lora_shrink(x: torch.Tensor, A: torch.Tensor, meta: LoraMeta, ranks: Sequence[int] | None = None) -> torch.Tensor:
    """y[T, R]: y[t, :r] = x[t] @ A[slot[t], :r].T in float32, zero elsewhere; returned in x.dtype."""
    T, R = x.shape[0], A.shape[1]
    y = torch.zeros(T, R, dtype=torch.float32)
    xf, Af = x.detach().cpu().float(), A.detach().cpu().float()
    for rows, s, r in _slot_rows(meta, ranks, R):
        y[rows, :r] = torch.einsum("tk,rk->tr", xf[rows], Af[s, :r])
    return y.to(device=x.device, dtype=x.dtype)


def lora_expand(
    y: torch.Tensor,
    B: torch.Tensor,
    meta: LoraMeta,
    out: torch.Tensor,
    offset: int = 0,
    ranks: Sequence[int] | None = None,
) -> None:
    """out[t, offset:offset+N] += y[t, :r] @ B[slot[t], :, :r].T in float32, in place; see module doc."""
    N, R = B.shape[1], B.shape[2]
    acc = out.detach().cpu().float()
    yf, Bf = y.detach().cpu().float(), B.detach().cpu().float()
    for rows, s, r in _slot_rows(meta, ranks, R):
        acc[rows, offset : offset + N] += torch.einsum("tr,nr->tn", yf[rows, :r], Bf[s, :, :r])
    out.copy_(acc)


def lora_weigh(y: torch.Tensor, meta: LoraMeta) -> None:
    """y[t] *= token_weight[t] in float32, rounded once into y.dtype, in place; see module doc."""
    if meta.token_weight is None:
        return
    yf = y.detach().cpu().float() * meta.token_weight.detach().cpu()[:, None]
    y.copy_(yf)
