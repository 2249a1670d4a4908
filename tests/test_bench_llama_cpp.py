"""The `llama-cpp` bench system without llama.cpp: no llama-server binary exists on this machine, so
nothing here has run against a real server.

Tested: the skip reasons; the settings; the server command line; the request bodies; parsing of
responses in the documented shape (`fixtures/llama_cpp_*.json`, hand-written from llama.cpp's
server README, not recorded from a live server); and the system's own lifecycle (convert, start,
wait for health, concurrent requests, stop) against a stand-in server written here, which answers
in that documented shape with made-up tokens. What a real llama-server returns is untested.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from loracli.bench import BenchOptions, run_bench
from loracli.bench.protocol import Measurement
from loracli.bench.report import summarize
from loracli.bench.system_names import ALL_KINDS, parse_system
from loracli.bench.systems.llama_cpp import (
    completion_body,
    context_per_slot,
    llama_cpp_missing,
    parse_completion,
    server_command,
)
from loracli.bench.workload import BenchRequest
from loracli.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"
TINY = dict(prompt_len="4-8", output_len="3", threads=1, warmup=1, roofline_seconds=0.0, dtype="float32")

STAND_IN_SERVER = """#!{python}
# A stand-in for llama-server: /health, then /completion in the documented response shape.
import json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
log = {log!r}
with open(log + ".argv", "w") as f:
    json.dump({{"argv": args, "pid": os.getpid()}}, f)
