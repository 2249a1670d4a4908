"""The systems under test: names, parsing, and how each one generates a `Job`'s requests.

Names (`parse_systems`, comma-separated; `all` = every kind below):

- `loracli`: the engine with its current defaults; `loracli:KEY=VALUE[:KEY=VALUE...]` a variant
  with `EngineConfig` fields changed (`loracli:max-loras=4`, `loracli:max-num-seqs=16`).
  `max_lora_rank` is raised to the workload's largest rank when the default is too small.
- `base`: the loracli engine with every request's adapter removed (the LoRA overhead reference).
- `peft-mixed`: transformers + PEFT, every adapter loaded into one `PeftModel`, static batches of
  `baseline_batch` requests in arrival order, `generate(..., adapter_names=[...])` (base-model
  requests use `"__base__"`), left padding, greedy.
- `peft-grouped`: the same model, requests grouped by adapter (groups in order of first use),
  `set_adapter(name)` then batches; base-model requests under `disable_adapter()`.
- `merged-swap`: plain transformers; for each adapter group, `W += scale * B @ A` computed in
  float32 (loracli's validated adapter reader), the group's batches, then the saved `W` restored
  exactly (no drift); the merges are inside the timed run.
- `vllm`: offline `LLM(enable_lora=True)` with a `LoRARequest` per request; only when
  `import vllm` works, otherwise the system is skipped with a note.

Every system gets the same token ids, dtype, device and thread count. With ignore-eos, HF
systems pass `min_new_tokens = max_new_tokens`; a static batch runs to its longest request and
each request keeps its own `max_tokens` (the rest is the price of static batching). Times are
seconds from the start of the timed run: `ttft` when the request's first token exists, `latency`
when it is finished (for a static batch: when its `generate` returns).

Heavy imports (torch models, transformers, peft, vllm) happen inside the runners only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..config import EngineConfig
from ..errors import ConfigError
from ..sizes import parse_bytes

KINDS = ("loracli", "peft-mixed", "peft-grouped", "merged-swap", "base", "vllm", "loracli-ray")
ALL_KINDS = KINDS[:-1]  # `all`: loracli-ray needs Ray and starts a local Ray instance, so it is asked for by name
# loracli-ray settings of ClusterOptions
CLUSTER_FIELDS = ("workers", "worker_cpus", "worker_gpus", "routing", "ship_adapters")
BASE_ADAPTER = "__base__"
FIXED_ENGINE_FIELDS = ("model", "adapters_dir", "dtype", "device")
BYTE_FIELDS = ("memory_budget", "kv_cache_memory")  # take sizes such as 512MiB
DEFAULT_MAX_LORA_RANK = EngineConfig().max_lora_rank


@dataclass(frozen=True)
class SystemSpec:
    name: str  # as written, e.g. "loracli:max-loras=4"
    kind: str
    overrides: tuple[tuple[str, object], ...] = ()  # EngineConfig field -> value (loracli only)
    cluster: tuple[tuple[str, object], ...] = ()  # ClusterOptions field -> value (loracli-ray only)


def _engine_value(key: str, raw: str) -> tuple[str, object]:
    name = key.strip().replace("-", "_")
    known = {f.name: str(f.type) for f in fields(EngineConfig)}
    if name not in known or name in FIXED_ENGINE_FIELDS:
        allowed = sorted(k.replace("_", "-") for k in known if k not in FIXED_ENGINE_FIELDS)
        raise ConfigError(f"--systems: {key!r} is not an engine setting (known: {', '.join(allowed)})")
    kind, text = known[name], raw.strip()
    if "None" in kind and text.lower() == "none":
        return name, None
    if kind.startswith("bool"):
        return name, _bool_value(key, raw)
    if name in BYTE_FIELDS:
        return name, parse_bytes(text, f"--systems: {key}")
    if kind.startswith("int"):
        try:
            return name, int(text)
        except ValueError:
            raise ConfigError(f"--systems: {key} must be an integer, got {raw!r}") from None
    return name, text


def _bool_value(key: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise ConfigError(f"--systems: {key} must be true or false, got {raw!r}")
    return text in ("true", "1")


def parse_system(text: str) -> SystemSpec:
    """`loracli:max-loras=4:max-num-seqs=16` -> SystemSpec("...", "loracli", (("max_loras", 4), ...))."""
    name = text.strip()
    kind, _, rest = name.partition(":")
    if kind not in KINDS:
        raise ConfigError(f"--systems: unknown system {name!r} (known: {', '.join(KINDS)}, all, loracli:KEY=VALUE)")
    if not rest:
        return SystemSpec(name, kind)
    if kind not in ("loracli", "loracli-ray"):
        raise ConfigError(f"--systems: only loracli and loracli-ray take settings, got {name!r}")
    overrides, cluster = [], []
    for item in rest.split(":"):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--systems: expected KEY=VALUE after '{kind}:', got {item!r}")
        field_name = key.strip().replace("-", "_")
        if kind == "loracli-ray" and field_name in CLUSTER_FIELDS:
            cluster.append(_cluster_value(field_name, value))
        else:
            overrides.append(_engine_value(key, value))
    EngineConfig(**dict(overrides))  # validates values with the engine's own messages
    if cluster:
        from ..cluster.pool import ClusterOptions

        ClusterOptions(**dict(cluster))
    return SystemSpec(name, kind, tuple(overrides), tuple(cluster))


def _cluster_value(name: str, raw: str) -> tuple[str, object]:
    text = raw.strip()
    if name == "ship_adapters":
        return name, _bool_value("ship-adapters", raw)
    try:
        return name, {"workers": int, "worker_cpus": float, "worker_gpus": float}.get(name, str)(text)
    except ValueError:
        raise ConfigError(f"--systems: {name.replace('_', '-')} must be a number, got {raw!r}") from None


def parse_systems(text: str) -> list[SystemSpec]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--systems: name at least one system")
    out: list[SystemSpec] = []
    for n in names:
        for spec in [parse_system(k) for k in ALL_KINDS] if n == "all" else [parse_system(n)]:
            if spec.name not in {s.name for s in out}:
                out.append(spec)
    return out


def lora_rank_limit(max_rank: int) -> int:
    """The engine's `max_lora_rank` for a workload: the default, or the next power of two above a larger rank."""
    limit = DEFAULT_MAX_LORA_RANK
    while limit < max_rank:
        limit *= 2
    return limit


