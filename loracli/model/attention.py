"""Attention of one decoder layer over the paged KV cache, with the layer's own sliding window.

    prefill(q [T, Hq, D], k/v [T, Hkv, D], attn, layer: LayerAttn, deterministic, kv) -> [T, Hq*D]
    decode(q [B, Hq, D], kv [2, rows, Hkv, D], attn, layer: LayerAttn, deterministic) -> [B, Hq*D]
    step(q, k, v, kv, attn, layer, deterministic) -> [T, Hq*D]: one of them, or both in a mixed step
      (`AttnMeta.decode`: the prefill's sequences' tokens first, then one per decoding sequence)

Semantics (transformers' eager attention): scores = q·k * scale; with a soft cap, scores = cap *
tanh(scores / cap); a query at position i sees the keys j <= i of its own sequence, and with a window
w only those with i - j < w; softmax in float32; times v. `LayerAttn` holds a layer's scale, window
and cap (`ModelSpec.scale`, `layer_windows`, `attn_softcap`).

Deterministic mode runs `fixed_attention` (window and cap passed through). Otherwise a prefill
runs SDPA (causal, or with a window mask when a sequence is longer than the window), or, with a
soft cap (which SDPA cannot apply), a plain matmul-softmax-matmul; a decode step runs
`loracli.kernels.paged_decode_attention` over the cache where the keys lie (`AttnMeta.paged`:
block tables and lengths, window and cap per layer; the CPU path's row index and masks built once
per step, the Triton kernel reads the blocks in place). Deterministic mode's decode masks come
from `AttnMeta.key_mask` (the sequence's keys) narrowed to the window by `AttnMeta.key_lens`,
once per window per step (cached on `attn`, as are its `DecodeKeys`).

A prefill over cached prefixes (`AttnMeta.context_lens`, prefix caching) has the queries of each
sequence's last `seq_lens[i]` tokens only; every key is read back from the cache `kv` at
`AttnMeta.key_rows` (the step's own K/V are written there before attention runs), and a query at
position i sees keys j <= i (a mask, as SDPA's `is_causal` aligns queries to the first key).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..kernels import PagedMeta, paged_decode_attention
from . import fixed_attention
from .pointwise import softcap

DECODE_RANGE = "loracli::decode_attention"


@dataclass
class AttnMeta:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] int64: flat KV-cache row of each token
    seq_lens: list[int]  # prefill: tokens per sequence (python, sums to T)
    gather_index: torch.Tensor | None = None  # decode, deterministic: [B, L] flat KV rows, masked -> zero_row
    key_mask: torch.Tensor | None = None  # decode: [B, 1, 1, L] bool, True = attend (the sequence's keys)
    key_lens: torch.Tensor | None = None  # decode: [B] int64, keys of each sequence (its length)
    window_masks: dict = field(default_factory=dict)  # decode: window -> [B, 1, 1, L] key_mask within it
    context_lens: list[int] | None = None  # prefill: each sequence's cached tokens before its seq_lens new ones
    key_rows: torch.Tensor | None = None  # prefill with context_lens: [sum(context + seq_lens)] int64 KV rows
    fixed_keys: dict = field(default_factory=dict)  # decode, deterministic: window -> DecodeKeys
    paged: PagedMeta | None = None  # decode, not deterministic: block tables and lengths (`paged_decode_attention`)
    decode: AttnMeta | None = None  # prefill, a mixed step: the decode part's meta (its tokens follow the prefill's)

    def token_counts(self) -> list[int]:
        """Tokens of each sequence of the step, in row order (a mixed step's decode sequences: 1 each)."""
        return self.seq_lens + (self.decode.seq_lens if self.decode is not None else [])


@dataclass(frozen=True)
class LayerAttn:
    scale: float
    window: int | None
    softcap: float | None
    tanh: Callable[[torch.Tensor], torch.Tensor]
    kv_heads: int


def step(q, k, v, kv: torch.Tensor, attn: AttnMeta, layer: LayerAttn, deterministic: bool) -> torch.Tensor:
    """The step's attention, q [T, Hq, D], k/v [T, Hkv, D] (already in `kv`) -> [T, Hq*D]: `prefill`,
    `decode`, or in a mixed step both: the prefill over the first P = sum(seq_lens) rows, the decode
    (`attn.decode`) over the rest. Each row's result is the one it gets in a step of its own kind."""
    if not attn.is_prefill:
        return decode(q, kv, attn, layer, deterministic)
    if attn.decode is None:
        return prefill(q, k, v, attn, layer, deterministic, kv)
    n = sum(attn.seq_lens)
    out = prefill(q[:n], k[:n], v[:n], attn, layer, deterministic, kv)
    return torch.cat([out, decode(q[n:], kv, attn.decode, layer, deterministic)])


def prefill(q, k, v, attn: AttnMeta, layer: LayerAttn, deterministic: bool, kv=None) -> torch.Tensor:
    """Causal attention within each sequence: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq*D]; with
    `attn.context_lens`, over every key of the sequence, read from `kv` [2, rows, Hkv, D]."""
    contexts = attn.context_lens
    if contexts is not None:
        k, v = kv[0].index_select(0, attn.key_rows), kv[1].index_select(0, attn.key_rows)  # [K, Hkv, D]
    if deterministic:
        cap = None if layer.softcap is None else (layer.softcap, layer.tanh)
        return fixed_attention.prefill(q, k, v, attn.seq_lens, layer.scale, layer.window, cap, contexts)
    if contexts is not None:
        return _prefill_after(q, k, v, attn.seq_lens, contexts, layer)
    outs, start, window = [], 0, layer.window
    for n in attn.seq_lens:
        qs, ks, vs = (t[start : start + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if layer.softcap is not None or (window is not None and n > window):
            i = torch.arange(n, device=q.device)
            mask = i[:, None] >= i[None, :]
            if window is not None:
                mask &= i[:, None] - i[None, :] < window
            o = _attend(qs, ks, vs, mask, layer)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=layer.scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1).reshape(n, -1))
        start += n
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _prefill_after(q, k, v, seq_lens: list[int], contexts: list[int], layer: LayerAttn) -> torch.Tensor:
    """Sequence i's seq_lens[i] queries (positions contexts[i]..) over all its keys: q [T, Hq, D],
    k/v [sum(contexts + seq_lens), Hkv, D] -> [T, Hq*D]."""
    outs, start, key_start, window = [], 0, 0, layer.window
    for n, c in zip(seq_lens, contexts, strict=True):
        qs = q[start : start + n].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        ks, vs = (t[key_start : key_start + c + n].transpose(0, 1).unsqueeze(0) for t in (k, v))  # [1, Hkv, c+n, D]
        i = torch.arange(c, c + n, device=q.device)
        j = torch.arange(c + n, device=q.device)
        mask = j[None, :] <= i[:, None]  # [n, c + n]
        if window is not None:
            mask &= i[:, None] - j[None, :] < window
        if layer.softcap is not None:
            o = _attend(qs, ks, vs, mask, layer)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=layer.scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1).reshape(n, -1))
        start += n
        key_start += c + n
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def decode(q, kv: torch.Tensor, attn: AttnMeta, layer: LayerAttn, deterministic: bool) -> torch.Tensor:
    """One query per sequence over its cached keys: q [B, Hq, D] -> [B, Hq*D]; under a profiler, a
    `DECODE_RANGE` range holds its ops (`loracli.bench.profile` counts them as attention)."""
    if not torch._C._autograd._profiler_enabled():  # a range costs ~25 us per layer even unprofiled
        return _decode(q, kv, attn, layer, deterministic)
    with torch.profiler.record_function(DECODE_RANGE):
        return _decode(q, kv, attn, layer, deterministic)


