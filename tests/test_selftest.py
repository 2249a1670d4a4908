"""`python -m loracli.selftest`: every registered Triton kernel against its reference, then a decode
microbenchmark. Here (no GPU) the kernels run in Triton's interpreter, as the command does on a CPU;
what it would print on a GPU is not tested anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from loracli.kernels import cases as kernel_cases
from loracli.kernels import checks
from loracli.kernels.checks import CHECKS, Case, KernelCheck, run_case

from loracli import selftest


def _command_env() -> dict[str, str]:
    """This environment without the variables the command must set (or re-exec for) itself."""
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LORACLI_LORA_BACKEND")}


def test_the_command_checks_every_registered_kernel_and_times_a_decode_step():
    """The whole command as CI runs it (about 30 s on 2 busy cores): every `CHECKS` entry, every case."""
    proc = subprocess.run(
        [sys.executable, "-m", "loracli.selftest", "--quick", "--json"],
        capture_output=True,
        text=True,
        env=_command_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] and report["device"] == "cpu" and "interpreter" in report["triton"]
    assert {c["kernel"] for c in report["checks"]} == {c.name for c in CHECKS}
    assert len(report["checks"]) == sum(len(c.cases(False)) for c in CHECKS)
    assert all(c["ok"] for c in report["checks"])
    bench = report["bench"]
    assert bench["layers"] == 2 and bench["batch"] == 8 and bench["adapters"] == 4
    assert bench["step_ms"] > 0 and bench["tokens_per_s"] == pytest.approx(8 / (bench["step_ms"] / 1e3), rel=0.01)


def test_triton_imported_first_makes_it_reexec_under_the_interpreter():
    """Something that imports triton before the command runs: it re-executes itself with TRITON_INTERPRET=1."""
    code = (
        "import sys, triton\n"
        "from loracli.selftest import main\n"
        "sys.exit(main(['--kernel', 'lora_weigh', '--no-bench']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_command_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    n = len(next(c for c in CHECKS if c.name == "lora_weigh").cases(False))
    assert "interpreter" in lines[0] and lines[-1] == f"{n}/{n} kernel checks passed"
    assert all(line.startswith("ok   lora_weigh ") for line in lines[1:-1])


def _broken(name: str, wrong) -> KernelCheck:
    """A registered LoRA check whose kernel result is replaced by `wrong(result)`."""
    check = next(c for c in CHECKS if c.name == name)

    def kernel(inputs):
        return wrong(check.triton(inputs))

    return KernelCheck(f"broken_{name}", check.cases, check.reference, kernel)


def test_a_wrong_or_failing_kernel_is_a_failed_check():
    case = CHECKS[0].cases(False)[0]
    assert run_case(CHECKS[0], case, "cpu").ok
    off = run_case(_broken("sgmv_shrink", lambda y: y + 1e-3), case, "cpu")
    assert not off.ok and off.max_error == pytest.approx(1e-3, rel=0.05)

    def boom(y):
        raise RuntimeError("no such kernel")

    raised = run_case(_broken("sgmv_shrink", boom), case, "cpu")
    assert not raised.ok and raised.error == "RuntimeError: no such kernel" and raised.max_error is None
    shape = run_case(_broken("bgmv_expand", lambda out: out[:, :-1]), case, "cpu")
    assert not shape.ok and "shape" in shape.error
    nan = run_case(_broken("lora_weigh", lambda y: y * torch.nan), case, "cpu")
    assert not nan.ok


def test_exit_status_is_one_on_a_mismatch(monkeypatch, capsys):
    monkeypatch.setattr(checks, "CHECKS", [*CHECKS[:1], _broken("lora_weigh", lambda y: y * 2)])
    assert selftest.main(["--no-bench"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith("kernel checks passed") and out[-1].startswith(f"{len(CHECKS[0].cases(False))}/")
    assert any(line.startswith("FAIL broken_lora_weigh ") for line in out)
    assert selftest.main(["--no-bench", "--kernel", "nope"]) == 2
    assert "not a registered kernel" in capsys.readouterr().err


def test_every_check_has_cases_and_the_full_sweep_holds_the_default_one():
    for check in CHECKS:
        cases = check.cases(False)
        assert cases and all(isinstance(c, Case) for c in cases), check.name
    assert set(kernel_cases.sweep(False)) < set(kernel_cases.sweep(True))


def test_quick_sets_defaults_and_explicit_values_win():
    quick = selftest.parse_args(["--quick", "--layers", "4"])
    assert (quick.layers, quick.batch, quick.steps, quick.warmup) == (4, 8, 3, 1)
    full = selftest.parse_args([])
    assert (full.layers, full.batch, full.steps, full.warmup) == (30, 64, 8, 3)
    for bad in (["--batch", "0"], ["--adapters", "-1"]):
        with pytest.raises(SystemExit):
            selftest.parse_args(bad)
