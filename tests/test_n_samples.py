"""n > 1 samples per request: the prompt prefilled once, its full KV blocks shared by the n
samples, sample i seeded seed + i; one record per request (native `choices`, OpenAI `choices`
with index 0..n-1, usage counting the prompt once); preemption and resume stay correct.
"""

from __future__ import annotations

import pytest
from runs import by_key, read_output, run, tiny_engine, write_jsonl
from test_engine_vs_peft import reference

from loracli.engine.block_manager import BlockManager
from loracli.engine.sequence import Sequence
from loracli.requests import Request
from loracli.sampling import SamplingParams

PROMPT = "tell me a story about a robot who learns to paint"  # > 3 blocks of 4 tokens, the last partial


def sampled(rid, n, seed=5, adapter="attn4", **extra):
    params = {"n": n, "max_tokens": 8, "temperature": 1.0, "seed": seed, "ignore_eos": True, **extra}
    return Request(id=rid, adapter=adapter, prompt=PROMPT, params=params)


@pytest.fixture(scope="module")
def engine(llama_dir, llama_adapters, one_thread):
    return tiny_engine(llama_dir, llama_adapters, block_size=4, deterministic=True)


def choices(result):
    return [tuple(c.token_ids) for c in result.choices]


def test_n_samples_are_reproducible_and_sample_i_is_seed_plus_i(engine):
    (first,) = engine.generate([sampled("a", 4)])
    (again,) = engine.generate([sampled("a", 4)])
    assert first.error is None and len(first.choices) == 4
    assert choices(first) == choices(again)
    assert len(set(choices(first))) == 4  # four different draws
    singles = {r.id: r for r in engine.generate([sampled(f"s{i}", 1, seed=5 + i) for i in range(4)])}
    assert [tuple(singles[f"s{i}"].token_ids) for i in range(4)] == choices(first)
    assert first.token_ids == first.choices[0].token_ids and first.text == first.choices[0].text
    assert first.completion_tokens == 4 * 8 and first.prompt_tokens == len(engine.tokenize(sampled("a", 4)))


def test_the_samples_share_the_prompts_full_blocks(engine):
    req = sampled("b", 4)
    prompt_len = len(engine.tokenize(req))
    full, partial = divmod(prompt_len, 4)
    assert full >= 3 and partial  # the case with a copied last block
    free = engine.blocks.num_free
    assert engine.add_request(req) is None
    engine.step()  # the prefill: sample 0 runs, samples 1..3 are forked from it
    running = engine.scheduler.running
    assert len(running) == 4 and all(s.num_output == 1 for s in running)
    parent = running[0]
    shared = parent.block_table[:full]
    for child in running[1:]:
        assert child.block_table[:full] == shared
        assert child.block_table[full] not in parent.block_table  # its own copy of the partial block
    assert all(engine.blocks.refs[b] == 4 for b in shared)
    assert engine.blocks.num_free == free - (full + 4)  # not 4 * (full + 1)
    while engine.has_work():
        done = engine.step()
    (result,) = done
    assert engine.blocks.num_free == free and engine.blocks.refs == {}
    (alone,) = engine.generate([sampled("b", 4)])
    assert choices(result) == choices(alone)


def test_greedy_n_gives_n_identical_answers_equal_to_peft(engine, llama_dir, llama_adapters):
    req = Request(id="g", adapter="mlp8", prompt=PROMPT, params={"n": 3, "max_tokens": 8, "ignore_eos": True})
    (result,) = engine.generate([req])
    expected, _ = reference(llama_dir, llama_adapters, "mlp8", engine.tokenize(req), 8)
    assert choices(result) == [tuple(expected)] * 3


def test_more_samples_than_batch_places_run_as_separate_sequences(llama_dir, llama_adapters, engine):
    (shared,) = engine.generate([sampled("c", 4)])
    narrow = tiny_engine(llama_dir, llama_adapters, block_size=4, deterministic=True, max_num_seqs=2)
    (separate,) = narrow.generate([sampled("c", 4)])
    assert choices(separate) == choices(shared)


def test_preempted_samples_are_recomputed_to_the_same_tokens(llama_dir, llama_adapters, engine):
    reqs = [sampled("p0", 4, max_tokens=24), sampled("p1", 3, seed=9, adapter="mlp8", max_tokens=24)]
    roomy = {r.id: choices(r) for r in engine.generate(reqs)}
    tight = tiny_engine(llama_dir, llama_adapters, block_size=4, deterministic=True, num_kv_blocks=24)
    results = list(tight.generate(reqs))
    assert all(r.error is None for r in results)
    assert {r.id: choices(r) for r in results} == roomy
    assert tight.scheduler.preemptions > 0
    assert tight.blocks.num_free == 24 and tight.blocks.refs == {}


