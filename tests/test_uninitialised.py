"""KV cache and LoRA slot buffers are allocated without a zero-fill: whatever they hold before being
written must never reach an output. Poison them with NaN and compare with a clean engine."""

from __future__ import annotations

import torch
from runs import tiny_engine

from loracli.model.lora_linear import MultiLoraLinear
from loracli.requests import Request
from loracli.sampling import SamplingParams


def _outputs(engine, n: int = 9) -> dict[str, list[int]]:
    adapters = (None, "attn4", "mlp8", "all16rs", "pattern")
    reqs = [Request(f"r{i}", adapters[i % len(adapters)], "the quick brown fox " * (1 + i % 4)) for i in range(n)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    return {r.id: list(r.token_ids) for r in engine.generate(reqs, params)}


def _poison(engine, monkeypatch) -> None:
    """NaN in the KV cache's rows and in every LoRA buffer allocated from now on, as uninitialised
    memory may hold."""
    for kv in engine.model.kv:
        kv[:, : engine.model.zero_row].fill_(float("nan"))
    storage = MultiLoraLinear._storage

    def poisoned(self, *args):
        a, bs = storage(self, *args)
        for t in (a, *bs):
            t.fill_(float("nan"))
        return a, bs

    monkeypatch.setattr(MultiLoraLinear, "_storage", poisoned)
    for _, lin in engine.model.linears():
        lin.resize(lin.n_slots)


def test_nan_in_unwritten_kv_rows_and_slots_never_reaches_outputs(llama_dir, llama_adapters, monkeypatch):
    clean = _outputs(
        tiny_engine(llama_dir, llama_adapters, max_loras=4, max_num_seqs=4, num_kv_blocks=16, block_size=4)
    )
    poisoned = tiny_engine(llama_dir, llama_adapters, max_loras=4, max_num_seqs=4, num_kv_blocks=16, block_size=4)
    _poison(poisoned, monkeypatch)
    got = _outputs(poisoned)
    assert got == clean and len(got) == 9


def test_the_zero_row_is_zero_and_masked_positions_read_it(llama_dir):
    engine = tiny_engine(llama_dir, num_kv_blocks=4, block_size=4)
    for kv in engine.model.kv:
        assert kv.shape[1] == engine.model.zero_row + 1
        assert torch.count_nonzero(kv[:, engine.model.zero_row]) == 0
