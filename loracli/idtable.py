"""`IdTable`: a compact table of request ids (or line numbers) with a few flag bits each.

The one structure of a run that grows with the input: which ids were already answered (resume)
and which were seen so far (duplicate detection). Keys are 128-bit keyed BLAKE2b digests kept in
open-addressed `array`s (16 bytes of digest + 1 byte of flags per slot, at most half full), so
a million ids cost about 40 MB instead of the ~100 MB of a `set` of strings. Two different
keys share a digest with probability about n^2 / 2^129: never, in practice.

Keys are ids as the input gives them, strings or integers, and the type is part of the key
(`key_bytes`): the integer 1 and the string "1" are two keys, as they are two ids
(`requests.py`). The job's ledger and the resume planner's reading of an output both key this
table, so they agree on what one id is.

Pure Python, no I/O; `flags(key)` is 0 for a key never marked.
"""

from __future__ import annotations

from array import array
from hashlib import blake2b

_EMPTY = 0
_MIN_SLOTS = 1024


def key_bytes(key: str | int) -> bytes:
    """The canonical bytes of a key: its type, then its text (1 -> b"i1", "1" -> b"s1")."""
    tag = b"s" if isinstance(key, str) else b"i"
    return tag + str(key).encode("utf-8", "surrogatepass")


def _digest(key: str | int, space: bytes) -> tuple[int, int]:
    d = blake2b(key_bytes(key), digest_size=16, person=space).digest()
    hi = int.from_bytes(d[:8], "little")
    lo = int.from_bytes(d[8:], "little") | 1  # never _EMPTY
    return hi, lo


class IdTable:
    """A map from str or int keys to small non-zero flag sets (an int 1..255); `space` separates tables."""

    def __init__(self, space: bytes = b"id"):
        self.space = space
        self._len = 0
        self._alloc(_MIN_SLOTS)

    def _alloc(self, slots: int) -> None:
        self._mask = slots - 1
        self._hi = array("Q", bytes(8 * slots))
        self._lo = array("Q", bytes(8 * slots))
        self._flags = bytearray(slots)

    def __len__(self) -> int:
        return self._len

    def _find(self, hi: int, lo: int) -> int:
        """Index of the key's slot, or of the empty slot where it would go."""
        i = hi & self._mask
        his, los = self._hi, self._lo
        while los[i] != _EMPTY and (los[i] != lo or his[i] != hi):
            i = (i + 1) & self._mask
        return i

    def flags(self, key: str | int) -> int:
        hi, lo = _digest(key, self.space)
        return self._flags[self._find(hi, lo)]

    def __contains__(self, key: str | int) -> bool:
        return self.flags(key) != 0

    def mark(self, key: str | int, flags: int = 1) -> int:
        """Add `flags` to the key's flags; returns the flags it had before (0 if new)."""
        if not 0 < flags < 256:
            raise ValueError(f"flags must be in 1..255, got {flags}")
        hi, lo = _digest(key, self.space)
        i = self._find(hi, lo)
        before = self._flags[i]
        if self._lo[i] == _EMPTY:
            self._hi[i], self._lo[i] = hi, lo
            self._len += 1
        self._flags[i] = before | flags
        if 2 * self._len > self._mask + 1:
            self._grow()
        return before

    def _grow(self) -> None:
        his, los, fl = self._hi, self._lo, self._flags
        self._alloc(2 * (self._mask + 1))
        for hi, lo, f in zip(his, los, fl, strict=True):
            if lo != _EMPTY:
                i = self._find(hi, lo)
                self._hi[i], self._lo[i], self._flags[i] = hi, lo, f

    def nbytes(self) -> int:
        """Memory held by the table's arrays."""
        return len(self._hi) * 16 + len(self._flags)
