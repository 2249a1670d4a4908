"""Paged decode attention against the float32 reference (`reference.paged_decode_attention`).

The torch (CPU) path and the Triton kernel run on the cases of `loracli.kernels.paged_cases`:
dtype x heads (MHA, GQA 9/3, MQA) x sequence lengths x block size (16, 5, 1) x window x soft cap.
Every cache row a sequence does not own as a key holds NaN, so reading one fails the comparison.
Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 set before triton's first
import, as in tests/test_kernels.py). The full sweep is marked slow; the fast cases cover every
value of every axis at least once.
"""

from __future__ import annotations

import os

import pytest
import torch
from loracli.kernels import build_paged_meta, paged_decode_attention, reference, torch_attention
from loracli.kernels.paged_cases import DTYPES, FAST_CASES, FULL_CASES, TOL, make_paged_case


@pytest.fixture(scope="module")
def triton_attention():
    """`loracli.kernels.triton_attention`, in the interpreter unless CUDA is available."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede `import triton`
    pytest.importorskip("triton")
    from loracli.kernels import triton_attention
    from loracli.kernels.triton_ops import INTERPRET

    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("triton was imported before TRITON_INTERPRET=1 could be set")
    return triton_attention


def _case_id(case) -> str:
    d, hq, hkv, lens, bs, w, c = case
    return f"{d}-h{hq}x{hkv}-n{max(lens)}-bs{bs}-w{w}-cap{c}"


def _check(op, case, D: int = 32) -> None:
    d, hq, hkv, lens, bs, window, cap = case
    c = make_paged_case(DTYPES[d], hq, hkv, lens, bs, D)
    q, kv, meta = c["q"], c["kv"], c["meta"]
    if op.__module__.endswith("triton_attention") and torch.cuda.is_available():
        q, kv = q.cuda(), kv.cuda()
        meta = build_paged_meta(meta.block_tables.tolist(), meta.seq_lens.tolist(), bs, meta.pad_row, device="cuda")
    scale = D**-0.5
    got = op(q, kv, meta, scale, window, cap)
    expect = reference.paged_decode_attention(q, kv.float(), meta, scale, window, cap)
    assert got.shape == (len(lens), hq, D) and got.dtype == q.dtype
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(got.float().cpu(), expect.float().cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", FAST_CASES, ids=_case_id)
def test_torch_path(case):
    _check(torch_attention.paged_decode_attention, case)


@pytest.mark.parametrize("case", FAST_CASES, ids=_case_id)
def test_triton_kernel(case, triton_attention):
    _check(triton_attention.paged_decode_attention, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_CASES, ids=_case_id)
def test_torch_path_full(case):
    _check(torch_attention.paged_decode_attention, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_CASES, ids=_case_id)
def test_triton_kernel_full(case, triton_attention):
    _check(triton_attention.paged_decode_attention, case)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_profile_model_shape(backend, request):
    """The profile model's heads and head dim (SmolLM2-135M: 9 / 3, D 64) at the engine's block size."""
    op = (
        request.getfixturevalue("triton_attention").paged_decode_attention
        if backend == "triton"
        else torch_attention.paged_decode_attention
    )
    _check(op, ("bf16", 9, 3, (40, 1, 77), 16, None, None), D=64)


def test_reference_reads_visible_keys_only():
    """A hand case: two sequences of one block, the second windowed to its last key."""
    kv = torch.full((2, 9, 1, 2), float("nan"))
    kv[0, [4, 5, 0]] = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])
    kv[1, [4, 5, 0]] = torch.tensor([[[2.0, 0.0]], [[0.0, 4.0]], [[8.0, 8.0]]])
    meta = build_paged_meta([[1], [0]], [2, 1], block_size=4, pad_row=8)
    q = torch.tensor([[[0.0, 0.0]], [[3.0, 3.0]]])
    out = reference.paged_decode_attention(q, kv, meta, 1.0, window=1)
    assert out[0, 0].tolist() == [0.0, 4.0] and out[1, 0].tolist() == [8.0, 8.0]  # window 1: the last key only
    out = reference.paged_decode_attention(q, kv, meta, 1.0)
    assert out[0, 0].tolist() == [1.0, 2.0]  # equal scores over rows 4, 5: the mean of their values
    assert out[1, 0].tolist() == [8.0, 8.0]


def test_dispatcher_backends(monkeypatch):
    c = make_paged_case(torch.float32, 9, 3, (5, 20), 16)
    expect = reference.paged_decode_attention(c["q"], c["kv"], c["meta"], 0.3, 4, 2.0)
    for backend in ("reference", "torch"):
        monkeypatch.setenv("LORACLI_LORA_BACKEND", backend)
        got = paged_decode_attention(c["q"], c["kv"], c["meta"], 0.3, 4, 2.0)
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: {**c, "q": c["q"][:, :4]}, "not a multiple"),
        (lambda c: {**c, "q": c["q"].double()}, "one dtype"),
        (lambda c: {**c, "q": c["q"][:1]}, "do not describe 1 sequences"),
        (lambda c: {**c, "kv": c["kv"][0]}, "wants q"),
    ],
)
def test_bad_arguments(change, message):
    c = change(make_paged_case(torch.float32, 9, 3, (5, 20), 16))
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(c["q"], c["kv"], c["meta"], 1.0)
    with pytest.raises(ValueError, match="window must be"):
        paged_decode_attention(*(make_paged_case(torch.float32, 4, 4, (3,), 4)[k] for k in ("q", "kv", "meta")), 1.0, 0)


def test_build_paged_meta_checks():
    meta = build_paged_meta([[3, 1], [2]], [20, 3], 16, pad_row=64, max_blocks=4)
    assert meta.block_tables.tolist() == [[3, 1, 0, 0], [2, 0, 0, 0]] and meta.max_len == 20
    with pytest.raises(ValueError, match="needs 2 blocks, has 1"):
        build_paged_meta([[3], [2]], [20, 3], 16, pad_row=64)
    with pytest.raises(ValueError, match=">= 1"):
        build_paged_meta([[3]], [0], 16, pad_row=64)


def test_the_microbenchmark_variants_compute_the_same_attention():
    """`python -m loracli.kernels.attention_bench` compares like with like (float32, short sequences)."""
    from loracli.kernels.attention_bench import variants

    fns = variants(torch.float32, 5, 40)
    expect = fns["gather-sdpa"]().reshape(64, -1)
    for name, fn in fns.items():
        torch.testing.assert_close(fn().reshape(64, -1), expect, atol=1e-4, rtol=1e-4, msg=name)
