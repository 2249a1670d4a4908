"""Tiny random models of every supported family, as model folders for `loracli bench --model DIR`.

    python recipes/family_models.py OUT [--families llama,qwen3,...] [--hidden 256] [--layers 4]

Each `OUT/<family>` is a Hugging Face model folder: the family's own transformers config class
(seeded random weights, float32 safetensors) with the default model's tokenizer and chat template
(SmolLM2's, so the bench's synthetic prompts are whole words). Gemma's sliding window (32) is
shorter than a bench prompt plus its answer, Phi-3 runs LongRoPE past its original 64 positions,
and the MoE families route to 2 experts of 4-8. `recipes/bench_families.sh` benches them all.
No network: the tokenizer comes from the converted default model (`loracli.model_source`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0 + 0.05 * i for i in range(16)],
    "long_factor": [1.0 + 0.5 * i for i in range(16)],
    "original_max_position_embeddings": 64,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
QWEN_MOE = dict(moe_intermediate_size=128, mlp_only_layers=[0], decoder_sparse_step=1, num_experts_per_tok=2)

# family -> (transformers config class, its own settings)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=False)),
    "qwen3": ("Qwen3Config", {}),
    "gemma2": (
        "Gemma2Config",
        dict(sliding_window=32, query_pre_attn_scalar=32, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    ),
    "gemma3_text": ("Gemma3TextConfig", dict(sliding_window=32, query_pre_attn_scalar=32)),
    "phi3": ("Phi3Config", dict(rope_parameters=LONGROPE, original_max_position_embeddings=64)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, shared_expert_intermediate_size=256, **QWEN_MOE)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, **QWEN_MOE)),
}


def tokenizer():
    """The default model's tokenizer (converted once into loracli's cache)."""
    from transformers import AutoTokenizer

    from loracli.model_source import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(None, progress=False))


def make(out: Path, family: str, tok, hidden: int, layers: int, seed: int = 0) -> Path:
    import torch
    import transformers

    cls_name, own = FAMILIES[family]
    config = getattr(transformers, cls_name)(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=hidden // 8,
        max_position_embeddings=1024,
        initializer_range=0.05,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        **own,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    folder = out / family
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    unknown = [f for f in args.families.split(",") if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    tok = tokenizer()
    for family in args.families.split(","):
        print(make(args.out, family, tok, args.hidden, args.layers))


if __name__ == "__main__":
    main()
