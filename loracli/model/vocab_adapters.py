"""Per-slot vocabulary parts: what an adapter changes in the token embedding and in lm_head.

An adapter slot may hold a `SlotVocab` (every part optional; shapes V = vocabulary, H = hidden):

    embed_lora = (A.T [V, r], scale * B [H, r])  embedding LoRA: x[t] = E[id_t] + A.T[id_t] @ (scale * B).T
    head_lora  = (A [r, H], scale * B [V, r])     lm_head LoRA: logits = h @ W.T + (h @ A.T) @ (scale * B).T
    embed [V, H]                                  replaces the base embedding E for the slot's tokens
    head [V, H]                                   replaces the base lm_head W for the slot's sequences

Only slots whose adapter has such parts hold anything: `parts` is a list of optional entries, no
buffer is preallocated, and `set(slot, None)` (the slot taken by an adapter without them) frees
what the slot held. `resize(n, keep)` follows the slot table's compaction (`SlotMove.keep`).

    embed(ids [T], slots [T] or None, base [V, H], dense) -> [T, H]
    logits(hidden [B, H], slots [B] or None, base_head [V, H], dense) -> float32 [B, V]

`slots` gives each row's adapter slot (-1: the base model). Rows of slots without parts get the
base matrices; the rows of each slot with parts are gathered, computed (base or replacement
matrix, plus the LoRA term, in the model dtype, then float32 for logits, as PEFT adds them) and
written back. The base and replacement matrices stay separate even when the model ties lm_head to
the embedding, so a head part never reaches the embedding, nor the reverse. Every GEMM goes
through the model's `dense` (`invariant.linear` in deterministic mode), so a row's result depends
on its own token and slot only, never on the other rows of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Dense = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [N, K], weight [M, K]) -> x @ weight.T [N, M]


@dataclass
class SlotVocab:
    embed_lora: tuple[torch.Tensor, torch.Tensor] | None = None  # (A.T [V, r], scale * B [H, r])
    head_lora: tuple[torch.Tensor, torch.Tensor] | None = None  # (A [r, H], scale * B [V, r])
    embed: torch.Tensor | None = None  # [V, H]
    head: torch.Tensor | None = None  # [V, H]

    def tensors(self) -> list[torch.Tensor]:
        pairs = [t for pair in (self.embed_lora, self.head_lora) if pair is not None for t in pair]
        return pairs + [t for t in (self.embed, self.head) if t is not None]

    @property
    def changes_embedding(self) -> bool:
        return self.embed_lora is not None or self.embed is not None

    @property
    def changes_head(self) -> bool:
        return self.head_lora is not None or self.head is not None


class VocabAdapters:
    def __init__(self, n_slots: int):
        self.parts: list[SlotVocab | None] = [None] * n_slots

    def set(self, slot: int, parts: SlotVocab | None) -> None:
        """Give `slot` its adapter's parts (None or no parts: nothing held, the old parts freed)."""
        self.parts[slot] = parts if parts is not None and parts.tensors() else None

    def resize(self, n_slots: int, keep: list[int]) -> None:
        """New slot i takes old slot keep[i]; the other slots are emptied."""
        self.parts = [self.parts[s] for s in keep] + [None] * (n_slots - len(keep))

    def nbytes(self) -> int:
        """Bytes the slots hold, a tensor shared by two parts or slots counted once."""
        seen = {id(t): t.nbytes for p in self.parts if p is not None for t in p.tensors()}
        return sum(seen.values())

    def any(self) -> bool:
        return any(p is not None for p in self.parts)

    def _groups(self, slots: list[int] | None, device, wanted: Callable[[SlotVocab], bool]):
        """(parts, row indices [n]) per slot of `slots` whose parts satisfy `wanted`, in slot order."""
        if slots is None or not self.any():
            return []
        rows: dict[int, list[int]] = {}
        for i, s in enumerate(slots):
            if s >= 0:
                rows.setdefault(s, []).append(i)
        out = []
        for s in sorted(rows):
            parts = self.parts[s]
            if parts is not None and wanted(parts):
                out.append((parts, torch.tensor(rows[s], dtype=torch.int64, device=device)))
        return out

    def embed(self, ids: torch.Tensor, slots: list[int] | None, base: torch.Tensor, dense: Dense) -> torch.Tensor:
        x = base[ids]  # [T, H]
        for parts, rows in self._groups(slots, ids.device, lambda p: p.changes_embedding):
            sub = ids[rows]  # [n]
            if parts.embed is not None:
                x.index_copy_(0, rows, parts.embed[sub])
            if parts.embed_lora is not None:
                a_t, b = parts.embed_lora
                x.index_copy_(0, rows, x[rows] + dense(a_t[sub], b))  # [n, r] @ [r, H]
        return x

    def logits(self, hidden: torch.Tensor, slots: list[int] | None, base_head: torch.Tensor, dense: Dense):
        out = dense(hidden, base_head).float()  # [B, V]
        for parts, rows in self._groups(slots, hidden.device, lambda p: p.changes_head):
            h = hidden[rows]  # [n, H]
            y = dense(h, parts.head if parts.head is not None else base_head)  # [n, V]
            if parts.head_lora is not None:
                a, b = parts.head_lora
                y = y + dense(dense(h, a), b)  # [n, r] -> [n, V]
            out.index_copy_(0, rows, y.float())
        return out
