"""`loracli/cli/flags.py`: the table from configuration fields to flags agrees with the typer commands
and the option dataclasses, and `describe` rewrites exactly the fields an error names."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys

import pytest
import typer.main

from loracli.cli import app, main
from loracli.cli.flags import CLI_ONLY, FLAGS, NO_FLAG, describe, flag
from loracli.errors import AdapterError, ConfigError, LoracliError


def spellings(param) -> set[str]:
    """How a user writes a parameter: an option's flags, an argument's metavar (INPUT)."""
    if param.param_type_name == "argument":
        return {param.name.upper()}
    return {*param.opts, *param.secondary_opts}


def command_spellings() -> dict[str, dict[str, set[str]]]:
    """command name -> parameter name -> its spellings, from the click command typer builds."""
    group = typer.main.get_command(app)
    return {name: {p.name: spellings(p) for p in cmd.params} for name, cmd in group.commands.items()}


COMMANDS = command_spellings()


def all_spellings(command: str) -> set[str]:
    return set().union(*COMMANDS[command].values())


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_engine_config_fields_map_to_run_flags():
    from loracli.config import EngineConfig

    run = all_spellings("run")
    for name in field_names(EngineConfig):
        assert name in FLAGS or name in NO_FLAG, f"EngineConfig.{name}: add it to FLAGS or NO_FLAG"
        if name in FLAGS:
            assert FLAGS[name] in run, f"EngineConfig.{name} -> {FLAGS[name]}: no such flag on `run`"
    assert FLAGS["slot_cooldown_steps"] == "--slot-cooldown"
    assert FLAGS["adapters_dir"] == "--adapters" and FLAGS["pinned"] == "--pin"


def test_sampling_cluster_and_job_fields_map_to_run_flags():
    from loracli.cluster.options import ClusterOptions
    from loracli.job import JobOptions, run_job
    from loracli.sampling import SamplingParams

    run = all_spellings("run")
    job_args = [p for p in inspect.signature(run_job).parameters if p.endswith("_path")]
    assert {"input_path", "output_path", "stats_path"} <= set(job_args)
    for owner, names in (
        ("SamplingParams", field_names(SamplingParams)),
        ("ClusterOptions", field_names(ClusterOptions)),
        ("JobOptions", field_names(JobOptions)),
        ("run_job", job_args),
    ):
        for name in names:
            assert name in FLAGS or name in NO_FLAG, f"{owner}.{name}: add it to FLAGS or NO_FLAG"
            if name in FLAGS:
                assert FLAGS[name] in run, f"{owner}.{name} -> {FLAGS[name]}: no such flag on `run`"
    assert FLAGS["address"] == "--ray" and FLAGS["errors_path"] == "--errors" and FLAGS["stats_path"] == "--stats"


def test_bench_and_inspect_fields_map_to_their_flags():
    from loracli.bench import BenchOptions

    bench = all_spellings("bench")
    for name in field_names(BenchOptions):
        assert name in FLAGS or name in NO_FLAG, f"BenchOptions.{name}: add it to FLAGS or NO_FLAG"
        if name in FLAGS:
            assert FLAGS[name] in bench, f"BenchOptions.{name} -> {FLAGS[name]}: no such flag on `bench`"

    from loracli.inspect import inspect_path

    inspect_flags = all_spellings("inspect-adapter")
    keywords = [p.name for p in inspect.signature(inspect_path).parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert keywords
    for name in keywords:
        assert name in FLAGS, f"inspect_path({name}=): add it to FLAGS"
        assert FLAGS[name] in inspect_flags, (
            f"inspect_path({name}=) -> {FLAGS[name]}: no such flag on `inspect-adapter`"
        )


def test_every_flag_in_the_table_exists_on_some_command():
    everywhere = set().union(*(all_spellings(c) for c in COMMANDS))
    missing = {field: f for field, f in FLAGS.items() if f not in everywhere}
    assert not missing, f"flags in FLAGS that no command has: {missing}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_parameter_maps_back_to_a_field_or_is_cli_only(command):
    mapped = set(FLAGS.values())
    for spelled in COMMANDS[command].values():
        assert spelled & (mapped | CLI_ONLY.get(command, set())), (
            f"`{command}` {sorted(spelled)}: map a field to it in FLAGS or list it in CLI_ONLY"
        )
    stale = CLI_ONLY.get(command, set()) - all_spellings(command)
    assert not stale, f"CLI_ONLY[{command!r}] lists parameters `{command}` does not have: {stale}"


def test_every_run_option_is_in_a_help_panel():
    from loracli.cli import run

    panels = {run.IO, run.MODEL, run.SAMPLING, run.SLOTS, run.MEMORY, run.MERGING, run.RAY}
    command = typer.main.get_command(app).commands["run"]
    options = [p for p in command.params if p.param_type_name == "option"]
    assert len(options) == 54
    assert {p.name: p.rich_help_panel for p in options if p.rich_help_panel not in panels} == {}


# --- describe ------------------------------------------------------------------------------------


def test_describe_rewrites_listed_fields():
    e = ConfigError("max_cpu_loras (4) must be >= max_loras (8)", fields=("max_cpu_loras", "max_loras"))
    assert describe(e) == "--max-cpu-loras (4) must be >= --max-loras (8)"
    e = ConfigError("slot_cooldown_steps must be a positive integer, got 0", fields=("slot_cooldown_steps",))
    assert describe(e) == "--slot-cooldown must be a positive integer, got 0"
    e = ConfigError("pinned names 3 adapters but min_loras is 2", fields=("pinned", "min_loras"))
    assert describe(e) == "--pin names 3 adapters but --min-loras is 2"
    e = ConfigError("give memory_budget or gpu_memory_utilization, not both", fields=("memory_budget",))
    assert describe(e) == "give --memory-budget or gpu_memory_utilization, not both"  # only the listed one


def test_describe_leaves_unlisted_words_alone():
    e = ConfigError("model cannot be combined with max_loras=0 for this model", fields=("max_loras",))
    assert describe(e) == "model cannot be combined with --max-loras=0 for this model"
    assert describe(ConfigError("the model is gone")) == "the model is gone"
    assert describe(ConfigError("max_loras must be >= 1")) == "max_loras must be >= 1"  # no fields: as is
    e = ConfigError("no_such_field must be set", fields=("no_such_field",))
    assert describe(e) == "no_such_field must be set"  # a field absent from the table stays
    assert describe(ValueError("max_loras")) == "max_loras"  # not a LoracliError: no fields


def test_describe_matches_whole_identifiers_only():
    e = ConfigError(
        "max_loras_total, config.max_loras, --max_loras and xmax_loras stay; max_loras goes",
        fields=("max_loras",),
    )
    assert describe(e) == "max_loras_total, config.max_loras, --max_loras and xmax_loras stay; --max-loras goes"
    # one pass, longest names first: `adapters_dir` is not read as `adapters` + `_dir`
    e = ConfigError("adapters_dir and adapters", fields=("adapters", "adapters_dir"))
    assert describe(e) == "--adapters and --adapters"
    e = ConfigError("'seed' (x) at the end: seed.", fields=("seed",))
    assert describe(e) == "'--seed' (x) at the end: --seed."


def test_describe_leaves_paths_alone():
    e = ConfigError(
        "/runs/overwrite/out.jsonl already exists; give overwrite, or model.gguf and C:\\model\\x for model.",
        fields=("overwrite", "output_path", "model"),
    )
    assert describe(e) == (
        "/runs/overwrite/out.jsonl already exists; give --overwrite, or model.gguf and C:\\model\\x for --model."
    )


def test_describe_keeps_an_adapter_errors_path():
    e = AdapterError("/data/seed/top_p", "rank 128 > max_lora_rank 64", fields=("max_lora_rank", "seed", "top_p"))
    assert describe(e) == "/data/seed/top_p: rank 128 > --max-lora-rank 64"


def test_flag_helper():
    assert flag("max_loras") == "--max-loras" and flag("block_size") == "block_size"


# --- end to end: the one error handler prints flags ----------------------------------------------


def test_main_prints_describe(monkeypatch, capsys):
    """Whatever the library's messages are today: a field-named error comes out with flags."""
    import loracli.config

    def refuse(**kwargs):
        raise ConfigError(
            f"max_cpu_loras ({kwargs['max_cpu_loras']}) must be >= max_loras ({kwargs['max_loras']})",
            fields=("max_cpu_loras", "max_loras"),
        )

    monkeypatch.setattr(loracli.config, "EngineConfig", refuse)
    monkeypatch.setattr(sys, "argv", ["loracli", "run", "x.jsonl", "--max-loras", "8", "--max-cpu-loras", "4"])
    monkeypatch.delenv("LORACLI_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err.strip() == "error: --max-cpu-loras (4) must be >= --max-loras (8)"


def test_main_escapes_markup(monkeypatch, capsys):
    import loracli.config

    def refuse(**kwargs):
        raise LoracliError("[bold]max_loras[/bold] [0, 1]", fields=("max_loras",))

    monkeypatch.setattr(loracli.config, "EngineConfig", refuse)
    monkeypatch.setattr(sys, "argv", ["loracli", "run", "x.jsonl"])
    monkeypatch.delenv("LORACLI_DEBUG", raising=False)
    with pytest.raises(SystemExit):
        main()
    assert capsys.readouterr().err.strip() == "error: [bold]--max-loras[/bold] [0, 1]"


def test_config_error_names_flags_end_to_end(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "loracli", "run", "x.jsonl", "--max-loras", "8", "--max-cpu-loras", "4"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "LORACLI_DEBUG": "0"},
        timeout=120,
    )
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert "--max-cpu-loras" in lines[0] and "--max-loras" in lines[0]
