"""`run_job`: what `loracli run` does, as a library call — stream an input through the engine
into a results file that never loses work, with progress on stderr and a summary at the end.

Contract:
- The input is streamed (`input_sources.read_items`); results are written as they finish, one
  whole line each (`outputs.ResultWriter`); nothing else grows with the input but the id
  tables of `resume.Ledger`.
- Every line is accounted for: an answer, an error record (in the output, or in
  `JobOptions.errors_path`), or a note on stderr (blank lines). Unknown fields are warned about
  once per field name.
- Rerunning with the same output resumes (`resume.py`: sidecar check, repair, what is redone);
  `overwrite` starts over. A foreign or mismatched output is refused before the model loads.
- One writer per output: the job holds the output's lock, and the errors file's, from before
  the resume decision to its end (`output_lock.hold`; with `cluster`, this driver is the only
  writer). A second job on the same file is refused at once, naming the holder's PID. Outputs
  that are not regular files (`-`, `/dev/null`, a FIFO) get no lock, no sidecar and no resume,
  which is said once on stderr, as is a sidecar and lock kept in the cache (unwritable folder).
- A Parquet output or an output on a URL (`destinations.py`): results go line by line to a
  local journal or staging file (all of the above applies to it), and the target is published
  from it at checkpoints (`JobOptions.checkpoint_seconds`) and when the run ends or stops.
- A full disk while writing a result, the sidecar or the lock: `outputs.DiskFullError` (exit 2),
  every result written before kept.
- `strict`: the whole input is checked first (streaming), every problem printed, and the run
  refused with `ConfigError` (exit 2) if there is any; nothing is written then.
- SIGINT / SIGTERM (`signals.StopSignals`): no new request is admitted, those in flight finish
  and are written, and the summary's `interrupted` holds the signal; a second signal stops at
  once (`forced`). Either way every finished result is on disk, and the summary's `left` counts
  the input's records settled neither now nor before (None when that is not cheap to know;
  `last_line` then says where reading stopped).
- Progress on stderr (`run_progress.RunProgress`): a bar on a terminal, else a plain line every
  `JobOptions.progress_seconds`.
- The summary's `cpu` (local runs; not with `cluster`) says how much other work ran on this
  process's CPUs during the run and whether that oversubscribed them (`cpu_usage.py`).
- Requests that give no seed get one derived from the run's seed and their id, so sampled
  outputs do not depend on batch order, and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass, field, replace
from hashlib import blake2b
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .cluster.options import ClusterOptions
from .config import EngineConfig
from .cpu_usage import cpu_sample, cpu_usage, torch_threads
from .destinations import Destination, Publisher, PublishingWriter, destination, prepare
from .devices import deterministic_default
from .engine_api import BatchEngine
from .errors import ConfigError
from .input_sources import Blank, check_input, count_records, display_name, read_items
from .output_lock import OutputLock, hold, in_cache, is_file_output
from .outputs import ResultWriter
from .requests import FieldMap, RecordError, Request, RequestId
from .results import Counters, Failure, Result
from .resume import (
    NO_RESUME,
    JobIdentity,
    Ledger,
    Settled,
    fingerprint,
    plan_output,
    repair,
    write_sidecar,
)
from .run_progress import RunProgress, records_after
from .sampling import SamplingParams
from .signals import ForcedStop, StopSignals, signal_name
from .url_fs import is_url

PREFLIGHT_BATCH = 256  # records checked per call under --strict (one remote call each with --ray)
SHOWN_PROBLEMS = 20  # failed records printed on stderr before only counting them (all with --strict)


@dataclass
class JobOptions:
    stats_path: str | None = None
    errors_path: str | None = None
    overwrite: bool = False
    strict: bool = False
    fields: FieldMap = field(default_factory=FieldMap)
    command: list[str] = field(default_factory=list)
    exit_after_stop: bool = False  # the caller exits after SIGINT/SIGTERM: ignore later signals
    cluster: ClusterOptions | None = None  # --ray: run on engine replicas on a Ray cluster
    progress_seconds: float = 10.0  # stderr not a terminal: a progress line this often (<= 0: none)
    checkpoint_seconds: float = 60.0  # Parquet or URL output: published at least this often (destinations.py)


@dataclass
class JobSummary:
    requests: int = 0  # records answered or failed by this run
    succeeded: int = 0
    failed: int = 0  # of `requests`, including `invalid`
    invalid: int = 0  # lines that could not be read or were duplicates
    completion_tokens: int = 0
    wall_seconds: float = 0.0
    load_seconds: float = 0.0
    tokens_per_second: float = 0.0
    counters: Counters = field(default_factory=Counters)  # the engine's (a pool's: summed over its workers)
    model: str = ""
    dtype: str = ""
    device: str = ""
    mode: str = ""  # fresh | overwrite | resume | stdout | stream (not a regular file: no resume)
    resumed: int = 0  # records an earlier run settled, skipped now
    failed_before: int = 0  # error records of earlier runs kept in the output (unreadable lines)
    retried: int = 0  # error records of earlier runs dropped to be run again
    repaired_lines: int = 0  # torn or foreign lines removed from the output
    blank_lines: int = 0
    interrupted: int | None = None  # the signal that stopped the run
    forced: bool = False  # a second signal: requests in flight were abandoned
    abandoned: int = 0  # requests read but not finished when the run stopped (in flight)
    left: int | None = None  # records settled neither now nor before (None: not known, see last_line)
    last_line: int = 0  # the input's last line (or row) dealt with
    slots: dict = field(default_factory=dict)  # adapter slots: timeline, tiers, swap latency, memory split
    merges: dict = field(default_factory=dict)  # merge/unmerge timeline, time merged, switch cost
    prefix_cache: dict = field(default_factory=dict)  # blocks and tokens found in the prefix cache, hit rates
    cluster: dict = field(default_factory=dict)  # --ray: routing, per-worker requests/loads/swaps, bytes moved
    cpu: dict = field(default_factory=dict)  # cpu_usage.cpu_usage: other work on our CPUs, oversubscribed (not --ray)

    @property
    def any_failed(self) -> bool:
        return bool(self.failed or self.failed_before)


def request_seed(run_seed: int, request_id: RequestId) -> int:
    """A request's sampling seed when it gives none: from the run's seed and its id only."""
    digest = blake2b(f"{run_seed}\x00{request_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def with_seed(req: Request, run_seed: int) -> Request:
    if "seed" in req.params:
        return req
    return replace(req, params={**req.params, "seed": request_seed(run_seed, req.id)})


def _deterministic(config: EngineConfig) -> bool | str:
    """The mode a job runs in: as set, else the dtype's default, else "auto" (decided by the dtype probe)."""
    if config.deterministic is not None:
        return config.deterministic
    return "auto" if config.dtype == "auto" else deterministic_default(config.dtype)


