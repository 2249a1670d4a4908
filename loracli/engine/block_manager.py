"""Paged KV-cache bookkeeping: fixed-size blocks, a free list, one block table per sequence, and
the prefix cache. Plain Python.

Block b holds cache rows [b * block_size, (b + 1) * block_size). A sequence of n tokens owns
ceil(n / block_size) blocks; its token at position p lives in row
block_table[p // block_size] * block_size + p % block_size.

Blocks are reference counted (`refs`): `fork(parent, child)` gives the child the parent's full
blocks (shared, read-only: no position in them is ever written again) and a fresh block for a
partially filled last one, whose rows the caller copies (the returned (source, copy) pair), so
every block a sequence writes to is its own. A block returns to the free list when its last
sequence lets go of it.

Prefix caching (`prefix_caching=True`): a full block is named by a `BlockKey`, (the sequence's
`identity`, the digest of the token ids of the block and of every block before it: `chain_digests`).
The identity names everything else that shapes the block's KV values (the adapter or mix, whether
it runs merged, ...: `engine.prefix_identity`), so two requests share a block only when the KV
would be computed the same way. `allocate(seq, identity)` takes the longest run of cached blocks
that starts the sequence, at most up to its second-to-last token (the last one is always
computed, for its logits), and sets `seq.num_cached` to the tokens they hold; the prefill computes
the rest. The full blocks the prefill computes are named at once, so a sequence admitted in the
same step can share them (a layer writes every token's KV before any attention reads it); a
failed step un-names them (`forget`). A freed block that has a name stays cached: it is free
(counted in `num_free`) but is handed out fresh only after every unnamed free block, least
recently freed first, losing its name then. Blocks a decode step fills are not named.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from .sequence import Sequence

BlockKey = tuple[tuple, bytes]  # (identity, chain digest)


@dataclass
class PrefixStats:
    """What the prefix cache saved: full blocks looked up at admission, found cached, and their tokens."""

    lookup_blocks: int = 0
    hit_blocks: int = 0
    hit_tokens: int = 0
    prefill_tokens: int = 0  # tokens the admissions asked to prefill (cached ones included)


def chain_digests(token_ids: list[int], block_size: int, done: list[bytes]) -> list[bytes]:
    """`done` (the digests of the first blocks) extended to every full block of `token_ids`: the
    digest of block i covers its tokens and, through block i - 1's digest, every token before it."""
    out = list(done)
    for i in range(len(done), len(token_ids) // block_size):
        h = hashlib.blake2b(out[-1] if out else b"", digest_size=16)
        h.update(array("q", token_ids[i * block_size : (i + 1) * block_size]).tobytes())
        out.append(h.digest())
    return out


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.free: deque[int] = deque(range(num_blocks))  # free blocks without a name
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # free named blocks, least recently freed first
        self.refs: dict[int, int] = {}  # block in use -> how many block tables hold it
        self.key_of: dict[int, BlockKey] = {}  # named block -> its key
        self.block_of: dict[BlockKey, int] = {}  # key -> the block holding it
        self.stats = PrefixStats()

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.cached_free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(len(seq)) <= self.num_free

    def _take(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.cached_free.popitem(last=False)
            self._unname(block)
        self.refs[block] = 1
        return block

    def _unname(self, block: int) -> None:
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.block_of[key]

    def _keys(self, seq: Sequence, identity: tuple) -> list[BlockKey]:
        seq.block_digests = chain_digests(seq.token_ids, self.block_size, seq.block_digests)
        return [(identity, d) for d in seq.block_digests]

    def cached_prefix(self, seq: Sequence, identity: tuple | None) -> list[int]:
        """The cached blocks `seq` would start with (none without caching, an identity, or when it asks
        for prompt logprobs: those need every prompt token's hidden state)."""
        if not self.prefix_caching or identity is None or _wants_prompt_logprobs(seq):
            return []
        hits = []
        for key in self._keys(seq, identity)[: (len(seq) - 1) // self.block_size]:
            block = self.block_of.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def needed(self, seq: Sequence, identity: tuple | None = None) -> tuple[int, int]:
        """(free blocks `allocate(seq, identity)` would take, tokens it would find cached); a cached
        block that is free counts as taken: it stops being free."""
        hits = self.cached_prefix(seq, identity)
        return self.blocks_for(len(seq)) - sum(1 for b in hits if b in self.refs), len(hits) * self.block_size

    def allocate(self, seq: Sequence, identity: tuple | None = None) -> None:
        """Blocks for every token of `seq`. A sequence holding no blocks is being admitted: with an
        identity (and prefix caching on) it starts with the longest cached prefix (`seq.num_cached`
        tokens, else 0) and names its other full blocks."""
        if not seq.block_table:
            self._allocate_cached(seq, identity)
            return
        need = self.blocks_for(len(seq)) - len(seq.block_table)
        seq.block_table.extend(self._take() for _ in range(need))

    def _allocate_cached(self, seq: Sequence, identity: tuple | None) -> None:
        hits = self.cached_prefix(seq, identity)
        for block in hits:
            if block in self.refs:
                self.refs[block] += 1
            else:
                del self.cached_free[block]
                self.refs[block] = 1
        seq.block_table = list(hits)
        seq.num_cached = len(hits) * self.block_size
        seq.block_table.extend(self._take() for _ in range(self.blocks_for(len(seq)) - len(hits)))
        if identity is None:
            return
        s = self.stats
        s.prefill_tokens += len(seq)
        if not self.prefix_caching or _wants_prompt_logprobs(seq):
            return
        keys = self._keys(seq, identity)
        s.lookup_blocks += len(keys)
        s.hit_blocks += len(hits)
        s.hit_tokens += seq.num_cached
        for key, block in zip(keys[len(hits) :], seq.block_table[len(hits) :], strict=False):
            if key not in self.block_of:  # else an equal block is cached already: keep that one
                self.block_of[key] = block
                self.key_of[block] = key

    def forget(self, seq: Sequence) -> None:
        """Un-name the blocks of `seq`: their KV may not have been written (its step failed)."""
        for block in seq.block_table:
            self._unname(block)

    def can_append(self, seq: Sequence) -> bool:
        """Room for the KV of the sequence's last token (the one the next decode step feeds)."""
        return self.blocks_for(len(seq)) <= len(seq.block_table) + self.num_free

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
        """Let go of the blocks of `seq`; a block nobody holds any more is free (cached, if named)."""
        for block in reversed(seq.block_table):  # the tail first: a prefix outlives its tails in the LRU order
            self.refs[block] -= 1
            if self.refs[block] == 0:
                del self.refs[block]
                if block in self.key_of:
                    self.cached_free[block] = None
                else:
                    self.free.append(block)
        seq.block_table = []

    def row(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def resize(self, num_blocks: int, seqs) -> dict[int, int]:
        """New block count; returns {old block: new block} for every block of `seqs` (the blocks in use).

        The cache is reallocated and only blocks in use are copied, so the free named blocks lose
        their names; a moved named block keeps its name."""
        if num_blocks < self.num_used:
            raise RuntimeError(f"cannot shrink the KV cache to {num_blocks} blocks: {self.num_used} are in use")
        for block in list(self.cached_free):
            self._unname(block)
        self.free.extend(self.cached_free)
        self.cached_free.clear()
        targets = iter(sorted(b for b in self.free if b < num_blocks))
        mapping: dict[int, int] = {}
        for seq in seqs:
            for i, b in enumerate(seq.block_table):
                if b not in mapping:  # a shared block moves once
                    mapping[b] = b if b < num_blocks else next(targets)
                seq.block_table[i] = mapping[b]
        self.refs = {mapping.get(b, b): n for b, n in self.refs.items()}
        self.key_of = {mapping.get(b, b): key for b, key in self.key_of.items()}
        self.block_of = {key: b for b, key in self.key_of.items()}
        used = set(mapping.values())
        self.free = deque(b for b in range(num_blocks) if b not in used)
        self.num_blocks = num_blocks
        return mapping


def prefix_identity(seq: Sequence, merged: str | None = None, long_rope: bool = False) -> tuple:
    """What besides its tokens shapes a sequence's KV: the base model, its adapter (and whether it
    runs merged into the base weights, `merged`), or its mix with the weights; `long_rope`: the
    sequence takes the long RoPE table (a longrope model past its original length)."""
    if seq.mix is not None:
        who: tuple = ("mix", seq.mix.parts)
    elif seq.adapter is None:
        who = ("base",)
    else:
        who = ("adapter", seq.adapter, seq.adapter == merged)
    return (*who, long_rope)


def _wants_prompt_logprobs(seq: Sequence) -> bool:
    """A sequence whose prefill must give logits after every prompt token (it has none yet)."""
    return seq.params.prompt_logprobs is not None and seq.prompt_logprobs is None
