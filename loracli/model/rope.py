"""Rotary position embedding: cos/sin tables from transformers' own rotary class, looked up per token.

    RopeTables(config, spec, max_len, dtype, device)
    .lookup(positions [T], ends [T]) -> {kind: (cos [T, 1, R], sin [T, 1, R])}   R = rotary dims <= head_dim
    apply_rope(x [T, heads, D], cos [T, 1, R], sin [T, 1, R]) -> [T, heads, D]  rotate-half on the first R dims

`sin` comes with its first half negated (`signed_sin`), so rotate-half is a roll:
x * cos + rotate_half(x) * sin == x * cos + roll(x, R/2) * signed_sin, bit for bit ((-a) * b == a * (-b)
in every dtype), in four ops over all heads. The model rotates q and k in one call where they are
adjacent (the q|k part of the fused qkv output).

The tables are what the family's rotary class (`Family.hf_module` / `rotary_class`) returns for
positions 0..max_len-1, so every scaling transformers implements for the family (linear, dynamic,
yarn, llama3, longrope; attention factors included) is its own code. A kind per layer
(`ModelSpec.rope_kinds`): "default", or Gemma 3's layer types (a local base for sliding layers).

Where transformers' result depends on the length of the forward call, loracli follows it:
- "dynamic": transformers rescales only past `max_position_embeddings`, which the engine never serves
  (`max_model_len` <= it), so the table is the unscaled one, as transformers uses for those lengths;
- "longrope" (Phi-3): transformers takes the short factors while the call's longest position + 1 is
  <= `original_max_position_embeddings`, the long ones past it. `ends` [T] is that value for each
  token's call (prefill: its sequence's length; decode: its position + 1): a token gets the long table
  exactly when its call would have. A sequence recomputed after preemption is one call, so its early
  tokens may switch to the long table where transformers' cache kept the short ones (only past the
  original length).
"""

from __future__ import annotations

import importlib

import torch

from .spec import ModelSpec


def _rotary(config, spec: ModelSpec):
    fam = spec.family
    mod = importlib.import_module(f"transformers.models.{fam.hf_module}.modeling_{fam.hf_module}")
    return getattr(mod, fam.rotary_class)(config)


def _table(config, spec: ModelSpec, kind: str, n: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, R] for positions 0..n-1 in one call of the rotary class."""
    rope = _rotary(config, spec)
    pos = torch.arange(n).unsqueeze(0)
    x = torch.zeros(1, dtype=dtype)
    cos, sin = rope(x, pos, kind) if spec.family.rope_by_layer_type else rope(x, pos)
    return cos[0], signed_sin(sin[0])


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [n, R] with its first R/2 columns negated: rotate-half's sign folded into the table."""
    out = sin.clone()
    out[:, : sin.shape[-1] // 2].neg_()
    return out


def longrope_original(config) -> int | None:
    """`original_max_position_embeddings` of a longrope config; None for any other RoPE."""
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type") != "longrope":
        return None
    return int(params.get("original_max_position_embeddings") or config.original_max_position_embeddings)


class RopeTables:
    def __init__(self, config, spec: ModelSpec, max_len: int, dtype, device):
        kinds = sorted(set(spec.rope_kinds))
        original = longrope_original(config)
        short = max_len if original is None else min(max_len, original)
        self.short = {k: tuple(t.to(device) for t in _table(config, spec, k, short, dtype)) for k in kinds}
        self.switch = original if original is not None and max_len > original else None
        self.long = {}
        if self.switch is not None:
            self.long = {k: tuple(t.to(device) for t in _table(config, spec, k, max_len, dtype)) for k in kinds}

    def tensors(self) -> list[torch.Tensor]:
        return [t for tables in (self.short, self.long) for pair in tables.values() for t in pair]

    def lookup(
        self, positions: torch.Tensor, ends: torch.Tensor | None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each kind's cos, signed sin [T, 1, R] at `positions`; `ends` [T]: see the module docstring (longrope)."""
        if self.switch is None or ends is None:
            return {k: (cos[positions, None], sin[positions, None]) for k, (cos, sin) in self.short.items()}
        use_long = (ends > self.switch)[:, None, None]  # [T, 1, 1]
        short_pos = positions.clamp(max=self.switch - 1)  # tokens past the short table take the long one
        out = {}
        for k, (cos_l, sin_l) in self.long.items():
            cos_s, sin_s = self.short[k]
            cos = torch.where(use_long, cos_l[positions, None], cos_s[short_pos, None])
            sin = torch.where(use_long, sin_l[positions, None], sin_s[short_pos, None])
            out[k] = (cos, sin)
        return out


def step_ends(positions: torch.Tensor, seq_lens: list[int], is_prefill: bool) -> torch.Tensor:
    """[T]: the longest position + 1 of each token's transformers call (prefill: the sequence's last token)."""
    if not is_prefill:
        return positions + 1
    last = torch.tensor(seq_lens, device=positions.device).cumsum(0) - 1  # [B] row of each sequence's last token
    counts = torch.tensor(seq_lens, device=positions.device)
    return (positions[last] + 1).repeat_interleave(counts)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] (any strides); cos/signed sin [T, 1, R], R <= D (partial rotary: the last D - R
    dims pass through) -> a new [T, heads, D]."""
    r = cos.shape[-1]
    rot = x if r == x.shape[-1] else x[..., :r]
    out = rot * cos
    out.add_(rot.roll(r // 2, dims=-1).mul_(sin))  # rotate_half(rot) * sin, the sign in the table
    return out if r == x.shape[-1] else torch.cat((out, x[..., r:]), dim=-1)
