"""`resolve_model`: the dispatch from a model spec to a local safetensors folder.

Contract: `resolve_model(spec, ...)` (specs and result described in the package docstring) first
puts the Hugging Face libraries offline (`set_hf_offline`), then hands `None`/`"default"` to the
default model, resolves a folder (returned as is when it holds safetensors weights, converted once
from pickles only when `allow_pickle` is set) or a GGUF file (converted once), and refuses
anything else with a one-line `ModelError` naming the spec. The refusal of pickle weights names
the configuration field `allow_pickle` (in the error's `fields`), never a command-line flag.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from loracli.errors import ModelError
from loracli.model_source import gguf_conversion
from loracli.model_source.conversion_cache import cache_root, cached, file_entry, folder_entry
from loracli.model_source.default_model import resolve_default
from loracli.model_source.model_folder import check_config, has_safetensors
from loracli.model_source.pickle_conversion import convert_pickle, pickle_weight_files
from loracli.model_source.progress import Reporter


def set_hf_offline() -> None:
    """Make Hugging Face libraries work offline: no hub lookups, no telemetry, ever."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ[name] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def resolve_model(
    spec: str | os.PathLike[str] | None,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    allow_pickle: bool = False,
) -> Path:
    """A local safetensors model folder for `spec` (see the package docstring for the specs)."""
    set_hf_offline()
    root = cache_root(cache_dir)
    reporter = Reporter(progress)
    if spec is None or str(spec) == "default":
        return resolve_default(root, reporter)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_folder(path.resolve(), root, reporter, allow_pickle)
    if path.is_file():
        return _resolve_file(path.resolve(), root, reporter)
    raise ModelError(_not_found_message(str(spec)))


def _not_found_message(spec: str) -> str:
    if "/" in spec and not spec.startswith((".", "/", "~")):
        return f"model not found: {spec} (loracli works offline: pass a local model folder, a .gguf file, or 'default')"
    return f"model not found: {spec}"


def _resolve_folder(folder: Path, root: Path, reporter: Reporter, allow_pickle: bool) -> Path:
    check_config(folder)
    if has_safetensors(folder):
        return folder
    pickles = pickle_weight_files(folder)
    if not pickles:
        raise ModelError(f"{folder}: no model weights (expected model.safetensors)")
    if not allow_pickle:
        raise ModelError(
            f"{folder}: weights are pickle files ({pickles[0].name}), which can run code when loaded; "
            "set allow_pickle to convert them to safetensors once",
            fields=("allow_pickle",),
        )

    def build(tmp: Path) -> None:
        with reporter.step(f"converting {pickles[0].name} → safetensors (once)"):
            convert_pickle(folder, pickles, tmp)

    return cached(folder_entry(root, "pickle", folder), root, reporter, build, source=str(folder))


def _resolve_file(path: Path, root: Path, reporter: Reporter) -> Path:
    if not gguf_conversion.is_gguf(path):
        if path.suffix.lower() == ".gguf":
            raise ModelError(f"{path}: not a GGUF file (bad magic bytes)")
        raise ModelError(f"{path}: unsupported model file (expected a folder with config.json or a .gguf file)")

    def build(tmp: Path) -> None:
        gguf_conversion.check_gguf_architecture(path)
        with reporter.step("converting GGUF → safetensors (once)"):
            gguf_conversion.convert_gguf(path, tmp)

    return cached(file_entry(root, "gguf", path), root, reporter, build, source=str(path))
