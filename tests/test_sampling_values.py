"""One rule for sampling values: `SamplingParams` (the defaults `loracli run` builds from its flags)
and the request parser (values set per record) refuse the same values in the same words."""

from __future__ import annotations

import json
import sys

import pytest

from loracli.cli import main
from loracli.errors import ConfigError
from loracli.requests import RecordError, parse_record
from loracli.sampling import SamplingParams

BAD = [
    ("max_tokens", 0, "must be positive, got 0"),
    ("max_tokens", 2.5, "must be an integer, got 2.5"),
    ("temperature", -1.0, "must be >= 0, got -1.0"),
    ("temperature", float("inf"), "must be a finite number, got Infinity"),
    ("top_p", 0.0, "must be in (0, 1], got 0.0"),
    ("top_p", 1.5, "must be in (0, 1], got 1.5"),
    ("seed", 1 << 64, f"must be a 64-bit integer, got {1 << 64}"),
    ("stop", [""], "must be a non-empty string or a list of non-empty strings"),
    ("ignore_eos", 1, "must be true or false, got 1"),
]


@pytest.mark.parametrize("name, value, problem", BAD)
def test_defaults_and_requests_refuse_the_same_values_in_the_same_words(name, value, problem):
    with pytest.raises(ConfigError) as info:
        SamplingParams(**{name: value})
    assert str(info.value) == f"{name} {problem}" and info.value.fields == (name,)
    with pytest.raises(RecordError) as record:
        parse_record(json.dumps({"id": "a", "prompt": "x", name: value}), 3, "in.jsonl")
    assert str(record.value) == f"in.jsonl:3: field '{name}': {problem}"


def test_good_values_are_kept_in_the_form_the_engine_uses():
    r = parse_record(b'{"prompt": "x", "temperature": 1, "top_p": 1, "stop": "\\n", "seed": -3}', 1, "f")
    assert r.params == {"temperature": 1.0, "top_p": 1.0, "stop": ["\n"], "seed": -3}
    assert SamplingParams(temperature=0, top_p=1e-9, seed=None).top_p == 1e-9


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--temperature", "-1", "--temperature must be >= 0, got -1.0"),
        ("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
        ("--max-tokens", "0", "--max-tokens must be positive, got 0"),
    ],
)
def test_the_cli_refuses_sampling_defaults_a_request_may_not_set(monkeypatch, capsys, tmp_path, flag, value, message):
    missing = tmp_path / "never-read.jsonl"  # the defaults are refused before the input is looked at
    monkeypatch.setattr(sys, "argv", ["loracli", "run", str(missing), flag, value])
    with pytest.raises(SystemExit) as info:
        main()
    err = " ".join(capsys.readouterr().err.split())
    assert info.value.code == 2 and err == f"error: {message}"
