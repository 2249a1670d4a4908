"""`ModelSpec`: the shapes and options of a supported base model, read from a HF config.

Supported families: the rows of `families.FAMILIES` (Llama, Mistral, Qwen2, Qwen3, Gemma 2,
Gemma 3 text, Phi-3, Mixtral, Qwen2-MoE, Qwen3-MoE: decoder-only, RMSNorm, RoPE, gated MLP or
mixture of experts, GQA); anything else raises a one-line
`ModelError` listing them. `ModelSpec.family` says what differs per family; the per-layer values read
from the config are `layer_windows` (sliding window or None) and `rope_kinds` (which rotary table),
and `attn_scale` (head_dim ** -0.5, or query_pre_attn_scalar ** -0.5), `attn_softcap` /
`final_softcap` (Gemma 2's tanh soft-capping of attention scores and logits) and `activation`.
LoRA targets are the family's (`target_modules`: q,k,v,o,gate,up,down, or Phi-3's fused qkv_proj,
o_proj, gate_up_proj, down_proj); `module_shape` knows all of them.

What LoRA costs on such a model, one formula for the engine and `inspect-adapter`: a pair
A `[r, in]`, B `[out, r]` takes `lora_pair_bytes(r, in, out, dtype_bytes)` = r * (in + out) *
dtype_bytes, and one engine adapter slot at rank R holds a pair and two per-row tables (DoRA's
g - 1 and the bias change, `slot_table_bytes` = 2 * out * dtype_bytes) for every target module of
every layer (the family's `target_modules`; on a MoE layer, `layer_targets`: the attention and shared-expert ones),
whatever an adapter targets: `ModelSpec.slot_bytes(R, dtype_bytes)` (`SLOT_BYTES_FORMULA`).

MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE) also set `moe` (`moe_spec.MoeSpec`: experts, top-k,
which layers are sparse); `intermediate` is then the dense layers' MLP size (Mixtral: the experts').
"""

from __future__ import annotations

from dataclasses import dataclass

from .families import (
    ALL_TARGET_MODULES,
    BY_TYPE,
    SUPPORTED_TYPES,
    Family,
    activation_of,
    family_of,
    layer_rope_kinds,
    layer_windows,
)
from .moe_spec import SHARED_EXPERT_TARGETS, MoeSpec

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTN_MODULES + MLP_MODULES  # the Llama-family targets; `ALL_TARGET_MODULES`: any family's
SLOT_BYTES_FORMULA = (
    "sum over layers and the family's target modules (q,k,v,o,gate,up,down; Phi-3: qkv,o,gate_up,down) "
    "of (R*(in+out) + 2*out)*dtype_bytes (a MoE layer: its attention and shared-expert modules only)"
)
__all__ = [
    "ALL_TARGET_MODULES",
    "ATTN_MODULES",
    "MLP_MODULES",
    "SUPPORTED_TYPES",
    "TARGET_MODULES",
    "ModelSpec",
    "lora_pair_bytes",
    "slot_table_bytes",
]


def lora_pair_bytes(rank: int, fan_in: int, fan_out: int, dtype_bytes: int) -> int:
    """Bytes of one LoRA pair: A `[rank, fan_in]` and B `[fan_out, rank]`."""
    return rank * (fan_in + fan_out) * dtype_bytes


