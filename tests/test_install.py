"""What `pip install loracli` brings (pyproject.toml) and that it is enough to run.

Contract checked here:
- the runtime dependencies leave Triton (~1 GB) out: it is the `gpu` extra's only package; they
  hold what the default model needs (accelerate: transformers reads GGUF files only with it);
- the `test` extra brings every other extra (so CI tests Triton's kernels in its interpreter,
  Ray and the PEFT baselines);
- without Triton, LoRA ops on CUDA tensors take the torch path, with one warning (CPU tensors
  always do: `test_kernels.test_package_imports_without_triton`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]


def requirement(spec: str) -> tuple[str, set[str]]:
    """("name", {extras}) of a requirement string such as "loracli[gpu,ray]>=1; python_version > '3'"."""
    match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", spec)
    extras = {e.strip() for e in (match.group(2) or "").split(",") if e.strip()}
    return match.group(1).lower(), extras


def names(specs: list[str]) -> set[str]:
    return {requirement(s)[0] for s in specs}


def test_runtime_leaves_triton_to_the_gpu_extra():
    assert "triton" not in names(PROJECT["dependencies"])
    assert names(EXTRAS["gpu"]) == {"triton"}


def test_runtime_reads_the_default_model():
    """transformers reads the default model's GGUF file only with accelerate installed."""
    assert {"torch", "transformers", "gguf", "accelerate", "typer"} <= names(PROJECT["dependencies"])


def test_test_extra_brings_every_other_extra():
    own = [extras for name, extras in map(requirement, EXTRAS["test"]) if name == "loracli"]
    assert own and set(EXTRAS) - {"test"} <= own[0]
    assert {"pytest", "ruff", "mypy"} <= names(EXTRAS["test"])


def test_cuda_tensors_take_the_torch_path_without_triton(monkeypatch, tmp_path):
    cuda = SimpleNamespace(is_cuda=True)  # `backend_for` looks at nothing else
    monkeypatch.delenv("LORACLI_LORA_BACKEND", raising=False)
    from loracli.kernels import backend_for

    assert backend_for(cuda) == "triton"  # the test extra installs it
    code = (
        "import sys, types; sys.modules['triton'] = None\n"
        "from loracli.kernels import backend_for\n"
        "cuda = types.SimpleNamespace(is_cuda=True)\n"
        "print(backend_for(cuda), backend_for(cuda))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LORACLI_LORA_BACKEND"}
    run = [sys.executable, "-c", code]  # not run from the repo, whose loracli/ folder lacks the kernels
    proc = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["torch", "torch"]
    assert proc.stderr.count("Triton is not installed") == 1 and "loracli[gpu]" in proc.stderr
