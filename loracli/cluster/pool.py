"""`RayPool`: `loracli run --ray`: N engine replicas as Ray actors behind the engine's interface.

`job.run_job` drives a `RayPool` exactly as it drives a local `Engine` (`generate`,
`preflight_many`, `stop_admitting`, `counters`, `reports`, ...), so the output file keeps its
semantics: streamed, resumable, exactly once. Only the driver reads the input and writes the
output.

Contract:
- Ray is optional: without it, a `ConfigError` says how to install it. `address` None starts a
  local Ray instance (sized so the workers fit: never a silent wait for resources); otherwise
  it connects to that cluster (`auto`, `host:port`, `ray://host:10001`) and checks the cluster
  has the CPUs/GPUs the workers ask for in total (if others use them, the workers wait for room).
- Each worker (`worker.EngineWorker`) loads the base model once and reads adapters from the
  adapters folder or manifest, resolved to an absolute path that every node must see (a URL
  `adapters_dir` is passed as given: each worker fetches through its own cache).
- Requests are routed (`routing.py`: adapter affinity, or round-robin) in chunks: a worker gets
  more whenever its call returns, up to `1.25 * max_num_seqs` in flight, so its batch stays full
  while the backlog stays with the router. The driver reads the input ahead while fewer than
  `workers * 2 * max_num_seqs` requests wait in the router (those in flight come on top).
- A worker that dies (or raises) is dropped; its unfinished requests go back to the queue and
  run on the others. Results already returned were written; a result is yielded once per id.
  If every worker dies the run stops with an error (finished results are kept: rerun resumes),
  unless it was stopping anyway (Ctrl-C): then it ends as an interrupted run.
- `ship_adapters` (`--ship-adapters`; a local adapters folder only, a URL or manifest is refused):
  workers read no shared adapters folder; the driver ships each adapter's files through the object
  store to each worker that needs it, once (`shipping.py`).
  The model path must still resolve on every node (or be `default`).
- Bytes moved are measured: requests sent and results received (pickled sizes), adapter bytes
  each worker read from disk, adapter bytes shipped to each worker.
"""

from __future__ import annotations

import math
import os
import pickle
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from ..adapter_sources.urls import is_url, kind_of, local_path, redact
from ..config import EngineConfig
from ..errors import ConfigError, InputError, LoracliError
from ..requests import Request, RequestId
from ..results import Counters, Failure, Result, input_error_result
from ..sampling import SamplingParams
from .options import ClusterOptions
from .routing import make_router
from .shipping import AdapterShipper
from .worker import EngineWorker, Reply


