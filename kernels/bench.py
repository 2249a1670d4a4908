"""CPU cost of the multi-LoRA ops next to the base linear they ride on: `python -m loracli.kernels.bench`.

For each SmolLM2-135M projection (fused as the engine fuses them: q|k|v, o, gate|up, down) and
each step shape (decode T=64, prefill T=2048) it times, on CPU, with `--adapters` adapters of rank
`--rank` spread over the tokens:

* base: `F.linear(x, W)` for the fused projection, W [sum(splits), in];
* LoRA: the ops on top of it, for each `--variants` entry (default `auto`):
    auto      what `MultiLoraLinear` runs: per sub-projection one `lora_shrink` + one `lora_expand`
              through the public dispatcher (the torch path picks its strategy per op);
    runs/bmm  the same calls with one `torch_ops` strategy forced;
    stacked   one `lora_shrink` over the sub-projections' A stacked along the rank ([S, J*R, in],
              valid since the engine zero-pads A past each rank), then one `lora_expand` per
              sub-projection on its column slice of y;
    fused     the stacked shrink plus one `lora_expand` with a block-diagonal B [S, N, J*R];
    compiled  the bmm strategy under `torch.compile` (sorted layout only);
* the ratio LoRA / base. The goal is <= 15% at decode.

Times are medians of `--repeat` runs after `--warmup` runs (a quarter of both for T > 256). Each
variant call directly follows a base call, as in the model, and the variants run interleaved, so
that load from other processes on a shared machine spreads over all of them. `--layout` orders
tokens as the model runner does (sorted by slot), shuffled (the gather path) or zipf-distributed
over the slots.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from . import build_meta, lora_expand, lora_shrink, torch_ops
from .meta import LoraMeta


@dataclass(frozen=True)
class Projection:
    name: str
    in_features: int
    splits: tuple[int, ...]  # out features of each sub-projection, fused along the output


SMOLLM2 = (
    Projection("qkv", 576, (576, 192, 192)),
    Projection("o", 576, (576,)),
    Projection("gate_up", 576, (1536, 1536)),
    Projection("down", 1536, (576,)),
)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
VARIANTS = ("auto", "runs", "bmm", "stacked", "fused", "compiled")


@dataclass
class Weights:
    """One fused projection's base weight and per-sub-projection LoRA buffers, as the engine holds them."""

    x: torch.Tensor  # [T, in]
    W: torch.Tensor  # [N, in]
    As: list[torch.Tensor]  # J x [S, R, in]
    Bs: list[torch.Tensor]  # J x [S, n_j, R]
    offsets: list[int]  # column of each sub-projection in the fused output
    ranks: list[int]  # [S]
    out: torch.Tensor  # [T, N]


