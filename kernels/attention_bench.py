"""Decode attention microbenchmark: `python -m loracli.kernels.attention_bench [--dtype bf16] [--threads 2]`.

Times one layer's decode attention over a paged cache at the decode profile's shapes
(SmolLM2-135M: 9 query heads, 3 KV heads, head dim 64; batch 64; block size 16; each sequence
100-300 keys, its blocks scattered over the cache), every variant in the same process, interleaved
round by round, and prints the median ms per layer, per step (x `--layers`) and the ratio to the
old path (`gather-sdpa`). Variants:

    gather-sdpa    the old non-deterministic decode: row gather kv[i][gather] [B, L, Hkv, D], SDPA with a mask
    blocks-sdpa    index_select of whole cache blocks into a preallocated buffer, SDPA on that strided view
                   (reads a last block's unwritten tail: NaN-unsafe, measured only)
    blocks-flash   block views into torch's CPU flash-attention op (K/V repeated per query head, no GQA there)
    paged          `torch_attention.paged_decode_attention`, what non-deterministic decode runs
    fixed          `fixed_attention.decode` (deterministic mode: GEMMs in the model dtype if bfloat16, else float32)

The machine may be shared: rounds are interleaved and medians taken, so the ratios hold better
than the absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .paged import build_paged_meta
from .torch_attention import paged_decode_attention

SHAPE = {"B": 64, "Hq": 9, "Hkv": 3, "D": 64, "block_size": 16}


def variants(dtype: torch.dtype, lo: int, hi: int, seed: int = 0) -> dict[str, Callable[[], torch.Tensor]]:
    """The variants of the module docstring, closed over one random case."""
    from loracli.model import fixed_attention

    gen = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, D, bs = (SHAPE[k] for k in ("B", "Hq", "Hkv", "D", "block_size"))
    lens = torch.randint(lo, hi + 1, (B,), generator=gen)
    L = fixed_attention.padded_keys(int(lens.max()))  # room for deterministic mode's padding too
    W = L // bs
    num_blocks = B * W + 64
    tables = torch.randperm(num_blocks, generator=gen)[: B * W].view(B, W)
    rows = num_blocks * bs
    kv = torch.randn(2, rows + 1, Hkv, D, generator=gen).to(dtype)
    kv[:, rows] = 0
    q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    scale = D**-0.5
    offs = torch.arange(L)
    valid = offs[None] < lens[:, None]
    gather = torch.where(valid, tables[:, offs // bs] * bs + offs % bs, rows)  # [B, L]
    mask = valid[:, None, None, :]
    n = int(lens.max())
    meta = build_paged_meta(tables.tolist(), lens.tolist(), bs, rows)
    blocks = kv[:, :rows].view(2, num_blocks, bs, Hkv, D)
    flat = tables[:, : -(-n // bs)].flatten()
    Lb = flat.numel() // B * bs
    buf = torch.empty(2, flat.numel(), bs, Hkv, D, dtype=dtype)
    bmask = valid[:, None, None, :Lb]
    fmask = torch.zeros(B, 1, 1, Lb, dtype=dtype).masked_fill_(~bmask, float("-inf"))
    keys = fixed_attention.DecodeKeys.of(gather, valid, Hkv)

    def gather_sdpa() -> torch.Tensor:
        k, v = kv[0][gather].transpose(1, 2), kv[1][gather].transpose(1, 2)
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    def block_views() -> torch.Tensor:
        torch.index_select(blocks, 1, flat, out=buf)
        return buf.view(2, B, Lb, Hkv, D).transpose(2, 3)  # [2, B, Hkv, Lb, D]

    def blocks_sdpa() -> torch.Tensor:
        g = block_views()
        return F.scaled_dot_product_attention(q.unsqueeze(2), g[0], g[1], attn_mask=bmask, scale=scale, enable_gqa=True)

    def blocks_flash() -> torch.Tensor:
        g = block_views().repeat_interleave(Hq // Hkv, dim=2)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.unsqueeze(2), g[0], g[1], attn_mask=fmask, scale=scale
        )[0]

    return {
        "gather-sdpa": gather_sdpa,
        "blocks-sdpa": blocks_sdpa,
        "blocks-flash": blocks_flash,
        "paged": lambda: paged_decode_attention(q, kv, meta, scale),
        "fixed": lambda: fixed_attention.decode(q, kv, keys, scale),
    }


def run(dtype: torch.dtype, lo: int, hi: int, rounds: int, reps: int) -> dict[str, float]:
    """Median ms per call of every variant, rounds interleaved."""
    fns = variants(dtype, lo, hi)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, fn in fns.items():
                fn()
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                times[name].append((time.perf_counter() - t0) / reps * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--lens", default="100-300", help="keys per sequence, lo-hi")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    lo, hi = (int(x) for x in a.lens.split("-"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    ms = run(dtype, lo, hi, a.rounds, a.reps)
    base = ms["gather-sdpa"]
    print(f"{a.dtype}, {torch.get_num_threads()} threads, {SHAPE}, keys {a.lens}; median of {a.rounds} rounds")
    for name, t in ms.items():
        print(f"{name:13s} {t:8.3f} ms/layer {t * a.layers:8.1f} ms/step  x{base / t:5.2f} vs gather-sdpa")


if __name__ == "__main__":
    main()
