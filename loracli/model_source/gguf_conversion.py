"""GGUF → safetensors: recognise a GGUF file, check its architecture, dequantize it to a folder.

Contract: `is_gguf(path)` tells whether a file starts with the GGUF magic bytes;
`check_gguf_architecture(path)` raises a one-line `ModelError` unless the file's
`general.architecture` is one of `SUPPORTED_GGUF_ARCHITECTURES`; `convert_gguf(gguf, dest)` writes
into the existing folder `dest` a plain Hugging Face checkpoint: float32 safetensors weights (GGUF
blocks dequantized, values kept exactly), a `config.json` without `quantization_config`, and the
tokenizer with its chat template. Library logs and progress bars are silenced and library prints
go to stderr (with `LORACLI_DEBUG=1` library output still reaches stderr). gguf, torch and
transformers are imported only inside these functions.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from loracli.errors import ModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")


def is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def check_gguf_architecture(path: Path) -> None:
    architecture = _gguf_architecture(path)
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_GGUF_ARCHITECTURES)
        raise ModelError(f"{path}: GGUF architecture '{architecture}' is not supported ({supported})")


def _gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).get_field("general.architecture")
    except Exception as exc:
        raise ModelError(f"{path}: unreadable GGUF file ({type(exc).__name__}: {exc})") from exc
    if field is None:
        raise ModelError(f"{path}: GGUF file has no general.architecture")
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF into float32 safetensors plus its tokenizer, in `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_libraries():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **_dequantize_kwargs()
        )
        _drop_quantizer(model)
        model.save_pretrained(dest, **_safe_serialization_kwargs(model))
        tokenizer.save_pretrained(dest)
    _strip_quantization_config(dest / "config.json")


def _dequantize_kwargs() -> dict[str, object]:
    """Ask for a plain dense model, where transformers could otherwise keep GGUF blocks packed."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _safe_serialization_kwargs(model: object) -> dict[str, bool]:
    """Older transformers need `safe_serialization=True`; newer ones only write safetensors."""
    parameters = inspect.signature(model.save_pretrained).parameters
    return {"safe_serialization": True} if "safe_serialization" in parameters else {}


def _drop_quantizer(model: object) -> None:
    """Forget the GGUF origin, so the model saves as (and reloads from) a plain checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _strip_quantization_config(config_path: Path) -> None:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence transformers' logs and progress bars and keep library prints off stdout.

    With `LORACLI_DEBUG=1`, library output still reaches stderr.
    """
    from transformers.utils import logging as hf_logging

    if os.environ.get("LORACLI_DEBUG"):
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(sys.stderr), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
