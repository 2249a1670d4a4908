"""KV cache and LoRA slot buffers are allocated without a zero-fill: whatever they hold before being
written must never reach an output. Poison them with NaN and compare with a clean engine."""

from __future__ import annotations

import torch
from runs import tiny_engine

from loracli.requests import Request
from loracli.sampling import SamplingParams


def _outputs(engine, n: int = 9) -> dict[str, list[int]]:
    adapters = (None, "attn4", "mlp8", "all16rs", "pattern")
    reqs = [Request(f"r{i}", adapters[i % len(adapters)], "the quick brown fox " * (1 + i % 4)) for i in range(n)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    return {r.id: list(r.token_ids) for r in engine.generate(reqs, params)}


def _poison(engine) -> None:
    for kv in engine.model.kv:
        kv[:, : engine.model.zero_row].fill_(float("nan"))
    for _, lin in engine.model.linears():
        for A, B in zip(lin.A, lin.B, strict=True):
            A.fill_(float("nan"))
            B.fill_(float("nan"))


def test_nan_in_unwritten_kv_rows_and_slots_never_reaches_outputs(llama_dir, llama_adapters):
    clean = _outputs(
        tiny_engine(llama_dir, llama_adapters, max_loras=4, max_num_seqs=4, num_kv_blocks=16, block_size=4)
    )
    poisoned = tiny_engine(llama_dir, llama_adapters, max_loras=4, max_num_seqs=4, num_kv_blocks=16, block_size=4)
    _poison(poisoned)
    got = _outputs(poisoned)
    assert got == clean and len(got) == 9


def test_the_zero_row_is_zero_and_masked_positions_read_it(llama_dir):
    engine = tiny_engine(llama_dir, num_kv_blocks=4, block_size=4)
    for kv in engine.model.kv:
        assert kv.shape[1] == engine.model.zero_row + 1
        assert torch.count_nonzero(kv[:, engine.model.zero_row]) == 0
