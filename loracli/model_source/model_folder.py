"""Checks of a local Hugging Face model folder: its config and which weights it holds.

Contract: `check_config(folder)` passes when `folder/config.json` is a readable JSON file;
`has_safetensors(folder)` tells whether the folder holds base-model safetensors weights (a
LoRA adapter's `adapter_model.safetensors` does not count); `read_index(index)` returns the
`weight_map` of a sharded-weights index. Each raises a one-line `ModelError` naming the path
when the folder is not what it claims: no config, an adapter folder, a bad index, a missing shard.
"""

from __future__ import annotations

import json
from pathlib import Path

from loracli.errors import ModelError

SAFETENSORS_INDEX = "model.safetensors.index.json"


def check_config(folder: Path) -> None:
    config = folder / "config.json"
    if not config.is_file():
        if (folder / "adapter_config.json").is_file():
            raise ModelError(f"{folder}: this is a LoRA adapter folder, not a base model (no config.json)")
        raise ModelError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config}: not a readable JSON file ({exc})") from exc


def has_safetensors(folder: Path) -> bool:
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        for shard in sorted(set(read_index(index).values())):
            if not (folder / shard).is_file():
                raise ModelError(f"{folder}: shard {shard} listed in {SAFETENSORS_INDEX} is missing")
        return True
    return any(p.name != "adapter_model.safetensors" for p in folder.glob("*.safetensors"))


def read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{index}: not a valid weight index ({exc})") from exc
    if not isinstance(weight_map, dict):
        raise ModelError(f"{index}: 'weight_map' is not an object")
    return weight_map
