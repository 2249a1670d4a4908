"""The decoder's fused small ops give transformers' own bits (issue 21, item 2).

`apply_rope` (one call over the adjacent q|k heads, rotate-half as a roll with the sign in the sin
table), the in-place `rms_norm` / `rms_norm_1p` and the in-place `invariant.silu` times up must
equal, bit for bit, transformers' `apply_rotary_pos_emb`, `LlamaRMSNorm`, `GemmaRMSNorm` and the
plain SiLU formula, in bfloat16 and float32, on the strided views the model hands them.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

from kernels import invariant
from loracli.model.pointwise import rms_norm, rms_norm_1p
from loracli.model.rope import apply_rope, signed_sin

DTYPES = [torch.bfloat16, torch.float32]


def _hf_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotation of x [T, heads, D] (batch T of one position each), cos/sin [T, R]."""
    q, _ = apply_rotary_pos_emb(x.unsqueeze(2), x.unsqueeze(2), cos.unsqueeze(1), sin.unsqueeze(1))
    return q.squeeze(2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary", [64, 32])  # full, and partial rotary (the last dims pass through)
def test_one_rope_call_over_q_and_k_gives_transformers_bits(dtype, rotary):
    g = torch.Generator().manual_seed(rotary)
    T, hq, hkv, D = 37, 9, 3, 64
    qkv = (torch.randn(T, (hq + 2 * hkv) * D, generator=g) * 4).to(dtype)  # the fused projection's output
    angles = torch.rand(T, rotary // 2, generator=g) * 100
    cos, sin = (torch.cat((f(angles), f(angles)), -1).to(dtype) for f in (torch.cos, torch.sin))
    qk = qkv[:, : (hq + hkv) * D].view(T, hq + hkv, D)  # strided: each row skips v
    out = apply_rope(qk, cos[:, None], signed_sin(sin)[:, None])
    q = qkv[:, : hq * D].view(T, hq, D)
    k = qkv[:, hq * D : (hq + hkv) * D].view(T, hkv, D)
    assert torch.equal(out[:, :hq], _hf_rope(q, cos, sin))
    assert torch.equal(out[:, hq:], _hf_rope(k, cos, sin))
    assert torch.equal(qk, qkv[:, : (hq + hkv) * D].view(T, hq + hkv, D)) and out.data_ptr() != qk.data_ptr()


def test_signed_sin_negates_the_first_half_only():
    sin = torch.arange(1.0, 9.0).view(1, 8)
    assert signed_sin(sin).tolist() == [[-1.0, -2.0, -3.0, -4.0, 5.0, 6.0, 7.0, 8.0]]
    assert sin.tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_rms_norms_give_transformers_bits_and_leave_x_alone(dtype, strided):
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(29, 3 * 64, generator=g) * 3).to(dtype)
    x = base[:, 64:128] if strided else base[:, :64].contiguous()  # a per-head norm gets a strided view
    before = x.clone()
    w = torch.randn(64, generator=g).to(dtype)
    llama = LlamaRMSNorm(64, eps=1e-6).to(dtype)
    gemma = GemmaRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        llama.weight.copy_(w)
        gemma.weight.copy_(w)
        assert torch.equal(rms_norm(x, w, 1e-6), llama(x))
        assert torch.equal(rms_norm_1p(x, w, 1e-6), gemma(x))
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_silu_times_up_gives_the_formula_bits(dtype):
    g = torch.Generator().manual_seed(2)
    gu = (torch.randn(21, 2 * 96, generator=g) * 6).to(dtype)
    gate, up = gu[:, :96], gu[:, 96:]
    before = gu.clone()
    h = gate.float()
    expected = (h / (torch.exp(-h) + 1)).to(dtype) * up
    assert torch.equal(invariant.silu(gate).mul_(up), expected)
    assert torch.equal(gu, before)
