"""`ModelSpec`: the shapes and options of a supported base model, read from a HF config.

Supported families: Llama, Mistral, Qwen2 (decoder-only, RMSNorm, RoPE, SwiGLU MLP, GQA,
optional q/k/v bias, tied or untied embeddings). Anything else raises `ModelError`.

What LoRA costs on such a model, one formula for the engine and `inspect-adapter`: a pair
A `[r, in]`, B `[out, r]` takes `lora_pair_bytes(r, in, out, dtype_bytes)` = r * (in + out) *
dtype_bytes, and one engine adapter slot at rank R holds a pair for every target module of every
layer, whatever an adapter targets: `ModelSpec.slot_bytes(R, dtype_bytes)` (`SLOT_BYTES_FORMULA`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTN_MODULES + MLP_MODULES
SLOT_BYTES_FORMULA = "sum over layers and the 7 modules q,k,v,o,gate,up,down of R*(in+out)*dtype_bytes"


def lora_pair_bytes(rank: int, fan_in: int, fan_out: int, dtype_bytes: int) -> int:
    """Bytes of one LoRA pair: A `[rank, fan_in]` and B `[fan_out, rank]`."""
    return rank * (fan_in + fan_out) * dtype_bytes


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
    sliding_window: int | None

    @classmethod
    def from_hf_config(cls, config) -> ModelSpec:
        mt = getattr(config, "model_type", None)
        if mt not in SUPPORTED_TYPES:
            raise ModelError(f"model type {mt!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        window = getattr(config, "sliding_window", None)
        if mt == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
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
            qkv_bias=mt == "qwen2" or bool(getattr(config, "attention_bias", False)),
            o_bias=mt != "qwen2" and bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            sliding_window=window,
        )

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
        }
        return shapes[module]

    def slot_bytes(self, rank: int, dtype_bytes: int) -> int:
        """Bytes of one engine adapter slot at `rank`: `SLOT_BYTES_FORMULA`."""
        per_layer = sum(lora_pair_bytes(rank, *self.module_shape(m), dtype_bytes) for m in TARGET_MODULES)
        return self.num_layers * per_layer

    @staticmethod
    def module_path(layer: int, module: str) -> str:
        """The module's name inside the HF model, e.g. `model.layers.3.self_attn.q_proj`."""
        parent = "self_attn" if module in ATTN_MODULES else "mlp"
        return f"model.layers.{layer}.{parent}.{module}"
