"""The only part of the engine that builds tensors: batch inputs, adapter slot writes, forward.

`run(seqs, is_prefill, decode)` orders nothing itself: the engine hands sequences sorted by adapter
slot, so each slot's tokens form one contiguous run and the LoRA ops work on slices. A mixed
step's prompts and decoding sequences are sorted each on their own (the prompts' tokens come
first), so a slot in both has two runs and the LoRA metadata carries the permutation that sorts
the tokens by slot (`LoraMeta.order`): the ops gather and scatter the step's rows once each.
With a deterministic model (`CausalLM.deterministic`) the LoRA metadata asks for batch-invariant
ops, and a decode step's keys are padded (to the zero row) up to a multiple of `model.key_tile`;
otherwise a decode step hands attention the block tables and lengths (`build_paged_meta`).
A prefill computes each sequence from `Sequence.num_cached` on (the tokens before are in the
prefix cache: `AttnMeta.context_lens`, and `key_rows` to read every key of the step's sequences
from the cache). A prefill also leaves, in `prompt_logits`, the logits after every prompt token of the sequences
that ask for prompt logprobs (`SamplingParams.prompt_logprobs`), computed from the step's hidden
states for those rows only: the other sequences' lm_head work is unchanged.
When the batch holds adapter mixes the metadata has one pass per mix part (`build_passes`): pass k
gives each token the slot and weight of its k-th part (plain adapters: their slot, weight 1, in
pass 0 only); a mix is never run merged.
An adapter's parts on the embedding and lm_head (`LoraWeights.vocab`) go to `CausalLM.vocab` at
its slot (a saved matrix equal to the base model's is not kept); each step hands the model every
row's real slot for them (`vocab_slot_of`: also while the adapter is merged, so merged output keeps
its embedding and head parts; -1 for the base model and for mixes, which refuse such adapters).
"""

from __future__ import annotations

from itertools import accumulate

import torch

