"""Logprobs against the reference: HF transformers (+ PEFT for an adapter), float32, on the tokens the
engine produced.

Checked: each generated token's logprob, rank and top N (sorted, length N) equal log_softmax of the
reference forward at that position, greedy and sampled (raw: before temperature); prompt_logprobs
equal the reference at every prompt position; the OpenAI chat and completions shapes and the
native shape; a grammar's forbidden tokens come out as -9999.0, never as a non-JSON infinity; the
same values whatever else is in the batch (deterministic mode); N above 20 and misplaced fields are
refused naming the field.
"""

from __future__ import annotations

import json

import pytest
import torch
from runs import by_key, read_output, run, tiny_engine, write_jsonl

from loracli.errors import InputError
from loracli.requests import parse_object

TOP = 5
PROMPT = "what is the capital of france? paris"
ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(llama_dir, llama_adapters, one_thread):
    return tiny_engine(llama_dir, llama_adapters, max_num_seqs=8)


def reference_logprobs(model_dir, adapters_dir, adapter, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers (+ PEFT) logits at every position of `token_ids`: [T, V] float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapters_dir / adapter))
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _generate(engine, records: list[dict]) -> dict:
    return {r.id: r for r in engine.generate([parse_object(r, i + 1, "in.jsonl") for i, r in enumerate(records)])}


def _check_entry(entry, token: int, ref_row: torch.Tensor, n: int) -> None:
    assert entry.id == token
    assert abs(entry.logprob - float(ref_row[token])) < ATOL
    assert entry.rank == int((ref_row > ref_row[token]).sum()) + 1
    values = [t.logprob for t in entry.top]
    assert len(entry.top) == n and values == sorted(values, reverse=True)
    ref_values, ref_ids = ref_row.topk(n)
    assert torch.allclose(torch.tensor(values), ref_values, atol=ATOL)
    assert [t.id for t in entry.top] == ref_ids.tolist()


@pytest.mark.parametrize("adapter", [None, "attn4", "mlp8"])
def test_logprobs_and_prompt_logprobs_equal_the_reference(engine, llama_dir, llama_adapters, adapter):
    records = [
        {"id": "greedy", "prompt": PROMPT, "adapter": adapter, "logprobs": TOP, "prompt_logprobs": 3},
        {"id": "hot", "prompt": PROMPT, "adapter": adapter, "logprobs": TOP, "temperature": 1.7, "seed": 5},
        {"id": "other", "prompt": "hello world", "adapter": "mlp8" if adapter != "mlp8" else None},
    ]
    records = [{**r, "max_tokens": 6, "ignore_eos": True} for r in records]
    out = _generate(engine, records)
    prompt_ids = engine.tokenize(parse_object(records[0], 1, "f"))
    p = len(prompt_ids)
    for rid in ("greedy", "hot"):
        res = out[rid]
        ref = reference_logprobs(llama_dir, llama_adapters, adapter, prompt_ids + res.token_ids)
        assert len(res.logprobs) == len(res.token_ids) == 6
        for k, (entry, token) in enumerate(zip(res.logprobs, res.token_ids, strict=True)):
            _check_entry(entry, token, ref[p - 1 + k], TOP)
            if rid == "greedy":
                assert entry.rank == 1
    prompt = out["greedy"].prompt_logprobs
    assert len(prompt) == p and prompt[0] is None
    ref = reference_logprobs(llama_dir, llama_adapters, adapter, prompt_ids)
    for j in range(1, p):
        _check_entry(prompt[j], prompt_ids[j], ref[j - 1], 3)
    assert out["hot"].prompt_logprobs is None and out["other"].logprobs is None


def test_openai_and_native_shapes(engine, tmp_path):
    chat = {"model": "attn4", "messages": [{"role": "user", "content": "hello"}], "logprobs": True}
    records = [
        {"custom_id": "chat", "url": "/v1/chat/completions", "body": {**chat, "top_logprobs": 3, "prompt_logprobs": 2}},
        {"custom_id": "comp", "url": "/v1/completions", "body": {"model": "base", "prompt": PROMPT, "logprobs": 2}},
        {"custom_id": "none", "url": "/v1/completions", "body": {"model": "base", "prompt": PROMPT}},
        {"id": "native", "prompt": PROMPT, "logprobs": 1, "prompt_logprobs": 0},
    ]
    out_path = tmp_path / "out.jsonl"
    run(engine, write_jsonl(tmp_path / "in.jsonl", records), out_path, max_tokens=5)
    out = by_key(read_output(out_path))
    body = out["chat"]["response"]["body"]
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 5
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"} and len(item["top_logprobs"]) == 3
        assert bytes(item["bytes"]).decode("utf-8", errors="replace") == item["token"]
        assert all(set(t) == {"token", "logprob", "bytes"} for t in item["top_logprobs"])
    prompt = body["prompt_logprobs"]
    assert prompt[0] is None and len(prompt) == body["usage"]["prompt_tokens"]
    assert all(
        1 <= len(entry) <= 3 and all(set(v) == {"logprob", "rank", "decoded_token"} for v in entry.values())
        for entry in prompt[1:]
    )
    comp = out["comp"]["response"]["body"]["choices"][0]["logprobs"]
    assert len(comp["tokens"]) == len(comp["token_logprobs"]) == len(comp["top_logprobs"]) == 5
    assert all(len(top) <= 2 for top in comp["top_logprobs"])
    assert comp["text_offset"][0] == 0
    offsets = comp["text_offset"]
    assert all(offsets[i + 1] - offsets[i] == len(comp["tokens"][i]) for i in range(len(offsets) - 1))
    assert out["none"]["response"]["body"]["choices"][0]["logprobs"] is None
    native = out["native"]
    assert len(native["logprobs"]) == 5 and native["prompt_logprobs"][0] is None
    assert set(native["logprobs"][0]) == {"token", "id", "logprob", "rank", "bytes", "top"}
    assert len(native["logprobs"][0]["top"]) == 1 and native["prompt_logprobs"][1]["top"] == []


