"""Parsing human byte sizes for options such as `--kv-cache-memory 2GiB`."""

from __future__ import annotations

import re

from .errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "t": 10**12,
    "tb": 10**12,
}


def parse_bytes(text: str, option: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].lower() not in _UNITS:
        raise ConfigError(f"{option} must be a size such as 512MiB or 2GiB, got {text!r}")
    value = int(float(m[1]) * _UNITS[m[2].lower()])
    if value <= 0:
        raise ConfigError(f"{option} must be positive, got {text!r}")
    return value


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB' (binary units, one decimal)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
