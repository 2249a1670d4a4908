"""The import rule of docs/ARCHITECTURE.md, enforced.

1. Light modules (plain data types, the input parser, the resume planner, the policies) import no
   torch, transformers or Ray, checked in a fresh interpreter.
2. Layers import downwards only: the CLI is imported by nobody (but `python -m loracli`); the
   engine, model and kernels do not import the job, the CLI, the bench or the cluster; checked on
   the source (AST).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIGHT = [
    "loracli.config",
    "loracli.errors",
    "loracli.sampling",
    "loracli.structured_spec",
    "loracli.output_fields",
    "loracli.logprob_shapes",
    "loracli.requests",
    "loracli.results",
    "loracli.engine_api",
    "loracli.outputs",
    "loracli.resume",
    "loracli.input_sources",
    "loracli.adapter_sources",
    "loracli.data_urls",
    "loracli.url_fs",
    "loracli.atomic_files",
    "loracli.destinations",
    "loracli.parquet_results",
    "loracli.job",
    "loracli.output_lock",
    "loracli.run_progress",
    "loracli.signals",
    "loracli.sizes",
    "loracli.devices",
    "loracli.cpu_usage",
    "loracli.thread_probe",
    "loracli.model_source",
    "loracli.cluster.options",
    "loracli.cluster.routing",
    "loracli.engine.scheduler",
    "loracli.engine.block_manager",
    "loracli.engine.slots",
    "loracli.engine.slot_policy",
    "loracli.engine.merge_policy",
    "loracli.cli",
]
HEAVY = ("torch", "transformers", "ray", "triton")


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_nothing_heavy(module):
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "", f"importing {module} imports {out.strip()}"


def imported(path: Path) -> set[str]:
    """Absolute names of the loracli modules `path` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    package = package.replace("kernels", "loracli.kernels", 1) if package.startswith("kernels") else package
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("loracli")}


def sources(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def test_nobody_imports_the_cli():
    offenders = [
        (str(p.relative_to(ROOT)), n)
        for p in sources("loracli", "kernels")
        if p.relative_to(ROOT).parts[1:2] != ("cli",) and p.name != "__main__.py"
        for n in imported(p)
        if n == "loracli.cli" or n.startswith("loracli.cli.")
    ]
    assert offenders == []


@pytest.mark.parametrize("lower", ["loracli/engine", "loracli/model", "kernels"])
def test_lower_layers_do_not_import_upper_ones(lower):
    upper = ("loracli.job", "loracli.cli", "loracli.bench", "loracli.cluster", "loracli.inspect")
    offenders = [
        (str(p.relative_to(ROOT)), n)
        for p in sources(lower)
        for n in imported(p)
        if any(n == u or n.startswith(u + ".") for u in upper)
    ]
    assert offenders == []
