"""One writer per output (`loracli/output_lock.py`) and where an output's own files live: a second
job on the same output or errors file is refused at once, naming the holder's PID; a killed job's
lock is taken over; the lock goes with the job however it ends; outputs that are not regular
files run without sidecar, lock or resume; an unwritable folder sends sidecar and lock to the cache.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from rich.console import Console
from runs import by_key, prompts, read_output, run, tiny_engine, write_jsonl
from test_layers import test_light_modules_import_nothing_heavy as import_is_light
from test_signals import ENV, check_intact, start, wait_for_lines

from loracli import output_lock
from loracli.errors import ConfigError
from loracli.output_lock import LOCK_SUFFIX, OutputLock, writable_folder
from loracli.outputs import DiskFullError, ResultWriter
from loracli.resume import sidecar_path

HOLD = (
    "import sys, time\n"
    "from loracli.output_lock import OutputLock\n"
    "OutputLock(sys.argv[1], 'output_path').__enter__()\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.fixture(scope="module")
def engine(llama_dir, llama_adapters):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_engine(llama_dir, llama_adapters)
    torch.set_num_threads(threads)


def quiet_run(engine, inp, out, **options):
    """`run` with stderr captured: (summary, what it said)."""
    err = io.StringIO()
    summary = run(engine, inp, out, console=Console(file=err, width=400), **options)
    return summary, err.getvalue()


def lock_file(out) -> Path:
    return Path(str(Path(out).resolve()) + LOCK_SUFFIX)


def holder(path) -> subprocess.Popen:
    """Another process holding `path`'s lock until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True, env={**ENV, "PYTHONPATH": "."}
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("module", ["loracli.output_lock", "loracli.run_progress"])
def test_new_modules_are_light(module):
    import_is_light(module)


def test_a_second_holder_is_refused_naming_the_pid_and_the_field(tmp_path):
    out = str(tmp_path / "out.jsonl")
    with OutputLock(out, "output_path") as first:
        assert json.loads(first.path.read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=f"another loracli job \\(PID {os.getpid()}, started ") as info:
            OutputLock(str(tmp_path / "." / "out.jsonl"), "errors_path").__enter__()  # another spelling, same file
        assert info.value.fields == ("errors_path",) and "\n" not in str(info.value)
    assert not first.path.exists()
    with OutputLock(out, "output_path"):  # released: free again
        pass


