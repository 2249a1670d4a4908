"""Reading an adapter's weights file for inspection, without loading it whole when it can be avoided.

Contract of `open_weights(path)`: a context manager yielding `(meta, get)`, where `meta` is
`{key: (shape, dtype name)}` and `get(key)` reads one tensor. For safetensors, shapes and dtypes
come from the header only (`safe_open`) and a tensor is read only when asked for. A pickle file
(which the caller has allowed: `adapters.weights_file`) is read whole by `adapters.read_tensors`,
with `torch.load(weights_only=True)`. A file that cannot be read, or a pickle that is not a state
dict of named tensors, raises `AdapterError` naming it, one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from ..adapters import read_tensors
from ..devices import dtype_name
from ..errors import AdapterError

if TYPE_CHECKING:
    import torch

Meta = tuple[list[int], str]  # (shape, dtype name) of one tensor
Getter = Callable[[str], "torch.Tensor"]

_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@contextmanager
def open_weights(path: Path) -> Iterator[tuple[dict[str, Meta], Getter]]:
    """({key: (shape, dtype)}, get(key)) of a weights file; for safetensors from the header only."""
    if path.suffix != ".safetensors":
        yield _pickle_weights(path)
        return
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - any header failure is a broken file to the user
        raise AdapterError(str(path), f"unreadable safetensors file, truncated or corrupt ({e})") from None
    with handle as f:

        def get(key: str) -> torch.Tensor:
            try:
                return f.get_tensor(key)
            except Exception as e:  # noqa: BLE001
                raise AdapterError(str(path), f"cannot read tensor {key} ({e})") from None

        yield _header(f), get


def _header(f) -> dict[str, Meta]:
    meta = {}
    for key in f.keys():
        piece = f.get_slice(key)
        raw_dtype = piece.get_dtype()
        meta[key] = (list(piece.get_shape()), _SAFETENSORS_DTYPES.get(raw_dtype, raw_dtype))
    return meta


def _pickle_weights(path: Path) -> tuple[dict[str, Meta], Getter]:
    tensors = read_tensors(path)
    meta = {k: (list(v.shape), dtype_name(v.dtype)) for k, v in tensors.items()}
    return meta, tensors.__getitem__