def test_openai_and_native_records_list_the_choices(engine, tmp_path):
    chat = {"model": "attn4", "messages": [{"role": "user", "content": "hi"}], "n": 3, "seed": 1, "temperature": 1}
    completion = {"model": "attn4", "prompt": PROMPT, "n": 2, "seed": 2, "temperature": 1}
    records = [
        {"custom_id": "chat", "url": "/v1/chat/completions", "body": chat},
        {"custom_id": "cmpl", "url": "/v1/completions", "body": completion},
        {"id": "native", "prompt": PROMPT, "n": 2, "seed": 3, "temperature": 1.0},
        {"id": "one", "prompt": PROMPT},
    ]
    out = tmp_path / "out.jsonl"
    run(engine, write_jsonl(tmp_path / "in.jsonl", records), out, max_tokens=5)
    lines = by_key(read_output(out))
    body = lines["chat"]["response"]["body"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["role"] == "assistant" and c["finish_reason"] == "length" for c in body["choices"])
    usage = body["usage"]
    assert usage["completion_tokens"] == 3 * 5 and usage["total_tokens"] == usage["prompt_tokens"] + 15
    cmpl = lines["cmpl"]["response"]["body"]
    assert [c["index"] for c in cmpl["choices"]] == [0, 1] and all("text" in c for c in cmpl["choices"])
    native = lines["native"]
    assert "text" not in native and [c["index"] for c in native["choices"]] == [0, 1]
    assert native["usage"]["completion_tokens"] == 10
    assert lines["one"]["text"] is not None and "choices" not in lines["one"]


def test_a_resumed_run_writes_each_n_request_once_with_all_its_samples(engine, tmp_path):
    records = [
        {"id": f"r{i}", "prompt": f"the quick brown fox {i}", "n": 1 + i % 3, "temperature": 1.0} for i in range(9)
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    full = tmp_path / "full.jsonl"
    run(engine, inp, full)
    expected = by_key(read_output(full))
    out = tmp_path / "out.jsonl"
    run(engine, inp, out)
    raw = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(raw[:4]) + raw[4][:20])  # killed mid-write of line 5
    summary = run(engine, inp, out)
    assert summary.resumed == 4 and summary.requests == 5
    assert by_key(read_output(out)) == expected
    for i in range(9):
        got = expected[f"r{i}"]
        assert len(got["choices"]) == 1 + i % 3 if i % 3 else got["text"] is not None


def test_one_failing_sample_fails_the_request_once_and_frees_the_others(llama_dir, llama_adapters, monkeypatch):
    eng = tiny_engine(llama_dir, llama_adapters, block_size=4, deterministic=True)
    real = eng.model_runner.run
    calls = []

    def nan_in_a_sample(seqs, is_prefill, decode=None):
        logits = real(seqs, is_prefill, decode).clone()
        rows = seqs + (decode or [])  # the logits' rows
        calls.append(len(rows))
        if len(calls) == 3:  # a decode step of the 4 samples (and the other request)
            logits[[i for i, s in enumerate(rows) if s.request_id == "bad"][1]] = float("nan")
        return logits

    monkeypatch.setattr(eng.model_runner, "run", nan_in_a_sample)
    free = eng.blocks.num_free
    results = list(eng.generate([sampled("bad", 4), sampled("good", 2, seed=8)]))
    assert [r.id for r in results].count("bad") == 1
    out = {r.id: r for r in results}
    assert out["bad"].error.kind == "engine_error" and out["good"].error is None and len(out["good"].choices) == 2
    assert eng.blocks.num_free == free and eng.blocks.refs == {} and not eng.has_work()


def test_resizing_the_cache_moves_a_shared_block_once():
    bm = BlockManager(8, 4)
    filler = Sequence(9, "f", None, list(range(16)), SamplingParams())
    bm.allocate(filler)  # blocks 0-3
    parent = Sequence(0, "a", None, list(range(10)), SamplingParams())
    child = Sequence(1, "a", None, list(range(10)), SamplingParams())
    bm.allocate(parent)
    assert parent.block_table == [4, 5, 6] and bm.fork(parent, child) == (6, 7)
    assert child.block_table == [4, 5, 7] and bm.refs == {0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 1, 7: 1}
    bm.free_seq(filler)
    moves = bm.resize(5, [parent, child])
    assert moves == {4: 4, 5: 0, 6: 1, 7: 2}
    assert parent.block_table == [4, 0, 1] and child.block_table == [4, 0, 2]
    assert bm.refs == {4: 2, 0: 2, 1: 1, 2: 1} and list(bm.free) == [3]
    bm.free_seq(parent)
    assert bm.refs == {4: 1, 0: 1, 2: 1} and sorted(bm.free) == [1, 3]