@dataclass
class Job:
    """Everything a worker needs to run one system on one workload (JSON-serializable)."""

    system: str
    model: str
    adapters_dir: str | None
    dtype: str  # a torch dtype name, never "auto"
    device: str
    threads: int
    baseline_batch: int
    ignore_eos: bool
    max_lora_rank: int
    pad_id: int
    eos_ids: list[int]
    requests: list[dict]  # BenchRequest fields plus "ids": the prompt token ids
    warmup: int = 4


@dataclass
class Record:
    id: str
    tokens: list[int]
    ttft: float | None
    latency: float
    error: str | None = None
    wait: float | None = None  # seconds from the engine taking the request to its first token (loracli)


@dataclass
class Timed:
    """What a system's timed run produced: one record per request and its counters."""

    records: list[Record]
    wall: float
    counters: dict = field(default_factory=dict)


@dataclass
class Measurement:
    """What a worker reports for one system: the timed run's records, timings, counters and memory."""

    system: str
    records: list[Record] = field(default_factory=list)
    wall: float = 0.0
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0
    counters: dict = field(default_factory=dict)
    peak_rss_mib: float | None = None
    rss_delta_mib: float | None = None
    error: str | None = None
    skipped: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Measurement:
        return cls(**{**d, "records": [Record(**r) for r in d.get("records", [])]})


def warmup_requests(requests: list[dict], n: int) -> list[dict]:
    """Up to n requests, one per adapter first (order of first use), each cut to 4 output tokens."""
    if n <= 0:
        return []
    seen: set[str | None] = set()
    firsts, rest = [], []
    for r in requests:
        (rest if r["adapter"] in seen else firsts).append(r)
        seen.add(r["adapter"])
    chosen = (firsts + rest)[:n]
    return [{**r, "id": f"warmup-{i}", "max_tokens": min(4, r["max_tokens"])} for i, r in enumerate(chosen)]


