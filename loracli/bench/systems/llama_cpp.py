"""`llama-cpp`: llama.cpp's `llama-server` with per-request LoRA, when a `llama-server` binary is at hand.

Contract: `llama_cpp_missing(settings, model_folder, has_adapters)` says why the system cannot run
here (None when it can); the harness then skips it with that note instead of starting a worker:
no `llama-server` on PATH nor named by `llama-cpp:server=PATH`; adapters in the workload but no
llama.cpp `convert_lora_to_gguf.py` named by `llama-cpp:convert=PATH`; or no GGUF for the base
model. The base model's GGUF is, in order: `llama-cpp:model=PATH`; the job's model folder
converted by llama.cpp's `convert_hf_to_gguf.py` named by `llama-cpp:convert-model=PATH` (output
type the job's dtype: f32, bf16 or f16); or, for the default model, its own GGUF (Q4_1: llama.cpp
then runs quantized weights, which `counters["model_gguf"]` records). Each adapter is converted with
`convert_lora_to_gguf.py --base <model folder> --outtype <dtype>` into a temporary folder.

`LlamaCppSystem(job, spec)` starts one server (`server_command`): the model, every adapter with
`--lora` and `--lora-init-without-apply` (scale 0 until a request sets it), `--parallel` slots
(setting `parallel`, default `DEFAULT_PARALLEL`, at most the number of requests), a context of
slots x the longest request (prompt + max_tokens), the job's thread count, on a free port of
127.0.0.1; and waits for `GET /health`. `run` posts every request to `POST /completion`
(`completion_body`: the bench's prompt token ids, `n_predict` = max_tokens, greedy, the job's
ignore-eos, `return_tokens`, and `lora` = [{id, scale 1.0}] naming the request's adapter; a
base-model request sets every adapter's scale to 0) from `parallel` threads at once, and turns each
response into a `Record` (`parse_completion`: the generated token ids; no `ttft`, since responses
are not streamed; `latency` when the response arrived). llama.cpp never batches requests of
different LoRA configurations together (its documentation says so). Its outputs are another
engine's, so, as for `vllm`, the bench's validity checks look at their count and lengths, not at
token equality with loracli. `close` stops the server and removes the converted files.

This module was written from llama.cpp's server documentation (tools/server/README.md) and has
never run against a real server here: no llama.cpp binary was available.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..protocol import Job, Record
from ..system_names import SystemSpec, setting_name
from .interface import System, Timed

SERVER_BINARY = "llama-server"
DEFAULT_PARALLEL = 64  # the llama.cpp measurement used 64 slots
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
START_SECONDS = 600.0  # model load and warm-up of the server
REQUEST_SECONDS = 3600.0


def _setting(settings: dict, name: str) -> str:
    return f"llama-cpp:{setting_name(name)}={settings[name]}"


def server_binary(settings: dict) -> str | None:
    """The `llama-server` to run: the `server` setting, else the one on PATH (None when neither)."""
    return settings.get("server") or shutil.which(SERVER_BINARY)


def _not_a_file(settings: dict, name: str) -> str | None:
    path = settings.get(name)
    if path is not None and not Path(path).is_file():
        return f"{_setting(settings, name)} is not a file: skipped"
    return None


def default_model_gguf(model_folder: str) -> Path | None:
    """The default model's own GGUF when `model_folder` is its cached folder, else None."""
    from ...model_source import cache_root
    from ...model_source.default_model import default_gguf_for

    return default_gguf_for(model_folder, cache_root())


def llama_cpp_missing(settings: dict, model_folder: str, has_adapters: bool) -> str | None:
    """Why the llama-cpp system cannot run here (see the module docstring), or None."""
    binary = server_binary(settings)
    if binary is None:
        return f"no {SERVER_BINARY} binary on PATH (or named by llama-cpp:server=PATH): skipped"
    if not (Path(binary).is_file() and os.access(binary, os.X_OK)):
        return f"{_setting(settings, 'server')} is not an executable file: skipped"
    for name in ("convert", "convert_model", "model"):
        problem = _not_a_file(settings, name)
        if problem:
            return problem
    if has_adapters and "convert" not in settings:
        return "the adapters need llama.cpp's convert_lora_to_gguf.py, named by llama-cpp:convert=PATH: skipped"
    if "model" not in settings and "convert_model" not in settings and default_model_gguf(model_folder) is None:
        return (
            f"no GGUF for the model {model_folder}: name one with llama-cpp:model=PATH, or llama.cpp's "
            "convert_hf_to_gguf.py with llama-cpp:convert-model=PATH: skipped"
        )
    return None


