"""`loracli run` on bad input, bad adapters and engine faults: every line is accounted for, messages
name file, line and field, exit codes are 0 / 1 / 2, and one failure never stops the others; a full
disk is one line and a rerun; progress lines on stderr when it is not a terminal.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from runs import by_key, prompts, read_output, run, tiny_engine, write_jsonl

from loracli.cli import main
from loracli.errors import ConfigError
from loracli.input_sources import GZIP_MAGIC
from loracli.outputs import LineFile
from loracli.run_progress import RunProgress

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def cli(monkeypatch, capsys, llama_dir, llama_adapters):
    def call(*args, adapters=llama_adapters, stdin: bytes | None = None) -> tuple[int, str, str]:
        argv = [
            "loracli",
            "run",
            *map(str, args),
            "--model",
            str(llama_dir),
            "--dtype",
            "float32",
            "--max-tokens",
            "3",
            "--ignore-eos",
        ]
        if adapters is not None:
            argv += ["--adapters", str(adapters)]
        monkeypatch.setattr(sys, "argv", argv)
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        with pytest.raises(SystemExit) as info:
            main()
        out, err = capsys.readouterr()
        return info.value.code, out, err

    return call


BAD_LINES = [
    {"id": "ok1", "prompt": "hello world", "adapter": "attn4", "colour": "red"},
    "{not json",
    {"id": "t", "prompt": 42},
    {"id": "m", "adapter": "mlp8"},
    "",
    {"id": "ok1", "prompt": "again"},
    {"id": "u", "prompt": "hi", "adapter": "nope"},
    {"id": "z", "prompt": "hi", "max_tokens": 0},
    {"id": "big", "prompt": "hi", "max_tokens": 100000},
    {"id": "long", "prompt": "the quick brown fox " * 80},
    {"id": "ok2", "prompt": "numbers one two", "colour": "blue", "size": 3},
    {"custom_id": "o1", "url": "/v1/completions", "body": {"model": "mlp8", "prompt": "x", "top_p": 7}},
    [1, 2],
]


def test_bad_lines_are_each_answered_and_reported(cli, tmp_path):
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, BAD_LINES)
    with open(inp, "ab") as f:
        f.write(b'{"id": "bytes", "prompt": "caf\xe9"}\n')
    out = tmp_path / "out.jsonl"
    code, stdout, err = cli(inp, "-o", out)
    assert code == 1 and stdout == ""
    recs = by_key(read_output(out))
    assert len(recs) == len(BAD_LINES)  # 14 lines, one blank: 13 records
    assert "text" in recs["ok1"] and "text" in recs["ok2"]
    kinds = {k: r["error"].get("type", r["error"].get("code")) for k, r in recs.items() if r.get("error")}
    assert kinds == {
        ("line", 2): "invalid_request",
        ("line", 3): "invalid_request",
        ("line", 4): "invalid_request",
        ("line", 6): "duplicate_id",
        "u": "unknown_adapter",
        ("line", 8): "invalid_request",
        "big": "max_tokens_too_large",
        "long": "prompt_too_long",
        ("line", 12): "invalid_request",
        ("line", 13): "invalid_request",
        ("line", 14): "invalid_request",
    }
    assert recs[("line", 12)]["custom_id"] == "o1" and recs[("line", 3)]["id"] == "t"
    for where in (
        "2: not valid JSON",
        "3: field 'prompt'",
        "4: field 'prompt'",
        "5: blank line",
        "6: field 'id': duplicate id 'ok1'",
        "7: field 'adapter'",
        "8: field 'max_tokens'",
        "9: field 'max_tokens'",
        "10: field 'prompt'",
        "12: field 'body.top_p'",
        "13: must be a JSON object",
        "14: not valid UTF-8",
    ):
        assert f"in.jsonl:{where}" in err, where
    assert err.count("'colour'") == 1 and "field 'size'" in err  # unknown fields: once per name
    assert "Traceback" not in err


def test_errors_file_takes_every_failure(cli, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", BAD_LINES)
    out, errs = tmp_path / "out.jsonl", tmp_path / "bad.jsonl"
    code, _, _ = cli(inp, "-o", out, "--errors", errs)
    assert code == 1
    assert {r["id"] for r in read_output(out)} == {"ok1", "ok2"}
    assert all(r.get("error") for r in read_output(errs)) and len(read_output(errs)) == 10


def test_strict_reports_all_problems_and_runs_nothing(cli, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", BAD_LINES)
    out = tmp_path / "out.jsonl"
    code, _, err = cli(inp, "-o", out, "--strict")
    assert code == 2 and not out.exists()
    for n in (2, 3, 4, 6, 7, 8, 9, 10, 12, 13):
        assert f"in.jsonl:{n}:" in err, n
    assert "problem(s) in" in err and "nothing was run (--strict)" in err
    good = write_jsonl(tmp_path / "good.jsonl", prompts(4))
    assert cli(good, "-o", out, "--strict")[0] == 0 and len(read_output(out)) == 4


def test_exit_codes_for_empty_missing_and_blank_inputs(cli, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n  \n\n")
    for path, words in ((empty, "empty"), (tmp_path / "none.jsonl", "not found"), (blank, "no records")):
        code, _, err = cli(path, "-o", tmp_path / "o.jsonl", "--overwrite")
        assert code == 2 and words in err and "Traceback" not in err
    good = write_jsonl(tmp_path / "good.jsonl", prompts(3))
    code, stdout, _ = cli("-", stdin=good.read_bytes())
    assert code == 0 and {json.loads(x)["id"] for x in stdout.splitlines()} == {"r0", "r1", "r2"}


def test_corrupt_and_incompatible_adapters_fail_only_their_requests(cli, tmp_path, llama_dir, llama_adapters):
    from tiny import make_adapter

    ads = tmp_path / "ads"
    shutil.copytree(llama_adapters, ads)
    data = (ads / "attn4" / "adapter_model.safetensors").read_bytes()
    (ads / "attn4" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    make_adapter(llama_dir, ads / "rank32", r=32, seed=3)  # above --max-lora-rank 16
    cfg = json.loads((ads / "pattern" / "adapter_config.json").read_text())
    (ads / "pattern" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (ads / "empty").mkdir()
    names = ["attn4", "rank32", "pattern", "empty", "mlp8", None]
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(18, adapters=names))
    out = tmp_path / "out.jsonl"
    code, _, err = cli(inp, "-o", out, "--max-lora-rank", "16", adapters=ads)
    assert code == 1
    recs = by_key(read_output(out))
    assert len(recs) == 18
    for i in range(18):
        rec, name = recs[f"r{i}"], names[i % len(names)]
        if name in ("mlp8", None):
            assert "text" in rec
        else:
            assert rec["error"]["type"] == "adapter_error", rec
            assert f"in.jsonl:{i + 1}: field 'adapter'" in rec["error"]["message"]
    assert "DoRA" in recs["r2"]["error"]["message"] and "rank" in recs["r1"]["error"]["message"]


@pytest.fixture(scope="module")
def engine(llama_dir, llama_adapters):
    return tiny_engine(llama_dir, llama_adapters)


def test_out_of_memory_backs_off_and_gives_the_same_results(engine, llama_dir, llama_adapters, tmp_path, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(24))
    run(engine, inp, tmp_path / "ref.jsonl", max_tokens=5)
    squeezed = tiny_engine(llama_dir, llama_adapters)
    real_run = squeezed.model_runner.run

    def small_memory(seqs, is_prefill, decode=None):
        if len(seqs) + len(decode or []) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(seqs, is_prefill, decode)

    monkeypatch.setattr(squeezed.model_runner, "run", small_memory)
    summary = run(squeezed, inp, tmp_path / "out.jsonl", max_tokens=5)
    assert summary.failed == 0 and summary.counters.oom_backoffs >= 2
    assert squeezed.scheduler.max_num_seqs <= 2  # the live limit is the scheduler's
    assert squeezed.config.max_num_seqs == 8  # the config stays as given (tests/runs.py)
    assert by_key(read_output(tmp_path / "out.jsonl")) == by_key(read_output(tmp_path / "ref.jsonl"))


def test_persistent_out_of_memory_fails_requests_not_the_run(llama_dir, tmp_path, monkeypatch):
    eng = tiny_engine(llama_dir)
    real_run = eng.model_runner.run

    def no_memory(seqs, is_prefill, decode=None):
        if any(s.request_id == "r1" for s in seqs + (decode or [])):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")
        return real_run(seqs, is_prefill, decode)

    monkeypatch.setattr(eng.model_runner, "run", no_memory)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(6, adapters=(None,)))
    summary = run(eng, inp, tmp_path / "out.jsonl")
    recs = by_key(read_output(tmp_path / "out.jsonl"))
    assert summary.failed == 1 and recs["r1"]["error"]["type"] == "out_of_memory"
    assert all("text" in recs[f"r{i}"] for i in (0, 2, 3, 4, 5))


def test_other_engine_exceptions_are_not_swallowed(llama_dir, tmp_path, monkeypatch):
    eng = tiny_engine(llama_dir)
    monkeypatch.setattr(eng.model_runner, "run", lambda *step: (_ for _ in ()).throw(ValueError("bug")))
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(2, adapters=(None,)))
    with pytest.raises(ValueError, match="bug"):
        run(eng, inp, tmp_path / "out.jsonl")


def test_sampled_outputs_do_not_depend_on_batching(llama_dir, llama_adapters, tmp_path):
    rows = prompts(10, temperature=1.0)
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    wide = tiny_engine(llama_dir, llama_adapters, max_num_seqs=8)
    narrow = tiny_engine(llama_dir, llama_adapters, max_num_seqs=1)
    run(wide, inp, tmp_path / "a.jsonl", max_tokens=6)
    run(narrow, inp, tmp_path / "b.jsonl", max_tokens=6)
    assert by_key(read_output(tmp_path / "a.jsonl")) == by_key(read_output(tmp_path / "b.jsonl"))
    texts = {r["text"] for r in read_output(tmp_path / "a.jsonl")}
    assert len(texts) > 5  # different ids, different seeds


def test_refuses_foreign_output_before_loading(engine, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    out = tmp_path / "out.jsonl"
    out.write_text("precious data\n")
    with pytest.raises(ConfigError, match="already exists"):
        run(engine, inp, out)
    assert out.read_text() == "precious data\n"


line_strategy = st.one_of(
    st.binary(max_size=30).filter(lambda b: b"\n" not in b and b"\r" not in b),
    st.just(b""),
    st.builds(
        lambda i, a, mt: json.dumps({"id": f"k{i}", "prompt": "hello", "adapter": a, "max_tokens": mt}).encode(),
        st.integers(0, 6),
        st.sampled_from([None, "attn4", "nope"]),
        st.integers(-1, 3),
    ),
    st.builds(
        lambda p: json.dumps({"prompt": p}, ensure_ascii=False).encode("utf-8", "surrogatepass"), st.text(max_size=12)
    ),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line_strategy, min_size=1, max_size=12).filter(lambda ls: not ls[0].startswith(GZIP_MAGIC)))
def test_any_input_every_line_is_answered_or_reported(engine, tmp_path, lines):
    """Any JSONL bytes (a file starting with gzip's magic number is gzip by content: its own tests
    are in test_requests.py), every line answered or reported once, and a rerun resumes them all."""
    inp, out = tmp_path / "fuzz.jsonl", tmp_path / "fuzz.out.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    blank = sum(1 for line in lines if not line.strip())
    if blank == len(lines):
        with pytest.raises(ConfigError, match="no records"):
            run(engine, inp, out, max_tokens=1, overwrite=True)
        return
    summary = run(engine, inp, out, max_tokens=1, overwrite=True)
    records = read_output(out)
    assert len(records) == summary.requests == len(lines) - blank and summary.blank_lines == blank
    answered = [r["id"] for r in records if "error" not in r]
    assert len(answered) == len(set(answered))
    again = run(engine, inp, out, max_tokens=1)
    assert again.resumed + again.requests == len(lines) - blank
    assert len(read_output(out)) == len(records)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_line_exit_2_and_the_rerun_finishes(cli, tmp_path, monkeypatch, code):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(8))
    out = tmp_path / "out.jsonl"
    real_put = LineFile._put

    def filling(self, data):
        if self.lines == 3:
            real_put(self, data[:10])  # the disk fills in the middle of the fourth line
            raise OSError(code, os.strerror(code))
        real_put(self, data)

    monkeypatch.setattr(LineFile, "_put", filling)
    status, _, err = cli(inp, "-o", out)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot write {out}: {os.strerror(code)}; every result written before is kept" in err
    assert "free space, then rerun the same command" in err and "Traceback" not in err
    assert len(out.read_bytes().splitlines(keepends=True)) == 4  # three whole lines and a torn one
    monkeypatch.setattr(LineFile, "_put", real_put)
    status, _, err = cli(inp, "-o", out)
    assert status == 0 and "resuming" in err and "a torn last line cut" in err
    assert sorted(by_key(read_output(out))) == sorted(f"r{i}" for i in range(8))


PROGRESS_LINE = re.compile(r"loracli run: (\d+)/12 done \(\d+%\), \d+\.\d tok/s, 0:00:\d\d elapsed(, ETA 0:00:\d\d)?$")


def test_progress_lines_on_stderr_when_it_is_not_a_terminal(engine, tmp_path, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(12))
    real_run = engine.model_runner.run

    def slow(*step):
        time.sleep(0.01)
        return real_run(*step)

    monkeypatch.setattr(engine.model_runner, "run", slow)
    log = io.StringIO()
    run(engine, inp, tmp_path / "out.jsonl", console=Console(file=log, width=300), progress_seconds=0.02)
    lines = [line for line in log.getvalue().splitlines() if line.startswith("loracli run:")]
    assert len(lines) >= 2 and all(PROGRESS_LINE.match(line) for line in lines), lines
    assert any("ETA" in line for line in lines)
    done = [int(PROGRESS_LINE.match(line)[1]) for line in lines]
    assert done == sorted(done)
    tty = io.StringIO()
    run(engine, inp, tmp_path / "tty.jsonl", console=Console(file=tty, force_terminal=True), progress_seconds=0.02)
    assert "done (" not in tty.getvalue()  # a terminal gets the bar instead


def test_progress_line_counts_settled_records_as_free_in_the_eta():
    counts = SimpleNamespace(completion_tokens=100, requests=5, resumed=4)
    progress = RunProgress(Console(file=io.StringIO()), counts, total=40, every=0, settled=10)
    progress.done = 15  # 4 skipped as settled, 5 results, 6 blank lines
    progress.started = time.perf_counter() - 5.0
    # 40 - 15 done - 6 settled still ahead = 19 left, at 5 results in 5 s
    assert progress.line() == "loracli run: 15/40 done (37%), 20.0 tok/s, 0:00:05 elapsed, ETA 0:00:19"
    progress.total = None
    assert progress.line() == "loracli run: 15 done, 20.0 tok/s, 0:00:05 elapsed"


def test_a_failed_job_leaves_nothing_for_the_next_job_on_the_same_engine(llama_dir, llama_adapters, tmp_path):
    """A job whose engine step raised leaves sequences admitted; the caller's next job on that engine
    must answer exactly its own records (no results of the failed job's requests leak into it)."""
    eng = tiny_engine(llama_dir, llama_adapters)
    first = write_jsonl(tmp_path / "first.jsonl", prompts(6))
    real_run = eng.model_runner.run
    eng.model_runner.run = lambda *step: 1 / 0
    with pytest.raises(ZeroDivisionError):
        run(eng, first, tmp_path / "first.out.jsonl")
    eng.model_runner.run = real_run
    second = write_jsonl(tmp_path / "second.jsonl", [{**p, "id": f"s{i}"} for i, p in enumerate(prompts(4))])
    summary = run(eng, second, tmp_path / "second.out.jsonl", max_tokens=2)
    ids = [r["id"] for r in read_output(tmp_path / "second.out.jsonl")]
    assert summary.requests == 4 and sorted(ids) == ["s0", "s1", "s2", "s3"]
    assert not eng.has_work() and eng.blocks.num_free == eng.blocks.num_blocks