class System:
    """One loaded system: `run(requests)` generates them all and times it (call once to warm up)."""

    counters_note = ""

    def run(self, requests: list[dict]) -> Timed:
        raise NotImplementedError

    def elsewhere_rss_mib(self) -> float:
        """Peak memory of processes other than this one the system ran in (Ray workers)."""
        return 0.0

    def close(self) -> None:
        """Release what outlives this process otherwise (Ray workers and their files)."""


class LoracliSystem(System):
    def __init__(self, job: Job, spec: SystemSpec):
        overrides = dict(spec.overrides)
        overrides.setdefault("max_lora_rank", job.max_lora_rank)
        self.strip = spec.kind == "base"
        self.ignore_eos = job.ignore_eos
        config = EngineConfig(
            model=job.model, adapters_dir=job.adapters_dir, dtype=job.dtype, device=job.device, **overrides
        )
        self.engine = self.load(config, spec)

    def load(self, config: EngineConfig, spec: SystemSpec):
        from ..engine.engine import Engine

        return Engine(config)

    def _requests(self, requests: list[dict]):
        from ..requests import Request

        out = []
        for r in requests:
            req = Request(
                r["id"],
                None if self.strip else r["adapter"],
                r["prompt"],
                r["messages"],
                {"max_tokens": r["max_tokens"], "ignore_eos": self.ignore_eos, "temperature": 0.0},
            )
            if hasattr(self.engine, "tokenize") and self.engine.tokenize(req) != r["ids"]:
                raise RuntimeError(f"request {r['id']}: the engine tokenizes the prompt differently from the bench")
            out.append(req)
        return out

    def counters(self) -> dict:
        e = self.engine
        return {
            "steps": e.stats.steps,
            "prefill_steps": e.stats.prefill_steps,
            "slot_activations": e.slots.stats.activations,
            "slot_evictions": e.slots.stats.evictions,
            "slot_hits": e.slots.stats.hits,
            "disk_loads": e.store.stats.disk_loads,
            "cpu_evictions": e.store.stats.cpu_evictions,
            "preemptions": e.scheduler.preemptions,
            "oom_backoffs": e.stats.oom_backoffs,
            "slot_resizes": len(e.resizer.timeline.resizes),
            "slots": e.slots.n_slots,
            "merges": e.merger.report()["merges"],
        }

    def run(self, requests: list[dict]) -> Timed:
        reqs = self._requests(requests)
        before = self.counters()
        t0 = time.perf_counter()
        records = []
        for res in self.engine.generate(reqs):
            error = f"{res.error[0]}: {res.error[1]}" if res.error else None
            ttft = res.first_token - t0 if res.first_token is not None else None
            wait = res.first_token - res.arrival if res.first_token is not None else None
            records.append(Record(res.id, list(res.token_ids), ttft, res.finished - t0, error, wait))
        wall = time.perf_counter() - t0
        after = self.counters()
        return Timed(records, wall, {k: after[k] - before[k] for k in after})


class LoracliRaySystem(LoracliSystem):
    """loracli-ray[:KEY=VALUE...]: `loracli run --ray` engine replicas (a local Ray instance)."""

    counters_note = "summed over the Ray workers"

    def load(self, config: EngineConfig, spec: SystemSpec):
        from ..cluster.pool import ClusterOptions, RayPool

        return RayPool(config, ClusterOptions(**dict(spec.cluster)))

    def counters(self) -> dict:
        c, rep = self.engine.counters(), self.engine.cluster_report()
        return {
            "steps": c.steps,
            "slot_activations": c.slot_activations,
            "slot_evictions": c.slot_evictions,
            "disk_loads": c.disk_loads,
            "preemptions": c.preemptions,
            "resent": rep["resent"],
            "stolen": rep["stolen"],
            "request_bytes": rep["request_bytes_sent"],
            "result_bytes": rep["result_bytes_received"],
            "adapter_bytes": rep["adapter_bytes_read"],
            "shipped_bytes": rep["adapter_bytes_shipped"],
        }

    def elsewhere_rss_mib(self) -> float:
        return sum(w["peak_rss_mib"] or 0.0 for w in self.engine.cluster_report()["per_worker"])

    def close(self) -> None:
        self.engine.close()


