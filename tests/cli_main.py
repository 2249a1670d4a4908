"""`cli(monkeypatch, capsys, *args)`: run `loracli ARGS` in-process through `loracli.cli.main`, the
real error handler, and return (exit code, stdout, stderr)."""

from __future__ import annotations

import sys

import pytest


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    from loracli.cli import main

    monkeypatch.setattr(sys, "argv", ["loracli", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return e.value.code or 0, out, err
