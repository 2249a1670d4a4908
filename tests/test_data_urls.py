"""Prompts and results on URLs and in Parquet (loracli/data_urls.py, destinations.py, parquet_results.py).

Against a real S3 API on localhost (moto's server, tests/s3_server.py): an `s3://` input and output
through a real `python -m loracli run`, killed (SIGKILL) and then force-stopped (two SIGINTs), then
finished on a "second machine" (an empty cache): the object never holds a torn line, the final
object answers every id exactly once, equal to an uninterrupted local run, and the first machine's
stale staging is then refused. Parquet: a round trip
equal to the JSONL run, and a resume after a kill and after a graceful stop (from the Parquet file
itself). An `hf://datasets/...` input from a prepared Hub cache offline. Bad URLs and a missing
extra: one line naming the field.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_main import cli
from runs import by_key, prompts, read_output, run, tiny_engine, write_jsonl
from s3_server import s3  # noqa: F401 - the fixture

from loracli.errors import ConfigError
from loracli.input_sources import check_input
from loracli.parquet_results import record, row
from loracli.url_fs import filesystem

N = 240
MAX_TOKENS = 8
ARGS = ["--dtype", "float32", "--ignore-eos", "--max-num-seqs", "4", "--max-loras", "2", "--max-lora-rank", "16"]


@pytest.fixture(scope="module")
def workload(llama_dir, llama_adapters, tmp_path_factory):
    """(input file, engine, reference records by id from an uninterrupted local JSONL run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("urls")
    inp = write_jsonl(root / "prompts.jsonl", prompts(N))
    engine = tiny_engine(llama_dir, llama_adapters, max_num_seqs=4, max_loras=2)
    run(engine, inp, root / "reference.jsonl", max_tokens=MAX_TOKENS)
    yield inp, engine, by_key(read_output(root / "reference.jsonl"))
    torch.set_num_threads(threads)


def cli_args(llama_dir, llama_adapters) -> list[str]:
    return ["--model", str(llama_dir), "--adapters", str(llama_adapters), "--max-tokens", str(MAX_TOKENS), *ARGS]


def start(inp: str, out: str, args: list[str], cache: Path, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,  # the s3 fixture's AWS_* variables, read now
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "LORACLI_CACHE": str(cache),
    }
    err = log.open("ab")
    return subprocess.Popen([sys.executable, "-m", "loracli", "run", inp, "-o", out, *args], stderr=err, env=env)


def object_bytes(server, bucket: str, key: str) -> bytes | None:
    try:
        return server.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except server.client.exceptions.NoSuchKey:
        return None


def wait_until(proc: subprocess.Popen, ready, what: str, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        assert proc.poll() is None, f"the run ended before {what}: {log.read_text()}"
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {what} in time")


def whole_records(data: bytes) -> dict:
    """The records of an object or file that must hold whole lines only, by id (each once)."""
    assert data.endswith(b"\n"), "torn last line"
    return by_key([json.loads(line) for line in data.decode("utf-8").splitlines()])


def test_s3_input_and_output_survive_a_kill_and_a_forced_stop(s3, workload, llama_dir, llama_adapters, tmp_path):  # noqa: F811
    inp, _, reference = workload
    bucket = s3.bucket("data")
    url_in = s3.put(bucket, "in/prompts.jsonl", Path(inp).read_bytes())
    url_out = f"s3://{bucket}/runs/out.jsonl"
    args = [*cli_args(llama_dir, llama_adapters), "--checkpoint-seconds", "0.2"]
    machine_a, log = tmp_path / "cache-a", tmp_path / "stderr.txt"

    # 1. kill -9 once the object holds some results: it holds whole lines, the staging file holds more
    proc = start(url_in, url_out, args, machine_a, log)
    wait_until(proc, lambda: (object_bytes(s3, bucket, "runs/out.jsonl") or b"").count(b"\n") >= 10, "checkpoint", log)
    proc.kill()
    proc.wait()
    first = whole_records(object_bytes(s3, bucket, "runs/out.jsonl"))
    assert 10 <= len(first) < N
    assert object_bytes(s3, bucket, "runs/out.jsonl.loracli.json") is not None  # the sidecar goes first

    # 2. same machine: resumes from its staging file; a double SIGINT stops at once, then the last upload
    proc = start(url_in, url_out, args, machine_a, log)
    wait_until(
        proc,
        lambda: (object_bytes(s3, bucket, "runs/out.jsonl") or b"").count(b"\n") >= len(first) + 3,
        "progress",
        log,
    )
    proc.send_signal(signal.SIGINT)
    wait_until(proc, lambda: "SIGINT received" in log.read_text(), "the first signal's notice", log)
    proc.send_signal(signal.SIGINT)  # stops at once, or finds the requests in flight finished: exit 130 either way
    assert proc.wait(timeout=60) == 130, log.read_text()
    assert "Traceback" not in log.read_text()
    second = whole_records(object_bytes(s3, bucket, "runs/out.jsonl"))
    assert set(first) <= set(second) and len(second) < N

    # 3. another machine (empty cache): downloads the object and its sidecar, answers the rest
    proc = start(url_in, url_out, args, tmp_path / "cache-b", log)
    assert proc.wait(timeout=300) == 0, log.read_text()
    final = whole_records(object_bytes(s3, bucket, "runs/out.jsonl"))
    assert final == reference
    assert f"{len(second)} done by earlier runs" in log.read_text()
    assert not list((tmp_path / "cache-b" / "outputs").glob("*out.jsonl")), "staging kept after a complete run"

    # 4. back on the first machine, whose staging is older than the object: refused before any model loads
    proc = start(url_in, url_out, args, machine_a, log)
    assert proc.wait(timeout=120) == 2
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith(f"error: --output {url_out} changed since this machine last uploaded or read it"), last
    assert whole_records(object_bytes(s3, bucket, "runs/out.jsonl")) == reference


def test_parquet_output_round_trip_and_on_s3(s3, workload, tmp_path, monkeypatch):  # noqa: F811
    import pyarrow.parquet as pq

    inp, engine, reference = workload
    out = tmp_path / "results.parquet"
    run(engine, inp, out, max_tokens=MAX_TOKENS, checkpoint_seconds=0.05)
    table = pq.read_table(out)
    assert table.num_rows == N and table.column_names[:4] == ["id", "custom_id", "id_type", "form"]
    assert by_key([record(r) for r in table.to_pylist()]) == {k: record(row(v)) for k, v in reference.items()}
    assert json.loads(table.column("usage")[0].as_py())["completion_tokens"] == MAX_TOKENS
    assert not (tmp_path / "results.parquet.loracli.jsonl").exists()  # the journal goes after a complete run
    again = run(engine, inp, out, max_tokens=MAX_TOKENS)  # resumes from the Parquet file: nothing left
    assert (again.resumed, again.requests) == (N, 0) and pq.read_table(out).equals(table)

    bucket = s3.bucket("results")
    url = f"s3://{bucket}/r/results.parquet"
    monkeypatch.setenv("LORACLI_CACHE", str(tmp_path / "cache"))
    run(engine, inp, url, max_tokens=MAX_TOKENS)
    fs, path = filesystem(url, "output_path")
    with fs.open(path, "rb") as f:
        assert pq.read_table(f).equals(table)

    # a table input on S3 (streamed by `datasets` through fsspec); a foreign object refused, then overwritten
    import pyarrow as pa

    rows = pa.Table.from_pylist([json.loads(line) for line in Path(inp).read_text().splitlines()])
    pq.write_table(rows, tmp_path / "prompts.parquet")
    url_in = s3.put(bucket, "in/prompts.parquet", (tmp_path / "prompts.parquet").read_bytes())
    url_out = s3.put(bucket, "r/out.jsonl", b'{"not": "ours"}\n')
    with pytest.raises(ConfigError, match=rf"^{url_out} already exists and has no out.jsonl.loracli.json saying"):
        run(engine, url_in, url_out, max_tokens=MAX_TOKENS)
    run(engine, url_in, url_out, max_tokens=MAX_TOKENS, overwrite=True)
    got = object_bytes(s3, bucket, "r/out.jsonl")
    assert whole_records(got) == reference


def test_parquet_resume_after_a_kill_and_after_a_stop(workload, llama_dir, llama_adapters, tmp_path):
    import pyarrow.parquet as pq

    inp, engine, reference = workload
    out, journal, log = tmp_path / "results.parquet", tmp_path / "results.parquet.loracli.jsonl", tmp_path / "err"
    args = [*cli_args(llama_dir, llama_adapters), "--checkpoint-seconds", "0.2"]

    proc = start(str(inp), str(out), args, tmp_path / "cache", log)
    wait_until(proc, lambda: out.exists() and pq.read_metadata(out).num_rows >= 10, "a published Parquet file", log)
    proc.kill()
    proc.wait()
    published = pq.read_table(out).num_rows
    journaled = journal.read_bytes().count(b"\n")
    assert journaled >= published  # the journal holds at least what was published

    proc = start(str(inp), str(out), args, tmp_path / "cache", log)
    # progress of this run (the journal may already hold more than was published: waiting for
    # `published + 10` could signal the run before it has its handlers)
    wait_until(proc, lambda: journal.read_bytes().count(b"\n") >= journaled + 10, "progress", log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, log.read_text()
    stopped = pq.read_table(out)
    assert stopped.num_rows == journal.read_bytes().count(b"\n") < N  # the stop published every finished result
    journal.unlink()  # resume from the Parquet file alone

    summary = run(engine, inp, out, max_tokens=MAX_TOKENS)
    assert summary.resumed == stopped.num_rows and summary.requests == N - stopped.num_rows
    final = by_key([record(r) for r in pq.read_table(out).to_pylist()])
    assert final == {k: record(row(v)) for k, v in reference.items()}


def make_hub_cache(root: Path, repo: str, filename: str, data: bytes) -> Path:
    """The Hub cache's layout for one file of a dataset repo at `main` (what `hf download` leaves)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"datasets--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    target = repo_dir / "snapshots" / commit / filename
    target.parent.mkdir(parents=True)
    target.write_bytes(data)
    return root


def test_hf_dataset_input_from_the_hub_cache_offline(workload, tmp_path, monkeypatch):
    from huggingface_hub import constants

    inp, engine, reference = workload
    cache = make_hub_cache(tmp_path / "hub", "org/prompts", "data/train.jsonl", Path(inp).read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out.jsonl"
    run(engine, "hf://datasets/org/prompts/data/train.jsonl", out, max_tokens=MAX_TOKENS)
    assert by_key(read_output(out)) == reference
    with pytest.raises(ConfigError, match=r"^input_path hf://datasets/org/prompts/other.jsonl: not in the Hub cache"):
        check_input("hf://datasets/org/prompts/other.jsonl")


def test_hf_input_online_goes_to_the_hub_filesystem(monkeypatch):
    """No network here: the Hub endpoint is a closed local port, so the filesystem's failure is one line."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    fs, path = filesystem("hf://datasets/org/prompts/data/train.jsonl", "input_path")
    assert type(fs).__name__ == "HfFileSystem" and path == "datasets/org/prompts/data/train.jsonl"
    with pytest.raises(ConfigError) as e:
        check_input("hf://datasets/org/prompts/data/train.jsonl")
    assert str(e.value).startswith("input_path hf://datasets/org/prompts/data/train.jsonl: ")
    assert "\n" not in str(e.value)


def test_bad_urls_and_a_missing_extra_are_one_line(s3, monkeypatch, capsys, llama_dir, tmp_path):  # noqa: F811
    import fsspec  # noqa: F401 - loads fsspec.registry

    registry = sys.modules["fsspec.registry"]._registry  # `fsspec.registry` is a read-only view of it
    s3.bucket("data")
    model = ["--model", str(llama_dir)]
    code, _, err = cli(monkeypatch, capsys, "run", "s3://data/missing.jsonl", "-o", str(tmp_path / "o.jsonl"), *model)
    assert code == 2 and err.strip() == "error: INPUT s3://data/missing.jsonl: not found"
    code, _, err = cli(monkeypatch, capsys, "run", "nosuch://x/in.jsonl", *model)
    assert code == 2 and err.strip() == "error: INPUT nosuch://x/in.jsonl: no filesystem for nosuch:// URLs"
    url = s3.put("data", "in.jsonl", b'{"prompt": "hi"}\n')
    code, _, err = cli(monkeypatch, capsys, "run", url, "--errors", "s3://data/errors.jsonl", *model)
    assert code == 2 and err.strip().startswith("error: --errors s3://data/errors.jsonl: must be a local file")
    code, _, err = cli(monkeypatch, capsys, "run", url, "-o", url, *model)
    assert code == 2 and err.strip() == f"error: --output {url} is the input itself"

    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if the extra were not installed
    monkeypatch.delitem(registry, "s3", raising=False)
    code, _, err = cli(monkeypatch, capsys, "run", url, *model)
    assert code == 2 and err.strip() == f"error: INPUT {url}: s3:// URLs need s3fs: pip install 'loracli[s3]'"


@pytest.mark.parametrize("url", ["s3://AKIA:s3cr3t@data/in.jsonl", "s3://data/in.jsonl?X-Amz-Signature=s3cr3t"])
def test_a_data_url_carrying_credentials_is_refused_without_showing_them(url):
    from loracli.errors import ConfigError
    from loracli.input_sources import check_input

    with pytest.raises(ConfigError) as info:
        check_input(url)
    assert "credential" in str(info.value) and "s3cr3t" not in str(info.value), info.value
    assert info.value.fields == ("input_path",)
