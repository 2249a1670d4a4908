"""Paged decode attention on the CPU, in plain torch: same semantics as `reference.paged_decode_attention`.

    paged_decode_attention(q [B, Hq, D], kv [2, rows, Hkv, D], meta: PagedMeta, scale, window, softcap) -> [B, Hq, D]

One step, per layer: one `index_select` of the cache (contiguous, viewed as [2, rows*Hkv, D])
gathers every sequence's keys and values into items (sequence, KV head) of `meta.max_len` keys,
[2, B*Hkv, L, D]; padded positions read `meta.pad_row` (zeros), so stale rows never reach the
sums. Then two batched GEMMs in the model dtype over those items, whose rows are the G query
heads sharing the KV head (GQA without repeating K/V): scores [B*Hkv, G, L] = q @ k.T, then one
`add` of a float32 0/-inf mask bias (past the sequence's length or outside the window) that also
scales and converts to float32 (a soft cap takes separate ops), softmax in float32; out = p @ v,
p rounded to the model dtype first (transformers' eager attention rounds the same way). Few ops
per layer matter: each is a parallel region, and on a busy machine every region can wait a
scheduler slice for a descheduled thread.

Why not SDPA: with one query per sequence torch's CPU flash-attention kernel, not the gather,
took most of the old path's time. At the decode profile's shapes (batch 64, 9/3 heads, head dim
64) this path measured 8.7-9.1x faster in bf16 at 1 thread and 5.2-6.3x at 2 threads, 1.7-2.0x
in float32 at 1 thread and about even at 2 threads (`python -m loracli.kernels.attention_bench`,
docs/PERFORMANCE.md). Gathering whole cache blocks (`index_select` of block views) measured
no faster than this row gather, and would read the unwritten tail of a last block, so it is not
used. The row index and masks are built once per step (`PagedMeta.cached`).
"""

from __future__ import annotations

import torch

from .paged import PagedMeta


def _key_rows(meta: PagedMeta, heads: int) -> torch.Tensor:
    """[B*heads*L] rows of the cache viewed as [rows*heads, D]: item (b, h), then key j; padding -> pad_row."""
    dev, bs = meta.block_tables.device, meta.block_size
    offs = torch.arange(meta.max_len, device=dev)
    rows = meta.block_tables[:, offs // bs] * bs + offs % bs  # [B, L]
    rows = torch.where(offs[None, :] < meta.seq_lens[:, None], rows, meta.pad_row)
    head = torch.arange(heads, device=dev).view(1, heads, 1)
    return (rows.unsqueeze(1) * heads + head).flatten()


def _hidden(meta: PagedMeta, window: int | None) -> torch.Tensor:
    """[B, 1, 1, L] True where a sequence's query may not see key j (past its length, outside the window)."""
    offs = torch.arange(meta.max_len, device=meta.seq_lens.device)
    lens = meta.seq_lens[:, None]
    hidden = offs[None, :] >= lens
    if window is not None:
        hidden |= offs[None, :] < lens - window
    return hidden[:, None, None, :]


def _bias(meta: PagedMeta, window: int | None) -> torch.Tensor:
    """[B, 1, 1, L] float32: 0 where the query sees key j, -inf where `_hidden`."""
    hidden = meta.cached(("torch.hidden", window), lambda: _hidden(meta, window))
    return torch.zeros(hidden.shape, device=hidden.device).masked_fill_(hidden, float("-inf"))


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
    Hkv, L = kv.shape[2], meta.max_len
    G = Hq // Hkv
    index = meta.cached(("torch.rows", Hkv), lambda: _key_rows(meta, Hkv))
    kv_items = kv.view(2, -1, D).index_select(1, index).view(2, B * Hkv, L, D)  # K and V in one gather
    s = torch.bmm(q.reshape(B * Hkv, G, D), kv_items[0].transpose(1, 2)).view(B, Hkv, G, L)
    if softcap is None:  # scale, float32 and mask in one op
        bias = meta.cached(("torch.bias", window), lambda: _bias(meta, window))
        s = torch.add(bias, s, alpha=scale)
    else:
        s = torch.tanh(s.float().mul_(scale / softcap)).mul_(softcap)
        s.masked_fill_(meta.cached(("torch.hidden", window), lambda: _hidden(meta, window)), float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype).view(B * Hkv, G, L)
    return torch.bmm(p, kv_items[1]).view(B, Hq, D)
