"""Per-row and elementwise ops of the decoder, one function per family variant (`families.Family`).

    rms_norm(x [T, H], w [H], eps)      -> w * (x / rms(x)), the normalised x cast to x's dtype first (Llama)
    rms_norm_1p(x [T, H], w [H], eps)   -> ((1 + w) * (x / rms(x))) in float32, cast to x's dtype (Gemma)
    gelu_tanh(x)                        -> 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    softcap(x, cap, tanh)               -> cap * tanh(x / cap)

The rms is taken in float32 over the last dimension (one row at a time: batch-invariant as it
stands). `exp_tanh` is tanh as 1 - 2 / (exp(2x) + 1), one formula for every element (the
deterministic mode's tanh, as `kernels.invariant.silu` is its SiLU); `activation(name, deterministic)`
and `tanh_fn(deterministic)` pick the variant for a mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..kernels import invariant

Norm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
_GELU_C = math.sqrt(2.0 / math.pi)


def _normalised(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) in float32, a new tensor (x itself is never written)."""
    h = x.to(torch.float32)
    inv = h.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()  # [T, 1]
    return h.mul_(inv) if h is not x else h * inv


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _normalised(x, eps).to(x.dtype).mul_(weight)


def rms_norm_1p(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _normalised(x, eps).mul_(1.0 + weight.float()).to(x.dtype)


NORMS: dict[str, Norm] = {"rms": rms_norm, "rms1p": rms_norm_1p}


def exp_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) as 1 - 2 / (exp(2x) + 1) in float32 (saturates to +-1 without NaN), cast back."""
    h = x.float()
    return (1.0 - 2.0 / (torch.exp(2.0 * h) + 1.0)).to(x.dtype)


def tanh_fn(deterministic: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    return exp_tanh if deterministic else torch.tanh


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, one formula for every element (deterministic mode)."""
    h = x.float()
    return (0.5 * h * (1.0 + exp_tanh(_GELU_C * (h + 0.044715 * h * h * h)))).to(x.dtype)


def activation(name: str, deterministic: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated MLP's activation (`ModelSpec.activation`) for a mode."""
    if name == "gelu_pytorch_tanh":
        return gelu_tanh if deterministic else (lambda x: F.gelu(x, approximate="tanh"))
    return invariant.silu if deterministic else F.silu


def softcap(x: torch.Tensor, cap: float, tanh: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma 2's soft-capping of attention scores and final logits)."""
    return tanh(x / cap) * cap
