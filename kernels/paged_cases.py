"""Paged decode attention's test cases, shared by `tests/test_paged_attention.py` (and a self-test).

    make_paged_case(dtype, Hq, Hkv, lens, block_size, D, seed) -> {"q" [B, Hq, D], "kv" [2, rows + 1, Hkv, D],
                                                                  "meta": PagedMeta}
    FAST_CASES / FULL_CASES: (dtype name, Hq, Hkv, lens, block_size, window, softcap)

Each sequence's blocks are a random (shuffled) set of the cache's blocks, with spare blocks no
sequence owns. Every cache row a sequence does not own as a key (spare blocks, the unwritten tail
of its last block) is NaN, so a backend that reads one fails the comparison; the last row is the
zero `pad_row`. q and keys are standard normal (scores of order 1 at scale D**-0.5). Nothing here
imports Triton.
"""

from __future__ import annotations

import itertools

import torch

from .paged import PagedMeta, build_paged_meta

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {  # (atol, rtol): outputs are convex mixes of order-1 values; bf16/fp16 round scores and p
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (4e-3, 4e-3),
}
HEADS = ((4, 4), (9, 3), (8, 1))  # (Hq, Hkv): MHA, the profile model's GQA, MQA
LENS = ((1, 7, 33, 16), (64, 3, 130, 17))  # keys per sequence: single key, partial and exact blocks, long
BLOCK_SIZES = (16, 5, 1)
WINDOWS = (None, 6)
SOFTCAPS = (None, 2.0)

FAST_CASES = [  # every dtype, head layout, length set, block size, window and cap at least once
    ("fp32", 9, 3, LENS[0], 16, None, None),
    ("bf16", 9, 3, LENS[1], 16, 6, None),
    ("fp16", 4, 4, LENS[0], 5, None, 2.0),
    ("fp32", 8, 1, LENS[1], 1, 6, 2.0),
    ("bf16", 8, 1, LENS[0], 5, None, 2.0),
    ("fp32", 4, 4, LENS[1], 16, 6, None),
]
FULL_CASES = [
    (d, hq, hkv, lens, bs, w, c)
    for d, (hq, hkv), lens, bs, w, c in itertools.product(DTYPES, HEADS, LENS, BLOCK_SIZES, WINDOWS, SOFTCAPS)
]


def make_paged_case(
    dtype: torch.dtype, Hq: int, Hkv: int, lens: tuple[int, ...], block_size: int, D: int = 32, seed: int = 0
) -> dict[str, torch.Tensor | PagedMeta]:
    """Random q and paged cache for sequences of `lens` keys (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, at = [], 0
    for k in need:
        tables.append(order[at : at + k])
        at += k
    rows = num_blocks * block_size
    kv = torch.full((2, rows + 1, Hkv, D), float("nan"))
    kv[:, rows] = 0
    for table, n in zip(tables, lens, strict=True):
        owned = torch.tensor([b * block_size + i for b in table for i in range(block_size)][:n])
        kv[:, owned] = torch.randn(2, n, Hkv, D, generator=gen)
    q = torch.randn(len(lens), Hq, D, generator=gen)
    meta = build_paged_meta(tables, lens, block_size, pad_row=rows)
    return {"q": q.to(dtype), "kv": kv.to(dtype), "meta": meta}
