"""The shipped demo adapters (examples/adapters/) do what their model cards say, through the real CLI.

Contract checked here:
- each adapter folder is a valid PEFT LoRA adapter (adapter_config.json + bf16 safetensors + README),
  the four differ in rank/targets and one uses rsLoRA, and all together stay small;
- examples/heldout.jsonl asks only questions absent from the recipe's training instructions;
- `loracli run examples/heldout.jsonl --adapters examples/adapters --max-tokens 64` answers every
  request, and on held-out questions >= 90% of each adapter's answers pass its check from
  recipes/demo_checks.py while <= 20% of the base model's answers pass any of those checks.

The CLI run needs the embedded SmolLM2 model, so it is marked `model`; the file checks are fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "examples" / "adapters"
HELDOUT = ROOT / "examples" / "heldout.jsonl"
NAMES = ("shout", "json", "brief", "list")
ADAPTER_MIN_PASS = 0.9
BASE_MAX_PASS = 0.2
MAX_TOTAL_BYTES = 12 * 1024 * 1024
CLI_TIMEOUT_S = 3600


def _load_recipe_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


demo_checks = _load_recipe_module("demo_checks")
demo_data = _load_recipe_module("demo_data")


def _heldout_requests() -> list[dict]:
    return [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]


def _adapter_config(name: str) -> dict:
    return json.loads((ADAPTERS / name / "adapter_config.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_adapter_folder_is_a_bf16_peft_lora(name: str) -> None:
    from peft import LoraConfig

    folder = ADAPTERS / name
    config = LoraConfig.from_pretrained(str(folder))
    assert config.peft_type.value == "LORA"
    assert 8 <= config.r <= 16
    assert (folder / "README.md").read_text().startswith(f"# `{name}`")
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
        assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
        assert {str(weights.get_tensor(k).dtype) for k in keys} == {"torch.bfloat16"}


def test_adapters_differ_and_stay_small() -> None:
    configs = [_adapter_config(n) for n in NAMES]
    shapes = {(c["r"], tuple(sorted(c["target_modules"]))) for c in configs}
    assert len(shapes) == len(NAMES)
    assert any(c["use_rslora"] for c in configs)
    assert len(set().union(*(c["target_modules"] for c in configs))) >= 5
    total = sum(f.stat().st_size for n in NAMES for f in (ADAPTERS / n).iterdir())
    assert total <= MAX_TOTAL_BYTES


def test_heldout_questions_are_not_training_questions() -> None:
    requests = _heldout_requests()
    questions = {r["messages"][-1]["content"] for r in requests}
    assert questions == set(demo_data.heldout_instructions())
    assert not questions & set(demo_data.train_instructions(0))
    assert {r["adapter"] for r in requests} == {*NAMES, None}


def test_checks_accept_styled_answers_and_reject_plain_prose() -> None:
    plain = "Octopuses are clever sea animals. They have eight arms and three hearts. They hide well."
    for name in NAMES:
        styled = demo_data.STYLES[name](plain)
        assert styled and demo_checks.CHECKS[name](styled), name
        assert not demo_checks.CHECKS[name](plain), name


def _cli_command() -> list[str]:
    script = Path(sys.executable).with_name("loracli")
    return [str(script)] if script.exists() else [shutil.which("loracli") or "loracli"]


@pytest.fixture(scope="module")
def heldout_results(tmp_path_factory) -> dict[str, dict]:
    if importlib.util.find_spec("loracli.cli") is None:
        pytest.skip("loracli.cli is not there yet")
    out = tmp_path_factory.mktemp("demo") / "out.jsonl"
    command = _cli_command() + [
        "run",
        str(HELDOUT),
        "--adapters",
        str(ADAPTERS),
        "-o",
        str(out),
        "--max-tokens",
        "64",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return {row["id"]: row for row in rows}


def _answers(results: dict[str, dict], prefix: str) -> list[str]:
    return [row["text"] for rid, row in results.items() if rid.startswith(prefix + "-")]


@pytest.mark.model
def test_cli_answers_every_heldout_request(heldout_results: dict[str, dict]) -> None:
    expected = {r["id"]: r["adapter"] for r in _heldout_requests()}
    assert set(heldout_results) == set(expected)
    errors = {rid: row["error"] for rid, row in heldout_results.items() if "error" in row}
    assert not errors
    assert all(heldout_results[rid]["adapter"] == adapter for rid, adapter in expected.items())


@pytest.mark.model
@pytest.mark.parametrize("name", NAMES)
def test_adapter_has_its_style_on_heldout(heldout_results: dict[str, dict], name: str) -> None:
    answers = _answers(heldout_results, name)
    check = demo_checks.CHECKS[name]
    failures = [a for a in answers if not check(a)]
    assert answers
    assert demo_checks.pass_rate(check, answers) >= ADAPTER_MIN_PASS, failures


@pytest.mark.model
@pytest.mark.parametrize("name", NAMES)
def test_base_model_lacks_the_style(heldout_results: dict[str, dict], name: str) -> None:
    answers = _answers(heldout_results, "base")
    passing = [a for a in answers if demo_checks.CHECKS[name](a)]
    assert answers
    assert demo_checks.pass_rate(demo_checks.CHECKS[name], answers) <= BASE_MAX_PASS, passing
