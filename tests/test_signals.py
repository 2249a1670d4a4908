"""A real `loracli run` on the tiny model, interrupted mid-run by SIGINT, SIGTERM, a double SIGINT
and SIGKILL, then rerun: no finished result is lost, no line is torn, every id ends up exactly
once, and the final output equals an uninterrupted run's. The stop message counts exactly the
records the rerun then does, or says where reading stopped when the input's total is unknown.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from runs import by_key, prompts, read_output, run, tiny_engine, write_jsonl

from loracli.job import stop_message
from loracli.outputs import ResultWriter
from loracli.resume import sidecar_path
from loracli.signals import ForcedStop, StopSignals, critical, exit_status, resume_command

N = 300
MAX_TOKENS = 8
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def test_resume_command_drops_overwrite_and_quotes():
    argv = ["run", "my input.jsonl", "-o", "out.jsonl", "--overwrite", "--max-tokens", "4"]
    assert resume_command(argv) == "loracli run 'my input.jsonl' -o out.jsonl --max-tokens 4"
    assert (exit_status(signal.SIGINT), exit_status(signal.SIGTERM)) == (130, 143)


def test_second_signal_waits_for_the_write_in_progress():
    previous = signal.getsignal(signal.SIGINT)
    wrote = []
    with pytest.raises(ForcedStop) as info, StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM
        with critical():
            os.kill(os.getpid(), signal.SIGINT)
            wrote.append("the whole line")
        wrote.append("never")
    assert wrote == ["the whole line"] and info.value.signum == signal.SIGTERM and stop.forced
    assert signal.getsignal(signal.SIGINT) is previous


@pytest.fixture(scope="module")
def workload(llama_dir, llama_adapters, tmp_path_factory):
    """The input, the CLI arguments and an uninterrupted run's output (made in-process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("signals")
    rows = [
        {"id": f"q{i}", "prompt": f"tell me a story number {i}", "adapter": (None, "attn4", "mlp8")[i % 3]}
        for i in range(N)
    ]
    inp = write_jsonl(root / "in.jsonl", rows)
    engine = tiny_engine(llama_dir, llama_adapters, max_num_seqs=4, max_loras=2)
    run(engine, inp, root / "reference.jsonl", max_tokens=MAX_TOKENS)
    args = [
        "--model",
        str(llama_dir),
        "--adapters",
        str(llama_adapters),
        "--dtype",
        "float32",
        "--ignore-eos",
        "--max-tokens",
        str(MAX_TOKENS),
        "--max-num-seqs",
        "4",
        "--max-loras",
        "2",
        "--max-lora-rank",
        "16",
    ]
    yield inp, args, by_key(read_output(root / "reference.jsonl")), engine
    torch.set_num_threads(threads)


def start(inp, out, args, tmp_path) -> subprocess.Popen:
    err = open(tmp_path / "stderr.txt", "wb")  # noqa: SIM115 - the child holds it
    return subprocess.Popen(
        [sys.executable, "-m", "loracli", "run", str(inp), "-o", str(out), *args],
        stdout=subprocess.DEVNULL,
        stderr=err,
        env=ENV,
    )


