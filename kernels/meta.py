"""Per-step LoRA metadata, built once per step and shared by every LoRA layer.

`token_slot[T]` gives each token's adapter slot (-1 = no LoRA). The builder groups tokens
into runs of one slot (Punica's segments). When the caller orders sequences by slot (the
model runner does), every run is a contiguous slice and the ops need no gather/scatter;
otherwise `order` is the stable permutation that sorts tokens by slot, and the runs index
positions in that sorted order (so `order[start:end]` are the run's tokens).

`invariant` asks for results per token that do not depend on the rest of the batch (deterministic
mode): the torch backend then always takes its bmm path, on a grid padded to whole row tiles.

Adapter mixes (a token adding several adapters' terms, each with a weight) run as passes: one
`LoraMeta` per pass, chained through `next` (`build_passes`; `passes()` walks them). Pass k gives
each token the slot of its k-th adapter (-1 when it has fewer) and, in `token_weight`, that
adapter's weight: the caller runs shrink, `lora_weigh`, expand once per pass. A token's passes
depend on its own mix only, so its result does not follow the batch.

Backends derive further layouts from the runs (device segment tables for Triton, padded
slot groups for the CPU batched path). They are built lazily, at most once per step, through
`LoraMeta.cached`, so a backend that does not use a layout never pays for it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

_V = TypeVar("_V")


@dataclass
class LoraMeta:
    token_slot: torch.Tensor  # [T] int64 on the compute device, -1 = no LoRA
    runs: list[tuple[int, int, int]]  # (slot, start, end) over the (sorted) token order, slot >= 0 only
    order: torch.Tensor | None  # [T] int64 permutation sorting tokens by slot, or None when runs are slices
    num_tokens: int
    max_slot: int  # largest slot used, -1 when no token uses LoRA
    invariant: bool = False  # a token's result must not depend on the other tokens (deterministic mode)
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # backend layouts, see `cached`
    token_weight: torch.Tensor | None = None  # [T] float32 weight of each token's term (`lora_weigh`), None = 1
    next: LoraMeta | None = None  # the next pass of an adapter mix, see the module docstring

    @property
    def any_lora(self) -> bool:
        return bool(self.runs)

    def passes(self) -> Iterator[LoraMeta]:
        """This pass and the ones chained after it, in order."""
        meta: LoraMeta | None = self
        while meta is not None:
            yield meta
            meta = meta.next

    def cached(self, key: Hashable, build: Callable[[], _V]) -> _V:
        """Return the layout stored under `key`, calling `build()` the first time it is asked for."""
        value = self.cache.get(key)
        if value is None:
            value = self.cache[key] = build()
        return value


def _runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs (slot, start, end) of equal consecutive values, slot -1 runs dropped."""
    runs = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            if slots[start] >= 0:
                runs.append((slots[start], start, i))
            start = i
    return runs


def build_meta(
    token_slot: Sequence[int],
    device: torch.device | str = "cpu",
    invariant: bool = False,
    token_weight: Sequence[float] | None = None,
) -> LoraMeta:
    """Group `token_slot` (python ints, -1 = no LoRA) into slot runs; see module docstring."""
    slots = [int(s) for s in token_slot]
    if any(s < -1 for s in slots):
        raise ValueError(f"token slots must be >= -1, got {min(slots)}")
    runs = _runs(slots)
    used = [s for s, _, _ in runs]
    order = None
    if len(set(used)) != len(used):
        perm = sorted(range(len(slots)), key=slots.__getitem__)
        order = torch.tensor(perm, dtype=torch.int64, device=device)
        runs = _runs([slots[t] for t in perm])
    ts = torch.tensor(slots, dtype=torch.int64, device=device)
    meta = LoraMeta(ts, runs, order, len(slots), max(used, default=-1), invariant)
    if token_weight is not None:
        if len(token_weight) != len(slots):
            raise ValueError(f"token_weight has {len(token_weight)} entries for {len(slots)} tokens")
        meta.token_weight = torch.tensor([float(w) for w in token_weight], dtype=torch.float32, device=device)
    return meta


def build_passes(
    passes: Sequence[tuple[Sequence[int], Sequence[float] | None]],
    device: torch.device | str = "cpu",
    invariant: bool = False,
) -> LoraMeta:
    """One `LoraMeta` per (token_slot, token_weight) pass, chained through `next`; returns the first."""
    if not passes:
        raise ValueError("build_passes needs at least one pass")
    metas = [build_meta(slots, device, invariant, weights) for slots, weights in passes]
    for meta, after in itertools.pairwise(metas):
        meta.next = after
    return metas[0]
