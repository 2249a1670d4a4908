"""Resume: the id table, the sidecar check, repairing a torn or stale output, and reruns that finish
exactly the missing records and end equal to an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from runs import by_key, prompts, read_output, run, tiny_engine, write_jsonl

from loracli.errors import ConfigError
from loracli.idtable import IdTable
from loracli.outputs import DiskFullError
from loracli.requests import RecordError, Request, parse_record
from loracli.resume import (
    ANSWER,
    FOREIGN,
    INPUT_ERROR,
    RETRY,
    JobIdentity,
    Ledger,
    Settled,
    classify,
    fingerprint,
    plan_output,
    repair,
    sidecar_path,
    write_sidecar,
)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.text(max_size=6), st.integers(1, 3)), max_size=3000))
def test_id_table_behaves_like_a_dict_of_flags(ops):
    table, ref = IdTable(), {}
    for key, flag in ops:
        assert table.mark(key, flag) == ref.get(key, 0)
        ref[key] = ref.get(key, 0) | flag
    assert len(table) == len(ref)
    assert all(table.flags(k) == v for k, v in ref.items())
    assert table.flags("\x00never") == 0


def test_id_table_is_compact():
    table = IdTable()
    for i in range(100_000):
        table.mark(f"request-{i}")
    assert len(table) == 100_000 and "request-99999" in table and "request-100000" not in table
    assert table.nbytes() < 100_000 * 60


@pytest.mark.parametrize(
    "line, expected",
    [
        ({"id": "a", "text": "x", "finish_reason": "length"}, (ANSWER, "a")),
        ({"id": "b", "custom_id": "c", "response": {}, "error": None}, (ANSWER, "c")),
        ({"id": None, "line": 4, "error": {"type": "invalid_request", "message": "m"}}, (INPUT_ERROR, 4)),
        ({"custom_id": "c", "line": 5, "error": {"code": "duplicate_id", "message": "m"}}, (INPUT_ERROR, 5)),
        ({"id": "a", "error": {"type": "unknown_adapter", "message": "m"}}, (RETRY, None)),
        ({"id": "a", "error": {"type": "engine_error", "message": "m"}}, (RETRY, None)),
        ({"custom_id": "a", "response": None, "error": {"code": "out_of_memory", "message": "m"}}, (RETRY, None)),
        ({"x": 1}, (FOREIGN, None)),
        ([1, 2], (FOREIGN, None)),
    ],
)
def test_classify_output_lines(line, expected):
    assert classify(json.dumps(line).encode() + b"\n") == expected
    assert classify(b"{torn") == (FOREIGN, None)


def test_repair_truncates_a_torn_line_without_rewriting(tmp_path):
    out = tmp_path / "out.jsonl"
    good = b'{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n'
    out.write_bytes(good + b'{"id": "c", "te')
    inode = out.stat().st_ino
    settled = Settled()
    repair(str(out), settled, print)
    assert out.read_bytes() == good and out.stat().st_ino == inode
    assert (settled.answers, settled.torn) == (2, 1)
    assert "a" in settled.ids and "c" not in settled.ids


def test_repair_drops_retryable_errors_duplicates_and_foreign_lines(tmp_path):
    out = tmp_path / "out.jsonl"
    lines = [
        {"id": "a", "text": "x"},
        {"id": "b", "adapter": "z", "error": {"type": "adapter_error", "message": "m"}},
        {"id": None, "line": 7, "error": {"type": "invalid_request", "message": "m"}},
        {"id": "a", "text": "x"},
        "not json",
        {"id": "c", "text": "z"},
    ]
    write_jsonl(out, lines)
    warnings = []
    settled = Settled()
    repair(str(out), settled, warnings.append)
    kept = read_output(out)
    assert [r.get("id") for r in kept] == ["a", None, "c"]
    assert (settled.answers, settled.input_errors, settled.retried, settled.foreign) == (2, 1, 1, 2)
    assert len(warnings) == 2 and "7" in settled.lines and "b" not in settled.ids
    assert not list(tmp_path.glob("*.tmp"))


def test_ledger_skips_settled_reports_duplicates_and_runs_the_rest():
    settled = Settled()
    settled.ids.mark("done", 1)
    settled.lines.mark("3", 1)
    ledger = Ledger("f", settled)
    req = lambda rid, line: Request(rid, None, "p", line=line)  # noqa: E731
    assert ledger.decide(req("done", 1)) is None
    assert ledger.decide(req("new", 2)) is not None
    assert ledger.decide(RecordError("f", 3, None, "bad", record_id="x")) is None
    dup = ledger.decide(req("new", 4))
    assert isinstance(dup, RecordError) and dup.kind == "duplicate_id" and "f:4" in str(dup)
    assert isinstance(ledger.decide(req("x", 5)), RecordError)  # line 3 had id x
    assert ledger.decide(req("done", 6)).kind == "duplicate_id"


def _identity(tmp_path, **opts):
    base = {
        "model": "m",
        "max_tokens": 4,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
        "ignore_eos": True,
        "dtype": "float32",
    }
    return JobIdentity(str(tmp_path / "in.jsonl"), {"size": 10, "sha256": "ab"}, {**base, **opts})


def test_plan_output_fresh_resume_refuse_and_overwrite(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    out = str(tmp_path / "out.jsonl")
    ident = _identity(tmp_path)
    assert plan_output(out, str(inp), None, ident, False) == "fresh"
    assert plan_output("-", str(inp), None, ident, False) == "stdout"
    (tmp_path / "out.jsonl").write_text('{"id": "a", "text": "x"}\n')
    with pytest.raises(ConfigError, match="no out.jsonl.loracli.json"):
        plan_output(out, str(inp), None, ident, False)
    write_sidecar(out, ident)
    assert plan_output(out, str(inp), None, ident, False) == "resume"
    with pytest.raises(ConfigError, match="max_tokens was 4 then, 8 now"):
        plan_output(out, str(inp), None, _identity(tmp_path, max_tokens=8), False)
    changed = JobIdentity(ident.input, {"size": 11, "sha256": "cd"}, ident.options)
    with pytest.raises(ConfigError, match="the input differs"):
        plan_output(out, str(inp), None, changed, False)
    assert plan_output(out, str(inp), None, changed, True) == "overwrite"
    with pytest.raises(ConfigError, match="input file itself"):
        plan_output(str(inp), str(inp), None, ident, True)
    with pytest.raises(ConfigError, match="another file"):
        plan_output(out, str(inp), out, ident, True)
    sidecar_path(out).write_text("{garbage")
    with pytest.raises(ConfigError, match="unreadable"):
        plan_output(out, str(inp), None, ident, False)


@pytest.fixture(scope="module")
def engine(llama_dir, llama_adapters):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is several times faster on a busy machine
    yield tiny_engine(llama_dir, llama_adapters)
    torch.set_num_threads(threads)


def test_rerun_after_a_cut_finishes_exactly_the_rest(engine, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(40) + ["{bad"])
    full = tmp_path / "full.jsonl"
    run(engine, inp, full)
    expected = by_key(read_output(full))
    assert len(expected) == 41
    out = tmp_path / "out.jsonl"
    run(engine, inp, out)
    raw = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(raw[:17]) + raw[17][:9])  # killed mid-write of line 18
    summary = run(engine, inp, out)
    assert summary.resumed == 17 and summary.requests == 24 and summary.repaired_lines == 1
    assert by_key(read_output(out)) == expected
    again = run(engine, inp, out)
    assert again.requests == 0 and again.resumed == 41 and again.failed_before == 1
    assert by_key(read_output(out)) == expected


def test_engine_errors_are_retried_but_unreadable_records_are_kept(engine, tmp_path, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(12) + [{"id": "bad", "prompt": 3}])
    out = tmp_path / "out.jsonl"
    real_run = engine.model_runner.run

    def poisoned(seqs, is_prefill, decode=None):
        logits = real_run(seqs, is_prefill, decode).clone()
        for i, s in enumerate(seqs + (decode or [])):  # the logits' rows
            if s.request_id in ("r3", "r7"):
                logits[i] = float("nan")
        return logits

    monkeypatch.setattr(engine.model_runner, "run", poisoned)
    first = run(engine, inp, out)
    assert (first.requests, first.failed, first.invalid) == (13, 3, 1)
    errors = {r["id"]: r["error"]["type"] for r in read_output(out) if "error" in r}
    assert errors == {"r3": "engine_error", "r7": "engine_error", "bad": "invalid_request"}
    monkeypatch.setattr(engine.model_runner, "run", real_run)
    second = run(engine, inp, out)
    assert (second.requests, second.retried, second.failed_before, second.failed) == (2, 2, 1, 0)
    final = by_key(read_output(out))
    assert len(final) == 13 and "error" not in final["r3"] and "error" not in final["r7"]
    assert final[("line", 13)]["error"]["type"] == "invalid_request"


def test_overwrite_starts_over_and_errors_file_is_resumed_too(engine, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(6) + ["{bad", {"id": "u", "prompt": "p", "adapter": "nope"}])
    out, errs = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    run(engine, inp, out, errors_path=str(errs))
    assert len(read_output(out)) == 6 and len(read_output(errs)) == 2
    with pytest.raises(ConfigError, match="errors_path was"):
        run(engine, inp, out)
    again = run(engine, inp, out, errors_path=str(errs))
    assert again.requests == 1 and again.failed == 1  # the unknown adapter is tried again
    assert len(read_output(out)) == 6 and len(read_output(errs)) == 2
    fresh = run(engine, inp, out, max_tokens=2, overwrite=True)
    assert fresh.requests == 8 and fresh.mode == "overwrite"
    assert all(r.get("usage", {}).get("completion_tokens", 2) == 2 for r in read_output(out))


def test_ids_keep_their_type_and_implicit_ids_their_own_form():
    table = IdTable()
    assert table.mark(1) == 0 and table.mark("1") == 0 and table.mark("#1") == 0
    assert len(table) == 3 and 1 in table and "1" in table
    ledger = Ledger("f")
    reqs = [parse_record(raw, n, "f") for n, raw in enumerate([b'{"prompt": "a"}', b'{"id": 1, "prompt": "b"}'], 1)]
    reqs.append(parse_record(b'{"id": "1", "prompt": "c"}', 3, "f"))
    assert [r.id for r in reqs] == ["#1", 1, "1"]
    assert all(isinstance(ledger.decide(r), Request) for r in reqs)
    assert ledger.decide(parse_record(b'{"id": 1, "prompt": "d"}', 4, "f")).kind == "duplicate_id"


@pytest.mark.parametrize(
    "line, expected",
    [
        ({"id": 7, "text": "x", "finish_reason": "length"}, (ANSWER, 7)),
        ({"id": "#7", "text": "x", "finish_reason": "length"}, (ANSWER, "#7")),
        ({"id": True, "text": "x"}, (FOREIGN, None)),
        ({"id": 1.5, "text": "x"}, (FOREIGN, None)),
    ],
)
def test_classify_reads_ids_back_as_the_input_gave_them(line, expected):
    assert classify(json.dumps(line).encode() + b"\n") == expected


def test_repair_settles_ids_by_type(tmp_path):
    out = write_jsonl(tmp_path / "out.jsonl", [{"id": 1, "text": "x"}, {"id": "#3", "text": "y"}])
    settled = Settled()
    repair(str(out), settled, print)
    ledger = Ledger("f", settled)
    assert ledger.decide(Request(1, None, "p", line=1)) is None
    assert ledger.decide(Request("#3", None, "p", line=3)) is None
    assert isinstance(ledger.decide(Request("1", None, "p", line=2)), Request)


def test_ids_of_every_kind_are_written_back_as_given_and_resumed(engine, tmp_path):
    inp = write_jsonl(
        tmp_path / "in.jsonl", [{"id": 1, "prompt": "a b"}, {"id": "1", "prompt": "a c"}, {"prompt": "a d"}]
    )
    out = tmp_path / "out.jsonl"
    first = run(engine, inp, out)
    assert (first.requests, first.failed) == (3, 0)
    written = read_output(out)
    assert sorted((type(r["id"]).__name__, r["id"]) for r in written) == [("int", 1), ("str", "#3"), ("str", "1")]
    out.write_bytes(out.read_bytes().splitlines(keepends=True)[0])
    second = run(engine, inp, out)
    assert (second.resumed, second.requests, second.failed) == (1, 2, 0)
    assert sorted(json.dumps(r["id"]) for r in read_output(out)) == sorted(json.dumps(r["id"]) for r in written)


def test_outputs_that_are_not_regular_files_are_streamed_without_resume(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    ident = _identity(tmp_path)
    for output in ("/dev/null", str(fifo)):
        assert plan_output(output, str(inp), None, ident, False) == "stream"
        assert plan_output(output, str(inp), None, ident, True) == "stream"


def test_a_full_disk_writing_the_sidecar_is_one_line_naming_it(tmp_path, monkeypatch):
    out = str(tmp_path / "out.jsonl")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DiskFullError, match="free space, then rerun the same command") as info:
        write_sidecar(out, _identity(tmp_path))
    assert str(info.value).startswith(f"cannot write {sidecar_path(out)}: No space left on device;")


def test_an_output_of_the_previous_id_scheme_is_refused_not_answered_twice(tmp_path):
    """Sidecar version 1 wrote implicit ids as "12" and int ids as strings: resuming such an output
    would run its records again, so it is refused with a one-line reason and the way out."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "1", "adapter": null, "text": "x"}\n')
    identity = JobIdentity(str(inp), fingerprint(str(inp)), {}, None, [])
    old = json.loads(identity.to_json())
    old["version"] = 1
    sidecar_path(str(out)).write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="another loracli version .*set overwrite to start over") as info:
        plan_output(str(out), str(inp), None, identity, False)
    assert "\n" not in str(info.value) and "overwrite" in info.value.fields
