"""LoRA rank arithmetic shared by `inspect-adapter`, the engine's configuration and `bench`.

`next_power_of_two(n)`: the smallest power of two >= n (1 for n <= 1), the rounding that turns
an adapter's rank into a `max_lora_rank` the engine accepts. Pure integers; imports nothing.
"""

from __future__ import annotations


def next_power_of_two(n: int) -> int:
    """4 -> 4, 5 -> 8, 0 -> 1."""
    return 1 << max(n - 1, 0).bit_length()