def test_a_job_on_an_output_another_process_writes_is_refused_then_takes_over_after_a_kill(engine, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    out, errs = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    other = holder(out)
    try:
        with pytest.raises(ConfigError, match=f"out.jsonl is being written by another loracli job \\(PID {other.pid},"):
            run(engine, inp, out)
        assert not out.exists()  # refused before anything was written
        other.send_signal(signal.SIGKILL)  # the kernel drops its lock; its lock file stays behind
        other.wait(timeout=30)
    finally:
        other.kill()
    assert lock_file(out).exists()
    summary = run(engine, inp, out)  # the stale lock file is taken over
    assert summary.requests == 4 and len(read_output(out)) == 4 and not lock_file(out).exists()

    other = holder(errs)
    try:
        with pytest.raises(ConfigError, match=f"PID {other.pid}") as info:
            run(engine, inp, tmp_path / "other.jsonl", errors_path=str(errs))
        assert info.value.fields == ("errors_path",)
    finally:
        other.kill()
        other.wait(timeout=30)


def test_two_cli_runs_at_once_the_second_refuses_and_the_first_finishes_clean(engine, llama_dir, tmp_path):
    # far more than the first run can finish before the second one starts (it is stopped anyway)
    rows = [{"id": f"q{i}", "prompt": f"tell me a story number {i}"} for i in range(3000)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = ["--model", str(llama_dir), "--dtype", "float32", "--ignore-eos", "--max-tokens", "8", "--max-num-seqs", "4"]
    first = start(inp, out, args, tmp_path)
    try:
        wait_for_lines(first, out, 5)
        with pytest.raises(ConfigError, match=f"PID {first.pid},"):
            run(engine, inp, out, max_tokens=8)
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=60) == 130
    finally:
        first.kill()
    check_intact(out)  # every line whole, no id twice
    assert not lock_file(out).exists()


def test_a_full_disk_writing_the_lock_is_one_line_naming_it(tmp_path, monkeypatch):
    out = str(tmp_path / "out.jsonl")

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(output_lock, "write_all", full)
    with pytest.raises(DiskFullError, match="free space, then rerun the same command") as info:
        OutputLock(out, "output_path").__enter__()
    assert str(info.value).startswith(f"cannot write {lock_file(out)}: No space left on device;")
    monkeypatch.undo()
    with OutputLock(out, "output_path"):  # nothing was left locked
        pass


def test_the_lock_is_released_when_the_job_fails_or_is_stopped(engine, tmp_path, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(12))
    out = tmp_path / "out.jsonl"
    real_run = engine.model_runner.run
    monkeypatch.setattr(engine.model_runner, "run", lambda *step: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run(engine, inp, out)
    assert not lock_file(out).exists()
    monkeypatch.setattr(engine.model_runner, "run", real_run)
    real_write = ResultWriter.write

    def interrupting(self, result):
        real_write(self, result)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ResultWriter, "write", interrupting)
    summary = run(engine, inp, out)
    assert summary.interrupted == signal.SIGINT and not lock_file(out).exists()
    with OutputLock(str(out), "output_path"):
        pass


def test_outputs_that_are_not_regular_files_get_no_sidecar_lock_or_resume(engine, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    null_sidecar = Path("/dev/null" + ".loracli.json")
    before = null_sidecar.stat().st_mtime_ns if null_sidecar.exists() else None
    summary, said = quiet_run(engine, inp, "/dev/null")
    assert summary.mode == "stream" and summary.requests == 5
    assert (null_sidecar.stat().st_mtime_ns if null_sidecar.exists() else None) == before
    assert not Path("/dev/null" + LOCK_SUFFIX).exists()
    assert said.count("resume is off") == 1 and "/dev/null is not a regular file" in said

    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    received, finished = [], threading.Event()

    def drain():
        while not finished.is_set():
            with open(fifo, "rb") as f:
                received.append(f.read())

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    summary, said = quiet_run(engine, inp, fifo)
    finished.set()
    try:  # wakes the reader if it waits in open() for a writer; ENXIO: it has already left
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass
    reader.join(timeout=30)
    assert summary.mode == "stream" and said.count("resume is off") == 1
    assert sorted(json.loads(x)["id"] for x in b"".join(received).splitlines()) == [f"r{i}" for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.fifo"]  # no sidecar, no lock

    _, said = quiet_run(engine, inp, "-")
    assert said.count("resume is off") == 1 and "stdout" in said


def test_writable_folder_is_tried_not_guessed(tmp_path):
    assert writable_folder(tmp_path) and writable_folder(tmp_path / "new" / "sub")
    assert not writable_folder(Path("/proc"))  # not even root can create a file there


def test_an_unwritable_folder_keeps_sidecar_and_lock_in_the_cache(engine, tmp_path, monkeypatch):
    cache, folder = tmp_path / "cache", tmp_path / "readonly"
    monkeypatch.setenv("LORACLI_CACHE", str(cache))
    monkeypatch.setattr(output_lock, "writable_folder", lambda path: Path(path) != folder)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    out = folder / "out.jsonl"
    first, said = quiet_run(engine, inp, out)
    assert first.requests == 6
    sidecars = cache / "sidecars"
    assert f"cannot write beside {out}: its sidecar and lock are kept in {sidecars}" in said
    assert sorted(p.name for p in folder.iterdir()) == ["out.jsonl"]
    [kept] = sidecars.iterdir()  # the sidecar; the lock went with the job
    assert kept == sidecar_path(str(out)) and kept.name.startswith("out.jsonl-")
    out.write_bytes(b"".join(out.read_bytes().splitlines(keepends=True)[:2]))
    again, _ = quiet_run(engine, inp, out)  # found again: resumed
    assert (again.mode, again.resumed, again.requests) == ("resume", 2, 4) and len(by_key(read_output(out))) == 6
    with pytest.raises(ConfigError, match="max_tokens was 4 then, 3 now"):
        run(engine, inp, out, max_tokens=3)
