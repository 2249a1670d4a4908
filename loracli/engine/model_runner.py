"""The only part of the engine that builds tensors: batch inputs, adapter slot writes, forward.

`run(seqs, is_prefill)` orders nothing itself: the engine hands sequences sorted by adapter
slot, so each slot's tokens form one contiguous run and the LoRA ops work on slices.
With a deterministic model (`CausalLM.deterministic`) the LoRA metadata asks for batch-invariant
ops, and a decode step's keys are padded (to the zero row) up to a multiple of `model.key_tile`.
"""

from __future__ import annotations

import torch

from ..adapters import LoraWeights
from ..kernels import build_meta
from ..model.llama import AttnMeta, CausalLM
from .block_manager import BlockManager
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, blocks: BlockManager):
        self.model = model
        self.blocks = blocks
        self.device = model.device
        self.merged: str | None = None  # the adapter folded into the base weights, if any

    @torch.inference_mode()
    def write_adapter(self, slot: int, weights: LoraWeights) -> None:
        """Copy an adapter's A and scaled B into `slot` of every LoRA linear; clear what it lacks."""
        for layer, lin in self.model.linears():
            for j, name in enumerate(lin.names):
                ab = weights.modules.get((layer, name))
                lin.set_slot(slot, j, *(ab if ab is not None else (None, None)))

    def merge(self, adapter: str, slot: int) -> None:
        """Fold the adapter in `slot` into the base weights; its sequences then run with no LoRA term."""
        for _, lin in self.model.linears():
            lin.merge(slot)
        self.merged = adapter

    def unmerge(self) -> None:
        """Restore the original base weights bit for bit."""
        for _, lin in self.model.linears():
            lin.unmerge()
        self.merged = None

    def slot_of(self, seq: Sequence) -> int:
        """The slot whose LoRA the sequence gets this step: -1 when its adapter is merged."""
        return -1 if self.merged is not None and seq.adapter == self.merged else seq.slot

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def run(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Forward one step; returns float32 logits [len(seqs), V] for each sequence's next token."""
        if is_prefill:
            ids: list[int] = []
            pos: list[int] = []
            rows: list[int] = []
            slots: list[int] = []
            lens: list[int] = []
            for seq in seqs:
                n = len(seq)
                ids.extend(seq.token_ids)
                pos.extend(range(n))
                rows.extend(self.blocks.row(seq, p) for p in range(n))
                slots.extend([self.slot_of(seq)] * n)
                lens.append(n)
            attn = AttnMeta(True, self._tensor(rows), lens)
            last = self._tensor([sum(lens[: i + 1]) - 1 for i in range(len(lens))])
        else:
            ids = [seq.token_ids[-1] for seq in seqs]
            pos = [len(seq) - 1 for seq in seqs]
            rows = [self.blocks.row(seq, len(seq) - 1) for seq in seqs]
            slots = [self.slot_of(seq) for seq in seqs]
            attn = self._decode_meta(seqs, rows)
            last = None
        lora = build_meta(slots, self.device, self.model.deterministic) if any(s >= 0 for s in slots) else None
        hidden = self.model.forward(self._tensor(ids), self._tensor(pos), attn, lora)
        if last is not None:
            hidden = hidden.index_select(0, last)
        return self.model.logits(hidden)

    def _decode_meta(self, seqs: list[Sequence], rows: list[int]) -> AttnMeta:
        bs, tile = self.blocks.block_size, self.model.key_tile
        keys = -(-max(len(s) for s in seqs) // tile) * tile  # the longest sequence, padded to the key tile
        width = -(-keys // bs)
        table = torch.zeros(len(seqs), width, dtype=torch.int64)
        for i, seq in enumerate(seqs):
            table[i, : len(seq.block_table)] = torch.tensor(seq.block_table[:width])
        offs = torch.arange(keys)
        gather = table[:, offs // bs] * bs + offs % bs  # [B, L]
        lens = torch.tensor([len(s) for s in seqs])
        mask = offs[None, :] < lens[:, None]
        window = self.model.spec.sliding_window
        if window is not None:
            mask &= offs[None, :] >= (lens[:, None] - window)
        gather = torch.where(mask, gather, self.model.zero_row)  # masked positions read the zero row
        return AttnMeta(
            False, self._tensor(rows), [1] * len(seqs), gather.to(self.device), mask[:, None, None, :].to(self.device)
        )
