"""A bad pickled model under `allow_pickle`: one `ModelError` line naming the file, and no torch
warning text (`model_source/pickle_conversion.load_tensor_pickle`, the reader adapters share)."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch

from loracli.errors import ModelError
from loracli.model_source import resolve_model


def truncated(path):
    torch.save({"w": torch.ones(64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "write,match",
    [
        (lambda p: p.write_bytes(pickle.dumps({"w": torch.ones(2)})), "holds more than plain tensors"),
        (
            lambda p: torch.save({"w": torch.ones(2), "f": print}, p),
            "Unsupported global: GLOBAL print was not an allowed global",
        ),
        (truncated, r"unreadable weights \(RuntimeError: PytorchStreamReader failed reading zip archive"),
        (lambda p: p.write_bytes(b""), r"unreadable weights \(EOFError\)"),
    ],
    ids=["plain-pickle", "a-global", "truncated", "empty"],
)
def test_bad_model_pickle_is_one_line_without_warnings(tmp_path, write, match):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    write(folder / "pytorch_model.bin")
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ModelError, match=match) as e:
        warnings.simplefilter("always")
        resolve_model(str(folder), cache_dir=tmp_path / "cache", progress=False, allow_pickle=True)
    assert str(e.value).startswith(f"{folder / 'pytorch_model.bin'}: ")
    assert "\n" not in str(e.value) and "Weights only load failed" not in str(e.value)
    assert [str(w.message) for w in caught] == []
