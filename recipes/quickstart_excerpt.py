"""Regenerate the output excerpt of README.md's Quickstart from a real run of its command.

    python recipes/quickstart_excerpt.py [--dtype auto] [--readme README.md]

Runs the Quickstart command, `loracli run examples/prompts.jsonl --adapters examples/adapters
-o results.jsonl` (plus `--stats`, which changes no result, to learn the dtype and device the run
used), on the embedded default model, in a temporary directory, with the Python running this
script. Then it rewrites what lies between the README's markers `<!-- quickstart-excerpt:start -->`
and `<!-- quickstart-excerpt:end -->`: the date, dtype, device and CPU count; one table row per
answer to "What causes rainbows?" (the records whose id starts with `rainbow-`, labelled by the
rest of the id, in input order), each answer's text whatever its output form (native `text`,
OpenAI Batch `response.body.choices[0]`), newlines as `<br>`, long ones cut at a word with `…`;
and the summary line the run printed on stderr. Nothing else in the README changes. A failed
run, a failed request or missing markers stop the script with a message and leave the README as
it was. Takes a minute or two on 2 CPU cores. Standard library only; `loracli` must be installed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = "<!-- quickstart-excerpt:start -->"
END = "<!-- quickstart-excerpt:end -->"
QUESTION_PREFIX = "rainbow-"
MAX_ANSWER_CHARS = 200


def run_quickstart(workdir: Path, dtype: str) -> tuple[list[dict], dict, str]:
    """Run the Quickstart command in `workdir`: (records in input order, --stats summary, stderr summary line)."""
    prompts = ROOT / "examples" / "prompts.jsonl"
    command = [sys.executable, "-m", "loracli", "run", str(prompts)]
    command += ["--adapters", str(ROOT / "examples" / "adapters"), "-o", "results.jsonl"]
    command += ["--stats", "stats.json", "--dtype", dtype]
    print("running:", " ".join(command), file=sys.stderr)
    proc = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the Quickstart command failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    order = [record_id(record) for record in read_jsonl(prompts)]
    records = sorted(read_jsonl(workdir / "results.jsonl"), key=lambda record: order.index(record_id(record)))
    stats = json.loads((workdir / "stats.json").read_text())
    return records, stats, summary_line(proc.stderr)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary_line(stderr: str) -> str:
    """The run's closing line on stderr ("18/18 requests ok, ... -> results.jsonl")."""
    lines = [line.strip() for line in stderr.splitlines() if " requests ok, " in line]
    if not lines:
        raise SystemExit(f"no summary line on the run's stderr:\n{stderr[-4000:]}")
    return lines[-1]


def record_id(record: dict) -> str:
    """A result's request id, in either output form."""
    return record["custom_id"] if "custom_id" in record else record["id"]


def answer_text(record: dict) -> str:
    """A result's generated text, in either output form; a failed request stops the script."""
    if record.get("error"):
        raise SystemExit(f"request {record_id(record)!r} failed: {record['error']}")
    if "response" not in record:
        return record["text"]
    choice = record["response"]["body"]["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def table_cell(text: str, limit: int = MAX_ANSWER_CHARS) -> str:
    """`text` as one Markdown table cell: cut at a word past `limit` characters, `|` escaped, lines as <br>."""
    text = text.strip()
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip() + " …"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "<br>".join(lines).replace("|", "\\|")


def excerpt(records: list[dict], stats: dict, summary: str, date: str, cpus: int) -> str:
    """The Markdown that goes between the markers."""
    rows = []
    for record in records:
        rid = record_id(record)
        if rid.startswith(QUESTION_PREFIX):
            label = rid.removeprefix(QUESTION_PREFIX)
            rows.append(f"| {label if label == 'base' else f'`{label}`'} | {table_cell(answer_text(record))} |")
    if not rows:
        raise SystemExit(f"no result with an id starting with {QUESTION_PREFIX!r}")
    return "\n".join(
        [
            f'What that run wrote for "What causes rainbows?" ({date}, **{stats["dtype"]}** on {stats["device"]},',
            f"{cpus} CPU cores; written by `python recipes/quickstart_excerpt.py`; `text` fields of `results.jsonl`,",
            "the json adapter's from its OpenAI Batch line; long answers cut with …):",
            "",
            "| adapter | answer |",
            "| --- | --- |",
            *rows,
            "",
            f"On stderr: `{summary}`",
            f"({len(records)} short requests: the batch never fills; see `loracli bench` for throughput).",
        ]
    )


def replace_block(readme: str, block: str) -> str:
    """`readme` with what lies between START and END (each once, in that order) replaced by `block`."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise SystemExit(f"the README needs {START} and then {END}, once each")
    head, rest = readme.split(START)
    return f"{head}{START}\n{block}\n{END}{rest.split(END)[1]}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto", help="passed to `loracli run --dtype` (default: auto)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    replace_block(args.readme.read_text(), "")  # check the markers before the long run
    with tempfile.TemporaryDirectory() as tmp:
        records, stats, summary = run_quickstart(Path(tmp), args.dtype)
    block = excerpt(records, stats, summary, datetime.date.today().isoformat(), os.cpu_count() or 1)
    args.readme.write_text(replace_block(args.readme.read_text(), block))  # read again: others may edit it meanwhile
    print(block)


if __name__ == "__main__":
    main()
