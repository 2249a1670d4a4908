"""Mixed steps (`EngineConfig.mixed_prefill`, on by default): new prompts run in the same forward as
the running sequences' next tokens.

1. the scheduler (no tensors): a place freed by a finished sequence is filled in the next step,
   beside the decoding ones; their tokens count against `max_batched_tokens`; a mixed step that
   runs out of memory requeues its prompts, keeps the decoding sequences and turns mixing off;
2. the engine: the same requests with mixing on and off give the same tokens (and, in
   deterministic mode, the same logprob bits), with prefix-cache hits, prompt logprobs, n samples
   and adapter mixes among them, in fewer steps; answers from mixed steps equal transformers + PEFT
   with each adapter alone.
"""

from __future__ import annotations

import random

import pytest
from runs import tiny_engine
from test_engine_vs_peft import assert_matches_peft
from test_scheduler import seq

from loracli.config import EngineConfig
from loracli.engine.block_manager import BlockManager
from loracli.engine.scheduler import Scheduler
from loracli.engine.sequence import Status
from loracli.engine.slots import SlotManager
from loracli.requests import AdapterMix, Request
from loracli.sampling import SamplingParams

# ---- 1. the scheduler ----------------------------------------------------------------------------


def scheduler(mixed: bool, max_num_seqs: int = 2, max_batched_tokens: int = 4096) -> Scheduler:
    cfg = EngineConfig(
        max_loras=2, max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens, block_size=4, mixed_prefill=mixed
    )
    return Scheduler(cfg, BlockManager(100, 4), SlotManager(2), lambda name: None)


def decoded(batch) -> list:
    """The sequences that get a token from this step: a decode's, or a mixed step's decoding ones."""
    return batch.decode if batch.is_prefill else batch.seqs


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "separate"])
def test_a_freed_place_is_filled_beside_the_decoding_sequences(mixed):
    sched = scheduler(mixed)
    a, b, c = seq(0, None), seq(1, "x"), seq(2, None)
    for s in (a, b, c):
        sched.add(s)
    first = sched.schedule()
    assert first.is_prefill and first.seqs == [a, b] and first.decode == []  # nothing was running
    assert decoded(sched.schedule()) == [a, b]  # c waits: two places
    sched.finish(a)
    step = sched.schedule()
    if mixed:
        assert step.is_prefill and step.seqs == [c] and step.decode == [b]
    else:
        assert step.is_prefill and step.seqs == [c] and step.decode == []  # b waits a step
        assert sched.schedule().seqs == [b, c]
    assert c.status is Status.RUNNING


def test_decode_tokens_count_against_the_step_budget():
    """Four running sequences leave 12 - 4 = 8 prompt tokens: the first prompt (5) fits, the second
    (5) waits; a prompt over what is left is still admitted when it is the step's first."""
    sched = scheduler(True, max_num_seqs=8, max_batched_tokens=12)
    running = [seq(i, None, n=3) for i in range(4)]
    for s in running:
        sched.add(s)
    assert sched.schedule().seqs == running  # 12 tokens: the whole budget
    p, q = seq(10, None, n=5), seq(11, None, n=5)
    sched.add(p)
    sched.add(q)
    step = sched.schedule()
    assert step.seqs == [p] and step.decode == running and list(sched.waiting) == [q]
    sched.finish(p)
    long = seq(12, None, n=11)
    sched.waiting.appendleft(long)
    step = sched.schedule()
    assert step.seqs == [long] and len(step.decode) == 4  # 11 > 12 - 4, but the step's first


def test_a_mixed_step_out_of_memory_requeues_its_prompts_and_stops_mixing():
    """Mixing is turned off, the limits stay: the steps that follow back off on their own."""
    sched = scheduler(True)
    a, b = seq(0, None), seq(1, None)
    sched.add(a)
    sched.schedule()
    sched.add(b)
    step = sched.schedule()
    assert step.seqs == [b] and step.decode == [a]
    sched.back_off(step)
    assert b.status is Status.WAITING and sched.waiting[0] is b
    assert a.status is Status.RUNNING and sched.running == [a]
    assert not sched.mixed
    assert (sched.max_batched_tokens, sched.max_num_seqs) == (4096, 2)  # limits unchanged: mixing was the change
    step = sched.schedule()
    assert step.is_prefill and step.seqs == [b] and step.decode == []