class ClusterError(LoracliError):
    """The Ray workers could not start, or all of them died."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("Ray is not installed: pip install 'loracli[ray]'") from None
    return ray


def _absolute(config: EngineConfig) -> EngineConfig:
    """Workers may start in another folder: give them absolute paths."""
    model = config.model
    if model not in (None, "default") and Path(model).exists():
        model = str(Path(model).resolve())
    adapters = config.adapters_dir
    if adapters and not is_url(adapters):  # a folder or manifest path; URLs stay as given
        adapters = str(Path(local_path(adapters)).resolve())
    return replace(config, model=model, adapters_dir=adapters)


def _cause(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


class RayPool:
    def __init__(self, config: EngineConfig, options: ClusterOptions, log: Callable[[str], None] = lambda m: None):
        ray = self.ray = import_ray()
        self.config, self.options, self.log = config, options, log
        self.shipper: AdapterShipper | None = None
        self.handles: list = []
        folder = self._shipped_folder()  # before Ray starts: a bad option leaves nothing running
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            self._init_ray()
        try:
            described = self._start_workers(folder)
        except BaseException:
            self.close()
            raise
        first = described[0]
        self.model_name = first["model_name"]
        self.base_names = frozenset(first["base_names"])
        self.max_model_len = first["max_model_len"]
        self.dtype_name = first["dtype"]
        self.device_name = f"ray:{options.workers}x{first['device']}"
        # In flight per worker: a full batch plus a quarter to admit from as sequences finish. Kept
        # short so the backlog stays in the router, where any worker that runs short can take it.
        self.queue_target = config.max_num_seqs + max(1, config.max_num_seqs // 4)
        self.window = options.workers * 2 * config.max_num_seqs
        self.router = make_router(
            options.routing, options.workers, min_queue=config.max_num_seqs, max_waited=2 * self.window
        )
        self.sent: list[dict[RequestId, Request]] = [{} for _ in self.handles]
        self.replies: list[Reply | None] = [None] * len(self.handles)
        self.answered = [0] * len(self.handles)
        self.errors: list[str | None] = [None] * len(self.handles)
        self.request_bytes = 0
        self.result_bytes = 0
        self.stopping = False
        self.on_reply: Callable[[int, Reply], None] | None = None  # called after each reply (fault drills)

    def _init_ray(self) -> None:
        o = self.options
        kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        if o.address is None:
            need = o.workers * o.worker_cpus
            kwargs["num_cpus"] = max(os.cpu_count() or 1, math.ceil(need))
        else:
            kwargs["address"] = o.address
        try:
            self.ray.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - an unreachable cluster: one line
            raise ClusterError(
                f"address {o.address or '(local)'}: cannot start or reach Ray: {_cause(e)}", fields=("address",)
            ) from None

    def _shipped_folder(self) -> Path | None:
        if not (self.options.ship_adapters and self.config.adapters_dir):
            return None
        if kind_of(self.config.adapters_dir) != "folder":
            raise ConfigError(
                f"adapters_dir: ship_adapters sends a local folder's adapters to the workers; "
                f"{redact(self.config.adapters_dir)} is a URL or a manifest, which each worker reads itself "
                "(through its own cache): leave ship_adapters off",
                fields=("adapters_dir", "ship_adapters"),
            )
        folder = Path(local_path(self.config.adapters_dir)).resolve()
        if not folder.is_dir():
            raise ConfigError(f"adapters_dir: {folder} is not a folder", fields=("adapters_dir",))
        return folder

    def _start_workers(self, shipped_folder: Path | None) -> list[dict]:
        """Start the actors; with shipping, each gets the adapter names and the pinned adapters' files."""
        o, ray = self.options, self.ray
        gpus = self._worker_gpus()
        self._check_fits(gpus)
        threads = max(1, math.floor(o.worker_cpus))
        actor = ray.remote(EngineWorker).options(num_cpus=o.worker_cpus, num_gpus=gpus, max_restarts=0)
        names = None
        if shipped_folder is not None:
            self.shipper = AdapterShipper(ray, shipped_folder, o.workers)
            names = sorted(self.shipper.names)
        config = _absolute(self.config)
        t0 = time.perf_counter()
        for w in range(o.workers):
            pinned = self.shipper.ship(w, set(config.pinned), live=range(o.workers)) if self.shipper else None
            self.handles.append(actor.remote(config, threads, names, pinned))
        try:
            described = ray.get([h.describe.remote() for h in self.handles])
        except Exception as e:  # noqa: BLE001 - a worker that cannot start: one line with the cause
            raise ClusterError(f"a Ray worker failed to start: {_cause(e)}") from None
        self.log(f"{o.workers} Ray workers ready in {time.perf_counter() - t0:.1f}s")
        return described

    def _worker_gpus(self) -> float:
        if self.options.worker_gpus is not None:
            return self.options.worker_gpus
        has_gpus = self.ray.cluster_resources().get("GPU", 0) > 0
        return 1.0 if has_gpus and self.config.device != "cpu" else 0.0

    def _check_fits(self, gpus: float) -> None:
        o = self.options
        have = self.ray.cluster_resources()
        for name, each in (("CPU", o.worker_cpus), ("GPU", gpus)):
            if each and have.get(name, 0) < o.workers * each:
                raise ClusterError(
                    f"workers {o.workers} x {each:g} {name} need {o.workers * each:g} {name}s; "
                    f"the Ray cluster has {have.get(name, 0):g}",
                    fields=("workers",),
                )

    def close(self) -> None:
        """Workers remove their adapter copies (waiting 30 s at most), every actor is killed, and a Ray
        this pool started is shut down: each step even if the one before failed."""
        handles, self.handles = self.handles, []
        try:
            if self.shipper is not None and handles:
                self.ray.wait([h.close.remote() for h in handles], num_returns=len(handles), timeout=30)
        finally:
            try:
                for h in handles:
                    self.ray.kill(h)
            finally:
                if self.owns_ray and self.ray.is_initialized():
                    self.ray.shutdown()

    # The engine interface job.py uses.

    def preflight_many(self, reqs: list[Request], defaults: SamplingParams | None = None) -> list[Failure | None]:
        return self.ray.get(self.handles[self.router.live()[0]].preflight_many.remote(reqs, defaults))

    def stop_admitting(self) -> list[RequestId]:
        self.stopping = True
        return []

    def abort(self) -> None:
        """Nothing more to drop: the driver forgets what it did not get back; a pool serves one job."""
        self.stopping = True

    def residency(self) -> str:
        states = zip(self.replies, self.router.workers, strict=True)
        return " ".join(f"w{i}:{r.residency if r and s.alive else '-'}" for i, (r, s) in enumerate(states))

    def counters(self) -> Counters:
        total = Counters()
        for reply in self.replies:
            if reply is not None:
                total.add(reply.counters)
        return total

    def generate(
        self, requests: Iterable[Request | InputError], defaults: SamplingParams | None = None
    ) -> Iterator[Result]:
        """Stream results as workers finish them; input is read at most `window` requests ahead."""
        defaults = defaults or SamplingParams()
        source = iter(requests)
        exhausted = False
        calls: dict = {}  # ObjectRef -> worker
        while True:
            while not exhausted and not self.stopping and self.router.pending() < self.window:
                item = next(source, None)
                if item is None:
                    exhausted = True
                elif isinstance(item, InputError):
                    yield input_error_result(item)
                else:
                    self.router.add(item)
            self._dispatch(calls, defaults)
            if not calls:
                if self.stopping or (exhausted and not self.router.pending()):
                    return
                raise RuntimeError("requests pending but no worker took any")  # routing bug: never spin
            ready, _ = self.ray.wait(list(calls), num_returns=1)
            w = calls.pop(ready[0])
            try:
                reply = self.ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - a dead or failing worker: its requests run elsewhere
                self._lose(w, e)
                continue
            yield from self._absorb(w, reply)

    def _dispatch(self, calls: dict, defaults: SamplingParams) -> None:
        busy = set(calls.values())
        for w in self.router.live():
            if w in busy:
                continue
            new = [] if self.stopping else self.router.take(w, self.queue_target - self.router.inflight(w))
            if not new and not self.router.inflight(w):
                continue
            for req in new:
                self.sent[w][req.id] = req
            self.request_bytes += len(pickle.dumps(new, protocol=5))
            needed = {name for r in new for name in r.adapters}  # a mix needs each of its adapters
            adapters = self.shipper.ship(w, needed, live=self.router.live()) if self.shipper else None
            calls[self.handles[w].work.remote(new, defaults, self.stopping, adapters)] = w

    def _absorb(self, w: int, reply: Reply) -> Iterator[Result]:
        self.replies[w] = reply
        self.result_bytes += len(pickle.dumps(reply.results, protocol=5))
        done = [r.id for r in reply.results] + reply.dropped
        for rid in reply.dropped:
            self.sent[w].pop(rid, None)
        finished = [(r, self.sent[w].pop(r.id)) for r in reply.results if r.id in self.sent[w]]
        self.router.done(w, done)
        self.router.holds(w, reply.holds)
        self.answered[w] += len(finished)
        if self.on_reply is not None:
            self.on_reply(w, reply)
        for result, req in finished:
            yield replace(result, request=req)

    def _lose(self, w: int, error: BaseException) -> None:
        self.errors[w] = _cause(error)
        lost = list(self.sent[w].values())
        self.sent[w] = {}
        self.handles[w].close.remote()  # if it still runs: remove its adapter copies, then exit
        self.handles[w].__ray_terminate__.remote()
        self.router.lose(w, [] if self.stopping else lost)
        live = self.router.live()
        self.log(
            f"Ray worker {w} failed ({self.errors[w]}); {len(lost)} requests "
            f"{'dropped (stopping)' if self.stopping else 'sent to the others'}; {len(live)} left"
        )
        if not live and not self.stopping:  # stopping: what was lost is run by the resumed run
            raise ClusterError(
                f"all {self.options.workers} Ray workers failed; the last: {self.errors[w]} "
                "(finished results are kept: rerun the same command to resume)"
            )

    def reports(self) -> dict:
        live = self.router.live()
        refs = {w: self.handles[w].reports.remote() for w in live}
        got: dict[int, dict] = {}
        for w, ref in refs.items():
            try:
                got[w] = self.ray.get(ref, timeout=30)
            except Exception as e:  # noqa: BLE001 - a worker lost at the very end: its counts stay
                self.errors[w] = _cause(e)
        return {
            "slots": {f"worker{w}": r["slots"] for w, r in got.items()},
            "merges": {f"worker{w}": r["merges"] for w, r in got.items()},
            "cluster": self.cluster_report(),
        }

    def cluster_report(self) -> dict:
        per_worker = []
        for w, reply in enumerate(self.replies):
            c = reply.counters if reply else Counters()
            state = self.router.workers[w]
            per_worker.append(
                {
                    "worker": w,
                    "alive": state.alive,
                    "error": self.errors[w],
                    "requests": self.answered[w],
                    "sent": state.sent,
                    "adapters_loaded": c.disk_loads,
                    "adapter_bytes_read": c.disk_bytes,
                    "swaps": c.slot_activations,
                    "slot_evictions": c.slot_evictions,
                    "peak_rss_mib": round(reply.peak_rss_mib, 1) if reply else None,
                    "adapters_shipped": len(self.shipper.sent[w]) if self.shipper else 0,
                    "adapter_bytes_shipped": self.shipper.bytes_sent[w] if self.shipper else 0,
                    "holds": reply.holds if reply else [],
                }
            )
        return {
            "workers": self.options.workers,
            "routing": self.options.routing,
            "address": self.options.address,
            "resent": self.router.resent,
            "stolen": getattr(self.router, "stolen", 0),
            "starved": getattr(self.router, "starved", 0),
            "request_bytes_sent": self.request_bytes,
            "result_bytes_received": self.result_bytes,
            "adapter_bytes_read": sum(p["adapter_bytes_read"] for p in per_worker),
            "ship_adapters": self.shipper is not None,
            "adapter_bytes_shipped": sum(p["adapter_bytes_shipped"] for p in per_worker),
            "adapter_bytes_read_by_driver": self.shipper.bytes_read if self.shipper else 0,
            "adapters_loaded": sum(p["adapters_loaded"] for p in per_worker),
            "per_worker": per_worker,
        }