from ..adapter_vocab import VocabWeights
from ..adapters import LoraWeights
from ..kernels import LoraMeta, build_paged_meta, build_passes
from ..model.llama import AttnMeta, CausalLM
from ..model.vocab_adapters import SlotVocab
from .block_manager import BlockManager
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, blocks: BlockManager):
        self.model = model
        self.blocks = blocks
        self.device = model.device
        self.merged: str | None = None  # the adapter folded into the base weights, if any
        self.prompt_logits: dict[int, torch.Tensor] = {}  # seq_id -> logits [P - 1, V], by the last prefill

    @torch.inference_mode()
    def write_adapter(self, slot: int, weights: LoraWeights) -> None:
        """Copy an adapter's A and scaled B (DoRA: with its magnitudes) and its bias changes into `slot` of
        every LoRA linear; clear what it lacks."""
        for layer, lin in self.model.linears():
            modules = [weights.modules.get((layer, name)) for name in lin.names]
            lin.fit(slot, [0 if ab is None else ab[0].shape[0] for ab in modules])
            for j, name in enumerate(lin.names):
                where = (layer, name)
                ab = weights.modules.get(where)
                a, b = ab if ab is not None else (None, None)
                lin.set_slot(slot, j, a, b, weights.magnitudes.get(where))
                lin.set_bias(slot, j, weights.lora_biases.get(where), weights.base_biases.get(where))
        self.model.vocab.set(slot, self._slot_vocab(weights.vocab))

    def _slot_vocab(self, vocab: VocabWeights | None) -> SlotVocab | None:
        """The adapter's vocabulary parts on the model's device; a full matrix equal to the base one is left out."""
        if vocab is None:
            return None
        m = self.model

        def own(t: torch.Tensor | None, base: torch.Tensor) -> torch.Tensor | None:
            t = None if t is None else t.to(device=m.device, dtype=m.dtype)
            return None if t is None or torch.equal(t, base) else t

        def pair(ab: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
            return None if ab is None else (ab[0].to(m.device, m.dtype), ab[1].to(m.device, m.dtype))

        embed, head = own(vocab.embed, m.embed), own(vocab.head, m.lm_head)
        return SlotVocab(pair(vocab.embed_lora), pair(vocab.head_lora), embed, head)

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the KV rows of block a into block b, every layer, for each (a, b): a forked sample's
        copy of its prompt's partly filled last block."""
        bs = self.blocks.block_size
        src = self._tensor([a * bs + i for a, _ in pairs for i in range(bs)])
        dst = self._tensor([b * bs + i for _, b in pairs for i in range(bs)])
        for kv in self.model.kv:  # [2, rows + 1, kv_heads, head_dim]
            kv[:, dst] = kv[:, src]

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

    @staticmethod
    def vocab_slot_of(seq: Sequence) -> int:
        """The slot whose embedding / lm_head parts the sequence gets: its own, merged or not; -1 for a mix."""
        return seq.slot if seq.mix is None else -1

    def parts_of(self, seq: Sequence) -> list[tuple[int, float]]:
        """(slot, weight) of each LoRA term the sequence adds this step: none for the base model or
        the merged adapter, one for an adapter, one per part for a mix."""
        if seq.mix is not None:
            return [(slot, w) for slot, (_, w) in zip(seq.part_slots, seq.mix.parts, strict=True)]
        slot = self.slot_of(seq)
        return [] if slot < 0 else [(slot, 1.0)]

    def lora_meta(self, seqs: list[Sequence], tokens: list[int]) -> LoraMeta | None:
        """The step's LoRA metadata for `seqs` of `tokens[i]` tokens each: one pass, or one per mix part."""
        parts = [self.parts_of(seq) for seq in seqs]
        depth = max(map(len, parts), default=0)
        if depth == 0:
            return None
        weighted = any(seq.mix is not None for seq in seqs)
        passes = [_lora_pass(parts, tokens, k, weighted) for k in range(depth)]
        return build_passes(passes, self.device, self.model.deterministic)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def run(self, seqs: list[Sequence], is_prefill: bool, decode: list[Sequence] | None = None) -> torch.Tensor:
        """Forward one step; returns float32 logits [len(seqs) + len(decode), V] for each sequence's next
        token. A prefill's `decode` sequences (a mixed step) run their next token in the same forward,
        after the prefill's tokens (`AttnMeta.decode`)."""
        decode = decode or []
        if is_prefill:
            ids: list[int] = []
            pos: list[int] = []
            rows: list[int] = []
            lens: list[int] = []
            for seq in seqs:
                n, cached = len(seq), seq.num_cached
                ids.extend(seq.token_ids[cached:])
                pos.extend(range(cached, n))
                rows.extend(self.blocks.row(seq, p) for p in range(cached, n))
                lens.append(n - cached)
            ends = list(accumulate(lens, initial=-1))[1:]  # each sequence's last token row
            if decode:  # a mixed step: one token per decoding sequence after the prompts' tokens
                d_ids, d_pos, d_rows = self._decode_inputs(decode)
                ends += range(len(ids), len(ids) + len(decode))
                ids, pos, rows = ids + d_ids, pos + d_pos, rows + d_rows
            attn = AttnMeta(True, self._tensor(rows), lens)
            attn.decode = self._decode_meta(decode, d_rows) if decode else None
            if any(seq.num_cached for seq in seqs):
                attn.context_lens = [seq.num_cached for seq in seqs]
                attn.key_rows = self._tensor([self.blocks.row(seq, p) for seq in seqs for p in range(len(seq))])
            last = self._tensor(ends)
        else:
            ids, pos, rows = self._decode_inputs(seqs)
            attn = self._decode_meta(seqs, rows)
            last = None
        every = seqs + decode
        counts = attn.token_counts()  # tokens of each sequence of `every` in the step
        lora = self.lora_meta(every, counts)
        vocab = [self.vocab_slot_of(seq) for seq in every] if self.model.vocab.any() else None
        token_vocab = None if vocab is None else [s for s, n in zip(vocab, counts, strict=True) for _ in range(n)]
        hidden = self.model.forward(self._tensor(ids), self._tensor(pos), attn, lora, token_vocab)
        if is_prefill:
            self.prompt_logits = self._prompt_logits(seqs, attn.seq_lens, hidden, vocab)
        if last is not None:
            hidden = hidden.index_select(0, last)
        return self.model.logits(hidden, vocab)

    def _decode_inputs(self, seqs: list[Sequence]) -> tuple[list[int], list[int], list[int]]:
        """(token ids, positions, KV rows) of a decode step: each sequence's last token."""
        ids = [seq.token_ids[-1] for seq in seqs]
        pos = [len(seq) - 1 for seq in seqs]
        return ids, pos, [self.blocks.row(seq, len(seq) - 1) for seq in seqs]

    def _prompt_logits(
        self, seqs: list[Sequence], lens: list[int], hidden: torch.Tensor, vocab: list[int] | None
    ) -> dict[int, torch.Tensor]:
        """Logits [P - 1, V] after each prompt token but the last, for the prefilled sequences that ask
        for prompt logprobs and have none yet (hidden [T, H]: the step's tokens); nothing for the others."""
        out: dict[int, torch.Tensor] = {}
        start = 0
        for i, (seq, n) in enumerate(zip(seqs, lens, strict=True)):
            if seq.params.prompt_logprobs is not None and seq.prompt_logprobs is None and seq.num_prompt > 1:
                rows = hidden[start : start + seq.num_prompt - 1]  # [P - 1, H]
                out[seq.seq_id] = self.model.logits(rows, None if vocab is None else [vocab[i]] * len(rows))
            start += n
        return out

    def _decode_meta(self, seqs: list[Sequence], rows: list[int]) -> AttnMeta:
        bs, tile = self.blocks.block_size, self.model.key_tile
        if not self.model.deterministic:  # paged attention reads the keys where they lie
            meta = AttnMeta(False, self._tensor(rows), [1] * len(seqs))
            tables, seq_lens = [s.block_table for s in seqs], [len(s) for s in seqs]
            meta.paged = build_paged_meta(tables, seq_lens, bs, self.model.zero_row, device=self.device)
            return meta
        keys = -(-max(len(s) for s in seqs) // tile) * tile  # the longest sequence, padded to the key tile
        width = -(-keys // bs)
        table = torch.tensor([_padded(s.block_table, width) for s in seqs], dtype=torch.int64)  # [B, width]
        offs = torch.arange(keys)
        gather = table[:, offs // bs] * bs + offs % bs  # [B, L]
        lens = torch.tensor([len(s) for s in seqs])
        mask = offs[None, :] < lens[:, None]  # each layer narrows it to its own sliding window (`attention`)
        gather = torch.where(mask, gather, self.model.zero_row)  # masked positions read the zero row
        dev = self.device
        meta = AttnMeta(False, self._tensor(rows), [1] * len(seqs), gather.to(dev), mask[:, None, None, :].to(dev))
        meta.key_lens = lens.to(dev)
        return meta


def _padded(blocks: list[int], width: int) -> list[int]:
    """A block table cut or zero-padded to `width` entries."""
    return blocks[:width] + [0] * (width - len(blocks))


def _lora_pass(
    parts: list[list[tuple[int, float]]], tokens: list[int], k: int, weighted: bool
) -> tuple[list[int], list[float] | None]:
    """Pass k, per token: the slot and weight of its sequence's k-th part (-1 and 1.0 when it has
    fewer parts); no weights when no sequence is weighted."""
    slots: list[int] = []
    weights: list[float] = []
    for seq_parts, n in zip(parts, tokens, strict=True):
        slot, weight = seq_parts[k] if k < len(seq_parts) else (-1, 1.0)
        slots += [slot] * n
        weights += [weight] * n
    return slots, weights if weighted else None
