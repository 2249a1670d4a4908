"""`loracli run` end to end as a user runs it (subprocess), on a tiny model and, marked
`model`, on the embedded default SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def loracli(*args, cwd=None, input=None):
    return subprocess.run(
        [sys.executable, "-m", "loracli", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        input=input,
        timeout=600,
    )


def write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_run_native_and_openai_forms(tmp_path, llama_dir, llama_adapters):
    rows = [
        {"id": "n1", "adapter": "attn4", "prompt": "hello world", "max_tokens": 5},
        {"adapter": None, "messages": [{"role": "user", "content": "the quick brown fox"}], "max_tokens": 4},
        {
            "custom_id": "o1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "mlp8", "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 3},
        },
        {
            "custom_id": "o2",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "base", "prompt": "numbers one two", "max_tokens": 3},
        },
        {"id": "bad", "adapter": "nope", "prompt": "x"},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    p = loracli(
        "run",
        inp,
        "--model",
        llama_dir,
        "--adapters",
        llama_adapters,
        "-o",
        out,
        "--stats",
        stats,
        "--dtype",
        "float32",
        "--ignore-eos",
    )
    assert p.returncode == 1, p.stderr  # one record failed
    recs = {
        r.get("id") if "custom_id" not in r else r["custom_id"]: r
        for r in map(json.loads, out.read_text().splitlines())
    }
    assert set(recs) == {"n1", "#2", "o1", "o2", "bad"}  # "#2": the id of line 2, which gives none
    assert recs["n1"]["usage"]["completion_tokens"] == 5 and recs["n1"]["finish_reason"] == "length"
    assert recs["n1"]["adapter"] == "attn4" and isinstance(recs["n1"]["text"], str)
    assert recs["#2"]["adapter"] is None and recs["#2"]["usage"]["completion_tokens"] == 4
    body = recs["o1"]["response"]["body"]
    assert recs["o1"]["error"] is None and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] == 3
    assert recs["o2"]["response"]["body"]["object"] == "text_completion"
    assert recs["bad"]["error"]["type"] == "unknown_adapter" and "nope" in recs["bad"]["error"]["message"]
    s = json.loads(stats.read_text())
    assert s["requests"] == 5 and s["failed"] == 1 and s["completion_tokens"] == 15
    assert s["counters"]["per_adapter"] == {"<base>": 2, "attn4": 1, "mlp8": 1}
    assert stdout_is_clean(p.stdout)


def stdout_is_clean(stdout: str) -> bool:
    return stdout.strip() == ""


def test_output_to_stdout(tmp_path, llama_dir, llama_adapters):
    inp = write_jsonl(
        tmp_path / "in.jsonl", [{"id": i, "adapter": "all16rs", "prompt": "hello", "max_tokens": 2} for i in range(3)]
    )
    p = loracli("run", inp, "--model", llama_dir, "--adapters", llama_adapters, "-o", "-")
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert sorted(r["id"] for r in lines) == [0, 1, 2]  # integer ids come back as integers


@pytest.mark.parametrize(
    "args,match",
    [
        (["--max-lora-rank", "320"], "--max-lora-rank must be a power of two"),
        (["--max-loras", "4", "--max-cpu-loras", "2"], "--max-cpu-loras (2) must be >= --max-loras (4)"),
        (["--kv-cache-memory", "lots"], "--kv-cache-memory"),
    ],
)
def test_config_errors_are_one_line(tmp_path, llama_dir, args, match):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    p = loracli("run", inp, "--model", llama_dir, *args)
    assert p.returncode == 2
    assert match in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_broken_adapter_fails_only_its_requests(tmp_path, llama_dir, llama_adapters):
    import shutil

    ads = tmp_path / "ads"
    shutil.copytree(llama_adapters, ads)
    (ads / "mlp8" / "adapter_model.safetensors").write_bytes(b"garbage")
    rows = [
        {"id": f"{a}{i}", "adapter": a, "prompt": "hello", "max_tokens": 2} for i in range(2) for a in ("mlp8", "attn4")
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    p = loracli("run", inp, "--model", llama_dir, "--adapters", ads, "-o", out)
    assert p.returncode == 1
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(recs) == {"mlp80", "mlp81", "attn40", "attn41"}
    for rid in ("mlp80", "mlp81"):
        assert recs[rid]["error"]["type"] == "adapter_error"
        assert "adapter_model.safetensors" in recs[rid]["error"]["message"] or "mlp8" in recs[rid]["error"]["message"]
    assert all("text" in recs[r] for r in ("attn40", "attn41"))


def test_help_is_light_and_grouped():
    """`loracli run --help` imports neither torch nor the engine, and shows the option panels."""
    code = (
        "import sys\n"
        "sys.argv = ['loracli', 'run', '--help']\n"
        "from loracli.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'loracli.engine', 'loracli.job') if m in sys.modules]\n"
        "print('heavy:', heavy, file=sys.stderr)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**ENV, "COLUMNS": "120"}, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert "heavy: []" in p.stderr
    for panel in ("Input and output", "Sampling", "Adapters and slots", "Memory", "Merging", "Scale-out (Ray)"):
        assert panel in p.stdout
    assert "--max-cpu-loras" in p.stdout and "--ship-adapters" in p.stdout


@pytest.mark.model
def test_default_model_end_to_end(tmp_path):
    """The real embedded SmolLM2 (converted once and cached) through `loracli run`."""
    rows = [
        {"id": "q1", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16},
        {"id": "q2", "prompt": "The capital of France is", "max_tokens": 8},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    p = loracli("run", inp, "-o", out, "--dtype", "float32")
    assert p.returncode == 0, p.stderr
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "Paris" in recs["q1"]["text"]
    assert recs["q2"]["usage"]["completion_tokens"] >= 1