# sampling defaults added after the sidecar's first options: kept only when set (older sidecars lack them)
LATER_DEFAULTS = (
    *("n", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens"),
    "include_stop_str_in_output",
)


def _changed_defaults(defaults: SamplingParams) -> dict:
    """The `LATER_DEFAULTS` the run sets to other than their default value."""
    plain = SamplingParams()
    return {k: getattr(defaults, k) for k in LATER_DEFAULTS if getattr(defaults, k) != getattr(plain, k)}


def job_identity(input_path: str, config: EngineConfig, defaults: SamplingParams, options: JobOptions) -> JobIdentity:
    model = config.model or "default"
    if Path(model).exists():
        model = str(Path(model).resolve())
    opts = {
        "model": model,
        "max_tokens": defaults.max_tokens,
        "temperature": defaults.temperature,
        "top_p": defaults.top_p,
        "seed": config.seed,
        "ignore_eos": defaults.ignore_eos,
        "dtype": config.dtype,
        "deterministic": _deterministic(config),  # off, the last bits (and so some tokens) follow the batch
        # not enable_prefix_caching: it changes no output bit in deterministic mode, and off that mode
        # it is one more way the batch shapes the last bits, which the mode already allows
        "max_model_len": config.max_model_len,
        "fields": options.fields.as_dict(),
        **_changed_defaults(defaults),
    }
    errors = str(Path(options.errors_path).resolve()) if options.errors_path else None
    source = input_path if input_path == "-" or is_url(input_path) else str(Path(input_path).resolve())
    return JobIdentity(source, fingerprint(input_path), opts, errors, list(options.command))


class Notes:
    """Warnings on stderr, each kind said once or counted (unknown fields, blank lines, bad records)."""

    def __init__(self, console: Console, show_problems: int | None = SHOWN_PROBLEMS):
        self.console = console
        self.show_problems = show_problems
        self.fields_warned: set[str] = set()
        self.problems = 0
        self.blanks = 0
        self.first_blank: Blank | None = None

    def say(self, text: str) -> None:
        self.console.print(escape(text), highlight=False, soft_wrap=True)

    def unknown_fields(self, req: Request, file: str, fatal: bool = False) -> int:
        new = [f for f in req.unknown_fields if f not in self.fields_warned]
        for name in new:
            self.fields_warned.add(name)
            what = "unknown field" if fatal else "unknown, ignored (said once per field name)"
            self.say(f"{file}:{req.line}: field '{name}': {what}")
        return len(new)

    def blank(self, item: Blank) -> None:
        self.blanks += 1
        if self.first_blank is None:
            self.first_blank = item
            self.say(f"{item.file}:{item.line}: blank line, skipped (others are counted at the end)")

    def problem(self, message: str) -> None:
        self.problems += 1
        if self.show_problems is None or self.problems <= self.show_problems:
            self.say(message)
        elif self.problems == self.show_problems + 1:
            self.say("... more failed records: see their error records")

    def close(self, file: str) -> None:
        if self.blanks > 1:
            self.say(f"{file}: {self.blanks} blank lines skipped")


def validate(
    items: Iterable,
    file: str,
    engine: BatchEngine,
    notes: Notes,
    stop: StopSignals | None = None,
    defaults: SamplingParams | None = None,
) -> int:
    """A strict job: check every record (streaming), print each problem; returns how many there were."""
    ledger = Ledger(file)
    count = 0
    batch: list[Request] = []

    def check() -> int:
        found = 0
        for req, failure in zip(batch, engine.preflight_many(batch, defaults), strict=True):
            if failure is not None:
                notes.problem(where(req, failure, file))
                found += 1
        batch.clear()
        return found

    for item in items:
        if stop is not None and stop.requested:
            break
        if isinstance(item, Blank):
            continue
        checked = ledger.decide(item)
        if checked is None:  # a fresh ledger settles nothing; only a resumed one skips records
            continue
        if isinstance(checked, RecordError):
            notes.problem(str(checked))
            count += 1
            continue
        count += notes.unknown_fields(checked, file, fatal=True)
        batch.append(checked)
        if len(batch) >= PREFLIGHT_BATCH:
            count += check()
    return count + check()


def _prepare_output(mode: str, dest: Destination, options: JobOptions, identity: JobIdentity, notes: Notes) -> Settled:
    settled = Settled()
    files = [p for p in (dest.lines, options.errors_path) if p is not None and is_file_output(p)]
    for path in files:
        if mode == "resume":
            repair(path, settled, notes.say)
        elif Path(path).exists():
            Path(path).write_bytes(b"")
    if mode not in NO_RESUME:
        write_sidecar(dest.local, identity)
    return settled


def _output_notes(mode: str, output: str, locks: list[OutputLock], dest: Destination, period: float) -> list[str]:
    """What to say once before the run about where its output's companions are, or why there are none."""
    notes = []
    if not dest.plain:
        notes.append(f"results are written to {dest.lines} and published to {output} every {period:g}s or more")
    if mode == "stdout":
        notes.append("results go to stdout: resume is off (write them to a file to be able to resume)")
    elif mode == "stream":
        notes.append(f"{output} is not a regular file: resume is off (no sidecar is kept)")
    for lock in locks:
        if in_cache(lock.path):
            what = "sidecar and lock are" if lock.field == "output_path" else "lock is"
            notes.append(f"cannot write beside {lock.output}: its {what} kept in {lock.path.parent}")
    return notes


def _resume_note(output: str, settled: Settled) -> str:
    parts = [f"resuming {output}: {settled.answers} answers kept"]
    if settled.input_errors:
        parts.append(f"{settled.input_errors} unreadable records kept")
    if settled.retried:
        parts.append(f"{settled.retried} failed records to run again")
    if settled.torn:
        parts.append("a torn last line cut")
    return ", ".join(parts)


def run_job(
    input_path: str,
    output_path: str,
    config: EngineConfig,
    defaults: SamplingParams,
    stats_path: str | None = None,
    console: Console | None = None,
    options: JobOptions | None = None,
    engine: BatchEngine | None = None,
) -> JobSummary:
    """Run every record of `input_path` into `output_path` (see the module doc). `engine`: reuse one."""
    console = console or Console(stderr=True)
    options = options or JobOptions()
    if stats_path is not None:
        options = replace(options, stats_path=stats_path)
    config = engine.config if engine is not None else config
    check_input(input_path)
    identity = job_identity(input_path, config, defaults, options)
    dest = destination(output_path, input_path, options.errors_path, options.stats_path)
    say = Notes(console).say
    with hold(((dest.local, "output_path"), (options.errors_path, "errors_path"))) as locks:
        prepare(dest, options.overwrite, say)
        mode = plan_output(
            dest.local, input_path, options.errors_path, identity, options.overwrite, dest.lines, dest.target
        )
        summary = JobSummary(mode=mode)
        for note in _output_notes(mode, output_path, locks, dest, options.checkpoint_seconds):
            say(note)
        publisher = Publisher(dest, options.checkpoint_seconds, say)
        with StopSignals(options.exit_after_stop) as stop:
            start = cpu_sample()
            try:
                _with_engine(input_path, publisher, config, defaults, options, console, engine, identity, summary, stop)
            except ForcedStop:
                summary.forced = True
            except BaseException:
                with suppress(Exception):  # the run's own error is the one to report; `lines` keeps every result
                    publisher.finish(complete=False)
                raise
            summary.interrupted = stop.requested
            if options.cluster is None:
                summary.cpu = cpu_usage(start, cpu_sample(), torch_threads())
        publisher.finish(complete=summary.interrupted is None)
    if options.stats_path:
        Path(options.stats_path).write_text(json.dumps(asdict(summary), indent=2) + "\n", encoding="utf-8")
    if summary.requests + summary.resumed == 0 and summary.interrupted is None:
        raise ConfigError(f"{display_name(input_path)} has no records (only blank lines)")
    return summary


def _with_engine(
    input_path: str,
    publisher: Publisher,
    config: EngineConfig,
    defaults: SamplingParams,
    options: JobOptions,
    console: Console,
    engine: BatchEngine | None,
    identity: JobIdentity,
    summary: JobSummary,
    stop: StopSignals,
) -> None:
    t0 = time.perf_counter()
    owned = engine is None
    engine = engine or _make_engine(config, options, console)
    summary.load_seconds = time.perf_counter() - t0
    try:
        _stream_job(input_path, publisher, defaults, options, console, engine, identity, summary, stop)
    finally:
        if owned:
            engine.close()
        else:  # a caller's engine: nothing of this job may leak into its next one
            engine.abort()


def _make_engine(config: EngineConfig, options: JobOptions, console: Console) -> BatchEngine:
    """A local `Engine`, or with `options.cluster` a `RayPool` of engine replicas (same interface)."""
    if options.cluster is None:
        from .engine.engine import Engine

        return Engine(config, progress=True)
    from .cluster.pool import RayPool

    return RayPool(config, options.cluster, log=lambda m: console.print(escape(m), highlight=False, soft_wrap=True))


def _stream_job(
    input_path: str,
    publisher: Publisher,
    defaults: SamplingParams,
    options: JobOptions,
    console: Console,
    engine: BatchEngine,
    identity: JobIdentity,
    summary: JobSummary,
    stop: StopSignals,
) -> None:
    summary.model, summary.device, summary.dtype = engine.model_name, engine.device_name, engine.dtype_name
    file = display_name(input_path)
    if options.strict:
        problems = validate(
            read_items(input_path, engine.base_names, options.fields),
            file,
            engine,
            Notes(console, show_problems=None),
            stop,
            defaults,
        )
        if problems and not stop.requested:
            raise ConfigError(f"{problems} problem(s) in {file}; nothing was run (strict)", fields=("strict",))
    if stop.requested:
        return
    notes = Notes(console)
    settled = _prepare_output(summary.mode, publisher.dest, options, identity, notes)
    if summary.mode == "resume":
        notes.say(_resume_note(publisher.dest.target, settled))
    summary.failed_before = settled.input_errors
    summary.retried = settled.retried
    summary.repaired_lines = settled.torn + settled.foreign
    total = count_records(input_path)
    progress = RunProgress(
        console, summary, total, options.progress_seconds, settled.answers + settled.input_errors, engine.residency
    )
    loop = _JobLoop(engine, Ledger(file, settled), notes, summary, file, stop, progress)
    items = read_items(input_path, engine.base_names, options.fields)
    writer = PublishingWriter(publisher, engine.model_name, errors_path=options.errors_path)
    try:
        with writer:
            loop.stream(items, writer, defaults, input_path)
    finally:
        notes.close(file)
        _finish_summary(engine, summary)


class _JobLoop:
    """The streaming loop of one run: input items -> ledger -> engine -> writer."""

    def __init__(
        self,
        engine: BatchEngine,
        ledger: Ledger,
        notes: Notes,
        summary: JobSummary,
        file: str,
        stop: StopSignals,
        progress: RunProgress,
    ):
        self.engine = engine
        self.ledger = ledger
        self.notes = notes
        self.summary = summary
        self.file = file
        self.stop = stop
        self.progress = progress
        self.submitted = 0
        self.exhausted = False  # the whole input was read

    def stream(self, items: Iterator, writer: ResultWriter, defaults: SamplingParams, input_path: str) -> None:
        summary, engine = self.summary, self.engine
        try:
            with self.progress:
                for result in engine.generate(self.admitted(items, writer), defaults):
                    result = locate(result, self.file)
                    if result.error is not None:
                        self.notes.problem(result.error.message)
                    writer.write(result)
                    _count(summary, result.error is not None)
                    summary.completion_tokens += result.completion_tokens
                    self.progress.advance()
                    if self.stop.requested:
                        engine.stop_admitting()
        finally:
            summary.abandoned = self.submitted - (summary.requests - summary.invalid)
            summary.wall_seconds = self.progress.elapsed()
            if self.exhausted or self.stop.requested:
                summary.left = self.left(input_path)

    def left(self, input_path: str) -> int | None:
        """Records settled neither by this run nor an earlier one: those in flight, and those not read
        yet less the ones earlier runs settled (all of which come after the last line read)."""
        summary = self.summary
        if self.exhausted:
            return summary.abandoned
        unread = records_after(input_path, summary.last_line, self.progress.total)
        if unread is None:
            return None
        return summary.abandoned + max(unread - (self.progress.settled - summary.resumed), 0)

    def admitted(self, items: Iterator, writer: ResultWriter) -> Iterator[Request]:
        """The requests to run, in input order; writes problems and skips settled records on the way."""
        summary, notes = self.summary, self.notes
        for item in items:
            if self.stop.requested:
                self.engine.stop_admitting()
                return
            summary.last_line = item.line
            if isinstance(item, Blank):
                summary.blank_lines += 1
                notes.blank(item)
                self.progress.advance()
                continue
            decision = self.ledger.decide(item)
            if decision is None:
                summary.resumed += 1
            elif isinstance(decision, RecordError):
                writer.write_problem(decision)
                _count(summary, failed=True)
                summary.invalid += 1
                notes.problem(str(decision))
            else:
                notes.unknown_fields(decision, self.file)
                self.submitted += 1
                yield with_seed(decision, self.engine.config.seed)
                continue
            self.progress.advance()
        self.exhausted = True


def where(req: Request, failure: Failure, file: str) -> str:
    """A failure's message prefixed with its file, line and field, like a bad record's; the field as
    the record's form spells it (`messages` for a chat prompt, `body.` for an OpenAI Batch line)."""
    fld = failure.field
    if fld == "prompt" and req.messages is not None:
        fld = "messages"
    if fld is not None and req.form == "openai":
        named = "body.adapter_weights" if req.mix is not None else "body.model"
        fld = named if fld == "adapter" else f"body.{fld}"
    return f"{file}:{req.line}" + (f": field '{fld}'" if fld else "") + f": {failure.message}"


def locate(result: Result, file: str) -> Result:
    """An engine failure's message, prefixed with its file, line and field (see `where`)."""
    req = result.request
    if result.error is None or req is None:
        return result
    return replace(result, error=result.error._replace(message=where(req, result.error, file)))


def _count(summary: JobSummary, failed: bool) -> None:
    summary.requests += 1
    summary.failed += failed
    summary.succeeded += not failed


def _finish_summary(engine: BatchEngine, summary: JobSummary) -> None:
    c = engine.counters()
    summary.counters = replace(c, per_adapter=dict(sorted(c.per_adapter.items())))
    summary.tokens_per_second = summary.completion_tokens / max(summary.wall_seconds, 1e-9)
    reports = engine.reports()
    summary.slots, summary.merges = reports["slots"], reports["merges"]
    summary.prefix_cache = summary.counters.prefix_cache()
    summary.cluster = reports.get("cluster", {})


def summary_line(summary: JobSummary, output: str) -> str:
    """The one-line report `loracli run` prints at the end."""
    text = (
        f"{summary.succeeded}/{summary.requests} requests ok, {summary.completion_tokens} tokens in "
        f"{summary.wall_seconds:.1f}s ({summary.tokens_per_second:.1f} tok/s)"
    )
    if summary.failed:
        text += f", {summary.failed} failed"
    if summary.resumed:
        text += f"; {summary.resumed} done by earlier runs"
    if summary.failed_before:
        text += f" ({summary.failed_before} of them unreadable records)"
    return text + ("" if output == "-" else f" -> {output}")


def stop_message(summary: JobSummary, output: str, command: str) -> str:
    """What an interrupted run prints: what was kept, and the command that finishes it."""
    how = "stopped at once" if summary.forced else "stopped after finishing the requests in flight"
    text = f"{signal_name(summary.interrupted or 2)}: {how}; {summary.requests} results written this run"
    if summary.left is None:
        text += f"; left to do: {summary.abandoned} requests in flight and the input after line {summary.last_line}"
    elif summary.left:
        text += f", {summary.left} requests left to do"
    if output == "-":
        return text + "\nresults went to stdout: to be able to resume, write them to a file with -o"
    if summary.mode in NO_RESUME:
        return text + f"\n{output} is not a regular file, so the run cannot be resumed: to resume, write to a file"
    return text + f"\nevery finished result is in {output}; to finish the run, rerun the same command:\n  {command}"


def worker_lines(cluster: dict) -> str:
    """What `loracli run --ray` prints per worker at the end."""
    lines = [
        f"{cluster['routing']} routing over {cluster['workers']} Ray workers: "
        f"{cluster['adapters_loaded']} adapter loads, {cluster['resent']} requests re-sent"
        + (
            f", {cluster['adapter_bytes_shipped'] / 2**20:.1f} MiB of adapters shipped"
            if cluster.get("ship_adapters")
            else ""
        )
    ]
    for w in cluster["per_worker"]:
        state = "" if w["alive"] else f" (failed: {w['error']})"
        lines.append(
            f"  worker {w['worker']}: {w['requests']} requests, {w['adapters_loaded']} adapters loaded, "
            f"{w['swaps']} slot swaps"
            + (f", {w['adapters_shipped']} adapters shipped to it" if cluster.get("ship_adapters") else "")
            + state
        )
    return "\n".join(lines)
