"""The sampling set: top_k, min_p, the three penalties, logit_bias, min_tokens, stop_token_ids,
include_stop_str_in_output and max_completion_tokens; per request, in mixed batches.

Each processor is checked against a reference written here as plain Python loops on crafted
logits; the engine's greedy tokens with repetition_penalty, a logit bias and min_tokens equal
HF transformers + PEFT's with the same processors; a seeded request using them all gives the
same tokens alone and in a batch of other adapters and settings; bad values are refused in the
same words by the CLI defaults and by records; and a known OpenAI / vLLM field loracli does not
implement fails its record with one line naming it while the run goes on.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from runs import read_output, run, tiny_engine, write_jsonl
from test_engine_vs_peft import reference

from loracli.cli import main
from loracli.engine.sampler import add_logit_bias, apply_penalties, process, truncate
from loracli.engine.sequence import Sequence
from loracli.errors import ConfigError
from loracli.requests import RecordError, Request, parse_record
from loracli.sampling import SamplingParams

V = 12


def crafted(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, V, generator=g) * 3
    logits[0, 5] = 0.0  # a zero logit: neither divided nor multiplied away
    return logits


# --- references: plain loops over one row -----------------------------------------------------


def ref_penalties(row, prompt, output, rep, freq, pres):
    out = list(row)
    for t in range(len(out)):
        if t in prompt or t in output:
            out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
        count = output.count(t)
        out[t] -= freq * count
        if count:
            out[t] -= pres
    return out


def ref_softmax(row):
    top = max(x for x in row if x != -math.inf)
    exps = [math.exp(x - top) if x != -math.inf else 0.0 for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def ref_truncate(row, top_k, top_p, min_p):
    """The kept token ids of one row: min_p, then top_k, then top_p (renormalised after top_k)."""
    probs = ref_softmax(row)
    kept = [t for t in range(len(row)) if probs[t] >= min_p * max(probs)]
    kept.sort(key=lambda t: (-row[t], t))
    if top_k > 0:
        kept = kept[:top_k]
    renorm = ref_softmax([row[t] for t in kept])
    out, mass = [], 0.0
    for t, p in zip(kept, renorm, strict=True):
        if mass > top_p:
            break
        out.append(t)
        mass += p
    return sorted(out)


def seq_with(params: SamplingParams, prompt: list[int], output: list[int], seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, f"s{seq_id}", None, prompt + output, params, num_prompt=len(prompt))


# --- each processor against its reference ------------------------------------------------------


def test_penalties_match_the_reference_row_by_row():
    logits = crafted(3)
    prompts = [[1, 2, 5], [0], [7, 7, 3]]
    outputs = [[2, 2, 9, 4], [], [3, 11, 11, 11]]
    rep, freq, pres = [1.3, 2.0, 0.7], [0.5, -1.0, 1.5], [0.25, 2.0, -0.5]
    ours = apply_penalties(logits.clone(), prompts, outputs, rep, freq, pres)
    for i in range(3):
        expected = ref_penalties(logits[i].tolist(), prompts[i], outputs[i], rep[i], freq[i], pres[i])
        assert ours[i].tolist() == pytest.approx(expected, abs=1e-6), i
    assert not torch.equal(ours, logits)


def test_logit_bias_adds_per_row():
    logits = crafted(2, seed=1)
    ours = logits.clone()
    add_logit_bias(ours, [0, 1], [{3: 100.0, 4: -2.5}, {3: -100.0}])
    expected = logits.clone().tolist()
    expected[0][3] += 100.0
    expected[0][4] -= 2.5
    expected[1][3] -= 100.0
    assert torch.allclose(ours, torch.tensor(expected), atol=1e-5)


@pytest.mark.parametrize(
    "top_k, top_p, min_p",
    [(3, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.2), (5, 0.8, 0.05), (1, 1.0, 0.0), (0, 1e-9, 0.0), (20, 0.95, 0.5)],
)
def test_top_k_top_p_min_p_keep_what_the_reference_keeps(top_k, top_p, min_p):
    logits = crafted(4, seed=2) / 2
    ours = truncate(logits, [top_k] * 4, [top_p] * 4, [min_p] * 4)
    for i in range(4):
        kept = torch.isfinite(ours[i]).nonzero().flatten().tolist()
        assert kept == ref_truncate(logits[i].tolist(), top_k, top_p, min_p), i
        assert torch.equal(ours[i][kept], logits[i][kept])  # kept logits untouched


def test_rows_with_different_settings_in_one_call_are_each_their_own():
    logits = crafted(3, seed=3)
    settings = [(2, 1.0, 0.0), (0, 0.5, 0.0), (0, 1.0, 0.3)]
    ours = truncate(logits, *[list(s) for s in zip(*settings, strict=True)])
    for i, (k, p, m) in enumerate(settings):
        alone = truncate(logits[i : i + 1], [k], [p], [m])[0]
        assert torch.equal(ours[i], alone)


def test_process_applies_bias_then_min_tokens_then_penalties_only_where_asked():
    eos = {11}
    plain = SamplingParams(ignore_eos=True)
    early = SamplingParams(min_tokens=3, stop_token_ids=[4])
    early_ignoring_eos = SamplingParams(min_tokens=3, ignore_eos=True)
    biased_rep = SamplingParams(logit_bias={6: 2.0}, repetition_penalty=1.5)
    seqs = [
        seq_with(plain, [1, 2], [3], 0),
        seq_with(early, [1, 2], [3, 4], 1),  # 2 outputs < 3: EOS and 4 masked
        seq_with(early_ignoring_eos, [1], [], 2),  # EOS is not held back when ignored
        seq_with(early, [1, 2], [3, 4, 5], 3),  # 3 outputs: nothing masked any more
        seq_with(biased_rep, [6], [], 4),
    ]
    logits = crafted(5, seed=4)
    ours, changed = process(logits, seqs, eos)
    assert changed
    assert torch.equal(ours[0], logits[0]) and torch.equal(ours[3], logits[3])
    assert ours[1, 11] == -math.inf and ours[1, 4] == -math.inf
    assert torch.isfinite(ours[1, [0, 1, 2, 3, 5, 6, 7, 8, 9, 10]]).all()
    assert torch.equal(ours[2], logits[2])
    row = logits[4].tolist()
    row[6] += 2.0
    expected = ref_penalties(row, [6], [], 1.5, 0.0, 0.0)
    assert ours[4].tolist() == pytest.approx(expected)
    untouched, changed = process(logits, seqs[:1], eos)
    assert untouched is logits and not changed  # no row asks: no work, not even a copy


# --- the engine against HF transformers + PEFT ---------------------------------------------------


@pytest.fixture(scope="module")
def engine(llama_dir, llama_adapters, one_thread):
    return tiny_engine(llama_dir, llama_adapters, max_loras=4, max_num_seqs=16, deterministic=True)


def test_greedy_with_repetition_penalty_bias_and_min_tokens_matches_peft(engine, llama_dir, llama_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompt = "numbers one two three four five"
    eos = engine.tokenizer.eos_token_id
    req = Request(
        id="p",
        adapter="mlp8",
        prompt=prompt,
        params={"max_tokens": 10, "repetition_penalty": 1.8, "logit_bias": {eos: 100.0}, "min_tokens": 4},
    )
    (res,) = engine.generate([req])
    ids = engine.tokenize(req)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32), str(llama_adapters / "mlp8")
    ).eval()
    prompt_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=10,
            do_sample=False,
            repetition_penalty=1.8,
            sequence_bias={(eos,): 100.0},
            min_new_tokens=4,
            eos_token_id=eos,
            pad_token_id=0,
        )
    expected = out[0, len(ids) :].tolist()
    assert res.token_ids == expected and len(expected) == 5 and expected[-1] == eos  # EOS held back 4 tokens
    assert res.finish_reason == "stop" and res.completion_tokens == 5
    plain_tokens, _ = reference(llama_dir, llama_adapters, "mlp8", ids, 10)
    assert res.token_ids[:4] != plain_tokens[:4]  # the penalty changed the answer


def test_stop_token_ids_and_include_stop_str_in_output(engine):
    free = Request(id="f", adapter=None, prompt="hello world", params={"max_tokens": 6, "ignore_eos": True})
    (base,) = engine.generate([free])
    stop_tok = base.token_ids[2]
    first = base.token_ids.index(stop_tok)
    cut = {"max_tokens": 6, "ignore_eos": True, "stop_token_ids": [stop_tok]}
    kept = {**cut, "include_stop_str_in_output": True}
    reqs = [Request(id=k, adapter=None, prompt="hello world", params=p) for k, p in (("cut", cut), ("kept", kept))]
    out = {r.id: r for r in engine.generate(reqs)}
    decode = engine.tokenizer.decode
    for r in out.values():
        assert r.finish_reason == "stop" and r.token_ids == base.token_ids[: first + 1]
    assert out["cut"].text == decode(base.token_ids[:first])
    assert out["kept"].text == decode(base.token_ids[: first + 1])
    stop = base.text[3:6]
    with_str = Request(
        id="s",
        adapter=None,
        prompt="hello world",
        params={"max_tokens": 6, "ignore_eos": True, "stop": stop, "include_stop_str_in_output": True},
    )
    (r,) = engine.generate([with_str])
    assert r.text == base.text[: base.text.find(stop) + len(stop)] and r.finish_reason == "stop"


def test_min_tokens_holds_stop_strings_back(engine):
    free = Request(id="f", adapter="attn4", prompt="the sea", params={"max_tokens": 8, "ignore_eos": True})
    (base,) = engine.generate([free])
    stop = engine.tokenizer.decode(base.token_ids[:1])
    assert stop and base.text.startswith(stop)
    params = {"max_tokens": 8, "ignore_eos": True, "stop": [stop]}
    (at_once,) = engine.generate([Request(id="s", adapter="attn4", prompt="the sea", params=params)])
    assert at_once.text == "" and at_once.completion_tokens == 1 and at_once.finish_reason == "stop"
    (held,) = engine.generate([Request(id="m", adapter="attn4", prompt="the sea", params={**params, "min_tokens": 3})])
    assert held.completion_tokens >= 3
    boundary = len(engine.tokenizer.decode(base.token_ids[:2]))  # a match must end in token 3 or later
    cut = base.text.find(stop, boundary - len(stop) + 1)
    if cut >= 0:
        assert (held.text, held.finish_reason) == (base.text[:cut], "stop")
    else:
        assert (held.text, held.finish_reason) == (base.text, "length")


SEEDED = {
    "max_tokens": 10,
    "temperature": 0.9,
    "seed": 42,
    "ignore_eos": True,
    "top_k": 20,
    "top_p": 0.9,
    "min_p": 0.02,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.3,
    "repetition_penalty": 1.2,
    "logit_bias": {7: 3.0},
    "min_tokens": 2,
}


def test_same_seed_same_output_whatever_the_batch(engine):
    target = Request(id="t", adapter="mlp8", prompt="write a poem about the sea", params=SEEDED)
    (alone,) = engine.generate([target])
    crowd = [
        Request(id=f"c{i}", adapter=a, prompt=p, params={"max_tokens": 10, "temperature": 1.0, "seed": i, **extra})
        for i, (a, p, extra) in enumerate(
            [
                ("attn4", "hello world", {"top_k": 3}),
                (None, "the quick brown fox", {"presence_penalty": 2.0}),
                ("all16rs", "numbers one two", {"min_p": 0.3, "repetition_penalty": 0.5}),
                ("mlp8", "tell me a story", {}),
                ("pattern", "what is the capital", {"logit_bias": {3: -100}, "top_p": 0.5}),
            ]
        )
    ]
    together = {r.id: r for r in engine.generate(crowd[:2] + [target] + crowd[2:])}
    assert together["t"].token_ids == alone.token_ids
    bare = {k: SEEDED[k] for k in ("max_tokens", "temperature", "seed", "ignore_eos")}
    (plain,) = engine.generate([Request(id="p", adapter="mlp8", prompt="write a poem about the sea", params=bare)])
    assert plain.token_ids != alone.token_ids  # the settings are not ignored


# --- validation: CLI defaults and records refuse the same values in the same words -------------

BAD = [
    ("n", 0, "must be positive, got 0"),
    ("n", 129, "must be at most 128, got 129"),
    ("top_k", -2, "must be >= 0 (0 or -1: no limit), got -2"),
    ("top_k", 1.5, "must be an integer, got 1.5"),
    ("min_p", 1.5, "must be in [0, 1], got 1.5"),
    ("presence_penalty", 2.5, "must be in [-2, 2], got 2.5"),
    ("frequency_penalty", -3, "must be in [-2, 2], got -3"),
    ("repetition_penalty", 0.0, "must be > 0, got 0.0"),
    ("min_tokens", -1, "must be >= 0, got -1"),
    ("logit_bias", {"x": 1}, 'keys must be token ids (non-negative integers), got "x"'),
    ("logit_bias", {"5": 101}, "biases must be numbers in [-100, 100], got 101 for token 5"),
    ("logit_bias", [1], "must be an object of token ids and biases, got [1]"),
    ("stop_token_ids", [1, -1], "must be a list of token ids (non-negative integers), got [1, -1]"),
    ("include_stop_str_in_output", "yes", 'must be true or false, got "yes"'),
]


@pytest.mark.parametrize("name, value, problem", BAD)
def test_defaults_and_records_refuse_the_same_values(name, value, problem):
    with pytest.raises(ConfigError) as info:
        SamplingParams(**{name: value})
    assert str(info.value) == f"{name} {problem}" and info.value.fields == (name,)
    with pytest.raises(RecordError) as native:
        parse_record(json.dumps({"id": "a", "prompt": "x", name: value}), 3, "in.jsonl")
    assert str(native.value) == f"in.jsonl:3: field '{name}': {problem}"
    body = {"model": "m", "prompt": "x", name: value}
    with pytest.raises(RecordError) as openai:
        parse_record(json.dumps({"custom_id": "c", "url": "/v1/completions", "body": body}), 4, "in.jsonl")
    assert str(openai.value) == f"in.jsonl:4: field 'body.{name}': {problem}"


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--top-k", "-2", "--top-k must be >= 0 (0 or -1: no limit), got -2"),
        ("--min-p", "1.5", "--min-p must be in [0, 1], got 1.5"),
        ("--presence-penalty", "3", "--presence-penalty must be in [-2, 2], got 3.0"),
        ("--frequency-penalty", "-2.5", "--frequency-penalty must be in [-2, 2], got -2.5"),
        ("--repetition-penalty", "0", "--repetition-penalty must be > 0, got 0.0"),
        ("--min-tokens", "-1", "--min-tokens must be >= 0, got -1"),
        ("--n", "0", "--n must be positive, got 0"),
    ],
)
def test_the_cli_refuses_the_same_defaults(monkeypatch, capsys, tmp_path, flag, value, message):
    monkeypatch.setattr(sys, "argv", ["loracli", "run", str(tmp_path / "never-read.jsonl"), flag, value])
    with pytest.raises(SystemExit) as info:
        main()
    err = " ".join(capsys.readouterr().err.split())
    assert info.value.code == 2 and err == f"error: {message}"


def test_min_tokens_above_max_tokens_is_refused_by_defaults_records_and_the_cli(engine, monkeypatch, capsys, tmp_path):
    with pytest.raises(ConfigError, match="min_tokens 9 is above max_tokens 4"):
        SamplingParams(min_tokens=9, max_tokens=4)
    (r,) = engine.generate([Request(id="a", adapter=None, prompt="x", params={"min_tokens": 9, "max_tokens": 4})])
    assert r.error.kind == "invalid_request" and r.error.message == "min_tokens 9 is above max_tokens 4"
    argv = ["loracli", "run", str(tmp_path / "never.jsonl"), "--min-tokens", "9", "--max-tokens", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        main()
    assert " ".join(capsys.readouterr().err.split()) == "error: --min-tokens 9 is above --max-tokens 4"


def test_token_ids_outside_the_vocabulary_fail_the_request(engine):
    vocab = engine.spec.vocab_size
    reqs = [
        Request(id="b", adapter=None, prompt="x", params={"logit_bias": {vocab: 1.0}}),
        Request(id="s", adapter=None, prompt="x", params={"stop_token_ids": [0, vocab + 3]}),
    ]
    out = {r.id: r.error for r in engine.generate(reqs)}
    assert (
        out["b"].field == "logit_bias"
        and out["b"].message == f"token id {vocab} is not in the vocabulary (0..{vocab - 1})"
    )
    assert out["s"].field == "stop_token_ids" and f"token id {vocab + 3} " in out["s"].message


def test_max_completion_tokens_is_max_tokens_and_both_must_agree():
    def body(**fields):
        record = {"custom_id": "c", "url": "/v1/completions", "body": {"model": "m", "prompt": "x", **fields}}
        return parse_record(json.dumps(record), 2, "in.jsonl")

    assert body(max_completion_tokens=7).params == {"max_tokens": 7}
    assert body(max_completion_tokens=7, max_tokens=7).params == {"max_tokens": 7}
    with pytest.raises(RecordError) as info:
        body(max_completion_tokens=7, max_tokens=8)
    message = "in.jsonl:2: field 'body.max_completion_tokens': is 7 but max_tokens is 8: give one, or the same value"
    assert str(info.value) == message
    native = parse_record(b'{"prompt": "x", "max_completion_tokens": 3}', 1, "f")
    assert native.params == {"max_tokens": 3} and native.unknown_fields == []
    with pytest.raises(RecordError, match="field 'max_completion_tokens': must be positive, got 0"):
        parse_record(b'{"prompt": "x", "max_completion_tokens": 0}', 1, "f")


# --- a known field loracli does not implement fails its record, naming it -----------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("functions", [{"name": "f"}]),
        ("audio", {"voice": "alloy"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("best_of", 3),
        ("use_beam_search", True),
        ("stream", True),
        ("stream_options", {"include_usage": True}),
        ("parallel_tool_calls", False),
        ("echo", True),
    ],
)
def test_unimplemented_known_fields_are_refused_naming_them(field, value):
    record = {"custom_id": "c", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [], field: value}}
    record["body"]["messages"] = [{"role": "user", "content": "hi"}]
    with pytest.raises(RecordError) as info:
        parse_record(json.dumps(record), 5, "in.jsonl")
    text = str(info.value)
    assert text.startswith(f"in.jsonl:5: field 'body.{field}': is not supported: loracli does not implement ")
    assert "\n" not in text and text.endswith("; remove the field")
    with pytest.raises(RecordError, match=f"field '{field}': is not supported"):
        parse_record(json.dumps({"prompt": "x", field: value}), 1, "in.jsonl")


def test_values_meaning_what_loracli_does_are_accepted():
    body = {"model": "m", "prompt": "x", "stream": False, "echo": False, "n": 2, "best_of": 2, "tools": None}
    r = parse_record(json.dumps({"custom_id": "c", "url": "/v1/completions", "body": body}), 1, "f")
    assert r.params == {"n": 2} and r.unknown_fields == []
    labels = parse_record(b'{"prompt": "x", "user": "u"}', 1, "f")
    assert labels.unknown_fields == ["user"]  # changes no answer: warned about, as any unknown field


TOOLS_REFUSED = "is not supported: loracli does not implement tool calling; remove the field"


def test_a_run_answers_the_others_and_fails_the_record_with_a_tool(engine, tmp_path):
    tool = {"type": "function", "function": {"name": "f"}}
    records = [
        {
            "custom_id": "ok",
            "url": "/v1/chat/completions",
            "body": {"model": "attn4", "messages": [{"role": "user", "content": "hi"}]},
        },
        {
            "custom_id": "tools",
            "url": "/v1/chat/completions",
            "body": {"model": "attn4", "messages": [{"role": "user", "content": "hi"}], "tools": [tool]},
        },
        {"id": "native", "prompt": "hello"},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    summary = run(engine, inp, out)
    lines = {r.get("custom_id", r.get("id")): r for r in read_output(out)}
    assert lines["ok"]["error"] is None and lines["native"]["text"]
    err = lines["tools"]["error"]
    assert err["code"] == "invalid_request" and "\n" not in err["message"]
    assert err["message"].endswith("in.jsonl:2: field 'body.tools': " + TOOLS_REFUSED)
    assert summary.requests == 3 and summary.any_failed
