"""The supported model families (dense and MoE), one `Family` row each, looked up by HF `model_type`.

What differs between the decoders `llama.CausalLM` runs, and nothing else, is in this table:

- `norm`: "rms" = w * rmsnorm(x) (cast to the model dtype before the weight, as Llama), or
  "rms1p" = (1 + w) * rmsnorm(x) in float32, then cast (Gemma);
- `qk_norm`: an RMSNorm over each head's q and k, before RoPE (Qwen3, Gemma 3);
- `embed_scale`: the embedding times sqrt(hidden), the factor rounded to the model dtype (Gemma);
- `sandwich_norms`: norms on the attention output and around the MLP (Gemma 2 / 3: the checkpoint's
  post_attention_layernorm goes on the attention output, pre_/post_feedforward_layernorm around the MLP);
- `fused_qkv` / `fused_gate_up`: the checkpoint (and a PEFT adapter) holds q|k|v as one `qkv_proj` and
  gate|up as one `gate_up_proj` (Phi-3); each is one LoRA target whose B covers the whole fused output;
- `windows`: "all" = `config.sliding_window` on every layer (Mistral, Phi-3), "layer_types" = only on the
  layers `config.layer_types` marks "sliding_attention" (Qwen2, Qwen3, Gemma 2, Gemma 3);
- `rope_by_layer_type`: transformers' rotary class takes a layer type (Gemma 3: a local base for sliding
  layers, `rope_local_base_freq`, and the global one for full-attention layers);
- `qkv_bias`: "config" = `attention_bias` on q, k, v and o; "always" = on q, k, v only (Qwen2);
- `mlp`: "dense" (a gated MLP), or "moe": the layers `moe_spec.MoeSpec.sparse` marks run a sparse
  mixture-of-experts block (`moe.MoeBlock`), the others a gated MLP (Mixtral, Qwen2-MoE, Qwen3-MoE);
- `hf_module` / `rotary_class`: where transformers' rotary embedding for the family lives.

Values read from the config (attention scale, soft-capping, activation, windows) land in `ModelSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    hf_module: str
    rotary_class: str
    norm: str = "rms"
    qk_norm: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    windows: str = "all"
    rope_by_layer_type: bool = False
    qkv_bias: str = "config"
    mlp: str = "dense"

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The decoder linears a LoRA adapter may target, in checkpoint order."""
        attn = ("qkv_proj",) if self.fused_qkv else ("q_proj", "k_proj", "v_proj")
        mlp = ("gate_up_proj",) if self.fused_gate_up else ("gate_proj", "up_proj")
        return (*attn, "o_proj", *mlp, "down_proj")


FAMILIES = (
    Family("Llama", ("llama",), "llama", "LlamaRotaryEmbedding"),
    Family("Mistral", ("mistral",), "mistral", "MistralRotaryEmbedding"),
    Family("Qwen2", ("qwen2",), "qwen2", "Qwen2RotaryEmbedding", windows="layer_types", qkv_bias="always"),
    Family("Qwen3", ("qwen3",), "qwen3", "Qwen3RotaryEmbedding", qk_norm=True, windows="layer_types"),
    Family(
        "Gemma 2",
        ("gemma2",),
        "gemma2",
        "Gemma2RotaryEmbedding",
        norm="rms1p",
        embed_scale=True,
        sandwich_norms=True,
        windows="layer_types",
    ),
    Family(
        "Gemma 3",
        ("gemma3_text",),
        "gemma3",
        "Gemma3RotaryEmbedding",
        norm="rms1p",
        qk_norm=True,
        embed_scale=True,
        sandwich_norms=True,
        windows="layer_types",
        rope_by_layer_type=True,
    ),
    Family("Phi-3", ("phi3",), "phi3", "Phi3RotaryEmbedding", fused_qkv=True, fused_gate_up=True),
    Family("Mixtral", ("mixtral",), "mixtral", "MixtralRotaryEmbedding", mlp="moe"),
    Family(
        "Qwen2-MoE",
        ("qwen2_moe",),
        "qwen2_moe",
        "Qwen2MoeRotaryEmbedding",
        windows="layer_types",
        qkv_bias="always",
        mlp="moe",
    ),
    Family("Qwen3-MoE", ("qwen3_moe",), "qwen3_moe", "Qwen3MoeRotaryEmbedding", qk_norm=True, mlp="moe"),
)
BY_TYPE = {mt: f for f in FAMILIES for mt in f.model_types}
SUPPORTED_TYPES = tuple(BY_TYPE)
ALL_TARGET_MODULES = tuple(dict.fromkeys(m for f in FAMILIES for m in f.target_modules))
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


def family_of(model_type: str | None) -> Family:
    """The family of a model type; `ModelError` listing the supported ones otherwise."""
    if model_type not in BY_TYPE:
        raise ModelError(f"model type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})")
    return BY_TYPE[model_type]


def activation_of(config) -> str:
    """The MLP activation's name (`hidden_activation` for Gemma, else `hidden_act`); `ModelError` if not served."""
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if name not in ACTIVATIONS:
        raise ModelError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return name


def layer_windows(config, family: Family) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), as transformers' attention applies it."""
    window = getattr(config, "sliding_window", None)
    if family.model_types == ("qwen2",) and not getattr(config, "use_sliding_window", False):
        window = None
    n = config.num_hidden_layers
    if window is None:
        return (None,) * n
    if family.windows == "all":
        return (window,) * n
    types = getattr(config, "layer_types", None) or ["full_attention"] * n
    return tuple(window if t == "sliding_attention" else None for t in types)


def layer_rope_kinds(config, family: Family) -> tuple[str, ...]:
    """Each layer's rotary table: its layer type when the family's RoPE depends on it, else "default"."""
    if family.rope_by_layer_type:
        return tuple(config.layer_types)
    return ("default",) * config.num_hidden_layers