def _decode(q, kv: torch.Tensor, attn: AttnMeta, layer: LayerAttn, deterministic: bool) -> torch.Tensor:
    if not deterministic:
        o = paged_decode_attention(q, kv, attn.paged, layer.scale, layer.window, layer.softcap)  # [B, Hq, D]
        return o.reshape(q.shape[0], -1)
    mask = _window_mask(attn, layer.window)  # [B, 1, 1, L]
    keys = attn.fixed_keys.get(layer.window)
    if keys is None:
        keys = fixed_attention.DecodeKeys.of(attn.gather_index, mask[:, 0, 0], layer.kv_heads)
        attn.fixed_keys[layer.window] = keys
    cap = None if layer.softcap is None else (layer.softcap, layer.tanh)
    return fixed_attention.decode(q, kv, keys, layer.scale, cap)


def _window_mask(attn: AttnMeta, window: int | None) -> torch.Tensor:
    """The decode step's key mask [B, 1, 1, L], narrowed to the last `window` keys of each sequence."""
    if window is None:
        return attn.key_mask
    mask = attn.window_masks.get(window)
    if mask is None:
        offs = torch.arange(attn.key_mask.shape[-1], device=attn.key_mask.device)
        inside = offs[None, :] >= (attn.key_lens[:, None] - window)  # [B, L]
        mask = attn.key_mask & inside[:, None, None, :]
        attn.window_masks[window] = mask
    return mask


def _attend(q, k, v, mask: torch.Tensor, layer: LayerAttn) -> torch.Tensor:
    """q [B, Hq, M, D], k/v [B, Hkv, L, D], mask broadcasting to [B, Hq, M, L] (True = attend) -> [B, Hq, M, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * layer.scale
    if layer.softcap is not None:
        s = softcap(s, layer.softcap, layer.tanh)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return torch.matmul(p, v)