class FirstStep:
    """A logits processor that only notes when it is first called: the first token of a batch exists."""

    def __init__(self):
        self.time: float | None = None

    def __call__(self, input_ids, scores):
        if self.time is None:
            self.time = time.perf_counter()
        return scores


class HFSystem(System):
    """Shared by the transformers baselines: model loading, padded static batches, output cutting."""

    def __init__(self, job: Job):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.job = job
        self.dtype = getattr(torch, job.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(job.model, dtype=self.dtype).to(job.device).eval()
        self.switches = 0

    def generate(self, model, batch: list[dict], t0: float, **kwargs) -> list[Record]:
        from transformers import GenerationConfig, LogitsProcessorList

        torch, job = self.torch, self.job
        width = max(len(r["ids"]) for r in batch)
        ids = torch.tensor([[job.pad_id] * (width - len(r["ids"])) + r["ids"] for r in batch], device=job.device)
        mask = torch.tensor([[0] * (width - len(r["ids"])) + [1] * len(r["ids"]) for r in batch], device=job.device)
        max_new = max(r["max_tokens"] for r in batch)
        config = GenerationConfig(
            max_new_tokens=max_new,
            min_new_tokens=max_new if job.ignore_eos else None,
            do_sample=False,
            pad_token_id=job.pad_id,
            eos_token_id=job.eos_ids or None,
        )
        first = FirstStep()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([first]),
                **kwargs,
            )
        end = time.perf_counter() - t0
        ttft = first.time - t0 if first.time is not None else None
        return [
            Record(r["id"], self.cut(out[i, width:].tolist(), r["max_tokens"]), ttft, end) for i, r in enumerate(batch)
        ]

    def cut(self, tokens: list[int], max_tokens: int) -> list[int]:
        tokens = tokens[:max_tokens]
        if not self.job.ignore_eos:
            for i, t in enumerate(tokens):
                if t in self.job.eos_ids:
                    return tokens[: i + 1]
        return tokens

    def batches(self, requests: list[dict]) -> list[list[dict]]:
        b = self.job.baseline_batch
        return [requests[i : i + b] for i in range(0, len(requests), b)]

    def grouped(self, requests: list[dict]) -> list[tuple[str | None, list[dict]]]:
        groups: dict[str | None, list[dict]] = {}
        for r in requests:
            groups.setdefault(r["adapter"], []).append(r)
        return list(groups.items())

    def timed(self, requests: list[dict], body: Callable[[float], list[Record]]) -> Timed:
        self.switches = 0
        t0 = time.perf_counter()
        records = body(t0)
        return Timed(records, time.perf_counter() - t0, {"adapter_switches": self.switches})


def load_peft(model, adapters_dir: str, names: list[str], dtype):
    """One PeftModel holding every named adapter (PEFT adapter names are the folder names), cast to dtype."""
    from peft import PeftModel

    if not names:
        return model
    peft_model = PeftModel.from_pretrained(model, str(Path(adapters_dir) / names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(Path(adapters_dir) / name), adapter_name=name)
    return peft_model.to(dtype).eval()


def adapters_of(requests: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["adapter"] for r in requests if r["adapter"] is not None))


class PeftMixedSystem(HFSystem):
    def __init__(self, job: Job):
        super().__init__(job)
        self.names = adapters_of(job.requests)
        self.peft = load_peft(self.model, job.adapters_dir, self.names, self.dtype)

    def run(self, requests: list[dict]) -> Timed:
        def body(t0: float) -> list[Record]:
            out = []
            for batch in self.batches(requests):
                kwargs = {}
                if self.names:
                    kwargs["adapter_names"] = [r["adapter"] or BASE_ADAPTER for r in batch]
                out.extend(self.generate(self.peft, batch, t0, **kwargs))
            return out

        return self.timed(requests, body)


