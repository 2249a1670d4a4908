"""The specification of the multi-LoRA ops and of paged decode attention: slow, obvious, float32.
Every backend is tested against it. `paged_decode_attention` (one query per sequence over the
paged KV cache, `PagedMeta`) states its shapes and semantics in its own docstring; the rest of
this docstring is about the LoRA ops.

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
Columns of out outside [offset, offset + N) never change. Any operand may be a strided view: y one
sub-projection's column slice of a grouped shrink (`MultiLoraLinear`) or an interleaved
view, out a slice of a wider output. The argument checks here are shared by every backend
(the dispatcher calls them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .meta import LoraMeta
from .paged import PagedMeta


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


def check_paged_decode(
    q: torch.Tensor, kv: torch.Tensor, meta: PagedMeta, window: int | None, softcap: float | None
) -> None:
    """Validate the arguments of `paged_decode_attention` (see its docstring); raise ValueError."""
    if q.dim() != 3 or kv.dim() != 4 or kv.shape[0] != 2 or q.shape[2] != kv.shape[3]:
        raise ValueError(
            "paged_decode_attention wants q [B, Hq, D] and kv [2, rows, Hkv, D], "
            f"got {tuple(q.shape)} and {tuple(kv.shape)}"
        )
    if q.shape[1] % kv.shape[2]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {kv.shape[2]} KV heads")
    if q.dtype != kv.dtype:
        raise ValueError(f"paged_decode_attention wants one dtype, got q {q.dtype} and kv {kv.dtype}")
    if meta.block_tables.dim() != 2 or meta.block_tables.shape[0] != q.shape[0] or meta.seq_lens.shape != (q.shape[0],):
        raise ValueError(
            f"block tables {tuple(meta.block_tables.shape)} and seq lens {tuple(meta.seq_lens.shape)} "
            f"do not describe {q.shape[0]} sequences"
        )
    if meta.block_tables.shape[1] * meta.block_size < meta.max_len:
        raise ValueError(
            f"{meta.block_tables.shape[1]} blocks of {meta.block_size} hold fewer than {meta.max_len} keys"
        )
    if window is not None and window < 1 or softcap is not None and softcap <= 0:
        raise ValueError(f"window must be >= 1 and softcap > 0, got {window} and {softcap}")


def paged_decode_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    meta: PagedMeta,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One query token per sequence over its keys where they lie in the paged KV cache -> [B, Hq, D] in q.dtype.

    Shapes (B sequences, Hq query heads, Hkv KV heads, G = Hq / Hkv, D head dim, bs = meta.block_size):

        q                  [B, Hq, D]          the step's query of each sequence (its last token)
        kv                 [2, rows, Hkv, D]   the cache: kv[0] keys, kv[1] values, block k = rows [k*bs, (k+1)*bs)
        meta.block_tables  [B, W] int64        block ids of each sequence, W * bs >= max(seq_lens)
        meta.seq_lens      [B] int64           n_b >= 1 keys of sequence b, at positions 0 .. n_b - 1

    Semantics, for every sequence b and query head h (GQA: it reads KV head h // G):

        row(j)    = block_tables[b, j // bs] * bs + j % bs                  the key at position j
        visible   = positions j < n_b, and with a window w only j >= n_b - w (the last w keys)
        s_j       = (q[b, h] . kv[0, row(j), h // G]) * scale                float32
        s_j       = softcap * tanh(s_j / softcap)                          when softcap is set (Gemma 2)
        p         = softmax over the visible j of s_j                      float32
        out[b, h] = sum_j p_j * kv[1, row(j), h // G]                       float32, rounded once to q.dtype

    Rows that are not visible keys of the sequence (other sequences' rows, table padding, the
    unwritten tail of the last block, keys outside the window) are never read, so garbage or NaN
    there never matters. Backends compute in q's dtype where the model does (transformers' eager
    attention: the scores' GEMM rounds to the model dtype, softmax in float32) and are compared
    with this within the dtype's tolerance.
    """
    B, Hq, D = q.shape
    G = Hq // kv.shape[2]
    bs = meta.block_size
    out = torch.empty(B, Hq, D, dtype=torch.float32)
    tables, lens = meta.block_tables.cpu(), meta.seq_lens.cpu().tolist()
    for b, n in enumerate(lens):
        first = 0 if window is None else max(0, n - window)
        pos = torch.arange(first, n)
        rows = tables[b, pos // bs] * bs + pos % bs
        k, v = (kv[i].detach().cpu().index_select(0, rows).float() for i in (0, 1))  # [n', Hkv, D]
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # [n', Hq, D]
        s = torch.einsum("hd,jhd->hj", q[b].detach().cpu().float(), k) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        out[b] = torch.einsum("hj,jhd->hd", torch.softmax(s, dim=-1), v)
    return out.to(device=q.device, dtype=q.dtype)