def server_command(
    binary: str, model: Path, adapters: list[Path], parallel: int, ctx_size: int, threads: int, port: int
) -> list[str]:
    """The `llama-server` command line (see the module docstring)."""
    cmd = [binary, "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--parallel", str(parallel), "--ctx-size", str(ctx_size), "--threads", str(threads)]
    cmd += ["--threads-batch", str(threads)]
    for path in adapters:
        cmd += ["--lora", str(path)]
    if adapters:
        cmd.append("--lora-init-without-apply")
    return cmd


def context_per_slot(requests: list[dict]) -> int:
    """Positions one slot needs for the longest request: its prompt ids plus max_tokens."""
    return max((len(r["ids"]) + r["max_tokens"] for r in requests), default=1)


def completion_body(request: dict, lora_ids: dict[str, int], ignore_eos: bool) -> dict:
    """The `POST /completion` body of one bench request (token ids in, token ids out, greedy)."""
    body: dict = {
        "prompt": list(request["ids"]),
        "n_predict": request["max_tokens"],
        "temperature": 0.0,
        "ignore_eos": ignore_eos,
        "return_tokens": True,
        "stream": False,
    }
    if lora_ids:
        adapter = request["adapter"]
        if adapter is None:
            body["lora"] = [{"id": i, "scale": 0.0} for i in sorted(lora_ids.values())]
        else:
            body["lora"] = [{"id": lora_ids[adapter], "scale": 1.0}]
    return body


def parse_completion(request_id: str, response: dict, latency: float) -> Record:
    """One `/completion` response -> a `Record` of its generated token ids (an error record when the
    response carries an error or no token ids)."""
    if "error" in response:
        error = response["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        return Record(request_id, [], None, latency, error=f"llama-server: {message}")
    tokens = response.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        return Record(request_id, [], None, latency, error="llama-server returned no token ids (`tokens`)")
    return Record(request_id, tokens, None, latency)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_SECONDS) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:  # the server's error body says why
        try:
            return json.loads(e.read())
        except ValueError:
            return {"error": f"HTTP {e.code}"}


def _run_tool(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")


class LlamaCppSystem(System):
    def __init__(self, job: Job, spec: SystemSpec):
        self.job = job
        self.settings = dict(spec.settings)
        self.tmp = Path(tempfile.mkdtemp(prefix="loracli-llama-cpp-"))
        self.process: subprocess.Popen | None = None
        self.log = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        job = self.job
        names = job.adapters()
        self.lora_ids = {name: i for i, name in enumerate(names)}
        outtype = GGUF_TYPES.get(job.dtype, "f32")
        model = self._model_gguf(outtype)
        adapters = [self._adapter_gguf(name, outtype) for name in names]
        self.parallel = min(int(self.settings.get("parallel", DEFAULT_PARALLEL)), max(1, len(job.requests)))
        ctx = self.parallel * context_per_slot(job.requests)
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        binary = server_binary(self.settings)
        if binary is None:
            raise RuntimeError(f"no {SERVER_BINARY} binary")
        cmd = server_command(binary, model, adapters, self.parallel, ctx, job.threads, port)
        self.log = (self.tmp / "server.log").open("w")
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _model_gguf(self, outtype: str) -> Path:
        if "model" in self.settings:
            self.model_gguf = Path(str(self.settings["model"]))
        elif "convert_model" in self.settings:
            self.model_gguf = self.tmp / f"model-{outtype}.gguf"
            argv = [sys.executable, str(self.settings["convert_model"]), self.job.model]
            _run_tool([*argv, "--outtype", outtype, "--outfile", str(self.model_gguf)], "convert_hf_to_gguf.py")
        else:
            found = default_model_gguf(self.job.model)
            if found is None:
                raise RuntimeError(f"no GGUF for the model {self.job.model}")
            self.model_gguf = found
        return self.model_gguf

    def _adapter_gguf(self, name: str, outtype: str) -> Path:
        out = self.tmp / f"{name}.gguf"
        folder = str(Path(self.job.adapters_dir or ".") / name)
        argv = [sys.executable, str(self.settings["convert"]), "--base", self.job.model, "--outtype", outtype]
        _run_tool([*argv, "--outfile", str(out), folder], f"convert_lora_to_gguf.py on {name}")
        return out

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                tail = (self.tmp / "server.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"{SERVER_BINARY} exited ({self.process.returncode}): {' | '.join(tail)}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{SERVER_BINARY} was not ready after {START_SECONDS:.0f} s")

    def run(self, requests: list[dict]) -> Timed:
        t0 = time.perf_counter()

        def one(r: dict) -> Record:
            response = _post(f"{self.url}/completion", completion_body(r, self.lora_ids, self.job.ignore_eos))
            return parse_completion(r["id"], response, time.perf_counter() - t0)

        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            records = list(pool.map(one, requests))
        return Timed(records, time.perf_counter() - t0, {"model_gguf": self.model_gguf.name})

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log is not None:
            self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
