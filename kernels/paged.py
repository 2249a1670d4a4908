"""Per-step metadata of paged decode attention, built once per step and shared by every layer.

    build_paged_meta(block_tables [B][*], seq_lens [B], block_size, pad_row, max_blocks, device) -> PagedMeta

The cache holds rows grouped in blocks of `block_size`: block k is rows [k * bs, (k + 1) * bs).
Sequence b has `seq_lens[b]` keys; its key at position j is in row
`block_tables[b, j // bs] * bs + j % bs`. Entries of a table past the sequence's last block are
padding (0) and never read. `pad_row` names a cache row that holds zeros (the model's
`zero_row`): a backend that pads sequences to one length reads it for the missing keys, so that
stale rows (garbage, possibly NaN, of freed blocks or of a last block's unwritten tail) never
reach a sum. Backends derive further layouts (the CPU path's row index and masks, int32 tables
for Triton) lazily through `PagedMeta.cached`, at most once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

_V = TypeVar("_V")


@dataclass
class PagedMeta:
    block_tables: torch.Tensor  # [B, W] int64 block ids, W >= ceil(max(seq_lens) / block_size), padding 0
    seq_lens: torch.Tensor  # [B] int64, keys of each sequence (>= 1)
    block_size: int
    pad_row: int  # a cache row holding zeros, read for padded positions
    max_len: int  # max(seq_lens), as a python int
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # backend layouts, see `cached`

    def cached(self, key: Hashable, build: Callable[[], _V]) -> _V:
        """Return the layout stored under `key`, calling `build()` the first time it is asked for."""
        value = self.cache.get(key)
        if value is None:
            value = self.cache[key] = build()
        return value


def build_paged_meta(
    block_tables: Sequence[Sequence[int]],
    seq_lens: Sequence[int],
    block_size: int,
    pad_row: int,
    max_blocks: int | None = None,
    device: torch.device | str = "cpu",
) -> PagedMeta:
    """Pad the tables (python lists of block ids) to `max_blocks` columns (default: the longest
    sequence's blocks) and check that every sequence has at least one key and its blocks."""
    lens = [int(n) for n in seq_lens]
    if len(block_tables) != len(lens) or not lens:
        raise ValueError(f"{len(block_tables)} block tables for {len(lens)} sequence lengths")
    if block_size < 1 or min(lens) < 1:
        raise ValueError(f"block_size and every sequence length must be >= 1, got {block_size} and {min(lens)}")
    width = max_blocks if max_blocks is not None else -(-max(lens) // block_size)
    rows = []
    for b, (blocks, n) in enumerate(zip(block_tables, lens, strict=True)):
        need = -(-n // block_size)
        if len(blocks) < need or need > width:
            raise ValueError(f"sequence {b} has {n} keys: it needs {need} blocks, has {len(blocks)} (width {width})")
        rows.append(list(blocks[:need]) + [0] * (width - need))
    table = torch.tensor(rows, dtype=torch.int64)  # [B, width], one tensor built from python lists
    lens_t = torch.tensor(lens, dtype=torch.int64)
    return PagedMeta(table.to(device), lens_t.to(device), block_size, pad_row, max(lens))
