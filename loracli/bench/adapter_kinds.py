"""The kinds of random adapter `loracli bench` can make, as PEFT saves each kind.

    kind_tensors(kind, spec, rank, generator) -> {PEFT key: tensor}   the parts beyond plain LoRA
    kind_config(kind) -> {adapter_config.json field: value}            what the kind sets
    kind_targets(kind) -> target_modules the kind adds to the workload's

Kinds (`KINDS`):
- `lora`: plain LoRA on the workload's targets (nothing beyond them);
- `dora`: DoRA (`use_dora`): a `lora_magnitude_vector` [out] per adapted module, drawn around
  `MAGNITUDE` (a row norm of the same order as a trained model's);
- `bias`: LoRA bias (`lora_bias`): a `lora_B.bias` [out] per adapted module, N(0, B_STD²);
- `vocab`: LoRA on `embed_tokens` (`lora_embedding_A` [r, V], `lora_embedding_B` [H, r]) and on
  `lm_head` (`lora_A` [r, H], `lora_B` [V, r]) besides the workload's targets;
- `saved-head`: `modules_to_save = ["lm_head"]`: a full [V, H] head of its own, N(0, HEAD_STD²).
Values are small and random: they exercise the serving path, not the quality of the output.
"""

from __future__ import annotations

import math

import torch

from ..model.spec import ModelSpec

KINDS = ("lora", "dora", "bias", "vocab", "saved-head")
B_STD = 0.01
MAGNITUDE = 1.0
HEAD_STD = 0.02


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown adapter kind {kind!r} (known: {', '.join(KINDS)})")
    return kind


def kind_config(kind: str) -> dict:
    """The adapter_config.json fields the kind sets (over a plain LoRA config)."""
    return {
        "lora": {},
        "dora": {"use_dora": True},
        "bias": {"lora_bias": True},
        "vocab": {},
        "saved-head": {"modules_to_save": ["lm_head"]},
    }[check_kind(kind)]


def kind_targets(kind: str) -> tuple[str, ...]:
    return ("embed_tokens", "lm_head") if check_kind(kind) == "vocab" else ()


def kind_tensors(
    kind: str, spec: ModelSpec, rank: int, targets: tuple[str, ...], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """PEFT-named tensors the kind adds to the plain LoRA pairs of `targets`, in bfloat16."""
    out: dict[str, torch.Tensor] = {}
    if kind in ("dora", "bias"):
        for layer in range(spec.num_layers):
            for module in (m for m in targets if m in spec.layer_targets(layer)):
                _, fan_out = spec.module_shape(module)
                prefix = f"base_model.model.{spec.module_path(layer, module)}"
                if kind == "dora":
                    magnitude = MAGNITUDE + 0.05 * torch.randn(fan_out, generator=generator)
                    out[f"{prefix}.lora_magnitude_vector"] = magnitude
                else:
                    out[f"{prefix}.lora_B.bias"] = torch.randn(fan_out, generator=generator) * B_STD
    elif kind == "vocab":
        vocab, hidden = spec.vocab_size, spec.hidden
        emb = "base_model.model.model.embed_tokens"
        out[f"{emb}.lora_embedding_A"] = torch.randn(rank, vocab, generator=generator)
        out[f"{emb}.lora_embedding_B"] = torch.randn(hidden, rank, generator=generator) * B_STD
        out["base_model.model.lm_head.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) / math.sqrt(
            hidden
        )
        out["base_model.model.lm_head.lora_B.weight"] = torch.randn(vocab, rank, generator=generator) * B_STD
    elif kind == "saved-head":
        head = torch.randn(spec.vocab_size, spec.hidden, generator=generator)
        out["base_model.model.lm_head.weight"] = head * HEAD_STD
    return {k: v.to(torch.bfloat16).contiguous() for k, v in out.items()}
