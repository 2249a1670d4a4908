"""`MultiLoraLinear`'s buffers laid out at the width the slots' adapters need (`layout`, `fit`,
`_relayout`, `resize`): through a random sequence of adapter writes of mixed ranks (some widening,
some narrowing the buffers), slot resizes with survivors moved, and merges, every written slot holds
exactly its adapter (zeros past its rank), the widths are the layout of the slots' ranks, the
allocated bytes stay those of `max_rank`, and the forward equals x @ W.T + the sum of each token's
own x @ A.T @ B.T computed from the adapters themselves."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from loracli.kernels import build_passes, invariant

from loracli.model.lora_linear import MultiLoraLinear

SPLITS, IN, MAX_RANK = [12, 6, 6], 20, 32
RANKS = (0, 2, 5, 16, 17, 32)


def check(lin: MultiLoraLinear, held: dict[int, list], gen: torch.Generator) -> None:
    """Every written slot's buffers against `held` (slot -> per sub (a, b) or None), and the forward."""
    assert (lin.width, lin.widths) == lin.layout(lin.ranks)
    allocated = lin.n_slots * (len(SPLITS) * MAX_RANK * IN + sum(SPLITS) * MAX_RANK + 2 * sum(SPLITS)) * 4
    assert lin.buffer_bytes() == allocated
    for slot, parts in held.items():
        for j, ab in enumerate(parts):
            r = 0 if ab is None else ab[0].shape[0]
            a, b = lin.slot_rows(j, slot)
            assert lin.ranks[j][slot] == r
            assert not a[r:].any() and not b[:, r:].any()
            if ab is not None:
                assert torch.equal(a[:r], ab[0]) and torch.equal(b[:, :r], ab[1])
    slots = [s for s in held for _ in range(3)] + [-1]
    x = torch.randn(len(slots), IN, generator=gen)
    meta = build_passes([(slots, None)], "cpu", lin.rank_tile > 1)
    want = F.linear(x, lin.weight)
    for t, s in enumerate(slots):
        if s < 0:
            continue
        for j, ab in enumerate(held[s]):
            if ab is not None:
                off = lin.offsets[j]
                want[t, off : off + SPLITS[j]] += x[t] @ ab[0].T @ ab[1].T
    torch.testing.assert_close(lin(x, meta), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dense", [F.linear, invariant.linear], ids=["exact widths", "rank tiles"])
@pytest.mark.parametrize("seed", range(4))
def test_random_writes_resizes_and_merges_keep_every_slot_exact(dense, seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(sum(SPLITS), IN, generator=gen) * 0.3
    lin = MultiLoraLinear(weight, None, SPLITS, ["q_proj", "k_proj", "v_proj"], IN, 3, MAX_RANK, dense)
    held: dict[int, list] = {}
    widened = narrowed = 0
    for _ in range(80):
        op = rng.random()
        before = lin.width
        if op < 0.7:  # write an adapter of random ranks into a random slot
            slot = rng.randrange(lin.n_slots)
            ranks = [rng.choice(RANKS) for _ in SPLITS]
            parts = [
                None if r == 0 else (torch.randn(r, IN, generator=gen), torch.randn(n, r, generator=gen))
                for r, n in zip(ranks, SPLITS, strict=True)
            ]
            if slot not in held and rng.random() < 0.3:  # a fresh slot given one part: the others read zeros
                parts[1:] = [None] * (len(SPLITS) - 1)
                lin.set_slot(slot, 0, *(parts[0] or (None, None)))
            else:
                if rng.random() < 0.5:
                    lin.fit(slot, ranks)  # as the model runner does; else set_slot alone lays them out
                for j, ab in enumerate(parts):
                    lin.set_slot(slot, j, *(ab or (None, None)))
            held[slot] = parts
        elif op < 0.9:  # resize: some survivors, moved
            n = rng.randint(1, 5)
            keep = rng.sample(range(lin.n_slots), min(n, lin.n_slots)) + [-1] * max(0, n - lin.n_slots)
            keep = keep[:n]
            rng.shuffle(keep)
            lin.resize(n, keep)
            held = {dst: held[src] for dst, src in enumerate(keep) if src >= 0 and src in held}
        elif held:  # merge a slot and unmerge: the base weight comes back bit for bit
            base = lin.weight.clone()
            lin.merge(rng.choice(sorted(held)))
            lin.unmerge()
            assert torch.equal(lin.weight, base)
        widened += lin.width > before
        narrowed += lin.width < before
        check(lin, held, gen)
    assert widened and narrowed  # both directions of `_relayout` ran