def token_slots(T: int, adapters: int, layout: str, seed: int = 0) -> list[int]:
    """Slot of each of T tokens: `adapters` slots spread evenly (sorted or shuffled) or zipf-like."""
    rng = random.Random(seed)
    if layout == "zipf":
        weights = [1 / (k + 1) for k in range(adapters)]
        return sorted(rng.choices(range(adapters), weights, k=T))
    slots = [t * adapters // T for t in range(T)]
    if layout == "shuffled":
        rng.shuffle(slots)
    return slots


def make_weights(proj: Projection, T: int, dtype: torch.dtype, adapters: int, rank: int) -> Weights:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(dtype)

    x, W = rand(T, proj.in_features), rand(sum(proj.splits), proj.in_features)
    return Weights(
        x=x,
        W=W,
        As=[rand(adapters, rank, proj.in_features) for _ in proj.splits],
        Bs=[rand(adapters, n, rank) for n in proj.splits],
        offsets=[sum(proj.splits[:j]) for j in range(len(proj.splits))],
        ranks=[rank] * adapters,
        out=F.linear(x, W),
    )


def per_sub_projection(shrink: Callable, expand: Callable, w: Weights, meta: LoraMeta) -> Callable[[], None]:
    """The `MultiLoraLinear` call pattern: shrink + expand for each sub-projection."""

    def run() -> None:
        for A, B, off in zip(w.As, w.Bs, w.offsets, strict=True):
            expand(shrink(w.x, A, meta, w.ranks), B, meta, w.out, off, w.ranks)

    return run


def stacked(w: Weights, meta: LoraMeta, fuse_expand: bool) -> Callable[[], None]:
    """One shrink over the stacked A's; one expand per sub-projection, or one with block-diagonal B."""
    A = torch.cat(w.As, dim=1)  # [S, J*R, in]
    R = w.As[0].shape[1]
    B = torch.zeros(A.shape[0], w.out.shape[1], A.shape[1], dtype=A.dtype)  # [S, N, J*R] block-diagonal
    for j, (Bj, off) in enumerate(zip(w.Bs, w.offsets, strict=True)):
        B[:, off : off + Bj.shape[1], j * R : (j + 1) * R] = Bj

    def run() -> None:
        y = lora_shrink(w.x, A, meta)  # [T, J*R]
        if fuse_expand:
            lora_expand(y, B, meta, w.out)
            return
        for j, (Bj, off) in enumerate(zip(w.Bs, w.offsets, strict=True)):
            lora_expand(y[:, j * R : (j + 1) * R], Bj, meta, w.out, off, w.ranks)

    return run


def compiled_bmm(w: Weights, meta: LoraMeta) -> Callable[[], None]:
    """The bmm strategy for a slot-sorted, evenly spread batch, under torch.compile (static shapes)."""
    grid = torch_ops.slot_grid(meta)
    if not grid.identity:
        raise ValueError("the compiled variant only covers the sorted layout")
    G, L = len(grid.slots), grid.width

    def lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        y = torch.bmm(x.view(G, L, -1), A[:G].transpose(1, 2))  # [G, L, R]
        return torch.bmm(y, B[:G].transpose(1, 2)).view(G * L, -1)  # [T, n]

    compiled = torch.compile(lora, dynamic=False)

    def run() -> None:
        for A, B, off in zip(w.As, w.Bs, w.offsets, strict=True):
            w.out.narrow(1, off, B.shape[1]).add_(compiled(w.x, A, B))

    return run


def variant(name: str, w: Weights, meta: LoraMeta) -> Callable[[], None]:
    if name == "auto":
        return per_sub_projection(lora_shrink, lora_expand, w, meta)
    if name == "runs":
        return per_sub_projection(torch_ops.shrink_runs, torch_ops.expand_runs, w, meta)
    if name == "bmm":
        return per_sub_projection(torch_ops.shrink_bmm, torch_ops.expand_bmm, w, meta)
    if name in ("stacked", "fused"):
        return stacked(w, meta, fuse_expand=name == "fused")
    return compiled_bmm(w, meta)


def median_us(
    base: Callable[[], object], variants: dict[str, Callable[[], object]], warmup: int, repeat: int
) -> dict[str, float]:
    """Median wall time in microseconds of `base` and of each variant, warm-up rounds excluded.

    Every variant call directly follows a base call, as the LoRA ops follow the base linear in the
    model (so each sees the caches the base linear leaves), and rounds interleave the variants so
    that load from other processes on a shared machine spreads over all of them.
    """
    times: dict[str, list[float]] = {name: [] for name in ("base", *variants)}
    for i in range(warmup + repeat):
        for name, fn in variants.items():
            for key, call in (("base", base), (name, fn)):
                t0 = time.perf_counter()
                call()
                if i >= warmup:
                    times[key].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def picked(meta: LoraMeta, proj: Projection, rank: int, dtype: torch.dtype) -> str:
    """The strategies `torch_ops` picks for the shrink and the (first) expand of a projection."""

    def name(D: int) -> str:
        return "bmm" if torch_ops.use_bmm(meta, D, rank, dtype) else "runs"

    return f"{name(proj.in_features)}/{name(proj.splits[0])}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 2048], help="step sizes T (decode, prefill)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--variants", nargs="+", default=["auto"], choices=VARIANTS)
    p.add_argument("--layout", default="sorted", choices=("sorted", "shuffled", "zipf"))
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeat", type=int, default=100)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    table = Table(
        title=f"multi-LoRA CPU ops vs base linear: {args.adapters} adapters x rank {args.rank}, "
        f"{args.layout} tokens, {torch.get_num_threads()} threads, median us"
    )
    for col in ("dtype", "T", "projection", "base us"):
        table.add_column(col, justify="right")
    for name in args.variants:
        table.add_column(f"{name} us", justify="right")
        table.add_column(f"{name}/base", justify="right")
    table.add_column("auto picks (shrink/expand)", justify="right")
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for T in args.tokens:
            meta = build_meta(token_slots(T, args.adapters, args.layout), "cpu")
            warmup, repeat = (args.warmup, args.repeat) if T <= 256 else (args.warmup // 4, args.repeat // 4)
            for proj in SMOLLM2:
                w = make_weights(proj, T, dtype, args.adapters, args.rank)
                variants = {name: variant(name, w, meta) for name in args.variants}
                res = median_us(lambda w=w: F.linear(w.x, w.W), variants, max(1, warmup), max(3, repeat))
                cells = [dname, str(T), proj.name, f"{res['base']:.0f}"]
                for name in args.variants:
                    cells += [f"{res[name]:.0f}", f"{100 * res[name] / res['base']:.0f}%"]
                table.add_row(*cells, picked(meta, proj, args.rank, dtype))
    console = Console()
    console.width = max(console.width, 160)
    console.print(table)


if __name__ == "__main__":
    main()
