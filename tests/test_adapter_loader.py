"""Background adapter loading (`loracli/adapter_loader.py`): load time hidden behind other work.

The slow source: `loracli.adapter_store.load_adapter` (the store's whole read of one adapter,
folder -> validated, scaled weights) is wrapped by a test-only function that sleeps first, as a
slow disk or bucket would; loracli's own logic (store, loader, scheduler, engine) runs unchanged.

- with a 0.5 s delay per load and 8 adapters, a run with the default `adapter_load_workers` takes at
  most 1.5 s more than without the delay, while loading in the step (`adapter_load_workers=0`) pays
  the 4 s (so the timing check can fail); runs without and with the delay alternate, up to 3 pairs,
  and the fastest of each is compared, as other processes may share the machine;
- the same tokens per request with 0 and 4 load workers (deterministic mode);
- a corrupt adapter fails only its own requests, naming its file and the reason;
- `close()` with loads in flight returns at once and cancels the loads not started;
- the config field is validated.
"""

from __future__ import annotations

import threading
import time

import pytest
from runs import tiny_engine
from tiny import make_adapter

import loracli.adapter_store as adapter_store
from loracli.config import EngineConfig
from loracli.errors import ConfigError
from loracli.requests import Request
from loracli.sampling import SamplingParams

N_ADAPTERS = 8
DELAY = 0.5


@pytest.fixture(scope="module")
def eight_adapters(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eight_adapters")
    for i in range(N_ADAPTERS):
        targets = ("q_proj", "v_proj") if i % 2 else ("gate_proj", "down_proj")
        make_adapter(llama_dir, root / f"a{i}", r=4, targets=targets, seed=100 + i)
    return root


@pytest.fixture
def slow_loads(monkeypatch):
    """Make every adapter load take `delay` seconds more (the store's reads go through the wrapper)."""
    real = adapter_store.load_adapter
    state = {"delay": 0.0, "gate": None, "calls": 0}

    def slow_load_adapter(*args, **kwargs):
        state["calls"] += 1
        if state["gate"] is not None:
            state["gate"].wait(10)
        time.sleep(state["delay"])
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter_store, "load_adapter", slow_load_adapter)
    return state


def requests(per_adapter: int, names: list[str], max_tokens: int) -> list[Request]:
    """`per_adapter` requests for each adapter, interleaved (each adapter's first one comes early)."""
    params = {"max_tokens": max_tokens, "ignore_eos": True}
    return [
        Request(f"{name}-{k}", name, f"the quick brown fox {k} {name}", params=dict(params))
        for k in range(per_adapter)
        for name in names
    ]


def timed_run(model_dir, adapters_dir, reqs, **config) -> tuple[float, dict, object]:
    """Wall seconds of one run on a fresh engine (start-up excluded), tokens per request id, counters."""
    engine = tiny_engine(model_dir, adapters_dir, deterministic=True, **config)
    try:
        t0 = time.perf_counter()
        results = list(engine.generate(reqs, SamplingParams()))
        wall = time.perf_counter() - t0
    finally:
        engine.close()
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    return wall, {r.id: r.token_ids for r in results}, engine.counters()