class PeftGroupedSystem(PeftMixedSystem):
    def run(self, requests: list[dict]) -> Timed:
        def body(t0: float) -> list[Record]:
            out = []
            for adapter, group in self.grouped(requests):
                self.switches += 1
                for batch in self.batches(group):
                    if adapter is None and self.names:
                        with self.peft.disable_adapter():
                            out.extend(self.generate(self.peft, batch, t0))
                        continue
                    if adapter is not None:
                        self.peft.set_adapter(adapter)
                    out.extend(self.generate(self.peft, batch, t0))
            return out

        return self.timed(requests, body)


class MergedSwapSystem(HFSystem):
    def __init__(self, job: Job):
        from ..adapters import load_adapter
        from ..model.spec import ModelSpec

        super().__init__(job)
        self.spec = ModelSpec.from_hf_config(self.model.config)
        self.adapters = {
            name: load_adapter(Path(job.adapters_dir) / name, self.spec, dtype=self.dtype)
            for name in adapters_of(job.requests)
        }

    def merge(self, name: str) -> dict:
        """Add the adapter's scale * B @ A into the base weights (float32 math); returns the originals."""
        saved = {}
        for (layer, module), (a, b) in self.adapters[name].modules.items():
            weight = self.model.get_submodule(self.spec.module_path(layer, module)).weight
            saved[(layer, module)] = weight.detach().clone()
            weight.data.copy_((weight.float() + b.float() @ a.float()).to(weight.dtype))
        return saved

    def restore(self, saved: dict) -> None:
        for (layer, module), original in saved.items():
            self.model.get_submodule(self.spec.module_path(layer, module)).weight.data.copy_(original)

    def run(self, requests: list[dict]) -> Timed:
        def body(t0: float) -> list[Record]:
            out = []
            for adapter, group in self.grouped(requests):
                saved = {}
                if adapter is not None:
                    self.switches += 1
                    with self.torch.inference_mode():
                        saved = self.merge(adapter)
                try:
                    for batch in self.batches(group):
                        out.extend(self.generate(self.model, batch, t0))
                finally:
                    self.restore(saved)
            return out

        return self.timed(requests, body)


class VllmSystem(System):
    def __init__(self, job: Job):
        from vllm import LLM

        self.job = job
        names = adapters_of(job.requests)
        self.lora_ids = {name: i + 1 for i, name in enumerate(names)}
        self.llm = LLM(
            model=job.model,
            dtype=job.dtype,
            enable_lora=bool(names),
            max_loras=max(1, min(8, len(names))),
            max_lora_rank=job.max_lora_rank,
            seed=0,
        )

    def run(self, requests: list[dict]) -> Timed:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        prompts = [{"prompt_token_ids": r["ids"]} for r in requests]
        params = [
            SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=self.job.ignore_eos)
            for r in requests
        ]
        loras = [
            LoRARequest(r["adapter"], self.lora_ids[r["adapter"]], str(Path(self.job.adapters_dir) / r["adapter"]))
            if r["adapter"]
            else None
            for r in requests
        ]
        t0 = time.perf_counter()
        start = time.time()
        outputs = self.llm.generate(prompts, params, lora_request=loras if self.lora_ids else None, use_tqdm=False)
        wall = time.perf_counter() - t0
        records = []
        for r, out in zip(requests, outputs, strict=True):
            metrics = getattr(out, "metrics", None)
            first = getattr(metrics, "first_token_time", None)
            done = getattr(metrics, "finished_time", None)
            records.append(
                Record(
                    r["id"],
                    list(out.outputs[0].token_ids),
                    first - start if first else None,
                    done - start if done else wall,
                )
            )
        return Timed(records, wall)


def vllm_missing() -> str | None:
    """Why the vllm system cannot run here, or None."""
    from importlib.util import find_spec

    return None if find_spec("vllm") is not None else "vllm is not installed (import vllm fails): skipped"


def build_system(job: Job) -> System:
    spec = parse_system(job.system)
    if spec.kind in ("loracli", "base"):
        return LoracliSystem(job, spec)
    if spec.kind == "loracli-ray":
        return LoracliRaySystem(job, spec)
    builders = {
        "peft-mixed": PeftMixedSystem,
        "peft-grouped": PeftGroupedSystem,
        "merged-swap": MergedSwapSystem,
        "vllm": VllmSystem,
    }
    return builders[spec.kind](job)
