"""One device-memory budget for base weights, adapter slots, KV cache and working buffers.

Plain arithmetic on byte counts the engine measures from its tensors:

    budget = weights + working + slots * slot_bytes + vocab_reserve(slots) + kv_blocks * block_bytes

`weights` are the base model's tensors (and RoPE tables); `slot_bytes` one adapter slot across
every LoRA layer (A and B buffers at `max_lora_rank`); `block_bytes` one KV block across every
layer; `vocab_reserve(slots)` what the adapters' own embedding / lm_head parts (embedding and head
LoRA, modules_to_save matrices: `adapter_vocab.vocab_bytes`, an upper bound from each adapter file's
tensor shapes) can take while `slots` adapters sit in slots: the sum of the `slots` largest
(`vocab_costs`, one per adapter that has such parts, largest first); `working` an estimate of the
activations of the largest step, of `step_tokens` tokens (`max_batched_tokens`, plus `max_num_seqs`
with `mixed_prefill`: a mixed step's decode tokens come on top of its prompts):

    working = 2 * step_tokens * (3 * hidden + 2 * intermediate + q + 2 kv) * elem
              + max_num_seqs * vocab * 4                      (the float32 logits)
              + 2 * step_tokens * moe.working_width(hidden) * elem      (MoE families only)

`kv_blocks(slots)` is what is left for the KV cache at a slot count; growing the slots by one
costs `blocks_per_slot` blocks. The engine really reallocates both when it resizes, so the
process's memory follows the split.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..sizes import format_bytes


@dataclass(frozen=True)
class MemoryBudget:
    budget: int
    weights: int
    working: int
    slot_bytes: int
    block_bytes: int
    vocab_costs: tuple[int, ...] = ()  # bytes of each adapter's embedding / lm_head parts, largest first

    def vocab_reserve(self, slots: int) -> int:
        """The most the vocabulary parts of `slots` resident adapters can take."""
        return sum(self.vocab_costs[:slots])

    def kv_blocks(self, slots: int) -> int:
        fixed = self.weights + self.working + slots * self.slot_bytes + self.vocab_reserve(slots)
        return max(0, (self.budget - fixed) // self.block_bytes)

    @property
    def blocks_per_slot(self) -> int:
        return -(-self.slot_bytes // self.block_bytes)

    def check(self, slots: int, min_blocks: int) -> None:
        """ConfigError unless `slots` slots leave at least `min_blocks` KV blocks."""
        if self.kv_blocks(slots) < min_blocks:
            vocab = self.vocab_reserve(slots)
            need = self.weights + self.working + slots * self.slot_bytes + vocab + min_blocks * self.block_bytes
            parts = f", embedding / lm_head parts of adapters {format_bytes(vocab)}" if vocab else ""
            raise ConfigError(
                f"memory_budget {format_bytes(self.budget)} is too small: weights {format_bytes(self.weights)}, "
                f"working buffers {format_bytes(self.working)}, {slots} adapter slots "
                f"{format_bytes(slots * self.slot_bytes)}{parts} and {min_blocks} KV blocks need {format_bytes(need)}",
                fields=("memory_budget",),
            )

    def split(self, slots: int, kv_blocks: int) -> dict:
        return {
            "weights": self.weights,
            "working": self.working,
            "slots": slots * self.slot_bytes,
            "vocab": self.vocab_reserve(slots),
            "kv": kv_blocks * self.block_bytes,
        }


def working_bytes(spec, step_tokens: int, max_num_seqs: int, elem: int) -> int:
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    acts = 2 * step_tokens * (3 * spec.hidden + 2 * spec.intermediate + q + 2 * kv) * elem
    if spec.moe is not None:  # a MoE block's own buffers (`MoeSpec.working_width`)
        acts += 2 * step_tokens * spec.moe.working_width(spec.hidden) * elem
    return acts + max_num_seqs * spec.vocab_size * 4
