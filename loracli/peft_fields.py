"""Every field of PEFT's `LoraConfig` (peft 0.21) and what loracli does with it at inference.

An `adapter_config.json` field falls in one of three groups:
- `READ`: loracli reads it and serves what it asks (the adapter's weights and scaling);
- `INERT`: it changes training, initialisation or metadata only, or its effect is already in the
  saved weights, so serving ignores it (`lora_dropout`: dropout is off at inference);
- `REFUSED`: a variant loracli does not serve; when the field is set to anything but PEFT's
  default, the adapter is refused with the field's name and the reason (`refusals`).
A field in none of them (written by a newer PEFT) is reported by `unknown_fields`, served as if
absent, and `inspect-adapter` warns about it.

Light: no torch, no PEFT import (the table is written out, checked against the installed PEFT by
`tests/test_adapter_config_coverage.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

READ = (
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "use_dora",
    "bias",
    "lora_bias",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
    "init_lora_weights",
    "base_model_name_or_path",
    "task_type",
)
INERT = (
    "auto_mapping",
    "peft_version",
    "revision",
    "inference_mode",
    "lora_dropout",  # dropout is off at inference
    "fan_in_fan_out",  # PEFT turns it off itself on nn.Linear targets, the only kind these models have
    "megatron_core",  # used only with megatron_config
    "qalora_group_size",  # used only with use_qalora
    "loftq_config",  # initialisation methods: their result is in the saved weights
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "runtime_config",  # runtime switches of PEFT's own forward (e.g. ephemeral GPU offload)
    "ensure_weight_tying",  # keeps tied copies tied when saving: the saved tensors say what is tied
)
# field -> (PEFT's default, why loracli refuses any other value)
REFUSED: dict[str, tuple[Any, str]] = {
    "megatron_config": (None, "Megatron-parallel LoRA layers are not served"),
    "trainable_token_indices": (None, "trainable token rows (retrained embedding rows) are not served"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA) is not served"),
    "use_qalora": (False, "QA-LoRA (quantization-aware pooling) is not served"),
    "layer_replication": (None, "layer replication is not served"),
    "target_parameters": (None, "LoRA on bare parameters (e.g. MoE expert tensors) is not served"),
    "use_bdlora": (None, "block-diagonal LoRA (BD-LoRA) is not served"),
    "arrow_config": (None, "Arrow routing between LoRA experts is not served"),
    "velora_config": (None, "VeLoRA is not served"),
    "monteclora_config": (None, "MonteCLoRA is not served"),
    "kasa_config": (None, "KaSA is not served"),
}


def _is_default(value: Any, default: Any) -> bool:
    return value == default or (default is None and value in ({}, [], False))


def refusals(raw: Mapping[str, Any]) -> list[str]:
    """One reason per `REFUSED` field that `raw` (a parsed adapter_config.json) sets, naming the field."""
    return [
        f"{name}={raw[name]!r}: {reason}"
        for name, (default, reason) in REFUSED.items()
        if name in raw and not _is_default(raw[name], default)
    ]


def unknown_fields(raw: Mapping[str, Any]) -> list[str]:
    """Fields of `raw` loracli does not know, set to something other than null / false / empty."""
    known = set(READ) | set(INERT) | set(REFUSED)
    return sorted(k for k, v in raw.items() if k not in known and v not in (None, False, {}, [], ""))
