"""Paged KV-cache bookkeeping: fixed-size blocks, a free list, one block table per sequence.

Plain Python. Block b holds cache rows [b * block_size, (b + 1) * block_size). A sequence of n
tokens owns ceil(n / block_size) blocks; its token at position p lives in row
block_table[p // block_size] * block_size + p % block_size.

Blocks are reference counted (`refs`): `fork(parent, child)` gives the child the parent's full
blocks (shared, read-only: no position in them is ever written again) and a fresh block for a
partially filled last one, whose rows the caller copies (the returned (source, copy) pair), so
every block a sequence writes to is its own. A block returns to the free list when its last
sequence lets go of it.
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.refs: dict[int, int] = {}  # block in use -> how many block tables hold it

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(len(seq)) <= len(self.free)

    def _take(self) -> int:
        block = self.free.popleft()
        self.refs[block] = 1
        return block

    def allocate(self, seq: Sequence) -> None:
        need = self.blocks_for(len(seq)) - len(seq.block_table)
        seq.block_table.extend(self._take() for _ in range(need))

    def can_append(self, seq: Sequence) -> bool:
        """Room for the KV of the sequence's last token (the one the next decode step feeds)."""
        return self.blocks_for(len(seq)) <= len(seq.block_table) + len(self.free)

    def append(self, seq: Sequence) -> None:
        self.allocate(seq)

    def fork_cost(self, seq: Sequence) -> int:
        """Free blocks one fork of `seq` (as it is now) takes: 1 when its last block is partly filled."""
        return 1 if len(seq) % self.block_size else 0

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give `child` (holding no blocks, as long as `parent`) the parent's blocks: the full ones
        shared, a copy of a partly filled last one. Returns (parent's block, child's block) to copy
        the rows of, or None."""
        full = len(parent) // self.block_size
        shared = parent.block_table[:full]
        for block in shared:
            self.refs[block] += 1
        child.block_table = list(shared)
        if full == len(parent.block_table):
            return None
        copy = self._take()
        child.block_table.append(copy)
        return parent.block_table[full], copy

    def free_seq(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                del self.refs[block]
                self.free.append(block)
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
                if b not in mapping:  # a shared block moves once
                    mapping[b] = b if b < num_blocks else next(targets)
                seq.block_table[i] = mapping[b]
        self.refs = {mapping.get(b, b): n for b, n in self.refs.items()}
        used = set(mapping.values())
        self.free = deque(b for b in range(num_blocks) if b not in used)
        self.num_blocks = num_blocks
        return mapping
