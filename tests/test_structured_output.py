"""Structured output: the grammar forces the output, per request, in batches mixed with free-text
requests and different adapters, greedy and sampled (tiny random model: without the mask it
would never write JSON).

Checked: a JSON schema (an integer, a bounded string, a string whose values hold quotes and a
backslash) validates 100% of the time; regex, choice and json_object likewise; unconstrained
requests in the same batch get the tokens they get alone; every record form (native fields,
OpenAI `response_format`, vLLM `structured_outputs` and `guided_*`) reaches the engine; a schema
that does not compile, and a missing grammar engine, fail only that request with one line; the
record parser refuses bad structure fields naming them. The demo `json` adapter on the default
model: 100% valid JSON with a schema (marked `model`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from runs import by_key, read_output, run, tiny_engine, write_jsonl

from loracli.errors import InputError
from loracli.requests import parse_object

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "name": {"type": "string", "pattern": "^[a-z ]{1,8}$"},
        "quote": {"enum": ['she said "hi"', "a \\ b", 'x"y']},
    },
    "required": ["n", "name", "quote"],
    "additionalProperties": False,
}
REGEX = "(ab|cd)-[0-9]{2,3}"
CHOICES = ["yes", "no", 'maybe "so"']
ADAPTERS = (None, "attn4", "mlp8")


@pytest.fixture(scope="module")
def engine(llama_dir, llama_adapters, one_thread):
    return tiny_engine(llama_dir, llama_adapters, max_num_seqs=16)


def _native(i: int, **fields) -> dict:
    sampled = {"temperature": 1.0, "seed": 100 + i} if i % 2 else {}
    prompt = f"tell me a story about a robot {i}"
    return {"id": f"r{i}", "prompt": prompt, "adapter": ADAPTERS[i % 3], "max_tokens": 48, **sampled, **fields}


def _generate(engine, records: list[dict]) -> dict:
    results = engine.generate([parse_object(r, i + 1, "in.jsonl") for i, r in enumerate(records)])
    return {r.id: r for r in results}


def _run(engine, records: list[dict], tmp_path: Path, max_tokens: int = 4) -> dict:
    """Records through `run_job` (as `loracli run` runs them) -> output records by id."""
    out = tmp_path / "out.jsonl"
    run(engine, write_jsonl(tmp_path / "in.jsonl", records), out, max_tokens)
    return by_key(read_output(out))


def test_json_schema_is_always_valid_in_a_mixed_batch(engine):
    constrained = [_native(i, json_schema=SCHEMA) for i in range(12)]
    free = [{**_native(i), "id": f"free{i}", "max_tokens": 8, "ignore_eos": True} for i in range(4)]
    out = _generate(engine, constrained + free)
    for rec in constrained:
        res = out[rec["id"]]
        assert res.error is None and res.finish_reason == "stop", (rec["id"], res)
        jsonschema.validate(json.loads(res.text), SCHEMA)
        assert res.text.startswith('{"n": ')  # compact, in the schema's property order
    quotes = {json.loads(out[r["id"]].text)["quote"] for r in constrained}
    assert quotes & {'she said "hi"', 'x"y', "a \\ b"}
    alone = _generate(tiny_engine(engine.config.model, engine.config.adapters_dir, max_num_seqs=1), free)
    assert {k: alone[k].token_ids for k in alone} == {r["id"]: out[r["id"]].token_ids for r in free}


def test_regex_choice_and_json_object(engine):
    records = [_native(i, regex=REGEX) for i in range(6)]
    records += [{**_native(i, choice=CHOICES), "id": f"c{i}"} for i in range(6)]
    records += [{**_native(i, response_format={"type": "json_object"}), "id": f"o{i}"} for i in range(4)]
    out = _generate(engine, records)
    assert all(r.error is None for r in out.values()), out
    for i in range(6):
        assert out[f"r{i}"].finish_reason == "stop" and re.fullmatch(REGEX, out[f"r{i}"].text), out[f"r{i}"]
        assert out[f"c{i}"].finish_reason == "stop" and out[f"c{i}"].text in CHOICES, out[f"c{i}"]
    # json_object leaves keys and values free: a random model may write one string until max_tokens
    objects = [out[f"o{i}"] for i in range(4)]
    assert any(r.finish_reason == "stop" for r in objects)
    for r in objects:
        assert isinstance(json.loads(r.text), dict) if r.finish_reason == "stop" else r.text.startswith("{")


def test_every_record_form_reaches_the_grammar(engine, tmp_path):
    def openai(cid: str, url: str, **body) -> dict:
        key = "messages" if url.endswith("chat/completions") else "prompt"
        value = [{"role": "user", "content": "hello"}] if key == "messages" else "hello"
        return {"custom_id": cid, "url": url, "body": {"model": "attn4", key: value, "max_tokens": 48, **body}}

    chat, comp = "/v1/chat/completions", "/v1/completions"
    schema_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}
    records = [
        openai("rf", chat, response_format=schema_format),
        openai("so-json", comp, structured_outputs={"json": SCHEMA}),
        openai("so-regex", chat, structured_outputs={"regex": REGEX}),
        openai("g-choice", comp, guided_choice=CHOICES, temperature=1.0, seed=3),
        openai("g-json", chat, guided_json=json.dumps(SCHEMA)),
        openai("g-regex", comp, guided_regex=REGEX),
        openai("g-grammar", chat, guided_grammar='root ::= "x" [0-9] [0-9]'),
        {"id": "native-grammar", "prompt": "hi", "grammar": 'root ::= "x" [0-9]', "max_tokens": 8},
    ]
    out = _run(engine, records, tmp_path, max_tokens=48)

    def text(cid: str) -> str:
        choice = out[cid]["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "stop", out[cid]
        return choice["message"]["content"] if "message" in choice else choice["text"]

    for cid in ("rf", "so-json", "g-json"):
        jsonschema.validate(json.loads(text(cid)), SCHEMA)
    assert re.fullmatch(REGEX, text("so-regex")) and re.fullmatch(REGEX, text("g-regex"))
    assert text("g-choice") in CHOICES
    assert re.fullmatch("x[0-9]{2}", text("g-grammar"))
    assert re.fullmatch("x[0-9]", out["native-grammar"]["text"])


def test_a_schema_that_does_not_compile_fails_only_its_request(engine, tmp_path):
    records = [
        _native(0, json_schema=SCHEMA),
        {**_native(1, json_schema={"type": "nope"}), "id": "bad"},
        {**_native(2, regex="(ab"), "id": "bad-regex"},
        {**_native(3), "max_tokens": 4},
        {**_native(4, regex=REGEX), "id": "early", "min_tokens": 2},
    ]
    out = _run(engine, records, tmp_path)
    assert (
        "field 'min_tokens': min_tokens cannot be combined with structured output" in out["early"]["error"]["message"]
    )
    bad = out["bad"]["error"]
    assert bad["type"] == "invalid_structure" and "\n" not in bad["message"]
    assert bad["message"].startswith(f"{tmp_path / 'in.jsonl'}:2: field 'json_schema': cannot compile the json schema")
    assert "nope" in bad["message"]
    assert out["bad-regex"]["error"]["type"] == "invalid_structure"
    assert "field 'regex'" in out["bad-regex"]["error"]["message"]
    jsonschema.validate(json.loads(out["r0"]["text"]), SCHEMA)
    assert "error" not in out["r3"]


def test_without_the_grammar_engine_a_structured_request_fails_with_one_line(engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar now raises ImportError
    out = _generate(engine, [_native(0, regex=REGEX), {**_native(1), "max_tokens": 3}])
    error = out["r0"].error
    assert error.kind == "missing_extra" and error.field == "regex"
    assert "pip install 'loracli[structured]'" in error.message and "\n" not in error.message
    assert out["r1"].error is None


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"regex": "a", "choice": ["a"]}, "choice", "give one structure"),
        ({"json_schema": 3}, "json_schema", "must be a JSON schema object"),
        ({"json_schema": "{not json"}, "json_schema", "not JSON"),
        ({"choice": []}, "choice", "non-empty list"),
        ({"regex": ""}, "regex", "non-empty string"),
        ({"response_format": {"type": "xml"}}, "response_format", "type must be"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs 'json_schema'"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format", "name"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}}},
            "response_format",
            "strict must be true or false",
        ),
    ],
)
def test_bad_structure_fields_are_refused_naming_the_field(fields, field, says):
    with pytest.raises(InputError) as caught:
        parse_object({"prompt": "x", **fields}, 7, "in.jsonl")
    assert caught.value.field == field and says in str(caught.value)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"structured_outputs": {"json": {}, "regex": "a"}}, "exactly one of"),
        ({"structured_outputs": {"structural_tag": "x"}}, "not supported"),
        ({"structured_outputs": {"jsn": {}}}, "unknown keys: jsn"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "give one structure"),
    ],
)
def test_bad_openai_structure_fields_are_refused(body, says):
    record = {"custom_id": "a", "url": "/v1/completions", "body": {"model": "m", "prompt": "x", **body}}
    with pytest.raises(InputError) as caught:
        parse_object(record, 3, "in.jsonl")
    assert caught.value.field.startswith("body.") and says in str(caught.value)


def test_a_text_response_format_sets_no_structure_and_strict_false_still_enforces():
    plain = parse_object({"prompt": "x", "response_format": {"type": "text"}}, 1, "f")
    assert "structure" not in plain.params and not plain.unknown_fields
    loose = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": False}}
    assert parse_object({"prompt": "x", "response_format": loose}, 1, "f").params["structure"].kind == "json"


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.model
def test_demo_json_adapter_always_gives_valid_json_with_a_schema(tmp_path):
    """The shipped `json` adapter on examples/heldout.jsonl's questions, with a schema: every answer is
    valid (without one, README's figure: 19 of 20 on this machine)."""
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    rows = [json.loads(line) for line in (ROOT / "examples" / "heldout.jsonl").read_text().splitlines()]
    asks = [{**r, "json_schema": schema} for r in rows if r["adapter"] == "json"]
    inp, out = write_jsonl(tmp_path / "in.jsonl", asks), tmp_path / "out.jsonl"
    loracli = Path(sys.executable).with_name("loracli")
    command = [str(loracli), "run", str(inp), "--adapters", str(ROOT / "examples" / "adapters"), "-o", str(out)]
    proc = subprocess.run([*command, "--max-tokens", "96"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    texts = {r["id"]: r["text"] for r in read_output(out)}
    assert len(texts) == len(asks) >= 10
    for text in texts.values():
        jsonschema.validate(json.loads(text), schema)


def test_each_of_n_samples_follows_the_grammar_and_has_its_logprobs(engine, tmp_path):
    record = {**_native(1, regex=REGEX), "id": "n3", "n": 3, "logprobs": 1}
    out = _run(engine, [record], tmp_path, max_tokens=16)["n3"]
    assert "logprobs" not in out and len(out["choices"]) == 3
    for choice in out["choices"]:
        assert choice["finish_reason"] == "stop" and re.fullmatch(REGEX, choice["text"]), choice
        assert "".join(entry["token"] for entry in choice["logprobs"][:-1]) == choice["text"]  # the last: EOS


def test_the_bench_long_answer_schema_masks_every_token_and_never_ends_an_answer(engine):
    """The bench's `structured=json` workload: with `ignore_eos` every request runs to its max_tokens
    inside the schema's one string (so its cost is measured per token, at equal output length)."""
    from loracli.bench.workload import long_answer_schema, structure_field

    assert structure_field("none", 8) is None
    records = [{**_native(i), "max_tokens": 24, "ignore_eos": True, **structure_field("json", 24)} for i in range(6)]
    for res in _generate(engine, records).values():
        assert res.error is None and res.finish_reason == "length" and len(res.token_ids) == 24, res
        assert res.text.startswith('{"answer": "') and '"' not in res.text[len('{"answer": "') :], res.text
    schema = long_answer_schema(24)
    assert schema["properties"]["answer"]["minLength"] > 24 * 81  # SmolLM2's longest token is 81 characters
