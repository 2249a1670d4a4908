"""Multi-LoRA ops against the float32 reference (`loracli.kernels.reference`).

Every backend (torch strategies, Triton SGMV/BGMV forms, the dispatcher) is compared with the
reference on random inputs. On a machine without CUDA the Triton kernels run in Triton's
interpreter: Triton 3.9 decides interpreted vs compiled when `@triton.jit` decorates a function,
and `import triton` already decorates triton.language's helpers (tl.zeros, ...), so the
`triton_ops` fixture sets TRITON_INTERPRET=1 before triton is first imported in this process
(the dispatcher does the same for a forced triton backend).
The full dtype x rank x tokens x spread sweep (`loracli.kernels.cases`, shared with `python -m loracli.selftest`)
is marked slow; the rest is a representative subset.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loracli.kernels import build_meta, build_passes, lora_expand, lora_shrink, lora_weigh, reference, torch_ops
from loracli.kernels.cases import (
    DTYPES,
    FAST_CASES,
    FULL_CASES,
    K_IN,
    N_OUT,
    OFFSET,
    TOL,
    make_case,
    spread_slots,
    sweep_case,
)

Shrink = Callable[..., torch.Tensor]
Expand = Callable[..., None]


def check_shrink(shrink: Shrink, case: dict, ranks=None) -> None:
    x, A, meta = case["x"], case["A"], case["meta"]
    y = shrink(x, A, meta, ranks)
    expect = reference.lora_shrink(x.float(), A.float(), meta, ranks)
    assert y.shape == expect.shape and y.dtype == x.dtype
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(y.float(), expect, atol=atol, rtol=rtol)
    free = meta.token_slot < 0
    assert not y[free].any(), "slot -1 rows must be zero"


def check_expand(expand: Expand, case: dict, ranks=None, y: torch.Tensor | None = None) -> None:
    y = case["y"] if y is None else y
    B, meta, before = case["B"], case["meta"], case["out"]
    out = before.clone()
    expand(y, B, meta, out, OFFSET, ranks)
    expect = before.float()
    reference.lora_expand(y.float(), B.float(), meta, expect, OFFSET, ranks)
    atol, rtol = TOL[out.dtype]
    torch.testing.assert_close(out.float(), expect, atol=atol, rtol=rtol)
    untouched = torch.ones_like(out, dtype=torch.bool)
    untouched[meta.token_slot >= 0, OFFSET : OFFSET + N_OUT] = False
    assert torch.equal(out[untouched], before[untouched]), "slot -1 rows and columns outside the window"


# ---- backends ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_ops():
    """`loracli.kernels.triton_ops`, in the interpreter unless CUDA is available."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede `import triton` (see module doc)
    pytest.importorskip("triton")
    from loracli.kernels import triton_ops

    if not triton_ops.INTERPRET and not torch.cuda.is_available():
        pytest.fail("triton was imported before TRITON_INTERPRET=1 could be set")
    return triton_ops


def _on(device: str, case: dict) -> dict:
    moved = {k: v.to(device) for k, v in case.items() if isinstance(v, torch.Tensor)}
    slots = case["meta"].token_slot.tolist()
    return {**moved, "meta": build_meta(slots, device)}


def invariant_ops() -> tuple[Shrink, Expand]:
    """The CPU path given deterministic-mode metadata (`build_meta(..., invariant=True)`)."""

    def again(meta):
        return build_meta(meta.token_slot.tolist(), meta.token_slot.device, invariant=True)

    def shrink(x, A, meta, ranks=None):
        return torch_ops.lora_shrink(x, A, again(meta), ranks)

    def expand(y, B, meta, out, offset=0, ranks=None):
        torch_ops.lora_expand(y, B, again(meta), out, offset, ranks)

    return shrink, expand


