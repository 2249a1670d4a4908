"""The multi-LoRA ops' test cases, shared by `tests/test_kernels.py` and `python -m loracli.selftest`.

One sweep, defined once: dtype x rank x tokens x adapter spread.

    spread_slots(spread, T, rng) -> (token_slot[T], S)   how T tokens spread over S adapter slots
    make_case(dtype, R, slots, S, seed) -> {"meta", "x" [T, K_IN], "A" [S, R, K_IN], "B" [S, N_OUT, R],
                                            "y" [T, R], "out" [T, OFFSET + N_OUT + EXTRA_COLS]}
    sweep_case(dname, R, T, spread) -> make_case for one entry of FAST_CASES / FULL_CASES
    sweep(full) -> the entries: FAST_CASES, or with full every entry of both (FULL_CASES lacks some fast ones)

Values are of order 1 (A and B scaled by fan-in), so `TOL[dtype]` (atol, rtol) fits every op's output.
`y` has garbage past every rank on purpose (the expand must ignore it). K_IN and N_OUT exceed the
Triton interpreter's block sizes, so the kernels' tile loops run more than once. Everything is
built on the CPU; a caller moves it to its device. Nothing here imports Triton.
"""

from __future__ import annotations

import random

import torch

from .meta import build_meta

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {  # (atol, rtol) for values of order 1; bf16/fp16 outputs may be rounded twice
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (3e-3, 3e-3),
}
SPREADS = ("one", "even", "distinct", "zipf", "free", "shuffled")
K_IN, N_OUT, OFFSET, EXTRA_COLS = 200, 96, 5, 9  # K > the interpreter's BLOCK_K, N > its BLOCK_N

FAST_CASES = [  # (dtype, R, T, spread): every spread, dtype and rank at least once
    ("fp32", 16, 128, "shuffled"),
    ("bf16", 8, 7, "free"),
    ("fp16", 64, 128, "zipf"),
    ("bf16", 1, 1, "one"),
    ("fp32", 8, 7, "distinct"),
    ("bf16", 16, 128, "zipf"),
    ("bf16", 16, 64, "even"),
]
FULL_CASES = [(d, R, T, s) for d in DTYPES for R in (1, 8, 16, 64) for T in (1, 7, 128, 1000) for s in SPREADS]


def spread_slots(spread: str, T: int, rng: random.Random) -> tuple[list[int], int]:
    """(token slots, slot count S) for a named spread of T tokens over adapters."""
    if spread == "one":
        return [2] * T, 3
    if spread == "distinct":
        return list(range(T)), T
    if spread == "even":  # sorted by slot in equal counts: the usual decode batch (no gather on CPU)
        return [t * 8 // T for t in range(T)], 8
    weights = [1 / (k + 1) for k in range(8)]
    if spread == "zipf":  # sorted by slot, as the model runner batches: contiguous runs
        return sorted(rng.choices(range(8), weights, k=T)), 8
    if spread == "free":  # a quarter of the tokens without LoRA, slots interleaved
        return [s if rng.random() < 0.75 else -1 for s in rng.choices(range(8), weights, k=T)], 8
    return [rng.randrange(8) for _ in range(T)], 8  # shuffled: non-contiguous, needs `order`


@torch.no_grad()
def make_case(dtype: torch.dtype, R: int, slots: list[int], S: int, seed: int = 0) -> dict:
    """Random x, A, B, y, out of order-1 values; y has garbage past every rank on purpose."""
    gen = torch.Generator().manual_seed(seed)
    T = len(slots)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    return {
        "meta": build_meta(slots),
        "x": rand(T, K_IN),
        "A": rand(S, R, K_IN, scale=K_IN**-0.5),
        "B": rand(S, N_OUT, R, scale=R**-0.5),
        "y": rand(T, R),
        "out": rand(T, OFFSET + N_OUT + EXTRA_COLS),
    }


def sweep_case(dname: str, R: int, T: int, spread: str) -> dict:
    """The case of one sweep entry (dtype name, rank, tokens, spread), reproducible from the entry."""
    slots, S = spread_slots(spread, T, random.Random(T * 31 + R))
    return make_case(DTYPES[dname], R, slots, S, seed=R + T)


def sweep(full: bool) -> list[tuple[str, int, int, str]]:
    """The sweep's entries: FAST_CASES, and with `full` FULL_CASES' other entries after them."""
    return FAST_CASES + [c for c in FULL_CASES if c not in FAST_CASES] if full else list(FAST_CASES)
