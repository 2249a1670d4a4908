"""The command line's own checks and messages: a usage error is one line with a hint (exit 2),
`--ray`-only options without `--ray`, `--device cuda` without CUDA and `--max-model-len` above the
model's context are one-line configuration errors, and `--json -o -` ends stdout with the summary.
Everything runs in-process through `loracli.cli.main`, the one error handler."""

from __future__ import annotations

import json

import pytest
import torch
from cli_main import cli

from loracli.config import EngineConfig
from loracli.devices import resolve_device
from loracli.errors import ConfigError


def one_error_line(err: str) -> str:
    """The one line of stderr that says what went wrong (progress lines may come before it)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and "╭" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "args,line",
    [
        (
            ["run", "in.jsonl", "--max-lora", "3"],
            "error: no such option: --max-lora (Possible options: --max-cpu-loras, --max-lora-rank, --max-loras); "
            "try loracli run --help",
        ),
        (
            ["run", "in.jsonl", "--max-loras", "many"],
            "error: invalid value for '--max-loras': Input should be a valid integer, unable to parse string as an "
            "integer; try loracli run --help",
        ),
        (["run"], "error: missing argument 'input'; try loracli run --help"),
        (["inspect-adapter", "a", "--bogus"], "error: no such option: --bogus; try loracli inspect-adapter --help"),
        (["inspect-adapter"], "error: missing argument 'path'; try loracli inspect-adapter --help"),
        (
            ["bench", "--warmup", "x"],
            "error: invalid value for '--warmup': Input should be a valid integer, unable "
            "to parse string as an integer; try loracli bench --help",
        ),
        (["bench", "--bogus"], "error: no such option: --bogus; try loracli bench --help"),
        (["nosuch"], "error: no such command 'nosuch'; try loracli --help"),
    ],
)
def test_usage_errors_are_one_line_with_a_hint(monkeypatch, capsys, args, line):
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 2 and out == ""
    assert err.strip() == line


def test_no_arguments_still_shows_the_help(monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys)
    assert code == 2 and err == ""
    assert "Usage: loracli" in out and "inspect-adapter" in out


@pytest.mark.parametrize(
    "args,flags",
    [
        (["--workers", "3"], "--workers applies"),
        (["--worker-cpus", "2"], "--worker-cpus applies"),
        (["--worker-gpus", "0"], "--worker-gpus applies"),
        (["--routing", "affinity"], "--routing applies"),  # the default value, but given: still refused
        (["--ship-adapters"], "--ship-adapters applies"),
        (["--routing", "round-robin", "--workers", "4"], "--workers, --routing apply"),
    ],
)
def test_ray_only_options_without_ray(monkeypatch, capsys, tmp_path, args, flags):
    code, out, err = cli(monkeypatch, capsys, "run", tmp_path / "in.jsonl", *args)
    assert code == 2 and out == ""
    it = "them" if flags.endswith(" apply") else "it"
    assert one_error_line(err) == f"error: {flags} only to a run with --ray; add --ray, or drop {it}"


def test_ray_only_options_with_ray_reach_the_cluster_options(monkeypatch, capsys, tmp_path):
    import loracli.job

    seen = {}

    def stop_here(input_path, output_path, config, defaults, *, console, options):
        seen["cluster"] = options.cluster
        raise ConfigError("stopped before the run")

    monkeypatch.setattr(loracli.job, "run_job", stop_here)
    args = ["--ray", "--workers", "3", "--routing", "round-robin", "--worker-cpus", "2", "--ship-adapters"]
    code, _, err = cli(monkeypatch, capsys, "run", tmp_path / "in.jsonl", *args)
    assert code == 2 and one_error_line(err) == "error: stopped before the run"
    c = seen["cluster"]
    assert (c.address, c.workers, c.routing, c.worker_cpus, c.ship_adapters) == (None, 3, "round-robin", 2.0, True)


# --- device and context length ----------------------------------------------------------------


def test_cuda_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"device '{name}' needs CUDA, and ") as e:
            resolve_device(name)
        assert e.value.fields == ("device",) and "\n" not in str(e.value)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")


def write_input(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "hello"}) + "\n" + json.dumps({"id": "b", "prompt": "x"}) + "\n")
    return path


def test_cli_device_cuda_without_cuda(monkeypatch, capsys, tmp_path, llama_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = cli(monkeypatch, capsys, "run", write_input(tmp_path), "--model", llama_dir, "--device", "cuda")
    assert code == 2
    assert one_error_line(err).startswith("error: --device 'cuda' needs CUDA, and ")


def test_max_model_len_above_the_context_is_refused(monkeypatch, capsys, tmp_path, llama_dir):
    from loracli.engine.engine import Engine

    with pytest.raises(ConfigError, match="max_model_len 257 is above the model's context length 256") as e:
        Engine(EngineConfig(model=str(llama_dir), device="cpu", max_model_len=257))
    assert e.value.fields == ("max_model_len",)
    code, _, err = cli(monkeypatch, capsys, "run", write_input(tmp_path), "--model", llama_dir, "--max-model-len", 999)
    assert code == 2
    assert one_error_line(err) == "error: --max-model-len 999 is above the model's context length 256"


# --- --json with -o - ----------------------------------------------------------------------------


def test_json_summary_is_the_last_line_of_stdout(monkeypatch, capsys, tmp_path, llama_dir):
    args = ["--model", llama_dir, "--dtype", "float32", "--max-tokens", "2", "--ignore-eos", "--json", "-o", "-"]
    code, out, _ = cli(monkeypatch, capsys, "run", write_input(tmp_path), *args)
    assert code == 0
    *results, summary = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["id"] for r in results) == ["a", "b"]
    assert summary["requests"] == 2 and summary["succeeded"] == 2 and summary["mode"] == "stdout"
