"""Which device and dtype a run uses: `resolve_device("auto")`, `resolve_dtype("auto", device)`.

One place for the rule, shared by the engine, `inspect-adapter` and `bench`. torch is imported
when a function is called, so importing this module stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """The device `name` means: "auto" is CUDA when present, else CPU. A device torch cannot use is a
    one-line `ConfigError` naming the `device` field, not torch's error at the first tensor."""
    import torch

    from .errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not one torch knows", fields=("device",)) from None
    problem = _cuda_problem(device) if device.type == "cuda" else None
    if problem is not None:
        raise ConfigError(f"device {name!r} {problem}", fields=("device",))
    return device


def _cuda_problem(device: torch.device) -> str | None:
    """Why torch cannot use this CUDA device here; None when it can."""
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda is not None
        return "needs CUDA, and " + ("no GPU is visible" if built else f"this torch ({torch.__version__}) has none")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"does not exist: {count} GPU{'s' if count != 1 else ''} visible"
    return None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    fast_bf16 = any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return torch.bfloat16 if fast_bf16 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16"."""
    return str(dtype).replace("torch.", "")


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text