def test_background_loading_hides_load_time(llama_dir, eight_adapters, slow_loads, one_thread):
    """Wall times of runs without and with the delay, alternated, up to 3 pairs until the fastest of
    each is within the bound (other processes may share the machine: single runs vary by seconds)."""
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    reqs = requests(per_adapter=8, names=names, max_tokens=48)
    plain, hidden = [], []
    while len(plain) < 3 and (not plain or min(hidden) > min(plain) + 1.5):
        slow_loads["delay"] = 0.0
        wall, tokens, _ = timed_run(llama_dir, eight_adapters, reqs)
        plain.append(wall)
        slow_loads["delay"] = DELAY
        wall, hidden_tokens, counters = timed_run(llama_dir, eight_adapters, reqs)
        hidden.append(wall)
        assert hidden_tokens == tokens
        assert counters.background_loads == N_ADAPTERS
        assert counters.load_wait_steps >= 1  # the first loads cannot be hidden: nothing else can run yet
        assert counters.load_wait_seconds <= 1.5 and counters.load_hidden_seconds >= N_ADAPTERS * DELAY - 1.5
    serial, serial_tokens, _ = timed_run(llama_dir, eight_adapters, reqs, adapter_load_workers=0)
    slow_loads["delay"] = 0.0
    serial_plain, _, _ = timed_run(llama_dir, eight_adapters, reqs, adapter_load_workers=0)
    print(f"no delay {plain}; {DELAY}s per load: background {hidden}, in the step {serial:.2f}s")
    print(f"in the step without the delay {serial_plain:.2f}s")
    # the delay is real: loading in the step pays it all (against the same schedule without the delay)
    assert serial >= serial_plain + N_ADAPTERS * DELAY - 0.3
    assert min(hidden) <= min(plain) + 1.5
    assert serial_tokens == tokens


def test_same_tokens_with_and_without_load_workers(llama_dir, eight_adapters, slow_loads, one_thread):
    slow_loads["delay"] = 0.05  # loads finish while others run: a different schedule, the same tokens
    names = [f"a{i}" for i in range(N_ADAPTERS)] + [None]
    reqs = requests(per_adapter=3, names=names, max_tokens=12)
    _, serial, _ = timed_run(llama_dir, eight_adapters, reqs, adapter_load_workers=0)
    _, background, counters = timed_run(llama_dir, eight_adapters, reqs, adapter_load_workers=4)
    assert counters.background_loads == N_ADAPTERS
    assert background == serial and len(serial) == len(reqs)


def test_corrupt_adapter_fails_only_its_requests(llama_dir, eight_adapters, tmp_path, one_thread):
    folder = tmp_path / "adapters"
    folder.mkdir()
    for name in ("a0", "a1"):
        (folder / name).symlink_to(eight_adapters / name, target_is_directory=True)
    broken = folder / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((eight_adapters / "a0" / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    engine = tiny_engine(llama_dir, folder, deterministic=True, adapter_load_workers=2)
    try:
        results = list(engine.generate(requests(3, ["broken", "a0", "a1"], max_tokens=6), SamplingParams()))
    finally:
        engine.close()
    failed = {r.id: r.error.message for r in results if r.error is not None}
    assert sorted(failed) == ["broken-0", "broken-1", "broken-2"]
    assert all(str(broken) in message for message in failed.values())
    assert len(results) == 9 and all(len(r.token_ids) == 6 for r in results if r.error is None)
    assert "broken" in engine.store.failed and engine.counters().background_loads == 3
    assert engine.reports()["slots"]["background_loads"] == 3  # what --stats shows


def test_close_with_loads_in_flight_returns_at_once(llama_dir, eight_adapters, slow_loads, one_thread):
    slow_loads["gate"] = gate = threading.Event()  # every load blocks until the test opens the gate
    engine = tiny_engine(llama_dir, eight_adapters, adapter_load_workers=1)
    try:
        for req in [Request("base", None, "hello world"), *requests(1, ["a0", "a1", "a2"], max_tokens=4)]:
            assert engine.add_request(req) is None
        engine.step()  # runs the base request's prefill; a0's load starts, a1's and a2's are queued
        deadline = time.perf_counter() + 5
        while slow_loads["calls"] == 0 and time.perf_counter() < deadline:
            time.sleep(0.01)
        assert engine.loader.is_loading("a0") and slow_loads["calls"] == 1
        t0 = time.perf_counter()
        engine.close()
        assert time.perf_counter() - t0 < 0.2
    finally:
        gate.set()
    time.sleep(0.3)
    assert slow_loads["calls"] == 1  # the queued loads were cancelled, not started
    engine.loader.prefetch(["a3"], set())  # a closed loader starts nothing


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_adapter_load_workers_is_validated(value):
    with pytest.raises(ConfigError, match="adapter_load_workers") as info:
        EngineConfig(adapter_load_workers=value)
    assert info.value.fields == ("adapter_load_workers",)
