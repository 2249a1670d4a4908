"""`python -m loracli.bench.profile`: the operator buckets (pure) and a tiny-model run of the decode profile."""

from __future__ import annotations

import pytest
from tiny import make_adapter, make_model

from loracli.bench.profile import bucket_of, profile_decode, self_times, split


def test_buckets_and_shares():
    assert bucket_of("aten::mm") == "base matmul"
    assert bucket_of("aten::bmm") == "lora"
    assert bucket_of("aten::index") == "attention"
    assert bucket_of("aten::argmax") == "sampling"
    assert bucket_of("aten::rsqrt") == "other"
    shares = split({"aten::mm": 60.0, "aten::bmm": 10.0, "aten::index": 20.0, "aten::rsqrt": 10.0})
    assert shares == pytest.approx({"base matmul": 0.6, "lora": 0.1, "attention": 0.2, "sampling": 0.0, "other": 0.1})


def test_ops_inside_the_attention_range_count_as_attention():
    """A GEMM under decode attention's range is attention, not LoRA; the range's own time too."""
    from types import SimpleNamespace as Ev

    rng = Ev(name="range", self_cpu_time_total=1.0, cpu_parent=None)
    linear = Ev(name="aten::linear", self_cpu_time_total=0.0, cpu_parent=None)
    events = [
        rng,
        Ev(name="aten::bmm", self_cpu_time_total=5.0, cpu_parent=rng),
        linear,
        Ev(name="aten::bmm", self_cpu_time_total=3.0, cpu_parent=linear),
    ]
    times = self_times(events, "range")
    assert times == {"attention/range": 1.0, "attention/aten::bmm": 5.0, "aten::bmm": 3.0}
    assert split(times) == pytest.approx(
        {"base matmul": 0, "lora": 1 / 3, "attention": 2 / 3, "sampling": 0, "other": 0}
    )


def test_profile_decode_on_a_tiny_model(tmp_path):
    model = make_model(tmp_path / "model")
    make_adapter(model, tmp_path / "adapters" / "a", r=4)
    make_adapter(model, tmp_path / "adapters" / "b", r=8, targets=("q_proj", "down_proj"), seed=2)
    result = profile_decode(
        str(model), str(tmp_path / "adapters"), batch=6, steps=2, warmup=1, dtype="float32", max_lora_rank=8
    )
    assert result["batch"] == 6 and result["adapters"] == ["a", "b"]
    assert result["step_ms"] > 0 and result["tokens_per_s"] > 0
    assert sum(result["shares"].values()) == pytest.approx(1.0)
    assert result["shares"]["base matmul"] > 0 and result["shares"]["lora"] > 0 and result["shares"]["attention"] > 0
    assert result["deterministic"] is False  # float32's default
    assert result["base_matmul_gflops"] > 0 and result["matmul_rate_gflops"] > 0
    assert result["activation_ms"]["disk_to_cpu"] > 0 and result["activation_ms"]["cpu_to_slot"] > 0