def backend_ops(name: str, tops) -> tuple[Shrink, Expand]:
    """(shrink, expand) of a named backend; Triton ones take and give CPU tensors in the interpreter."""
    if name == "torch":
        return torch_ops.lora_shrink, torch_ops.lora_expand
    if name == "torch-runs":
        return torch_ops.shrink_runs, torch_ops.expand_runs
    if name == "torch-bmm":
        return torch_ops.shrink_bmm, torch_ops.expand_bmm
    if name == "torch-invariant":
        return invariant_ops()
    if name == "triton-sgmv":
        return tops.sgmv_shrink, tops.sgmv_expand
    return tops.bgmv_shrink, tops.bgmv_expand


TORCH_BACKENDS = ("torch", "torch-runs", "torch-bmm", "torch-invariant")
TRITON_BACKENDS = ("triton-sgmv", "triton-bgmv")


def for_backend(name: str, request, case: dict) -> tuple[object, dict]:
    """(triton_ops or None, case): Triton backends get the fixture, and CUDA tensors unless interpreting."""
    if not name.startswith("triton"):
        return None, case
    tops = request.getfixturevalue("triton_ops")
    return tops, case if tops.INTERPRET else _on("cuda", case)


def run_both(name: str, request, case: dict, ranks=None, y=None) -> None:
    """Check the shrink and the expand of backend `name` on `case`."""
    tops, case = for_backend(name, request, case)
    if y is not None:
        y = y.to(case["x"].device)
    shrink, expand = backend_ops(name, tops)
    check_shrink(shrink, case, ranks)
    check_expand(expand, case, ranks, y)


# ---- the sweep ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", TORCH_BACKENDS + TRITON_BACKENDS)
@pytest.mark.parametrize("dname,R,T,spread", FAST_CASES)
def test_matches_reference(backend, dname, R, T, spread, request):
    run_both(backend, request, sweep_case(dname, R, T, spread))


@pytest.mark.slow
@pytest.mark.parametrize("backend", TORCH_BACKENDS + TRITON_BACKENDS)
@pytest.mark.parametrize("dname,R,T,spread", [c for c in FULL_CASES if c not in FAST_CASES])
def test_matches_reference_sweep(backend, dname, R, T, spread, request):
    run_both(backend, request, sweep_case(dname, R, T, spread))


# ---- ranks, offsets, strides -------------------------------------------------------------------


@pytest.mark.parametrize("backend", TORCH_BACKENDS + TRITON_BACKENDS)
@pytest.mark.parametrize("dname", ["fp32", "bf16"])
@pytest.mark.parametrize("spread", ["zipf", "free"])
def test_heterogeneous_ranks(backend, dname, spread, request):
    """Each slot uses only its first ranks[s] rank columns (0 = the adapter skips this module)."""
    slots, S = spread_slots(spread, 96, random.Random(5))
    case = make_case(DTYPES[dname], 16, slots, S, seed=3)
    ranks = [16, 0, 3, 8, 1, 16, 5, 12]
    run_both(backend, request, case, ranks)


@pytest.mark.parametrize("backend", TORCH_BACKENDS + TRITON_BACKENDS)
def test_rank_wider_than_one_tile(backend, request):
    """R = 80 spans two of Triton's rank tiles (64); heterogeneous ranks land in both."""
    slots, S = spread_slots("shuffled", 40, random.Random(9))
    case = make_case(torch.float32, 80, slots, S, seed=4)
    run_both(backend, request, case, [80, 64, 65, 17, 0, 79, 1, 40])


@pytest.mark.parametrize("backend", TORCH_BACKENDS + TRITON_BACKENDS)
@pytest.mark.parametrize("spread", ["even", "zipf", "shuffled"])
@pytest.mark.parametrize("form", ["slice", "interleaved"])
def test_expand_reads_a_strided_y(backend, spread, form, request):
    """y may be a view of a wider shrink result: a column slice (one sub-projection's columns of
    `MultiLoraLinear`'s grouped shrink), or an interleaved view (column i*J + j, J = 3): only strides differ."""
    slots, S = spread_slots(spread, 64, random.Random(2))
    case = make_case(torch.float32, 8, slots, S, seed=5)
    wide = torch.randn(64, 24)
    y = wide[:, 8:16] if form == "slice" else wide.view(64, 8, 3)[:, :, 1]  # [64, 8], strides (24, 1) or (24, 3)
    run_both(backend, request, case, [8, 2, 0, 8, 5, 8, 8, 3], y=y)


