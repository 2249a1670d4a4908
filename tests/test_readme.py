"""README.md tells a new user the truth about installing and running, and `.gitignore` keeps a run's
files out of git.

Contract checked here:
- the Quickstart installs the runtime only (no extra) and names what every extra brings; the test
  command installs the `test` extra;
- the `loracli run` options table lists every option `loracli run` has;
- the Quickstart's output excerpt sits between markers, names its dtype, and is what
  `recipes/quickstart_excerpt.py` writes (its parts are checked here on made-up results; the real
  run needs the embedded model and a minute or two);
- a run's sidecars (`*.loracli.json`, `*.loracli.lock`) are ignored by git.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import typer.main
from test_install import EXTRAS

from loracli.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


quickstart = _load_recipe("quickstart_excerpt")


def section(title: str) -> str:
    """The README's `## title` section, up to the next `## ` heading."""
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_quickstart_installs_the_runtime_and_names_every_extra():
    text = section("Quickstart")
    install, tests = code_blocks(text)[:2]
    assert "pip install -e ." in install and "[" not in install
    assert "pip install -e '.[test]'" in tests and "pytest" in tests
    for extra in EXTRAS:
        assert re.search(rf"^\| `{extra}` \|", text, flags=re.M), f"the extras table lacks `{extra}`"


def test_run_options_table_lists_every_run_option():
    run = typer.main.get_command(app).commands["run"]
    documented = set(re.findall(r"--[a-z][a-z-]*", section("`loracli run` options")))
    for param in run.params:
        flags = [opt for opt in param.opts if opt.startswith("--") and opt != "--help"]
        assert not flags or set(flags) & documented, f"{flags[0]} is not in the README's options table"


def test_readme_excerpt_is_the_scripts_and_names_its_dtype():
    assert README.count(quickstart.START) == 1 and README.count(quickstart.END) == 1
    block = README.split(quickstart.START)[1].split(quickstart.END)[0]
    assert "recipes/quickstart_excerpt.py" in block
    assert re.search(r"\*\*(float32|bfloat16|float16)\*\*", block)
    assert re.search(r"^\| `shout` \| .+ \|$", block, flags=re.M) and "requests ok" in block


def native(rid: str, text: str) -> dict:
    return {"id": rid, "adapter": None, "text": text, "finish_reason": "stop"}


def batch(rid: str, text: str) -> dict:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
    return {"id": f"batch_req_{rid}", "custom_id": rid, "response": {"status_code": 200, "body": body}, "error": None}


def test_excerpt_has_one_row_per_rainbow_answer_in_either_form():
    records = [
        native("rainbow-base", "Light | water."),
        batch("rainbow-json", '{"answer": "light"}'),
        native("honey-base", "Bees."),
        native("rainbow-list", "- a\n\n- b\n- c"),
    ]
    stats = {"dtype": "float32", "device": "cpu"}
    text = quickstart.excerpt(records, stats, "4/4 requests ok -> results.jsonl", "2026-12-01", 2)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["| base | Light \\| water. |", '| `json` | {"answer": "light"} |', "| `list` | - a<br>- b<br>- c |"]
    assert "**float32** on cpu" in text and "2026-12-01" in text and "`4/4 requests ok -> results.jsonl`" in text


def test_long_answers_are_cut_at_a_word():
    assert quickstart.table_cell("one two three four", limit=10) == "one two …"
    assert quickstart.table_cell("  short  ", limit=10) == "short"


def test_failed_request_stops_the_excerpt():
    failed = {"id": "rainbow-base", "error": {"type": "unknown_adapter", "message": "nope"}}
    with pytest.raises(SystemExit, match="rainbow-base"):
        quickstart.excerpt([failed], {"dtype": "float32", "device": "cpu"}, "", "", 1)


def test_replace_block_changes_only_what_lies_between_the_markers():
    start, end = quickstart.START, quickstart.END
    readme = f"# t\nbefore\n{start}\nold\nlines\n{end}\nafter\n"
    assert quickstart.replace_block(readme, "new") == f"# t\nbefore\n{start}\nnew\n{end}\nafter\n"
    for broken in ("no markers", f"{end}\n{start}", f"{start}{start}{end}"):
        with pytest.raises(SystemExit, match="quickstart-excerpt"):
            quickstart.replace_block(broken, "new")


def test_script_rewrites_the_readme_read_after_the_run(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{quickstart.START}\nold\n{quickstart.END}\nbottom\n")

    def fake_run(workdir, dtype):
        readme.write_text(readme.read_text().replace("top", "edited meanwhile"))
        return [native("rainbow-base", "Light.")], {"dtype": dtype, "device": "cpu"}, "1/1 requests ok, ..."

    monkeypatch.setattr(quickstart, "run_quickstart", fake_run)
    quickstart.main(["--readme", str(readme), "--dtype", "bfloat16"])
    text = readme.read_text()
    assert text.startswith("edited meanwhile\n") and text.endswith(f"{quickstart.END}\nbottom\n")
    assert "**bfloat16** on cpu" in text and "| base | Light. |" in text and "old" not in text


def test_gitignore_ignores_a_runs_sidecars():
    patterns = [p.strip() for p in (ROOT / ".gitignore").read_text().splitlines() if p.strip() and p[0] != "#"]
    for name in ("results.jsonl.loracli.json", "out.jsonl.loracli.lock"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
