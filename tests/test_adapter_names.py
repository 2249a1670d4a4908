"""Adapter folders named like the base model (`base`, the model's name) are refused when the engine
starts: OpenAI Batch lines naming them would silently run the base model instead."""

from __future__ import annotations

import shutil

import pytest
from runs import tiny_engine

from loracli.errors import ConfigError


@pytest.mark.parametrize("name", ["base", "model"])  # "model": the tiny model's folder name
def test_an_adapter_named_like_the_base_model_is_refused_at_start(llama_dir, llama_adapters, tmp_path, name):
    assert llama_dir.name == "model"
    adapters = tmp_path / "adapters"
    shutil.copytree(llama_adapters / "attn4", adapters / name)
    shutil.copytree(llama_adapters / "mlp8", adapters / "mlp8")
    with pytest.raises(ConfigError) as info:
        tiny_engine(llama_dir, adapters)
    message = str(info.value)
    assert str(adapters / name) in message and "rename" in message and "\n" not in message
    assert info.value.fields == ("adapters_dir",)