def test_offset_zero_and_flush_right():
    """The output window may start at column 0 or end at the last column of out."""
    case = make_case(torch.float32, 8, [0, 1, 1, 0, -1], 2)
    for offset in (0, case["out"].shape[1] - N_OUT):
        out = case["out"].clone()
        expect = out.clone()
        lora_expand(case["y"], case["B"], case["meta"], out, offset)
        reference.lora_expand(case["y"], case["B"], case["meta"], expect, offset)
        torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    slots=st.lists(st.integers(-1, 5), min_size=0, max_size=40),
    ranks=st.lists(st.integers(0, 8), min_size=6, max_size=6),
)
def test_torch_path_property(slots, ranks):
    """Any slot layout and ranks: the CPU path (every strategy) equals the reference."""
    case = make_case(torch.float32, 8, slots, 6, seed=len(slots))
    for shrink, expand in (
        (torch_ops.lora_shrink, torch_ops.lora_expand),
        (torch_ops.shrink_runs, torch_ops.expand_runs),
        (torch_ops.shrink_bmm, torch_ops.expand_bmm),
        invariant_ops(),
    ):
        if not case["meta"].runs and shrink is not torch_ops.lora_shrink:
            continue  # the strategies are only called with some LoRA token
        check_shrink(shrink, case, ranks)
        check_expand(expand, case, ranks)


# ---- dispatch ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_dispatch_forced_backend(backend, monkeypatch, request):
    monkeypatch.setenv("LORACLI_LORA_BACKEND", backend)
    slots, S = spread_slots("free", 50, random.Random(1))
    _, case = for_backend(backend, request, make_case(torch.bfloat16, 16, slots, S))
    ranks = [16, 4, 0, 16, 9, 2, 16, 1]
    check_shrink(lora_shrink, case, ranks)
    check_expand(lora_expand, case, ranks)


def test_dispatch_rejects_unknown_backend(monkeypatch):
    monkeypatch.setenv("LORACLI_LORA_BACKEND", "cuda-graphs")
    case = make_case(torch.float32, 4, [0, 0], 1)
    with pytest.raises(ValueError, match="LORACLI_LORA_BACKEND"):
        lora_shrink(case["x"], case["A"], case["meta"])


