"""Input parsing and reading: every bad input gets one clear message naming file, line and field;
arbitrary bytes or JSON never crash the reader, and every line is accounted for exactly once.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loracli.errors import ConfigError
from loracli.input_sources import GZIP_MAGIC, Blank, check_input, count_records, iter_lines, read_items
from loracli.requests import FieldMap, RecordError, Request, parse_object, parse_record
from loracli.results import input_error_result


def bad(raw, **kw) -> RecordError:
    with pytest.raises(RecordError) as info:
        parse_record(raw, 7, "in.jsonl", **kw)
    return info.value


@pytest.mark.parametrize(
    "raw, field, words",
    [
        (b"{bad json", None, "not valid JSON"),
        (b'"just a string"', None, "must be a JSON object"),
        (b'{"id": "a", "prompt": "x\xff"}', None, "not valid UTF-8"),
        (b'{"id": "a"}', "prompt", "missing"),
        (b'{"id": "a", "prompt": 5}', "prompt", "must be a string"),
        (b'{"id": "a", "prompt": ""}', "prompt", "empty"),
        (b'{"id": "a", "prompt": "x", "messages": []}', "messages", "not both"),
        (b'{"id": "a", "messages": [{"role": "user"}]}', "messages[0]", "string 'role' and 'content'"),
        (b'{"id": "a", "prompt": "x", "max_tokens": 0}', "max_tokens", "positive"),
        (b'{"id": "a", "prompt": "x", "max_tokens": -3}', "max_tokens", "positive"),
        (b'{"id": "a", "prompt": "x", "max_tokens": "9"}', "max_tokens", "integer"),
        (b'{"id": "a", "prompt": "x", "max_tokens": 2.5}', "max_tokens", "integer"),
        (b'{"id": "a", "prompt": "x", "temperature": -1}', "temperature", ">= 0"),
        (b'{"id": "a", "prompt": "x", "temperature": NaN}', "temperature", "finite"),
        (b'{"id": "a", "prompt": "x", "top_p": 0}', "top_p", "(0, 1]"),
        (b'{"id": "a", "prompt": "x", "seed": 1e3}', "seed", "64-bit integer"),
        (b'{"id": "a", "prompt": "x", "seed": 99999999999999999999999}', "seed", "64-bit integer"),
        (b'{"id": "a", "prompt": "x", "stop": [""]}', "stop", "non-empty"),
        (b'{"id": "a", "prompt": "x", "ignore_eos": 1}', "ignore_eos", "true or false"),
        (b'{"id": true, "prompt": "x"}', "id", "string or integer"),
        (b'{"id": "", "prompt": "x"}', "id", "empty"),
        (b'{"id": "a", "prompt": "x", "adapter": 3}', "adapter", "adapter name"),
        (b'{"custom_id": "c", "url": "/v1/embeddings", "body": {}}', "url", "must be one of"),
        (b'{"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "x"}}', "body.model", "missing"),
        (
            b'{"custom_id": "c", "url": "/v1/chat/completions", "body": {"model": "m", "prompt": "x"}}',
            "body.messages",
            "chat completions",
        ),
        (b'{"custom_id": "c", "method": "GET", "url": "/v1/completions", "body": {}}', "method", "POST"),
        (b'{"body": {"model": "m", "prompt": "x"}, "url": "/v1/completions"}', "custom_id", "missing"),
        (b'{"id": "a", "prompt": "bad \\udc00 half"}', "prompt", "unpaired surrogate"),
        (b'{"id": "a", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0]", "unpaired surrogate"),
        (b"[" * 100_000, None, "JSON"),
        (b'{"id": "a", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", None, "JSON"),
    ],
)
def test_each_bad_record_names_file_line_and_field(raw, field, words):
    e = bad(raw)
    assert e.file == "in.jsonl" and e.line == 7 and e.field == field
    assert str(e).startswith("in.jsonl:7") and words in str(e)
    if field:
        assert f"field '{field}'" in str(e)


def test_bad_record_keeps_its_id_and_form_when_readable():
    assert bad(b'{"id": "x1", "prompt": 5}').record_id == "x1"
    assert bad(b'{"id": 12, "prompt": 5}').record_id == 12
    assert bad(b'{"prompt": 5}').record_id is None
    e = bad(b'{"custom_id": "c9", "url": "/v1/completions", "body": {"model": "m"}}')
    assert (e.record_id, e.form, e.kind) == ("c9", "openai", "invalid_request")


def test_good_records_and_unknown_fields():
    r = parse_record(b'{"prompt": "hi", "max_token": 3, "temperature": 1}', 4, "f")
    assert isinstance(r, Request) and r.id == "#4" and r.params == {"temperature": 1.0}
    assert r.unknown_fields == ["max_token"]
    o = parse_record(
        json.dumps(
            {
                "custom_id": "c",
                "url": "/v1/completions",
                "x": 1,
                "body": {"model": "base", "prompt": "p", "user": "u", "max_completion_tokens": 5},
            }
        ),
        1,
        "f",
        base_names=frozenset({"base"}),
    )
    assert (o.id, o.adapter, o.params, o.form) == ("c", None, {"max_tokens": 5}, "openai")
    assert o.unknown_fields == ["body.user", "x"]


def test_field_map_renames_columns_and_names_them_in_errors():
    fields = FieldMap(prompt="text", adapter="lora", id="key")
    r = parse_object({"text": "hi", "lora": "a1", "key": 5}, 2, "t.csv", fields=fields)
    assert (r.id, r.adapter, r.prompt) == (5, "a1", "hi")
    chat = parse_object({"text": [{"role": "user", "content": "hi"}]}, 3, "t.csv", fields=fields)
    assert chat.messages == [{"role": "user", "content": "hi"}]
    with pytest.raises(RecordError) as info:
        parse_object({"text": 3, "key": "k"}, 4, "t.csv", fields=fields)
    assert "field 'text'" in str(info.value) and info.value.record_id == "k"


def test_read_items_accounts_for_every_line(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"prompt": "a"}\n\n   \n{oops\n{"id": "b", "prompt": "b"}')
    items = list(read_items(str(p)))
    assert [type(i) for i in items] == [Request, Blank, Blank, RecordError, Request]
    assert [i.line for i in items] == [1, 2, 3, 4, 5]
    assert count_records(str(p)) == 5


def test_gzip_and_overlong_lines(tmp_path):
    p = tmp_path / "in.jsonl.gz"
    with gzip.open(p, "wb") as f:
        f.write(b'{"prompt": "a"}\n{"prompt": "b"}\n')
    assert [i.prompt for i in read_items(str(p))] == ["a", "b"]
    assert count_records(str(p)) is None
    lines = list(iter_lines(io.BytesIO(b"x" * 100 + b"\nshort\n" + b"y" * 250), limit=64))
    assert lines == [(1, None), (2, b"short"), (3, None)]


def test_missing_folder_and_empty_inputs_are_refused(tmp_path):
    for path, words in ((tmp_path / "none.jsonl", "not found"), (tmp_path, "a folder")):
        with pytest.raises(ConfigError, match=words):
            check_input(str(path))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match="empty"):
        check_input(str(empty))


@pytest.mark.parametrize("fmt", ["parquet", "csv", "arrow"])
def test_table_inputs_stream_rows(tmp_path, fmt):
    import pyarrow as pa

    table = pa.table({"text": ["hello", "world", None], "lora": ["a1", None, "a2"], "key": ["k1", "k2", "k3"]})
    path = tmp_path / f"t.{fmt}"
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    items = list(read_items(str(path), fields=FieldMap(prompt="text", adapter="lora", id="key")))
    assert [(i.id, i.adapter, i.prompt) for i in items[:2]] == [("k1", "a1", "hello"), ("k2", None, "world")]
    assert isinstance(items[2], RecordError) and items[2].line == 3 and items[2].record_id == "k3"
    if fmt == "parquet":
        assert count_records(str(path)) == 3


def _expected_lines(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_and_every_line_is_accounted(tmp_path, data):
    p = tmp_path / "fuzz.jsonl"
    p.write_bytes(data)
    if data.startswith(GZIP_MAGIC):  # read as gzip: broken gzip is one error about the file
        with pytest.raises(ConfigError, match="cannot read"):
            list(read_items(str(p)))
        return
    items = list(read_items(str(p)))
    assert [i.line for i in items] == list(range(1, _expected_lines(data) + 1))
    for item in items:
        assert isinstance(item, (Request, RecordError, Blank))
        if isinstance(item, RecordError):
            assert str(item).startswith(f"{p}:{item.line}")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
keys = st.sampled_from(
    [
        "id",
        "prompt",
        "messages",
        "adapter",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "ignore_eos",
        "custom_id",
        "url",
        "body",
        "method",
        "model",
        "extra",
    ]
)
records = st.dictionaries(
    keys,
    json_values
    | st.just("/v1/completions")
    | st.fixed_dictionaries({"model": st.text(max_size=4), "prompt": json_values, "max_tokens": json_values}),
    max_size=8,
)


@settings(max_examples=400, deadline=None)
@given(obj=records)
def test_arbitrary_json_objects_give_a_request_or_a_record_error(obj):
    try:
        raw = json.dumps(obj, allow_nan=True)
    except (TypeError, ValueError):
        return
    try:
        r = parse_record(raw, 3, "f")
    except RecordError as e:
        assert e.line == 3 and str(e).startswith("f:3")
        return
    assert isinstance(r, Request) and isinstance(r.id, (str, int)) and r.id != "" and (r.prompt or r.messages)
    assert r.params.get("max_tokens", 1) > 0


def _write_table(path, table, fmt):
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif fmt in ("csv", "tsv"):
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path, pcsv.WriteOptions(delimiter="\t" if fmt == "tsv" else ","))
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "arrow"])
def test_every_table_format_reads_every_column(tmp_path, fmt):
    import pyarrow as pa

    table = pa.table(
        {
            "prompt": ["hello, world", "tab\tfree text"] if fmt != "tsv" else ["hello, world", "a, b, c"],
            "adapter": ["a1", "a2"],
            "id": ["k1", "k2"],
            "max_tokens": [3, 5],
        }
    )
    path = tmp_path / f"t.{fmt}"
    _write_table(path, table, fmt)
    items = list(read_items(str(path)))
    assert all(isinstance(i, Request) for i in items), items
    got = [(i.id, i.adapter, i.prompt, i.params, i.line) for i in items]
    prompts = table.column("prompt").to_pylist()
    assert got == [("k1", "a1", prompts[0], {"max_tokens": 3}, 1), ("k2", "a2", prompts[1], {"max_tokens": 5}, 2)]


BOM = b"\xef\xbb\xbf"
TWO_LINES = b'{"id": "a", "prompt": "x"}\n{"prompt": "y"}\n'


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def _ok(items) -> list:
    items = list(items)
    assert all(isinstance(i, Request) for i in items), items
    return [(i.id, i.prompt) for i in items]


def test_a_byte_order_mark_does_not_spoil_the_first_record(tmp_path, monkeypatch):
    expected = [("a", "x"), ("#2", "y")]
    plain, packed = tmp_path / "bom.jsonl", tmp_path / "bom.jsonl.gz"
    plain.write_bytes(BOM + TWO_LINES)
    packed.write_bytes(gzip.compress(BOM + TWO_LINES))
    assert _ok(read_items(str(plain))) == expected
    assert _ok(read_items(str(packed))) == expected
    _stdin(monkeypatch, BOM + TWO_LINES)
    assert _ok(read_items("-")) == expected
    for fmt, sep in (("csv", b","), ("tsv", b"\t")):
        table = tmp_path / f"bom.{fmt}"
        table.write_bytes(BOM + sep.join([b"id", b"prompt"]) + b"\n" + sep.join([b"a", b"x"]) + b"\n")
        assert _ok(read_items(str(table))) == [("a", "x")]


def test_gzip_is_known_by_its_content_not_its_name(tmp_path, monkeypatch):
    expected = [("a", "x"), ("#2", "y")]
    hidden = tmp_path / "in.jsonl"
    hidden.write_bytes(gzip.compress(TWO_LINES))
    assert _ok(read_items(str(hidden))) == expected
    assert count_records(str(hidden)) is None  # a compressed file's lines are not counted from its bytes
    named = tmp_path / "plain.jsonl.gz"
    named.write_bytes(TWO_LINES)
    assert _ok(read_items(str(named))) == expected
    assert count_records(str(named)) == 2
    _stdin(monkeypatch, gzip.compress(TWO_LINES))
    assert _ok(read_items("-")) == expected
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(GZIP_MAGIC + b"not deflate")
    with pytest.raises(ConfigError, match="cannot read"):
        list(read_items(str(broken)))
    _stdin(monkeypatch, b"\x1f")  # one byte of the magic number is not gzip
    assert [type(i) for i in read_items("-")] == [RecordError]


def test_stdin_is_read_line_by_line_as_it_comes(monkeypatch):
    read_end, write_end = os.pipe()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(open(read_end, "rb")))  # noqa: SIM115 - closed below
    os.write(write_end, b'{"id": "a", "prompt": "x"}\n')
    items, first = read_items("-"), []
    reader = threading.Thread(target=lambda: first.append(next(items)))
    reader.start()
    reader.join(timeout=10)
    waited = reader.is_alive()  # still waiting for bytes the first line does not need
    os.write(write_end, b'{"prompt": "y"}\n')
    os.close(write_end)
    reader.join()
    assert not waited and _ok(first + list(items)) == [("a", "x"), ("#2", "y")]
    sys.stdin.close()


def test_implicit_ids_cannot_collide_with_explicit_ones():
    assert parse_record(b'{"prompt": "x"}', 12, "f").id == "#12"
    assert parse_record(b'{"id": 12, "prompt": "x"}', 1, "f").id == 12
    assert parse_record(b'{"id": "12", "prompt": "x"}', 1, "f").id == "12"
    assert parse_record(b'{"id": "a#1", "prompt": "x"}', 1, "f").id == "a#1"
    native = bad(b'{"id": "#12", "prompt": "x"}')
    assert native.field == "id" and "must not start with '#'" in str(native) and native.record_id is None
    openai = bad(b'{"custom_id": "#3", "url": "/v1/completions", "body": {"model": "m", "prompt": "x"}}')
    assert openai.field == "custom_id" and "must not start with '#'" in str(openai) and openai.record_id is None
    assert input_error_result(bad(b"{oops")).id == "#7"  # an engine given an unreadable line: its implicit id


def _chat(content) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    return json.dumps({"custom_id": "c", "url": "/v1/chat/completions", "body": body}).encode()


def test_chat_content_given_as_text_parts_is_joined():
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    r = parse_record(_chat(parts), 1, "f")
    assert r.messages == [{"role": "user", "content": "Hello, world"}]
    native = parse_record(json.dumps({"messages": [{"role": "user", "content": parts[:1]}]}), 2, "f")
    assert native.messages == [{"role": "user", "content": "Hello, "}]


@pytest.mark.parametrize(
    "part, field, words",
    [
        ({"type": "image_url", "image_url": {"url": "x"}}, "content[1].type", "'image_url' parts are not supported"),
        ({"type": "text"}, "content[1].text", "must be a string, got null"),
        ({"text": "x"}, "content[1].type", "missing: a part names its type (only 'text' parts are supported)"),
        ("text", "content[1]", 'must be an object like {"type": "text", "text": ...}, got "text"'),
    ],
)
def test_other_content_parts_are_refused_by_name(part, field, words):
    e = bad(_chat([{"type": "text", "text": "hi"}, part]))
    assert e.field == f"body.messages[0].{field}" and e.record_id == "c"
    assert str(e) == f"in.jsonl:7: field 'body.messages[0].{field}': {words}"