lock = threading.Lock()
active = [0, 0]  # in flight now, most in flight at once

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {{"status": "ok"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with lock:
            active[0] += 1
            active[1] = max(active)
        time.sleep(0.05)
        n = body["n_predict"]
        tokens = [(body["prompt"][-1] + i) % 50 for i in range(n)]
        with lock:
            active[0] -= 1
            with open(log, "a") as f:
                f.write(json.dumps({{"body": body, "most_in_flight": active[1]}}) + "\\n")
        self._send(200, {{"content": "x" * n, "tokens": tokens, "id_slot": 0, "stop": True,
                          "tokens_predicted": n, "tokens_evaluated": len(body["prompt"]), "stop_type": "limit",
                          "timings": {{"prompt_n": len(body["prompt"]), "predicted_n": n}}}})

ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""

STAND_IN_CONVERTER = """#!{python}
import json, sys
args = sys.argv[1:]
out = args[args.index("--outfile") + 1]
open(out, "w").write("GGUF stand-in")
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
"""


def _script(path: Path, text: str, **fields) -> Path:
    path.write_text(text.format(python=sys.executable, **fields))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _request(rid: str, adapter: str | None, ids: list[int], max_tokens: int) -> dict:
    return {"id": rid, "adapter": adapter, "ids": ids, "max_tokens": max_tokens}


# --- settings and skip reasons --------------------------------------------------------------------------


def test_settings_parse_and_bad_ones_are_config_errors():
    spec = parse_system("llama-cpp:server=/opt/llama-server:convert=/x/convert_lora_to_gguf.py:parallel=8")
    assert spec.kind == "llama-cpp" and "llama-cpp" in ALL_KINDS
    assert dict(spec.settings) == {
        "server": "/opt/llama-server",
        "convert": "/x/convert_lora_to_gguf.py",
        "parallel": 8,
    }
    assert dict(parse_system("llama-cpp:convert-model=/c.py:model=/m.gguf").settings) == {
        "convert_model": "/c.py",
        "model": "/m.gguf",
    }
    for bad, words in (
        ("llama-cpp:parallel=0", "parallel must be an integer >= 1"),
        ("llama-cpp:parallel=x", "parallel must be an integer >= 1"),
        ("llama-cpp:threads=2", "KEY one of server, convert, convert-model, model, parallel"),
        ("llama-cpp:server", "KEY one of"),
        ("llama-cpp:server=", "server needs a path"),
    ):
        with pytest.raises(ConfigError, match=words):
            parse_system(bad)


def test_skip_reasons(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    model = str(tmp_path / "some-model")
    assert "no llama-server binary on PATH (or named by llama-cpp:server=PATH)" in llama_cpp_missing({}, model, False)
    assert "llama-cpp:server=/nope is not an executable file" in llama_cpp_missing({"server": "/nope"}, model, False)
    server = _script(tmp_path / "llama-server", "#!/bin/sh\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # found on PATH from now on
    assert "convert_lora_to_gguf.py, named by llama-cpp:convert=PATH" in llama_cpp_missing({}, model, True)
    assert "llama-cpp:convert=/c.py is not a file" in llama_cpp_missing({"convert": "/c.py"}, model, True)
    no_gguf = llama_cpp_missing({"convert": str(server)}, model, True)
    assert f"no GGUF for the model {model}" in no_gguf and "llama-cpp:convert-model=PATH" in no_gguf
    assert llama_cpp_missing({"convert": str(server), "model": str(server)}, model, True) is None
    assert llama_cpp_missing({"convert_model": str(server)}, model, False) is None


def test_default_model_uses_its_own_gguf(tmp_path, monkeypatch):
    """The default model's cached folder maps back to its GGUF (when the package holding it is installed)."""
    from loracli.model_source.default_model import DEFAULT_CACHE_NAME, default_gguf_for

    monkeypatch.setenv("LORACLI_CACHE", str(tmp_path))
    folder = tmp_path / "models" / DEFAULT_CACHE_NAME
    assert default_gguf_for(tmp_path / "models" / "other", tmp_path) is None
    downloaded = tmp_path / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    downloaded.parent.mkdir()
    downloaded.write_text("gguf")
    found = default_gguf_for(folder, tmp_path)
    assert found is not None and found.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_harness_skips_it_with_the_reason(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    report = run_bench(
        BenchOptions(model=str(llama_dir), adapters="2", prompts="3", systems="llama-cpp", isolate=False, **TINY)
    )
    (result,) = report.points[0].systems
    assert result.status == "skipped" and "no llama-server binary on PATH" in result.note
    assert not report.any_bad


# --- command line, requests, responses ------------------------------------------------------------------


def test_server_command():
    cmd = server_command("/bin/llama-server", Path("/m.gguf"), [Path("/a.gguf"), Path("/b.gguf")], 8, 800, 2, 5001)
    text = " ".join(cmd)
    assert cmd[0] == "/bin/llama-server" and "--model /m.gguf" in text and "--port 5001" in text
    assert "--parallel 8" in text and "--ctx-size 800" in text and "--threads 2" in text
    assert "--lora /a.gguf --lora /b.gguf" in text and cmd[-1] == "--lora-init-without-apply"
    assert "--lora" not in server_command("s", Path("/m.gguf"), [], 1, 100, 1, 1)
    assert context_per_slot([_request("a", None, [1, 2, 3], 5), _request("b", None, [1], 9)]) == 10


def test_request_bodies_name_the_adapter_per_request():
    ids = {"lora000": 0, "lora001": 1}
    body = completion_body(_request("r1", "lora001", [5, 6, 7], 4), ids, ignore_eos=True)
    assert body == {
        "prompt": [5, 6, 7],
        "n_predict": 4,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_tokens": True,
        "stream": False,
        "lora": [{"id": 1, "scale": 1.0}],
    }
    base = completion_body(_request("r2", None, [5], 2), ids, ignore_eos=False)
    assert base["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}] and base["ignore_eos"] is False
    assert "lora" not in completion_body(_request("r3", None, [5], 2), {}, ignore_eos=True)


def test_documented_responses_parse_into_records_the_validity_checks_judge():
    """Fixtures of the documented response format (not a live server): tokens out, errors as errors."""
    ok = json.loads((FIXTURES / "llama_cpp_completion.json").read_text())
    error = json.loads((FIXTURES / "llama_cpp_error.json").read_text())
    record = parse_completion("r1", ok, 1.5)
    assert record.tokens == [260, 3721, 284, 260, 5632] and record.latency == 1.5 and record.error is None
    failed = parse_completion("r2", error, 2.0)
    assert failed.error == "llama-server: the request exceeds the available context size" and failed.tokens == []
    no_tokens = parse_completion("r3", {k: v for k, v in ok.items() if k != "tokens"}, 2.0)
    assert "no token ids" in no_tokens.error
    requests = [BenchRequest("r1", "lora000", 5), BenchRequest("r2", None, 5)]
    assert summarize(Measurement("llama-cpp", [record, failed], wall=2.0), requests, True).status == "invalid"
    fine = summarize(Measurement("llama-cpp", [record, parse_completion("r2", ok, 2.0)], wall=2.0), requests, True)
    assert fine.status == "ok" and fine.tokens_per_s == 5.0  # lengths checked, not token equality with loracli
    short = summarize(
        Measurement("llama-cpp", [record, parse_completion("r2", ok, 2.0)], wall=2.0),
        [BenchRequest("r1", "lora000", 6), BenchRequest("r2", None, 5)],
        True,
    )
    assert short.status == "invalid" and "expected exactly 6" in short.note


# --- the system's lifecycle against a stand-in server ---------------------------------------------------


def test_lifecycle_against_a_stand_in_server(llama_dir, tmp_path):
    """Converts each adapter, starts the server with them, sends every request concurrently with its own
    `lora`, reads the tokens back, and stops the server: all against a stand-in written above."""
    log = tmp_path / "server.jsonl"
    server = _script(tmp_path / "llama-server", STAND_IN_SERVER, log=str(log))
    converter = _script(tmp_path / "convert_lora_to_gguf.py", STAND_IN_CONVERTER, log=str(tmp_path / "conv.jsonl"))
    model = tmp_path / "model.gguf"
    model.write_text("GGUF stand-in")
    system = f"llama-cpp:server={server}:convert={converter}:model={model}:parallel=4"
    report = run_bench(
        BenchOptions(model=str(llama_dir), adapters="2", prompts="8", systems=system, isolate=False, **TINY)
    )
    (result,) = report.points[0].systems
    assert result.status == "ok", result.note
    assert result.output_tokens == 8 * 3 and result.counters == {"model_gguf": "model.gguf"}
    conversions = [json.loads(line) for line in (tmp_path / "conv.jsonl").read_text().splitlines()]
    assert sorted(Path(c[-1]).name for c in conversions) == ["lora000", "lora001"]
    assert all(c[c.index("--base") + 1] == str(llama_dir) and c[c.index("--outtype") + 1] == "f32" for c in conversions)
    started = json.loads(Path(str(log) + ".argv").read_text())
    argv = started["argv"]
    assert argv[argv.index("--model") + 1] == str(model) and argv.count("--lora") == 2
    assert argv[argv.index("--parallel") + 1] == "4"
    with pytest.raises(ProcessLookupError):  # stopped (and reaped) by close()
        os.kill(started["pid"], 0)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    timed = calls[-8:]  # after the warm-up request
    loras = {json.dumps(c["body"]["lora"]) for c in timed}
    assert loras == {'[{"id": 0, "scale": 1.0}]', '[{"id": 1, "scale": 1.0}]'}  # both adapters, one each
    assert max(c["most_in_flight"] for c in calls) > 1  # requests overlap
