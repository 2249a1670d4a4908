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

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def resize(self, num_blocks: int, seqs) -> dict[int, int]:
        """New block count; returns {old block: new block} for every block of `seqs` (the blocks in use)."""
        if num_blocks < self.num_used:
            raise RuntimeError(f"cannot shrink the KV cache to {num_blocks} blocks: {self.num_used} are in use")
        targets = iter(sorted(b for b in self.free if b < num_blocks))
        mapping: dict[int, int] = {}
        for seq in seqs:
            for i, b in enumerate(seq.block_table):
                mapping[b] = b if b < num_blocks else next(targets)
                seq.block_table[i] = mapping[b]
        used = set(mapping.values())
        self.free = deque(b for b in range(num_blocks) if b not in used)
        self.num_blocks = num_blocks
        return mapping
