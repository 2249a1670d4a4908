"""Sampling: seeds reproducible whatever the batch, top-p, stop strings, EOS and max_tokens."""

from __future__ import annotations

import torch
from test_engine_vs_peft import make_engine

from loracli.engine.sampler import truncate
from loracli.requests import Request

PROMPTS = ["the quick brown fox", "hello world", "write a poem about the sea", "numbers one two"]


def run(engine, reqs):
    return {r.id: r for r in engine.generate(reqs)}


def sampled(prompt, rid, seed, adapter=None, **extra):
    return Request(
        id=rid,
        adapter=adapter,
        prompt=prompt,
        params={"max_tokens": 10, "temperature": 1.0, "seed": seed, "ignore_eos": True, **extra},
    )


def test_same_seed_same_output_whatever_the_batch(llama_dir, llama_adapters):
    engine = make_engine(llama_dir, llama_adapters)
    target = sampled(PROMPTS[0], "t", 123, "mlp8")
    alone = run(engine, [target])["t"].token_ids
    mix = zip(PROMPTS * 2, ["attn4", None, "mlp8", "all16rs"] * 2, strict=True)
    crowd = [sampled(p, f"c{i}", i, a) for i, (p, a) in enumerate(mix)]
    together = run(engine, crowd[:3] + [target] + crowd[3:])["t"].token_ids
    assert alone == together


def test_different_seeds_differ(llama_dir, llama_adapters):
    engine = make_engine(llama_dir, llama_adapters)
    outs = run(engine, [sampled(PROMPTS[2], f"s{s}", s) for s in range(4)])
    assert len({tuple(r.token_ids) for r in outs.values()}) > 1


def test_tiny_top_p_is_greedy(llama_dir, llama_adapters):
    engine = make_engine(llama_dir, llama_adapters)
    greedy = Request(id="g", adapter="attn4", prompt=PROMPTS[1], params={"max_tokens": 10, "ignore_eos": True})
    nucleus = sampled(PROMPTS[1], "n", 5, "attn4", top_p=1e-6)
    outs = run(engine, [greedy, nucleus])
    assert outs["g"].token_ids == outs["n"].token_ids


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(truncate(logits.clone(), [0], [0.7], [0.0])[0])
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(truncate(logits.clone(), [0], [1.0], [0.0])).all()


def test_stop_string_truncates(llama_dir, llama_adapters):
    engine = make_engine(llama_dir, llama_adapters)
    base = run(
        engine, [Request(id="a", adapter=None, prompt=PROMPTS[3], params={"max_tokens": 12, "ignore_eos": True})]
    )["a"]
    assert len(base.text) > 4
    stop = base.text[2:5]
    cut = run(
        engine,
        [
            Request(
                id="b", adapter=None, prompt=PROMPTS[3], params={"max_tokens": 12, "ignore_eos": True, "stop": [stop]}
            )
        ],
    )["b"]
    assert cut.finish_reason == "stop"
    assert cut.text == base.text[: base.text.find(stop)]


def test_eos_stops_and_max_tokens_lengths(llama_dir, llama_adapters):
    engine = make_engine(llama_dir, llama_adapters)
    free = run(
        engine,
        [
            Request(id=f"e{i}", adapter=a, prompt=p, params={"max_tokens": 40})
            for i, (p, a) in enumerate(zip(PROMPTS, ["attn4", None, "mlp8", "all16rs"], strict=True))
        ],
    )
    eos = engine.eos_ids
    for r in free.values():
        if r.finish_reason == "stop":
            assert r.token_ids[-1] in eos and not any(t in eos for t in r.token_ids[:-1])
        else:
            assert r.finish_reason == "length" and len(r.token_ids) == 40
