"""EngineConfig validation: typed one-line errors, never asserts."""

from __future__ import annotations

import pytest

from loracli.config import EngineConfig
from loracli.errors import ConfigError
from loracli.sizes import parse_bytes


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"max_lora_rank": 320}, "power of two"),
        ({"max_lora_rank": 1024}, "power of two"),
        ({"max_lora_rank": 0}, "positive"),
        ({"max_loras": 4, "max_cpu_loras": 2}, r"--max-cpu-loras \(2\) must be >= --max-loras \(4\)"),
        ({"dtype": "float8"}, "--dtype"),
        ({"device": "tpu"}, "--device"),
        ({"max_num_seqs": 0}, "--max-num-seqs"),
        ({"max_loras": True}, "--max-loras"),
    ],
)
def test_invalid(kw, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**kw)


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
