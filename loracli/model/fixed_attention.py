"""Attention in a fixed reduction order (deterministic mode): one query's output depends on its own
query, keys and values only, never on the other sequences of the batch, and prefill and decode
give it the same bits.

    prefill(q[T, Hq, D], k[K, Hkv, D], v[K, Hkv, D], seq_lens, scale, window, cap, contexts) -> [T, Hq*D]
    decode(q[B, Hq, D], kv[2, rows, Hkv, D], DecodeKeys, scale, cap) -> [B, Hq*D]
    DecodeKeys.of(gather[B, L], valid[B, L], Hkv): built once per step, shared by the layers

Both run `attend` on "items" (one KV head of one sequence) holding query rows (a token's query
heads that share that KV head, GQA) and the sequence's keys. The GEMMs run in bfloat16 for a
bfloat16 model on the CPU and in float32 otherwise (`gemm_dtype`); softmax and sums in float32:

1. scores = q·k * scale for every key in one GEMM (with `cap` = (c, tanh): c * tanh(scores / c),
   elementwise, Gemma 2's soft-capping); keys a row may not see (later positions,
   outside the sliding window, padding up to the batch's longest sequence) become -inf;
2. e = exp(scores - max): the max is exact in any order, padding gives exactly 0;
3. o = sum of e_c @ v_c and l = sum of e_c over chunks c of `KV_CHUNK` keys counted from key 0,
   added in ascending order: every chunk is a GEMM of the same depth, and the chunks past a row's
   last key add exact zeros, so neither the padded length nor the other rows change the sums
   (in bfloat16, e_c is rounded to bfloat16 for its GEMM, as transformers' eager attention rounds
   its probabilities, while l sums the unrounded e_c; each chunk's product, rounded to bfloat16 by
   its GEMM, is added in float32);
4. o / l, cast to the model dtype.

Every GEMM has a depth of D (scores) or `KV_CHUNK` (outputs). In float32 (MKL's GEMM) its row
count is a multiple of `invariant.ROW_TILE`: shapes at which a row's bits were measured not to
vary (see `loracli.kernels.invariant`). In bfloat16 (oneDNN's GEMM) a row's bits were measured
the same at every row count (1-1024), item count (1-300), key count (64-1024) and thread count
(1, 2) on an AVX-512-BF16 EPYC, so its rows are not padded and K/V are not copied to float32
(2-3x faster decode attention there). Each process checks this once on the machine it runs on
(`bf16_attend_invariant`) and keeps the float32 path where it does not hold. A decode step's query is one token
(its GQA query heads, padded to whole row tiles in float32); a prefill's are all of a sequence's tokens: the
same row math either way, so a sequence recomputed by a prefill after preemption gets the KV cache
and logits its decode steps gave, and a prefill over a cached prefix (`contexts`: its keys read
back from the cache) gives the bits a prefill of the whole sequence gives. Keys a decode step
never sees are read from the cache's zero row; a prefill's masked keys are real ones of the same
batch. Either way they get exactly zero weight, so stale cache rows never reach the sums.
Memory: one `attend`'s scores, [items, rows, keys] float32 (see
`prefill` for its bound).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch

from ..kernels import invariant

KV_CHUNK = 64  # keys per PV GEMM; decode pads the batch's key count to a multiple of it
QUERY_BLOCK = 256  # prefill: a longer sequence's queries go in blocks of this many tokens
BATCH_QUERIES = 1024  # prefill: shorter sequences share one attend up to this many (padded) query tokens
Cap = tuple[float, Callable[[torch.Tensor], torch.Tensor]] | None  # soft cap c and the tanh to use


def padded_keys(n: int) -> int:
    """`n` keys rounded up to a multiple of `KV_CHUNK`."""
    return -(-n // KV_CHUNK) * KV_CHUNK


def gemm_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype attention's GEMMs run in for queries `q`: bfloat16 on the CPU when this machine's
    bfloat16 GEMMs are row-invariant (`bf16_attend_invariant`), else float32 (any other dtype or device)."""
    cpu_bf16 = q.dtype == torch.bfloat16 and q.device.type == "cpu"
    return torch.bfloat16 if cpu_bf16 and bf16_attend_invariant() else torch.float32