def wait_for_lines(proc: subprocess.Popen, out, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no output in time")


def check_intact(out) -> int:
    """Every line of the output is a whole record; returns how many."""
    data = out.read_bytes()
    assert data.endswith(b"\n"), "torn last line"
    records = read_output(out)
    by_key(records)  # no id twice
    return len(records)


def interrupt(workload, out, tmp_path, signals: list[int], after: int) -> tuple[int, str, int]:
    """Start the CLI on `out`, wait for `after` more lines, send `signals`; (exit code, stderr, lines)."""
    inp, args, _, _ = workload
    before = out.read_bytes().count(b"\n") if out.exists() else 0
    proc = start(inp, out, args, tmp_path)
    wait_for_lines(proc, out, before + after)
    for i, sig in enumerate(signals):
        if i:
            time.sleep(0.02)
        proc.send_signal(sig)
    t = time.monotonic()
    code = proc.wait(timeout=60)
    if len(signals) > 1:
        assert time.monotonic() - t < 10, "a second signal must stop the run at once"
    data = out.read_bytes()
    return code, (tmp_path / "stderr.txt").read_text(), len(data[: data.rfind(b"\n") + 1].splitlines())


def test_interrupted_four_ways_then_finished_equals_an_uninterrupted_run(workload, tmp_path):
    inp, args, reference, engine = workload
    out = tmp_path / "out.jsonl"

    code, stderr, kept = interrupt(workload, out, tmp_path, [signal.SIGINT], after=20)
    assert code == 130 and check_intact(out) == kept and 20 <= kept < N
    assert "SIGINT" in stderr and "rerun the same command" in stderr and "Traceback" not in stderr
    command = shlex.split(stderr.strip().splitlines()[-1])
    assert command[:3] == ["loracli", "run", str(inp)] and command[3:] == ["-o", str(out), *args]

    code, stderr, now = interrupt(workload, out, tmp_path, [signal.SIGTERM], after=20)
    assert code == 143 and check_intact(out) == now and now >= kept + 20, stderr
    assert f"resuming {out}: {kept} answers kept" in stderr

    code, stderr, kept = interrupt(workload, out, tmp_path, [signal.SIGINT, signal.SIGINT], after=20)
    # The second signal stops the run at once, unless the requests in flight had already finished
    # (a race the tiny model often wins): either way exit 130, no traceback, no torn line.
    assert code == 130 and check_intact(out) == kept >= now + 20 and "Traceback" not in stderr, stderr
    assert "stopped at once" in stderr or "stopped after finishing the requests in flight" in stderr

    code, stderr, now = interrupt(workload, out, tmp_path, [signal.SIGKILL], after=20)
    assert code == -signal.SIGKILL and now >= kept + 20 and now < N
    summary = run(engine, inp, out, max_tokens=MAX_TOKENS)
    assert summary.resumed == now and summary.requests == N - now and summary.failed == 0
    assert by_key(read_output(out)) == reference
    assert out.read_bytes().count(b"\n") == N


@pytest.fixture(scope="module")
def small_engine(llama_dir, llama_adapters):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_engine(llama_dir, llama_adapters, max_num_seqs=4)
    torch.set_num_threads(threads)


def sigint_after(monkeypatch, writes: int) -> None:
    """Ctrl-C mid-run: SIGINT to this process once the run has written `writes` results."""
    real_write = ResultWriter.write
    written = []

    def write(self, result):
        real_write(self, result)
        written.append(result.id)
        if len(written) == writes:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ResultWriter, "write", write)


def with_blanks(n: int) -> list:
    """`n` records, with blank lines among the later ones (not records: never counted as left)."""
    rows = prompts(n)
    return rows[: n - 10] + ["", ""] + rows[n - 10 :] + [""]


def test_the_stop_message_counts_every_record_left_and_the_rerun_does_exactly_those(
    small_engine, tmp_path, monkeypatch
):
    inp = write_jsonl(tmp_path / "in.jsonl", with_blanks(40))
    out = tmp_path / "out.jsonl"
    sigint_after(monkeypatch, 3)
    summary = run(small_engine, inp, out)
    assert summary.interrupted == signal.SIGINT
    assert summary.left == 40 - len(read_output(out)) > summary.abandoned  # the unread records count too
    assert f", {summary.left} requests left to do\n" in stop_message(summary, str(out), "loracli run ...")
    monkeypatch.undo()
    rerun = run(small_engine, inp, out)
    assert rerun.requests == summary.left and len(by_key(read_output(out))) == 40


def test_records_an_earlier_run_settled_further_on_are_not_counted_as_left(small_engine, tmp_path, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", with_blanks(60))
    full, out = tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    run(small_engine, inp, full)
    write_jsonl(out, [r for r in read_output(full) if int(r["id"][1:]) >= 40])  # settled: r40..r59, further on
    shutil.copy(sidecar_path(str(full)), sidecar_path(str(out)))
    sigint_after(monkeypatch, 2)
    summary = run(small_engine, inp, out)
    assert summary.interrupted == signal.SIGINT and summary.last_line < 40
    assert summary.left == 60 - len(read_output(out))
    monkeypatch.undo()
    rerun = run(small_engine, inp, out)
    assert rerun.requests == summary.left and len(by_key(read_output(out))) == 60


def test_an_input_of_unknown_length_says_where_reading_stopped(small_engine, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "in.jsonl", prompts(40)).read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    out = tmp_path / "out.jsonl"
    sigint_after(monkeypatch, 3)
    summary = run(small_engine, "-", out)
    assert summary.left is None and summary.interrupted == signal.SIGINT
    assert summary.abandoned + (40 - summary.last_line) == 40 - len(read_output(out))  # what the message says is left
    said = f"left to do: {summary.abandoned} requests in flight and the input after line {summary.last_line}\n"
    assert said in stop_message(summary, str(out), "loracli run ...")