def test_logprobs_follow_the_grammar_mask_and_stay_json(engine, tmp_path):
    records = [{"id": "c", "prompt": PROMPT, "choice": ["yes", "no"], "logprobs": 20, "max_tokens": 8}]
    out_path = tmp_path / "out.jsonl"
    run(engine, write_jsonl(tmp_path / "in.jsonl", records), out_path, max_tokens=8)
    text = out_path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    record = json.loads(text)
    first = record["logprobs"][0]
    assert record["text"] in ("yes", "no") and first["logprob"] > -9999.0
    assert len(first["top"]) == 20 and first["top"][-1]["logprob"] == -9999.0  # forbidden by the grammar


def test_logprobs_do_not_depend_on_the_batch(llama_dir, llama_adapters):
    engine = tiny_engine(llama_dir, llama_adapters, max_num_seqs=8, deterministic=True)
    ask = {"id": "a", "prompt": PROMPT, "adapter": "attn4", "logprobs": 4, "prompt_logprobs": 2, "max_tokens": 5}
    others = [
        {"id": f"o{i}", "prompt": f"hello {i}", "adapter": ["mlp8", None][i % 2], "max_tokens": 5} for i in range(5)
    ]
    alone = _generate(engine, [ask])["a"]
    together = _generate(engine, [*others, ask])["a"]
    assert alone.logprobs == together.logprobs and alone.prompt_logprobs == together.prompt_logprobs


@pytest.mark.parametrize(
    ("record", "field", "says"),
    [
        ({"prompt": "x", "logprobs": 21}, "logprobs", "[0, 20]"),
        ({"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs", "[0, 20]"),
        ({"prompt": "x", "logprobs": True}, "logprobs", "integer"),
    ],
)
def test_bad_logprob_values_are_refused(record, field, says):
    with pytest.raises(InputError) as caught:
        parse_object(record, 1, "in.jsonl")
    assert caught.value.field == field and says in str(caught.value)


@pytest.mark.parametrize(
    ("url", "body", "field", "says"),
    [
        ("/v1/chat/completions", {"top_logprobs": 2}, "body.top_logprobs", "needs 'logprobs': true"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "body.top_logprobs", "[0, 20]"),
        ("/v1/chat/completions", {"logprobs": 3}, "body.logprobs", "true or false"),
        ("/v1/completions", {"top_logprobs": 2}, "body.top_logprobs", "chat completions field"),
        ("/v1/completions", {"logprobs": 25}, "body.logprobs", "[0, 20]"),
    ],
)
def test_openai_logprob_fields_are_checked_per_endpoint(url, body, field, says):
    key, value = ("messages", [{"role": "user", "content": "x"}]) if "chat" in url else ("prompt", "x")
    record = {"custom_id": "a", "url": url, "body": {"model": "m", key: value, **body}}
    with pytest.raises(InputError) as caught:
        parse_object(record, 1, "in.jsonl")
    assert caught.value.field == field and says in str(caught.value)


def test_openai_logprob_fields_become_one_setting():
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 4}
    assert parse_object({"custom_id": "a", "url": "/v1/chat/completions", "body": chat}, 1, "f").params["logprobs"] == 4
    off = {**chat, "logprobs": False, "top_logprobs": None}
    assert "logprobs" not in parse_object({"custom_id": "a", "url": "/v1/chat/completions", "body": off}, 1, "f").params
    comp = {"model": "m", "prompt": "x", "logprobs": 0, "prompt_logprobs": 1}
    params = parse_object({"custom_id": "a", "url": "/v1/completions", "body": comp}, 1, "f").params
    assert params["logprobs"] == 0 and params["prompt_logprobs"] == 1