# ---- 2. the engine -------------------------------------------------------------------------------

ADAPTERS = (None, "attn4", "mlp8", "all16rs", "pattern")
WORDS = "the quick brown fox jumps over a lazy dog while seven cats watch".split()
SYSTEM = " ".join(WORDS * 3)  # a prefix long enough for full cached blocks


def workload(n: int = 48) -> list[Request]:
    """Requests of 1-12 tokens (so places free at different steps), over four adapters, the base model
    and a mix; every fourth shares a long prefix (prefix-cache hits), every fifth asks for prompt
    logprobs, every seventh samples two answers with a seed."""
    rng = random.Random(5)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25)))
        params: dict = {"max_tokens": rng.randint(1, 12), "ignore_eos": True, "logprobs": 1}
        if i % 5 == 1:
            params["prompt_logprobs"] = 1
        if i % 7 == 3:
            params.update(n=2, temperature=0.8, seed=i)
        prompt = f"{SYSTEM} {text}" if i % 4 == 0 else text
        if i % 9 == 4:
            mix = AdapterMix((("attn4", 0.5), ("mlp8", 0.5)))
            out.append(Request(f"r{i}", mix.name, prompt=prompt, params=params, mix=mix))
        else:
            out.append(Request(f"r{i}", ADAPTERS[i % len(ADAPTERS)], prompt=prompt, params=params))
    return out


def answers(engine, requests) -> dict:
    """id -> every sample's tokens and logprobs, and the prompt logprobs."""
    out = {}
    for r in engine.generate(requests, SamplingParams(max_tokens=4)):
        assert r.error is None, (r.id, r.error)
        samples = r.choices or [r]
        out[r.id] = (
            [(s.token_ids, [(t.id, t.logprob) for t in s.logprobs]) for s in samples],
            None if r.prompt_logprobs is None else [None if t is None else t.logprob for t in r.prompt_logprobs],
        )
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_same_answers_with_and_without_mixed_steps(llama_dir, llama_adapters, dtype, one_thread):
    """Deterministic mode: equal tokens and equal logprob bits; every kind of request above ran."""
    requests = workload()
    got, counters = {}, {}
    for mixed in (True, False):
        engine = tiny_engine(
            llama_dir, llama_adapters, dtype=dtype, deterministic=True, max_num_seqs=5, max_loras=4, mixed_prefill=mixed
        )
        got[mixed] = answers(engine, requests)
        counters[mixed] = engine.counters()
    assert len(got[True]) == len(requests)
    assert got[True] == got[False]
    on, off = counters[True], counters[False]
    assert on.mixed_steps > 0 and off.mixed_steps == 0
    assert on.prefix_hit_blocks > 0
    assert on.steps < off.steps


def test_without_determinism_the_tokens_are_still_equal(llama_dir, llama_adapters, one_thread):
    """float32, fastest kernels (the last bits of a row follow its batch): the same tokens."""
    requests = workload()
    tokens = []
    for mixed in (True, False):
        engine = tiny_engine(
            llama_dir, llama_adapters, deterministic=False, max_num_seqs=5, max_loras=4, mixed_prefill=mixed
        )
        tokens.append({k: [s[0] for s in v[0]] for k, v in answers(engine, requests).items()})
    assert tokens[0] == tokens[1]


def test_answers_from_mixed_steps_equal_peft(llama_dir, llama_adapters):
    """Two places, answers of 2, 7 or 12 tokens: most prompts after the first two are admitted into a
    mixed step (six steps here); each answer equals transformers + PEFT with its adapter alone
    (float32)."""
    rng = random.Random(8)
    requests = [
        Request(
            f"p{i}",
            ADAPTERS[i % len(ADAPTERS)],
            prompt=" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))),
            params={"max_tokens": 2 + 5 * (i % 3), "ignore_eos": True},
        )
        for i in range(10)
    ]
    engine = tiny_engine(llama_dir, llama_adapters, deterministic=False, max_num_seqs=2, max_loras=4)
    results = {r.id: r for r in engine.generate(requests)}
    assert engine.counters().mixed_steps >= 4
    for req in requests:
        assert_matches_peft(engine, llama_dir, llama_adapters, req, results[req.id], req.params["max_tokens"])
