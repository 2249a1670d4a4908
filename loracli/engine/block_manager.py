"""Paged KV-cache bookkeeping: fixed-size blocks, a free list, one block table per sequence.

Plain Python. Block b holds cache rows [b * block_size, (b + 1) * block_size). A sequence of n
tokens owns ceil(n / block_size) blocks; its token at position p lives in row
block_table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(len(seq)) <= len(self.free)

    def allocate(self, seq: Sequence) -> None:
        need = self.blocks_for(len(seq)) - len(seq.block_table)
        seq.block_table.extend(self.free.popleft() for _ in range(need))

    def can_append(self, seq: Sequence) -> bool:
        """Room for the KV of the sequence's last token (the one the next decode step feeds)."""
        return self.blocks_for(len(seq)) <= len(seq.block_table) + len(self.free)

    def append(self, seq: Sequence) -> None:
        self.allocate(seq)

    def free_seq(self, seq: Sequence) -> None:
        self.free.extend(seq.block_table)
        seq.block_table = []

    def row(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size
