"""`Engine`: the Python API. Loads the base model once, then streams requests through
schedule -> run -> postprocess steps and yields a `Result` per request as it finishes.

    engine = Engine(EngineConfig(model=..., adapters_dir=...))
    for result in engine.generate(requests):   # Requests (or InputErrors) from `requests.py`
        ...

Requests are pulled lazily from the iterable (at most `window` wait inside the engine), so a
100k-line input never sits in memory. Failures of one request (unknown or broken adapter,
prompt too long, non-finite logits) become that request's error result; the run goes on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ..adapter_store import AdapterStore
from ..config import EngineConfig
from ..errors import AdapterError, ConfigError, InputError
from ..model.llama import CausalLM
from ..model.loader import load_config, load_state_dict, load_tokenizer
from ..model_source import default_model_name, resolve_model
from ..requests import Request
from .block_manager import BlockManager
from .memory_budget import MemoryBudget, working_bytes
from .merge_policy import MergePolicy
from .merger import Merger
from .model_runner import ModelRunner
from .sampler import sample
from .scheduler import Scheduler
from .sequence import SamplingParams, Sequence
from .slot_policy import SlotPolicy
from .slot_resizer import SlotResizer
from .slots import SlotManager


@dataclass
class Result:
    request: Request | None
    id: str
    adapter: str | None
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: tuple[str, str] | None = None  # (type, message)
    token_ids: list[int] = field(default_factory=list)
    arrival: float = 0.0
    first_token: float | None = None
    finished: float = 0.0
    wait_steps: int | None = None  # engine steps from arrival to first admission


@dataclass
class RunStats:
    requests: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0
    prefill_steps: int = 0
    per_adapter: dict[str, int] = field(default_factory=dict)
    oom_backoffs: int = 0


@dataclass
class Counters:
    """What one engine did so far, summed over engines by a pool of workers (`cluster/pool.py`)."""

    prompt_tokens: int = 0
    steps: int = 0
    oom_backoffs: int = 0
    preemptions: int = 0
    disk_loads: int = 0  # adapters read from disk into the CPU cache
    disk_bytes: int = 0
    cpu_hits: int = 0
    slot_activations: int = 0  # adapters written into a device slot (swaps in)
    slot_evictions: int = 0
    per_adapter: dict[str, int] = field(default_factory=dict)

    def add(self, other: Counters) -> None:
        for name, value in vars(other).items():
            if name == "per_adapter":
                for key, n in value.items():
                    self.per_adapter[key] = self.per_adapter.get(key, 0) + n
            else:
                setattr(self, name, getattr(self, name) + value)


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    fast_bf16 = any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return torch.bfloat16 if fast_bf16 else torch.float32


class Engine:
    def __init__(self, config: EngineConfig, *, progress: bool = False):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        folder = resolve_model(config.model, progress=progress, allow_pickle=config.allow_pickle)
        self.model_folder = folder
        hf_config, self.spec = load_config(folder)
        self.tokenizer = load_tokenizer(folder)
        self.model_name = default_model_name() if config.model in (None, "default") else folder.name
        self.max_model_len = min(config.max_model_len or self.spec.max_position, self.spec.max_position)
        self.eos_ids = self._eos_ids(folder)
        state = load_state_dict(folder, lambda k: not k.startswith("lm_head") or not self.spec.tie_embeddings)
        slots = config.min_loras if config.dynamic_slots else config.max_loras
        self.model = CausalLM(
            hf_config,
            self.spec,
            state,
            dtype=self.dtype,
            device=self.device,
            n_slots=slots,
            max_rank=config.max_lora_rank,
            max_len=self.max_model_len,
        )
        budget = self._memory_budget()
        if budget is not None:
            budget.check(slots, -(-self.max_model_len // config.block_size))
            num_blocks = budget.kv_blocks(slots)
        else:
            rows_needed = config.max_num_seqs * (self.max_model_len + config.block_size)
            num_blocks = config.num_kv_blocks or max(
                1,
                min(
                    config.kv_cache_memory // (self.model.kv_bytes_per_row() * config.block_size),
                    -(-rows_needed // config.block_size),
                ),
            )
        self.model.allocate_kv(num_blocks * config.block_size)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.slots = SlotManager(slots, pinned=set(config.pinned))
        self.store = AdapterStore(
            config.adapters_dir,
            self.spec,
            max_cpu_loras=config.max_cpu_loras,
            max_lora_rank=config.max_lora_rank,
            allow_pickle=config.allow_pickle,
            dtype=self.dtype,
        )
        self.scheduler = Scheduler(config, self.blocks, self.slots, self._ensure_adapter)
        self.runner = ModelRunner(self.model, self.blocks)
        policy = SlotPolicy(
            config.min_loras,
            config.max_loras,
            cooldown=config.slot_cooldown_steps,
            window=config.resize_window_steps,
            max_resizes=config.max_resizes,
        )
        self.resizer = SlotResizer(self, policy if config.dynamic_slots else None, budget)
        self.merger = Merger(self, MergePolicy(config.merge_policy, credit_steps=config.starvation_steps))
        self._pin(config.pinned)
        self.generators: dict[int, torch.Generator] = {}
        self.stats = RunStats()
        self._next_seq = 0
        self._arrivals: dict[int, tuple[float, float | None]] = {}

    def _memory_budget(self) -> MemoryBudget | None:
        cfg = self.config
        if cfg.gpu_memory_utilization is not None:
            if self.device.type != "cuda":
                raise ConfigError("--gpu-memory-utilization needs a CUDA device; on CPU give --memory-budget")
            total = int(cfg.gpu_memory_utilization * torch.cuda.get_device_properties(self.device).total_memory)
        elif cfg.memory_budget is not None:
            total = cfg.memory_budget
        else:
            return None
        if cfg.num_kv_blocks is not None:
            raise ConfigError("give a memory budget or a fixed number of KV blocks, not both")
        elem = torch.finfo(self.dtype).bits // 8
        return MemoryBudget(
            total,
            self.model.weight_bytes(),
            working_bytes(self.spec, cfg.max_batched_tokens, cfg.max_num_seqs, elem),
            self.model.slot_bytes(),
            self.model.kv_bytes_per_row() * cfg.block_size,
        )

    def _pin(self, names: tuple[str, ...]) -> None:
        """Load the pinned adapters into slots now; they are never evicted."""
        for name in names:
            if not self.store.has(name):
                raise ConfigError(f"--pin: unknown adapter {name!r} (known: {', '.join(self.store.names()) or 'none'})")
            try:
                weights = self.store.get(name)
            except AdapterError as e:
                raise ConfigError(f"--pin {name}: {e}") from None
            slot, _, write = self.slots.place(name, 0)
            if write:
                self.runner.write_adapter(slot, weights)

    def _eos_ids(self, folder) -> set[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        try:
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(str(folder), local_files_only=True).eos_token_id
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        except (OSError, ValueError):
            pass
        return ids

    @property
    def base_names(self) -> frozenset[str]:
        return frozenset({self.model_name, self.model_folder.name, "base"})

    def preflight(self, req: Request) -> str | None:
        """Why `add_request` would refuse `req` (for --strict), or None."""
        if req.adapter is not None and not self.store.has(req.adapter):
            return f"field 'adapter': unknown adapter {req.adapter!r}"
        try:
            n = len(self.tokenize(req))
        except Exception as e:  # noqa: BLE001 - as add_request: a tokenizer failure is this record's problem
            return f"cannot tokenize: {type(e).__name__}: {e}"
        if n >= self.max_model_len:
            return f"field 'prompt': {n} tokens; the context is {self.max_model_len}"
        max_tokens = req.params.get("max_tokens")
        if max_tokens is not None and n + max_tokens > self.max_model_len:
            return f"field 'max_tokens': {max_tokens} + prompt {n} tokens exceed the context of {self.max_model_len}"
        return None

    def preflight_many(self, reqs: list[Request]) -> list[str | None]:
        return [self.preflight(r) for r in reqs]

    def counters(self) -> Counters:
        st, store, slots = self.stats, self.store.stats, self.slots.stats
        return Counters(
            st.prompt_tokens,
            st.steps,
            st.oom_backoffs,
            self.scheduler.preemptions,
            store.disk_loads,
            store.disk_bytes,
            store.cpu_hits,
            slots.activations,
            slots.evictions,
            dict(st.per_adapter),
        )

    def reports(self) -> dict:
        """The slot and merge reports of `--stats` (timelines, swap times, memory split)."""
        return {"slots": self.resizer.report(), "merges": self.merger.report()}

    def residency(self) -> str:
        """Progress text: adapters in slots / slots."""
        return f"{len(self.slots.resident())}/{self.slots.n_slots}"

    def stop_admitting(self) -> list[str]:
        """Drop the requests still waiting (not started): a resumed run does them. Returns their ids."""
        dropped = [seq.request_id for seq in self.scheduler.waiting]
        for seq in self.scheduler.waiting:
            self._arrivals.pop(seq.seq_id, None)
            self.generators.pop(seq.seq_id, None)
        self.scheduler.waiting.clear()
        return dropped

    def _ensure_adapter(self, name: str) -> str | None:
        try:
            self.store.get(name)
        except AdapterError as e:
            return str(e)
        return None

    def tokenize(self, req: Request) -> list[int]:
        if req.messages is not None:
            text = self.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(req.prompt)["input_ids"]

    def _params(self, req: Request, defaults: SamplingParams) -> SamplingParams:
        p = req.params
        return SamplingParams(
            max_tokens=p.get("max_tokens", defaults.max_tokens),
            temperature=p.get("temperature", defaults.temperature),
            top_p=p.get("top_p", defaults.top_p),
            seed=p.get("seed", defaults.seed),
            stop=p.get("stop", defaults.stop),
            ignore_eos=p.get("ignore_eos", defaults.ignore_eos),
        )

    def add_request(self, req: Request, defaults: SamplingParams | None = None) -> Result | None:
        """Queue a request; returns an error `Result` at once if it cannot run."""
        defaults = defaults or SamplingParams()
        now = time.perf_counter()
        if req.adapter is not None and not self.store.has(req.adapter):
            known = ", ".join(self.store.names()) or "none"
            return self._error(req, "unknown_adapter", f"unknown adapter {req.adapter!r} (known: {known})", now)
        try:
            ids = self.tokenize(req)
        except Exception as e:  # noqa: BLE001 - a template or tokenizer failure fails this request only
            return self._error(req, "bad_request", f"cannot tokenize: {type(e).__name__}: {e}", now)
        params = self._params(req, defaults)
        if len(ids) >= self.max_model_len:
            return self._error(
                req, "prompt_too_long", f"prompt has {len(ids)} tokens; the context is {self.max_model_len}", now
            )
        room = self.max_model_len - len(ids)
        if params.max_tokens > room:
            if "max_tokens" in req.params:
                return self._error(
                    req,
                    "max_tokens_too_large",
                    f"max_tokens {params.max_tokens} + prompt {len(ids)} tokens exceed "
                    f"the context of {self.max_model_len}",
                    now,
                )
            params.max_tokens = room
        if self.blocks.blocks_for(len(ids) + params.max_tokens) > self.blocks.num_blocks:
            return self._error(
                req,
                "too_large_for_cache",
                "prompt + max_tokens need more KV cache than allotted (raise --kv-cache-memory)",
                now,
            )
        seq = Sequence(self._next_seq, req.id, req.adapter, ids, params, payload=req)
        self._next_seq += 1
        seed = params.seed if params.seed is not None else self.config.seed * 1_000_003 + seq.seq_id
        if params.temperature > 0:
            self.generators[seq.seq_id] = torch.Generator().manual_seed(seed)
        self._arrivals[seq.seq_id] = (now, None)
        self.scheduler.add(seq)
        return None

    def _error(
        self,
        req: Request | None,
        kind: str,
        message: str,
        arrival: float,
        rid: str | None = None,
        adapter: str | None = None,
    ) -> Result:
        self.stats.requests += 1
        self.stats.failed += 1
        return Result(
            req,
            rid if req is None else req.id,
            adapter if req is None else req.adapter,
            error=(kind, message),
            arrival=arrival,
            finished=time.perf_counter(),
        )

    def next_token_logits(self, adapter: str | None, token_ids: list[int]) -> torch.Tensor:
        """float32 logits [V] after `token_ids` under `adapter`, outside any batch (a verification aid).

        Must be called while the engine is idle; uses the same slots, cache and forward as `step`.
        """
        if self.has_work():
            raise RuntimeError("next_token_logits needs an idle engine")
        self.merger.settle(self.scheduler.step_no)
        seq = Sequence(-1, "score", adapter, list(token_ids), SamplingParams())
        if adapter is not None:
            slot, _, write = self.slots.place(adapter, self.scheduler.step_no)
            if write:
                self.runner.write_adapter(slot, self.store.get(adapter))
            seq.slot = slot
        self.blocks.allocate(seq)
        try:
            return self.runner.run([seq], is_prefill=True)[0]
        finally:
            self.blocks.free_seq(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Result]:
        """One engine step: schedule -> run -> postprocess. Returns the requests finished by it."""
        self.resizer.between_steps(self.scheduler.step_no)
        self.merger.between_steps(self.scheduler.step_no)
        batch = self.scheduler.schedule()
        out = [self._fail_seq(seq, "adapter_error", reason) for seq, reason in batch.failed]
        for slot, name in batch.activations:
            t0 = time.perf_counter()
            self.runner.write_adapter(slot, self.store.get(name, count_hit=False))
            self.resizer.timeline.write_seconds.append(time.perf_counter() - t0)
        if not batch.seqs:
            return out
        seqs = sorted(batch.seqs, key=self.runner.slot_of)
        t0 = time.perf_counter()
        try:
            logits = self.runner.run(seqs, batch.is_prefill)
        except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(e):
                raise
            return out + self._back_off(batch, e)
        self.stats.steps += 1
        self.stats.prefill_steps += batch.is_prefill
        top, greedy = logits.max(dim=-1)  # one pass: NaN or inf in a row makes its max non-finite
        bad = (~torch.isfinite(top)).tolist()
        if any(bad):
            for seq, is_bad in zip(seqs, bad, strict=True):
                if is_bad:
                    self.scheduler.finish(seq)
                    out.append(self._fail_seq(seq, "engine_error", "non-finite logits"))
            keep = [i for i, b in enumerate(bad) if not b]
            seqs, logits, greedy = [seqs[i] for i in keep], logits[keep], greedy[keep]
        tokens = sample(logits, seqs, self.generators, greedy) if seqs else []
        now = time.perf_counter()
        self.merger.observe_step(now - t0, len(tokens))
        for seq, tok in zip(seqs, tokens, strict=True):
            seq.token_ids.append(tok)
            arrival, first = self._arrivals[seq.seq_id]
            if first is None:
                self._arrivals[seq.seq_id] = (arrival, now)
            if self._check_finished(seq, tok):
                self.scheduler.finish(seq)
                out.append(self._finish(seq))
        if not self.has_work():
            self.merger.settle(self.scheduler.step_no)
        return out

    def _back_off(self, batch, error: RuntimeError) -> list[Result]:
        """Out of device memory in one step: halve the batch limits, requeue, retry; a lone sequence fails."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.stats.oom_backoffs += 1
        if len(batch.seqs) == 1:
            seq = batch.seqs[0]
            self.scheduler.finish(seq)
            return [self._fail_seq(seq, "out_of_memory", f"out of device memory even alone: {error}")]
        cfg = self.config
        if batch.is_prefill:
            cfg.max_batched_tokens = max(1, sum(len(s) for s in batch.seqs) // 2)
            victims = list(batch.seqs)
        else:
            cfg.max_num_seqs = max(1, len(batch.seqs) // 2)
            victims = self.scheduler.running[cfg.max_num_seqs :]
        for seq in reversed(victims):
            self.scheduler.preempt(seq)
        return []

    def _check_finished(self, seq: Sequence, tok: int) -> bool:
        p = seq.params
        if not p.ignore_eos and tok in self.eos_ids:
            seq.finish_reason = "stop"
            return True
        if p.stop:
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                seq.text, seq.finish_reason = text[:cut], "stop"
                return True
        if seq.num_output >= p.max_tokens or len(seq) >= self.max_model_len:
            seq.finish_reason = "length"
            return True
        return False

    def _finish(self, seq: Sequence) -> Result:
        if not seq.text:
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        arrival, first = self._arrivals.pop(seq.seq_id)
        self.generators.pop(seq.seq_id, None)
        st = self.stats
        st.requests += 1
        st.prompt_tokens += seq.num_prompt
        st.completion_tokens += seq.num_output
        key = seq.adapter or "<base>"
        st.per_adapter[key] = st.per_adapter.get(key, 0) + 1
        return Result(
            seq.payload,
            seq.request_id,
            seq.adapter,
            seq.text,
            seq.finish_reason,
            seq.num_prompt,
            seq.num_output,
            token_ids=list(seq.output_ids),
            arrival=arrival,
            first_token=first,
            finished=time.perf_counter(),
            wait_steps=seq.admitted_step - seq.arrival_step,
        )

    def _fail_seq(self, seq: Sequence, kind: str, message: str) -> Result:
        arrival, _ = self._arrivals.pop(seq.seq_id, (time.perf_counter(), None))
        self.generators.pop(seq.seq_id, None)
        return self._error(seq.payload, kind, message, arrival, seq.request_id, seq.adapter)

    def generate(
        self,
        requests: Iterable[Request | InputError],
        defaults: SamplingParams | None = None,
        window: int | None = None,
    ) -> Iterator[Result]:
        """Stream results as requests finish; input is pulled lazily, at most `window` waiting."""
        window = window or 4 * self.config.max_num_seqs
        source = iter(requests)
        exhausted = False
        while True:
            while not exhausted and len(self.scheduler.waiting) < window:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                if isinstance(item, InputError):
                    yield self._error(None, "invalid_request", str(item), time.perf_counter(), str(item.line))
                    continue
                failure = self.add_request(item, defaults)
                if failure is not None:
                    yield failure
            if not self.has_work():
                if exhausted:
                    return
                continue
            yield from self.step()
