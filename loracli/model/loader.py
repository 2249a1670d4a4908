"""Loading a HF model folder: config, tokenizer and safetensors weights (never pickle).

`load_config(folder)` -> (hf_config, ModelSpec); `load_state_dict(folder)` -> name -> tensor,
read lazily file by file with safetensors (sharded folders included).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ModelError
from .spec import ModelSpec


def load_config(folder: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; the user needs one line
        raise ModelError(f"{folder}: cannot read the model config ({type(e).__name__}: {e})") from None
    return config, ModelSpec.from_hf_config(config)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder}: no .safetensors weights in the model folder")
    return files


def load_state_dict(folder: Path, prefix_filter=None) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if prefix_filter is None or prefix_filter(key):
                        state[key] = f.get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"{path}: unreadable weights ({type(e).__name__}: {e})") from None
    return state