@functools.cache
def bf16_attend_invariant() -> bool:
    """Whether `attend` in bfloat16 gives a row the same bits at 3 and 48 rows, 1 and 8 items, 64 and
    256 keys on this machine (checked once per process, ~0.1 s; `--dtype auto`'s probe asks it too)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, n, 64, generator=gen).bfloat16() for n in (48, 256, 256))
    hidden = torch.zeros(1, 1, 256, dtype=torch.bool)
    hidden[..., 64:] = True  # the keys past 64 hidden: a 64-key call must give the same bits
    full = attend(q, k, v, hidden, scale=0.125)
    return torch.equal(attend(q[:1, :3], k[:1, :64], v[:1, :64], hidden[..., :64], scale=0.125), full[:1, :3])


def row_tile(dtype: torch.dtype) -> int:
    """Rows of an attention GEMM come in multiples of this (`dtype`: its GEMM dtype): none in bfloat16."""
    return 1 if dtype == torch.bfloat16 else invariant.ROW_TILE


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    hidden: torch.Tensor,
    cap: Cap = None,
    real: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q [I, M, D], k/v [I, L, D], all float32 or all bfloat16, L a multiple of KV_CHUNK; `hidden`
    broadcasts to [I, M, L], True where a row must not see a key (every row sees at least one) ->
    [I, M, D] float32. q comes scaled, or `scale` multiplies the float32 scores (bfloat16: q is not
    rounded again).

    With `real`, only rows < real are results and q's other rows must be zero (the row padding): the
    elementwise softmax work skips them (their scores stay 0, so they add nothing to the GEMMs) and
    their output rows are left unnormalised. A real row gets the same bits either way (the skipped
    rows change no GEMM row and no elementwise op of a real row); decode passes its GQA group."""
    s = torch.bmm(q, k.transpose(1, 2)).float()  # [I, M, L] float32 (no copy when q is float32)
    if scale is not None:
        s.mul_(scale)
    r = s if real is None else s[:, :real]  # [I, real, L]
    if cap is not None:
        r.copy_(cap[1](r / cap[0]) * cap[0])
    r.masked_fill_(hidden if hidden.shape[1] == 1 or real is None else hidden[:, :real], float("-inf"))
    r.sub_(r.amax(-1, keepdim=True)).exp_()
    e = s.to(q.dtype)  # the GEMMs' operand: s itself in float32
    o = torch.bmm(e[:, :, :KV_CHUNK], v[:, :KV_CHUNK]).float()
    total = r[:, :, :KV_CHUNK].sum(-1)
    for c in range(KV_CHUNK, s.shape[-1], KV_CHUNK):
        o.add_(torch.bmm(e[:, :, c : c + KV_CHUNK], v[:, c : c + KV_CHUNK]))
        total.add_(r[:, :, c : c + KV_CHUNK].sum(-1))
    (o if real is None else o[:, :real]).div_(total.unsqueeze(-1))
    return o


@dataclass(frozen=True)
class DecodeKeys:
    """Where a decode step's keys are: `rows` [Hkv*B*L] index the cache viewed as [rows*Hkv, D]
    (item-major: KV head, then sequence, then key), `hidden` [Hkv*B, 1, L] the keys an item may not
    see. `gather` [B, L] holds the flat cache row of each key (L a multiple of KV_CHUNK, unseen keys
    -> the cache's zero row), `valid` [B, L] which keys each sequence sees."""

    rows: torch.Tensor
    hidden: torch.Tensor
    heads: int

    @classmethod
    def of(cls, gather: torch.Tensor, valid: torch.Tensor, heads: int) -> DecodeKeys:
        head = torch.arange(heads, device=gather.device).view(heads, 1, 1)
        rows = (gather.unsqueeze(0) * heads + head).flatten()
        return cls(rows, (~valid).repeat(heads, 1).unsqueeze(1), heads)


def decode(q: torch.Tensor, kv: torch.Tensor, keys: DecodeKeys, scale: float, cap: Cap = None) -> torch.Tensor:
    """One query token per sequence over its cached keys (one plain row gather per K and V)."""
    B, Hq, D = q.shape
    Hkv, L = keys.heads, keys.hidden.shape[-1]
    group = Hq // Hkv
    dt = gemm_dtype(q)
    k, v = kv.view(2, -1, D).index_select(1, keys.rows).view(2, Hkv * B, L, D).to(dt).unbind(0)
    if dt == torch.bfloat16:  # no row padding, q not rescaled: the scores are scaled in float32
        qg = q.view(B, Hkv, group, D).transpose(0, 1).reshape(Hkv * B, group, D)
        o = attend(qg, k, v, keys.hidden, cap, scale=scale)  # [Hkv*B, group, D]
        return o.view(Hkv, B, group, D).transpose(0, 1).reshape(B, Hq * D).to(q.dtype)
    rows = invariant.tiled(group)
    qp = q.new_zeros(Hkv, B, rows, D, dtype=torch.float32)
    qp[:, :, :group] = (q.float() * scale).view(B, Hkv, group, D).transpose(0, 1)
    o = attend(qp.view(Hkv * B, rows, D), k, v, keys.hidden, cap, real=group)
    return o.view(Hkv, B, rows, D)[:, :, :group].transpose(0, 1).reshape(B, Hq * D).to(q.dtype)


def prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: list[int],
    scale: float,
    window: int | None,
    cap: Cap = None,
    contexts: list[int] | None = None,
) -> torch.Tensor:
    """Causal attention within each sequence of the flat batch (lengths `seq_lens`): [T, Hq*D].

    With `contexts` (prefix caching), sequence i's `seq_lens[i]` query tokens are its last ones,
    at positions contexts[i].., and k/v hold all its contexts[i] + seq_lens[i] keys (K = the sum:
    the cached ones read back from the cache, then the new ones); without, k/v are the step's own
    (K = T).
    A sequence longer than `QUERY_BLOCK` tokens goes block by block (`QUERY_BLOCK` queries each,
    over the keys up to the block's last). Shorter ones, by length, share padded `attend`s of up
    to `BATCH_QUERIES` query tokens. Either way the scores of one `attend` stay within
    `BATCH_QUERIES` x Hq x `QUERY_BLOCK` floats (plus a long sequence's length).
    """
    out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
    contexts = contexts or [0] * len(seq_lens)
    totals = [c + n for c, n in zip(contexts, seq_lens, strict=True)]
    q_starts = [0, *accumulate(seq_lens)][:-1]
    k_starts = [0, *accumulate(totals)][:-1]
    group: list[tuple[int, int, int, int]] = []
    for q_start, k_start, c, n in sorted(zip(q_starts, k_starts, contexts, totals, strict=True), key=lambda b: b[3]):
        if n > QUERY_BLOCK:
            for first in range(c, n, QUERY_BLOCK):
                block = (q_start + first - c, k_start, first, min(QUERY_BLOCK, n - first))
                _prefill_blocks(q, k, v, [block], scale, window, cap, out)
            continue
        if (len(group) + 1) * n > BATCH_QUERIES:  # ascending lengths: n is the group's longest
            _prefill_blocks(q, k, v, group, scale, window, cap, out)
            group = []
        group.append((q_start, k_start, c, n - c))
    if group:
        _prefill_blocks(q, k, v, group, scale, window, cap, out)
    return out


def _prefill_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: list[tuple[int, int, int, int]],
    scale: float,
    window: int | None,
    cap: Cap,
    out: torch.Tensor,
) -> None:
    """Blocks (q_row, k_start, first, n): the queries at positions first..first+n-1 of a sequence, in
    rows q_row.. of q, over its keys 0..first+n-1, in rows k_start.. of k/v. One `attend`, padded to
    the largest block; writes the blocks' rows of `out`."""
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    group = Hq // Hkv
    dev = q.device
    q_rows, k_starts, firsts, counts = (torch.tensor(c, device=dev).unsqueeze(1) for c in zip(*blocks, strict=True))
    nq = int(counts.max())
    dt = gemm_dtype(q)
    rows, keys = invariant.tiled(nq * group, row_tile(dt)), padded_keys(int((firsts + counts).max()))
    step = torch.arange(nq, device=dev)
    queries = (q_rows + torch.minimum(step, counts - 1)).flatten()  # [Bn*nq] token rows
    key_rows = (k_starts + torch.minimum(torch.arange(keys, device=dev), firsts + counts - 1)).flatten()
    qp = q.new_zeros(len(blocks), Hkv, rows, D, dtype=dt)
    qs = q.index_select(0, queries).to(dt)
    qs = (qs if dt == torch.bfloat16 else qs * scale).view(len(blocks), nq, Hkv, group, D)  # bf16: scaled later
    qp[:, :, : nq * group] = qs.transpose(1, 2).reshape(len(blocks), Hkv, nq * group, D)
    kp, vp = (t.index_select(0, key_rows).view(len(blocks), keys, Hkv, D).transpose(1, 2) for t in (k, v))
    kp, vp = (t.to(dt).reshape(len(blocks) * Hkv, keys, D) for t in (kp, vp))
    pos = firsts + torch.minimum(torch.arange(rows, device=dev).div(group, rounding_mode="floor"), counts - 1)
    key = torch.arange(keys, device=dev)
    hidden = key > pos.unsqueeze(-1)  # [Bn, rows, keys]; keys past a block's own are past its last query
    if window is not None:
        hidden |= key <= pos.unsqueeze(-1) - window
    hidden = hidden.repeat_interleave(Hkv, dim=0)
    o = attend(qp.view(len(blocks) * Hkv, rows, D), kp, vp, hidden, cap, scale=scale if dt == torch.bfloat16 else None)
    o = o.view(len(blocks), Hkv, rows, D)[:, :, : nq * group].view(len(blocks), Hkv, nq, group, D)
    o = o.transpose(1, 2).reshape(len(blocks) * nq, Hq * D)
    real = (step < counts).flatten().nonzero().flatten()
    out.index_copy_(0, queries.index_select(0, real), o.index_select(0, real).to(out.dtype))