def slot_table_bytes(fan_out: int, dtype_bytes: int) -> int:
    """Bytes of one module's per-row slot tables: DoRA's g - 1 and the bias change, `[out]` each."""
    return 2 * fan_out * dtype_bytes


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab_size: int
    rms_eps: float
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None  # the window of the sliding layers (None: every layer attends to all)
    family: Family = BY_TYPE["llama"]
    layer_windows: tuple[int | None, ...] = ()  # per layer: its sliding window, None = full attention
    rope_kinds: tuple[str, ...] = ()  # per layer: its rotary table ("default", or Gemma 3's layer type)
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    activation: str = "silu"  # the gated MLP's activation: silu or gelu_pytorch_tanh
    moe: MoeSpec | None = None  # the experts of an MoE family (`moe_spec`); None: every layer's MLP is dense

    @classmethod
    def from_hf_config(cls, config) -> ModelSpec:
        mt = getattr(config, "model_type", None)
        family = family_of(mt)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        windows = layer_windows(config, family)
        bias = bool(getattr(config, "attention_bias", False))
        scalar = getattr(config, "query_pre_attn_scalar", None)
        return cls(
            model_type=mt,
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            vocab_size=config.vocab_size,
            rms_eps=config.rms_norm_eps,
            max_position=config.max_position_embeddings,
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=family.qkv_bias == "always" or bias,
            o_bias=family.qkv_bias != "always" and bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            sliding_window=next((w for w in windows if w is not None), None),
            family=family,
            layer_windows=windows,
            rope_kinds=layer_rope_kinds(config, family),
            attn_scale=None if scalar is None else scalar**-0.5,
            attn_softcap=getattr(config, "attn_logit_softcapping", None),
            final_softcap=getattr(config, "final_logit_softcapping", None),
            activation=activation_of(config),
            moe=MoeSpec.from_hf_config(config) if family.mlp == "moe" else None,
        )

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The decoder linears LoRA may target on this model (`Family.target_modules`)."""
        return self.family.target_modules

    @property
    def scale(self) -> float:
        """The attention scores' scale."""
        return self.head_dim**-0.5 if self.attn_scale is None else self.attn_scale

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a target linear."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden, q_out),
            "k_proj": (self.hidden, kv_out),
            "v_proj": (self.hidden, kv_out),
            "o_proj": (q_out, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
            "qkv_proj": (self.hidden, q_out + 2 * kv_out),
            "gate_up_proj": (self.hidden, 2 * self.intermediate),
        }
        if self.moe is not None and self.moe.shared_intermediate:  # Qwen2-MoE's shared expert
            gate, up, down = SHARED_EXPERT_TARGETS
            shared = self.moe.shared_intermediate
            shapes |= {gate: (self.hidden, shared), up: (self.hidden, shared), down: (shared, self.hidden)}
        return shapes[module]

    def is_sparse(self, layer: int) -> bool:
        """Whether the layer's MLP is a MoE block (`moe`), whose router and experts take no LoRA."""
        return self.moe is not None and self.moe.sparse[layer]

    def layer_targets(self, layer: int) -> tuple[str, ...]:
        """The LoRA targets layer `layer` has: `target_modules`; on a MoE layer, the attention ones and the
        shared expert's (Qwen2-MoE: `SHARED_EXPERT_TARGETS`)."""
        if not self.is_sparse(layer):
            return self.target_modules
        attn = tuple(m for m in self.target_modules if m in (*ATTN_MODULES, "qkv_proj"))
        return attn + (SHARED_EXPERT_TARGETS if self.moe is not None and self.moe.shared_intermediate else ())

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """Every LoRA target of some layer (`layer_targets`), in order."""
        return tuple(dict.fromkeys(m for layer in range(self.num_layers) for m in self.layer_targets(layer)))

    def slot_bytes(self, rank: int, dtype_bytes: int) -> int:
        """Bytes of one engine adapter slot at `rank`: `SLOT_BYTES_FORMULA`."""
        pairs = sum(
            lora_pair_bytes(rank, *self.module_shape(m), dtype_bytes)
            for layer in range(self.num_layers)
            for m in self.layer_targets(layer)
        )
        return pairs + self.slot_tables_bytes(dtype_bytes)

    def slot_tables_bytes(self, dtype_bytes: int) -> int:
        """Bytes of one slot's per-row DoRA and bias tables across the model (`slot_table_bytes`), in any slot."""
        return sum(
            slot_table_bytes(self.module_shape(m)[1], dtype_bytes)
            for layer in range(self.num_layers)
            for m in self.layer_targets(layer)
        )

    @staticmethod
    def module_path(layer: int, module: str) -> str:
        """The module's name inside the HF model, e.g. `model.layers.3.self_attn.q_proj`."""
        parent = "self_attn" if module in (*ATTN_MODULES, "qkv_proj") else "mlp"
        return f"model.layers.{layer}.{parent}.{module}"
