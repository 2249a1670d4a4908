"""Pickled weights (`pytorch_model.bin`, `.pt`, `.pth`) → safetensors, without running pickled code.

Contract: `pickle_weight_files(folder)` lists a model folder's pickled weight files (from
`pytorch_model.bin.index.json` when present; training state such as `optimizer.pt` or `rng_state*`
is never counted as weights) and returns `[]` when there are none. `convert_pickle(folder,
weight_files, dest)` copies the folder's other files into the existing folder `dest` and writes the
weights as safetensors with their dtypes kept: one `model.safetensors`, or one shard per pickle
file plus `model.safetensors.index.json`. A tied `lm_head.weight` is left out (it is re-tied on
load). torch and safetensors are imported only inside the conversion.

`load_tensor_pickle(path, refuse)` is the one reader of pickled weights, for models and adapters:
`torch.load(weights_only=True)` with torch's warnings silenced; a file holding more than tensors,
unreadable, or not a state dict of named tensors raises `refuse(reason)`, the reason one line
without the path (here a `ModelError` naming the file).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from loracli.errors import LoracliError, ModelError
from loracli.model_source.model_folder import SAFETENSORS_INDEX, read_index

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PICKLE_INDEX = "pytorch_model.bin.index.json"
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

if TYPE_CHECKING:
    import torch


def pickle_weight_files(folder: Path) -> list[Path]:
    index = folder / PICKLE_INDEX
    if index.is_file():
        return [folder / name for name in sorted(set(read_index(index).values()))]
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and p.suffix in PICKLE_SUFFIXES
        and p.name not in NOT_WEIGHTS
        and not p.name.startswith("rng_state")
    )


def convert_pickle(folder: Path, weight_files: list[Path], dest: Path) -> None:
    """Copy the folder's other files and rewrite its pickled weights as safetensors, dtypes kept."""
    _copy_other_files(folder, {p.name for p in weight_files} | {PICKLE_INDEX}, dest)
    tied = bool(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("tie_word_embeddings"))
    weight_map, total = _write_shards(weight_files, tied, dest)
    if len(weight_files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dest / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _copy_other_files(folder: Path, skipped: set[str], dest: Path) -> None:
    for item in folder.iterdir():
        if item.is_file() and item.name not in skipped:
            shutil.copy2(item, dest / item.name)


def _write_shards(weight_files: list[Path], tied: bool, dest: Path) -> tuple[dict[str, str], int]:
    """One safetensors file per pickle file; returns the weight map and the total size in bytes."""
    count = len(weight_files)
    weight_map: dict[str, str] = {}
    total = 0
    for number, source in enumerate(weight_files, start=1):
        name = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        state = load_tensor_pickle(source, lambda reason, path=source: ModelError(f"{path}: {reason}"))
        tensors = _safetensors_ready(state, tied)
        _save_safetensors(tensors, dest / name)
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    return weight_map, total


def load_tensor_pickle(path: Path, refuse: Callable[[str], LoracliError]) -> dict[str, torch.Tensor]:
    """The named tensors of a pickle (a state dict, or one under "state_dict" or "model"); else `refuse(reason)`."""
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the outcome is reported instead
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refuse(f"holds more than plain tensors, or is no torch pickle; not run ({_load_failure(exc)})") from exc
    except Exception as exc:  # noqa: BLE001 - any reader failure is a corrupt file to the user
        raise refuse(f"unreadable weights ({_load_failure(exc)})") from exc
    candidates = [loaded]
    if isinstance(loaded, dict):
        candidates += [loaded.get("state_dict"), loaded.get("model")]
    for candidate in candidates:
        if _is_tensor_dict(candidate, torch.Tensor):
            return candidate
    raise refuse("not a state dict of named tensors")


def _load_failure(exc: BaseException) -> str:
    """A `torch.load` failure in one line: the weights-only unpickler's own reason when it gives one."""
    text = _ANSI.sub("", str(exc)).split("WeightsUnpickler error:", 1)[-1]
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    reason = line.split(". ", 1)[0].rstrip(".")
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def _is_tensor_dict(candidate: object, tensor_type: type) -> bool:
    return (
        isinstance(candidate, dict)
        and bool(candidate)
        and all(isinstance(k, str) and isinstance(v, tensor_type) for k, v in candidate.items())
    )


def _safetensors_ready(state: dict[str, object], tied: bool) -> dict[str, object]:
    """Contiguous tensors with no shared storage; a tied lm_head is left out (it is re-tied on load)."""
    ready: dict[str, object] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in state.items():
        if tied and key.split(".")[-2:] == ["lm_head", "weight"]:
            continue
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        tensor = tensor.contiguous()
        ready[key] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    return ready


def _save_safetensors(tensors: dict[str, object], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