def test_triton_kernels_pick_a_form(triton_ops):
    """Decode-like steps (short segments) use BGMV, long segments SGMV."""
    assert triton_ops.use_bgmv(build_meta([t // 4 for t in range(64)]))
    assert not triton_ops.use_bgmv(build_meta([t // 256 for t in range(2048)]))


def test_cpu_strategy_cost_model():
    sorted_decode = build_meta([t // 8 for t in range(64)])
    assert torch_ops.use_bmm(sorted_decode, 576, 16, torch.bfloat16)
    assert not torch_ops.use_bmm(sorted_decode, 576, 16, torch.float16)
    skewed_prefill = build_meta(sorted(random.Random(0).choices(range(8), [1, 0.01] * 4, k=2048)))
    assert not torch_ops.use_bmm(skewed_prefill, 576, 16, torch.float32)


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_invariant_meta_gives_each_token_the_same_bits_in_any_batch(dname):
    """With `invariant` metadata (deterministic mode) a token's shrink and expand results depend on
    its row, its slot's weights and rank only: not on the batch size, the other slots in the batch,
    the slot index its adapter sits in, whether the tokens come sorted by slot, the rank width (16
    or 32 columns: what `MultiLoraLinear` passes when a rank-32 adapter joins the slots), nor the
    strategy the cost model picks."""
    dtype = DTYPES[dname]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(70, K_IN, generator=gen).to(dtype)
    out = torch.randn(70, N_OUT + OFFSET, generator=gen).to(dtype)
    A = (torch.randn(6, 32, K_IN, generator=gen) * K_IN**-0.5).to(dtype)
    B = (torch.randn(6, N_OUT, 32, generator=gen) * 0.25).to(dtype)
    ranks = [16, 4, 0, 16, 9, 32]
    for slot, r in enumerate(ranks):  # zero past every real rank, as MultiLoraLinear's buffers are
        A[slot, r:] = 0
        B[slot, :, r:] = 0

    def token0(slots: list[int], rows: list[int], moved=None, width: int = 16, ops=(lora_shrink, lora_expand)):
        """Shrink and expand of x[rows] over `width` rank columns; slot s's adapter sits at
        moved.get(s, s); the results of row 0."""
        moved = moved or {}
        A2, B2, r2 = A[:, :width].clone(), B[:, :, :width].clone(), [min(r, width) for r in ranks]
        for old, new in moved.items():
            A2[new], B2[new], r2[new] = A[old, :width], B[old, :, :width], ranks[old]
        meta = build_meta([moved.get(s, s) for s in slots], invariant=True)
        y = ops[0](x[rows], A2, meta, r2)
        o = out[rows].clone()
        ops[1](y, B2, meta, o, OFFSET, r2)
        return y[0, :16], o[0]

    alone = token0([3], [0])
    cases = {
        "a run of 7 tokens of one slot": token0([3] * 7, list(range(7))),
        "a run of 64": token0([3] * 64, list(range(64))),
        "a run of 70: whole tiles in place, the rest padded": token0([3] * 70, list(range(70))),
        "sorted by slot, with a slot -1 token": token0([3, 3, 0, 0, 1, 4, 4, 5, -1], [0, 5, 6, 7, 8, 9, 10, 11, 12]),
        "not sorted: the gathered path": token0([3, 0, 3, 1, 0, -1, 4, 3], [0, 20, 21, 22, 23, 24, 25, 26]),
        "another slot index": token0([3, 3, 1], [0, 1, 2], moved={3: 0, 1: 4}),
        "32 rank columns": token0([3, 5, 5, 0], [0, 1, 2, 3], width=32),
    }
    mix = ([3, 3, 3, 0, 1, 4], [0, 1, 2, 9, 3, 4])  # contiguous runs, the token first
    for ops in ((torch_ops.shrink_runs, torch_ops.expand_runs), (torch_ops.shrink_bmm, torch_ops.expand_bmm)):
        cases[ops[0].__name__] = token0(*mix, ops=ops)
        cases[f"{ops[0].__name__}, not sorted"] = token0([3, 0, 3, -1], [0, 5, 6, 7], ops=ops)
    for name, got in cases.items():
        assert torch.equal(got[0], alone[0]) and torch.equal(got[1], alone[1]), name


def test_package_imports_without_triton():
    """`import loracli.kernels` and the CPU path must not need Triton."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from loracli.kernels import build_meta, lora_shrink\n"
        "y = lora_shrink(torch.ones(3, 4), torch.ones(2, 5, 4), build_meta([1, -1, 0]))\n"
        "assert y.tolist()[0] == [4.0] * 5 and y.tolist()[1] == [0.0] * 5\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LORACLI_LORA_BACKEND"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ---- no LoRA tokens, bad arguments -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("slots", [[], [-1, -1, -1]])
def test_no_lora_tokens(backend, slots, monkeypatch, request):
    monkeypatch.setenv("LORACLI_LORA_BACKEND", backend)
    _, case = for_backend(backend, request, make_case(torch.float32, 8, slots, 2))
    y = lora_shrink(case["x"], case["A"], case["meta"])
    assert y.shape == (len(slots), 8) and not y.any()
    out = case["out"].clone()
    lora_expand(case["y"], case["B"], case["meta"], out, OFFSET)
    assert torch.equal(out, case["out"])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: lora_shrink(c["x"][:, :10], c["A"], c["meta"]), "lora_shrink wants"),
        (lambda c: lora_shrink(c["x"][:2], c["A"], c["meta"]), "meta describes"),
        (lambda c: lora_shrink(c["x"], c["A"][:1], c["meta"]), "out of range"),
        (lambda c: lora_shrink(c["x"], c["A"], c["meta"], [8, 9]), "ranks must lie"),
        (lambda c: lora_shrink(c["x"], c["A"], c["meta"], [8]), "ranks has 1 entries"),
        (lambda c: lora_expand(c["y"], c["B"], c["meta"], c["out"], c["out"].shape[1]), "do not fit"),
        (lambda c: lora_expand(c["y"][:, :3], c["B"], c["meta"], c["out"]), "lora_expand wants"),
        (lambda c: lora_expand(c["y"], c["B"], c["meta"], c["out"][:2]), "out has 2 rows"),
        (lambda c: lora_shrink(c["x"].double(), c["A"], c["meta"]), "one dtype"),
        (lambda c: lora_expand(c["y"], c["B"].half(), c["meta"], c["out"]), "one dtype"),
    ],
)
def test_bad_arguments(call, message):
    case = make_case(torch.float32, 8, [0, 1, 1, -1], 2)
    with pytest.raises(ValueError, match=message):
        call(case)


# ---- build_meta --------------------------------------------------------------------------------


def test_build_meta_contiguous_runs():
    meta = build_meta([3, 3, -1, 0, 0, 0, 5])
    assert meta.runs == [(3, 0, 2), (0, 3, 6), (5, 6, 7)]
    assert meta.order is None
    assert meta.token_slot.tolist() == [3, 3, -1, 0, 0, 0, 5]
    assert (meta.num_tokens, meta.max_slot, meta.any_lora) == (7, 5, True)


def test_build_meta_non_contiguous_sorts_stably():
    slots = [1, 0, 1, -1, 0, 2, -1]
    meta = build_meta(slots)
    assert meta.order.tolist() == [3, 6, 1, 4, 0, 2, 5]  # slot -1 first, ties in token order
    assert meta.runs == [(0, 2, 4), (1, 4, 6), (2, 6, 7)]
    for slot, s, e in meta.runs:
        assert all(slots[t] == slot for t in meta.order[s:e].tolist())


def test_build_meta_repeated_slot_across_a_gap_is_non_contiguous():
    meta = build_meta([4, -1, 4])
    assert meta.order.tolist() == [1, 0, 2]
    assert meta.runs == [(4, 1, 3)]


def test_build_meta_all_free_and_empty():
    for slots in ([-1, -1], []):
        meta = build_meta(slots)
        assert meta.runs == [] and meta.order is None
        assert (meta.num_tokens, meta.max_slot, meta.any_lora) == (len(slots), -1, False)
        assert meta.token_slot.dtype == torch.int64 and meta.token_slot.numel() == len(slots)


def test_build_meta_rejects_bad_slots():
    with pytest.raises(ValueError, match=">= -1"):
        build_meta([0, -2])


def test_meta_cache_builds_once():
    meta = build_meta([0, 1])
    calls = []
    assert meta.cached("k", lambda: calls.append(1) or "v") == "v"
    assert meta.cached("k", lambda: calls.append(1) or "w") == "v"
    assert calls == [1]


# ---- adapter mixes: one pass per part, each weighted by `lora_weigh` -------------------------------


def mix_passes(slots: list[int], S: int, rng: random.Random) -> list[tuple[list[int], list[float]]]:
    """Passes for tokens whose first part is slots[t]: each token with a slot gets 1 to 3 parts of
    distinct slots, weights in [-1, 1.5] (0 included); slot -1 tokens get none."""
    parts = []
    for s in slots:
        n = 0 if s < 0 else rng.randint(1, min(3, S))
        others = rng.sample([o for o in range(S) if o != s], max(0, n - 1))
        parts.append([(p, rng.choice([0.0, rng.uniform(-1, 1.5)])) for p in ([s, *others] if n else [])])
    depth = max(1, *map(len, parts))
    return [
        ([p[k][0] if k < len(p) else -1 for p in parts], [p[k][1] if k < len(p) else 1.0 for p in parts])
        for k in range(depth)
    ]


def weigh_op(name: str, tops) -> Callable[..., None]:
    return tops.lora_weigh if name.startswith("triton") else torch_ops.lora_weigh


def run_mix(name: str, request, dname: str, R: int, T: int, spread: str) -> None:
    """A batch of adapter mixes through backend `name`, pass by pass, against the reference."""
    rng = random.Random(T * 7 + R)
    tops, case = for_backend(name, request, sweep_case(dname, R, T, spread))
    x, A, B, before = case["x"], case["A"], case["B"], case["out"]
    S = A.shape[0]
    ranks = [rng.randint(0, R) for _ in range(S)] if R > 1 else None
    first = build_passes(mix_passes(case["meta"].token_slot.tolist(), S, rng), x.device)
    shrink, expand = backend_ops(name, tops)
    out, expect = before.clone(), before.float().cpu()
    for meta in first.passes():
        y = shrink(x, A, meta, ranks)
        weigh_op(name, tops)(y, meta)
        expand(y, B, meta, out, OFFSET, ranks)
        yr = reference.lora_shrink(x.float(), A.float(), meta, ranks)
        reference.lora_weigh(yr, meta)
        reference.lora_expand(yr, B.float(), meta, expect, OFFSET, ranks)
    atol, rtol = TOL[out.dtype]
    torch.testing.assert_close(out.float().cpu(), expect, atol=2 * atol, rtol=2 * rtol)


@pytest.mark.parametrize("backend", TORCH_BACKENDS + TRITON_BACKENDS)
@pytest.mark.parametrize("dname,R,T,spread", FAST_CASES)
def test_mixes_match_reference(backend, dname, R, T, spread, request):
    run_mix(backend, request, dname, R, T, spread)


@pytest.mark.slow
@pytest.mark.parametrize("backend", TORCH_BACKENDS + TRITON_BACKENDS)
@pytest.mark.parametrize("dname,R,T,spread", [c for c in FULL_CASES if c not in FAST_CASES])
def test_mixes_match_reference_sweep(backend, dname, R, T, spread, request):
    run_mix(backend, request, dname, R, T, spread)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("R", [1, 16, 100])
def test_weigh_rounds_once_like_the_reference(backend, dname, R, request):
    gen = torch.Generator().manual_seed(R)
    y = (torch.randn(9, R, generator=gen) * 3).to(DTYPES[dname])
    meta = build_meta([0, -1, 1, 1, 2, 0, -1, 3, 3], token_weight=[0.7, 1, -0.3, 0, 1.0, 2.5, 1, -1e-3, 0.5])
    tops = request.getfixturevalue("triton_ops") if backend == "triton" else None
    ours, expect = y.clone(), y.clone()
    weigh_op(backend, tops)(ours, meta)
    reference.lora_weigh(expect, meta)
    if tops is not None and tops.INTERPRET and y.dtype == torch.bfloat16:
        # the interpreter truncates fp32 -> bf16 whatever the rounding mode asked: one ulp off at most
        torch.testing.assert_close(ours.float(), expect.float(), atol=0, rtol=2**-7)
    else:
        assert torch.equal(ours, expect)
    assert not torch.equal(ours, y)


def test_weigh_without_weights_changes_nothing():
    y = torch.randn(4, 8)
    before = y.clone()
    for weigh in (torch_ops.lora_weigh, reference.lora_weigh, lora_weigh):
        weigh(y, build_meta([0, 1, -1, 0]))
    assert torch.equal(y, before)


def test_build_passes_chains_and_checks():
    first = build_passes([([0, 1, -1], [0.5, 1.0, 1.0]), ([2, -1, -1], [-0.3, 1.0, 1.0])])
    metas = list(first.passes())
    assert [m.token_slot.tolist() for m in metas] == [[0, 1, -1], [2, -1, -1]]
    assert metas[1].token_weight.tolist() == pytest.approx([-0.3, 1.0, 1.0])
    with pytest.raises(ValueError, match="token_weight has 2 entries for 3 tokens"):
        build_meta([0, 1, 2], token_weight=[1.0, 2.0])
    with pytest.raises(ValueError, match="token_weight must be float32"):
        lora_weigh(torch.zeros(2, 4), build_meta([0, 1, 2], token_weight=[1.0, 2.0, 3.0]))
