"""EngineConfig validation: typed one-line errors, never asserts."""

from __future__ import annotations

import dataclasses

import pytest

from loracli.config import EngineConfig
from loracli.errors import ConfigError
from loracli.sizes import parse_bytes


@pytest.mark.parametrize(
    "kw,match,fields",
    [
        ({"max_lora_rank": 320}, "power of two", ("max_lora_rank",)),
        ({"max_lora_rank": 1024}, "power of two", ("max_lora_rank",)),
        ({"max_lora_rank": 0}, "positive", ("max_lora_rank",)),
        (
            {"max_loras": 4, "max_cpu_loras": 2},
            r"max_cpu_loras \(2\) must be >= max_loras \(4\)",
            ("max_cpu_loras", "max_loras"),
        ),
        ({"dtype": "float8"}, "dtype", ("dtype",)),
        ({"device": "tpu"}, "device", ("device",)),
        ({"max_num_seqs": 0}, "max_num_seqs", ("max_num_seqs",)),
        ({"max_loras": True}, "max_loras", ("max_loras",)),
        ({"slot_cooldown_steps": 0}, "slot_cooldown_steps", ("slot_cooldown_steps",)),
    ],
)
def test_invalid(kw, match, fields):
    """Errors name config fields (the CLI maps them to its flags), never flags."""
    with pytest.raises(ConfigError, match=match) as info:
        EngineConfig(**kw)
    assert info.value.fields == fields and "--" not in str(info.value)


def test_config_is_frozen_after_validation():
    cfg = EngineConfig(max_loras=4)
    assert cfg.min_loras == 4 and cfg.max_cpu_loras == 32 and cfg.dynamic_slots is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_num_seqs = 1  # type: ignore[misc]


@pytest.mark.parametrize("rank", [1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
def test_valid_ranks(rank):
    assert EngineConfig(max_lora_rank=rank).max_lora_rank == rank


def test_cpu_loras_default():
    assert EngineConfig(max_loras=40).max_cpu_loras == 40
    assert EngineConfig(max_loras=2).max_cpu_loras == 32


def test_parse_bytes():
    assert parse_bytes("2GiB", "--x") == 2 << 30
    assert parse_bytes("512MiB", "--x") == 512 << 20
    assert parse_bytes("1000", "--x") == 1000
    with pytest.raises(ConfigError, match="--x"):
        parse_bytes("lots", "--x")
