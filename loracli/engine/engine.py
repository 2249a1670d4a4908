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

import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace

import torch

from ..adapter_store import AdapterStore, refuse_base_names
from ..config import EngineConfig
from ..devices import deterministic_default, dtype_name, is_out_of_memory, resolve_device, resolve_dtype
from ..errors import AdapterError, ConfigError, InputError
from ..model.llama import CausalLM
from ..model.loader import load_config, load_state_dict, load_tokenizer
from ..model_source import default_model_name, resolve_model
from ..quantiles import percentile
from ..requests import Request, RequestId
from ..results import Counters, Failure, Result, input_error_result
from ..sampling import SamplingParams
from .block_manager import BlockManager
from .memory_budget import MemoryBudget, working_bytes
from .merge_policy import MergePolicy
from .merger import MergeOrders, Merger
from .model_runner import ModelRunner
from .sampler import sample
from .scheduler import Batch, Scheduler
from .sequence import Sequence
from .slot_policy import SlotPolicy
from .slot_resizer import SlotResizer
from .slots import SlotManager


class Engine:
    """One base model, its adapter tiers and KV cache, stepped as schedule -> run -> postprocess.

    Implements `loracli.engine_api.BatchEngine` (the interface the job drives).
    """

    def __init__(self, config: EngineConfig, *, progress: bool = False):
        if config.min_loras is None or config.max_cpu_loras is None:  # filled in by validation
            raise TypeError("EngineConfig was not validated")
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        det = config.deterministic
        self.deterministic = deterministic_default(dtype_name(self.dtype)) if det is None else det
        folder = resolve_model(config.model, progress=progress, allow_pickle=config.allow_pickle)
        self.model_folder = folder
        hf_config, self.spec = load_config(folder)
        self.tokenizer = load_tokenizer(folder)
        self.model_name = default_model_name() if config.model in (None, "default") else folder.name
        refuse_base_names(config.adapters_dir, self.base_names)
        self.max_model_len = config.max_model_len or self.spec.max_position
        if self.max_model_len > self.spec.max_position:
            raise ConfigError(
                f"max_model_len {self.max_model_len} is above the model's context length {self.spec.max_position}",
                fields=("max_model_len",),
            )
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
            deterministic=self.deterministic,
        )
        budget = self._memory_budget()
        num_blocks = self._kv_blocks(budget, slots)
        self.model.allocate_kv(num_blocks * config.block_size)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.slots = SlotManager(slots, pinned=frozenset(config.pinned))
        self.store = AdapterStore(
            config.adapters_dir,
            self.spec,
            max_cpu_loras=config.max_cpu_loras,
            max_lora_rank=config.max_lora_rank,
            allow_pickle=config.allow_pickle,
            dtype=self.dtype,
        )
        self.scheduler = Scheduler(config, self.blocks, self.slots, self._ensure_adapter)
        self.model_runner = ModelRunner(self.model, self.blocks)
        policy = SlotPolicy(
            config.min_loras,
            config.max_loras,
            cooldown=config.slot_cooldown_steps,
            window=config.resize_window_steps,
            max_resizes=config.max_resizes,
        )
        self.resizer = SlotResizer(
            policy if config.dynamic_slots else None,
            budget,
            self.slots,
            self.blocks,
            self.model,
            min_loras=config.min_loras,
            max_loras=config.max_loras,
            weights_of=lambda name: self.store.get(name, count_hit=False),
            verify=config.verify_slots,
        )
        self.merger = Merger(MergePolicy(config.merge_policy, credit_steps=config.starvation_steps), self.model_runner)
        self._pin(config.pinned)
        self.generators: dict[int, torch.Generator] = {}
        self.counts = Counters()  # this engine's own counters; `counters()` adds the parts'
        self.swap_seconds: list[float] = []  # time to write each adapter activated by a step into its slot
        self._next_seq = 0
        self._arrivals: dict[int, tuple[float, float | None]] = {}

    # --- start-up ----------------------------------------------------------------------------------

    def _memory_budget(self) -> MemoryBudget | None:
        cfg = self.config
        if cfg.gpu_memory_utilization is not None:
            if self.device.type != "cuda":
                raise ConfigError(
                    "gpu_memory_utilization needs a CUDA device; on CPU give memory_budget",
                    fields=("gpu_memory_utilization", "memory_budget"),
                )
            total = int(cfg.gpu_memory_utilization * torch.cuda.get_device_properties(self.device).total_memory)
        elif cfg.memory_budget is not None:
            total = cfg.memory_budget
        else:
            return None
        if cfg.num_kv_blocks is not None:
            raise ConfigError(
                "give a memory budget or a fixed number of KV blocks (num_kv_blocks), not both",
                fields=("num_kv_blocks",),
            )
        elem = torch.finfo(self.dtype).bits // 8
        return MemoryBudget(
            total,
            self.model.weight_bytes(),
            working_bytes(self.spec, cfg.max_batched_tokens, cfg.max_num_seqs, elem),
            self.model.slot_bytes(),
            self.model.kv_bytes_per_row() * cfg.block_size,
        )

    def _kv_blocks(self, budget: MemoryBudget | None, slots: int) -> int:
        cfg = self.config
        if budget is not None:
            budget.check(slots, -(-self.max_model_len // cfg.block_size))
            return budget.kv_blocks(slots)
        if cfg.num_kv_blocks:
            return cfg.num_kv_blocks
        rows_needed = cfg.max_num_seqs * (self.max_model_len + cfg.block_size)
        by_memory = cfg.kv_cache_memory // (self.model.kv_bytes_per_row() * cfg.block_size)
        return max(1, min(by_memory, -(-rows_needed // cfg.block_size)))

    def _pin(self, names: tuple[str, ...]) -> None:
        """Load the pinned adapters into slots now; they are never evicted."""
        for name in names:
            if not self.store.has(name):
                known = ", ".join(self.store.names()) or "none"
                raise ConfigError(f"pinned: unknown adapter {name!r} (known: {known})", fields=("pinned",))
            try:
                weights = self.store.get(name)
            except AdapterError as e:
                raise ConfigError(f"pinned {name}: {e}", fields=("pinned",)) from None
            slot, _, write = self.slots.place(name, 0)
            if write:
                self.model_runner.write_adapter(slot, weights)

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

    # --- what the job reads ------------------------------------------------------------------------

    @property
    def base_names(self) -> frozenset[str]:
        return frozenset({self.model_name, self.model_folder.name, "base"})

    @property
    def device_name(self) -> str:
        return str(self.device)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def counters(self) -> Counters:
        store, slots = self.store.stats, self.slots.stats
        return replace(
            self.counts,
            preemptions=self.scheduler.preemptions,
            disk_loads=store.disk_loads,
            disk_bytes=store.disk_bytes,
            cpu_hits=store.cpu_hits,
            slot_activations=slots.activations,
            slot_evictions=slots.evictions,
            per_adapter=dict(self.counts.per_adapter),
        )

    def reports(self) -> dict:
        """The slot and merge reports of `--stats` (timelines, tiers, swap times, memory split)."""
        return {"slots": {**self.resizer.report(), **self._tier_report()}, "merges": self.merger.report()}

    def _tier_report(self) -> dict:
        store, slots = self.store.stats, self.slots.stats
        writes_ms = [1e3 * s for s in self.swap_seconds]
        p50, p99 = percentile(writes_ms, 50), percentile(writes_ms, 99)
        return {
            "disk_loads": store.disk_loads,
            "cpu_hits": store.cpu_hits,
            "cpu_evictions": store.cpu_evictions,
            "slot_activations": slots.activations,
            "slot_hits": slots.hits,
            "slot_evictions": slots.evictions,
            "swap_ms_p50": None if p50 is None else round(p50, 3),
            "swap_ms_p99": None if p99 is None else round(p99, 3),
            "swap_ms_mean": round(statistics.fmean(writes_ms), 3) if writes_ms else None,
        }

    def residency(self) -> str:
        """Progress text: adapters in slots / slots."""
        return f"{len(self.slots.resident())}/{self.slots.n_slots}"

    def close(self) -> None:
        """Nothing to release: a local engine's memory goes with the object."""

    # --- requests in -------------------------------------------------------------------------------

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

    def check(self, req: Request, defaults: SamplingParams) -> tuple[list[int], SamplingParams] | Failure:
        """The one admission check: the prompt's token ids and the request's sampling parameters
        (`max_tokens` cut to the context when the request did not set it), or why it cannot run."""
        if req.adapter is not None and not self.store.has(req.adapter):
            known = ", ".join(self.store.names()) or "none"
            return Failure("unknown_adapter", f"unknown adapter {req.adapter!r} (known: {known})", "adapter")
        try:
            ids = self.tokenize(req)
        except Exception as e:  # noqa: BLE001 - a template or tokenizer failure fails this request only
            return Failure("bad_request", f"cannot tokenize: {type(e).__name__}: {e}", "prompt")
        if len(ids) >= self.max_model_len:
            return Failure(
                "prompt_too_long", f"prompt has {len(ids)} tokens; the context is {self.max_model_len}", "prompt"
            )
        params = self._params(req, defaults)
        room = self.max_model_len - len(ids)
        if params.max_tokens > room:
            if "max_tokens" in req.params:
                message = (
                    f"max_tokens {params.max_tokens} + prompt {len(ids)} tokens exceed the context of "
                    f"{self.max_model_len}"
                )
                return Failure("max_tokens_too_large", message, "max_tokens")
            params.max_tokens = room
        if self.blocks.blocks_for(len(ids) + params.max_tokens) > self.blocks.num_blocks:
            message = "prompt + max_tokens need more KV cache than allotted (raise kv_cache_memory)"
            return Failure("too_large_for_cache", message, "max_tokens")
        return ids, params

    def preflight_many(self, reqs: list[Request], defaults: SamplingParams | None = None) -> list[Failure | None]:
        """Why `add_request` would refuse each request (for a strict job), or None."""
        defaults = defaults or SamplingParams()
        return [c if isinstance(c, Failure) else None for c in (self.check(r, defaults) for r in reqs)]

    def add_request(self, req: Request, defaults: SamplingParams | None = None) -> Result | None:
        """Queue a request; returns an error `Result` at once if it cannot run."""
        now = time.perf_counter()
        checked = self.check(req, defaults or SamplingParams())
        if isinstance(checked, Failure):
            return self._error(req, checked, now)
        ids, params = checked
        seq = Sequence(self._next_seq, req.id, req.adapter, ids, params, payload=req)
        self._next_seq += 1
        seed = params.seed if params.seed is not None else self.config.seed * 1_000_003 + seq.seq_id
        if params.temperature > 0:
            self.generators[seq.seq_id] = torch.Generator().manual_seed(seed)
        self._arrivals[seq.seq_id] = (now, None)
        self.scheduler.add(seq)
        return None

    def stop_admitting(self) -> list[RequestId]:
        """Drop the requests still waiting (not started): a resumed run does them. Returns their ids."""
        dropped = [seq.request_id for seq in self.scheduler.waiting]
        for seq in self.scheduler.waiting:
            self._arrivals.pop(seq.seq_id, None)
            self.generators.pop(seq.seq_id, None)
        self.scheduler.waiting.clear()
        return dropped

    def abort(self) -> None:
        """Drop every request, started or not, and restore unmerged weights: a job that failed or
        stopped at once leaves no work behind for the next job on this engine."""
        self.stop_admitting()
        for seq in list(self.scheduler.running):
            self.scheduler.finish(seq)
            self._arrivals.pop(seq.seq_id, None)
            self.generators.pop(seq.seq_id, None)
        self._apply(self.merger.settle(self.scheduler.step_no))

    def _ensure_adapter(self, name: str) -> str | None:
        try:
            self.store.get(name)
        except AdapterError as e:
            return str(e)
        return None

    # --- the step ----------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Result]:
        """One engine step: controllers -> schedule -> run -> postprocess. Returns the requests it finished."""
        self._between_steps()
        batch = self.scheduler.schedule()
        out = [self._fail_seq(seq, Failure("adapter_error", reason, "adapter")) for seq, reason in batch.failed]
        for slot, name in batch.activations:
            t0 = time.perf_counter()
            self.model_runner.write_adapter(slot, self.store.get(name, count_hit=False))
            self.swap_seconds.append(time.perf_counter() - t0)
        if not batch.seqs:
            return out
        seqs = sorted(batch.seqs, key=self.model_runner.slot_of)
        t0 = time.perf_counter()
        try:
            logits = self.model_runner.run(seqs, batch.is_prefill)
        except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(e):
                raise
            return out + self._back_off(batch, e)
        out += self._postprocess(seqs, logits, batch.is_prefill, t0)
        if not self.has_work():
            self._apply(self.merger.settle(self.scheduler.step_no))
        return out

    def _between_steps(self) -> None:
        """The controllers, at one place: slot resizing, then merging; the engine applies their orders."""
        sched, step = self.scheduler, self.scheduler.step_no
        demand = len(sched.pending_adapters(self.config.max_num_seqs))
        sched.reserve_blocks = self.resizer.between_steps(step, demand, sched.running, sched.kv_blocked)
        self._apply(self.merger.between_steps(step, sched.waiting, sched.running, self.slots.lookup))

    def _apply(self, orders: MergeOrders) -> None:
        self.scheduler.only_adapter = orders.only_adapter
        self.slots.set_held(orders.held)

    def _postprocess(self, seqs: list[Sequence], logits: torch.Tensor, is_prefill: bool, t0: float) -> list[Result]:
        """Sample a token for each sequence, fail those with non-finite logits, finish those done."""
        self.counts.steps += 1
        self.counts.prefill_steps += is_prefill
        out = []
        top, greedy = logits.max(dim=-1)  # one pass: NaN or inf in a row makes its max non-finite
        bad = (~torch.isfinite(top)).tolist()
        if any(bad):
            for seq, is_bad in zip(seqs, bad, strict=True):
                if is_bad:
                    self.scheduler.finish(seq)
                    out.append(self._fail_seq(seq, Failure("engine_error", "non-finite logits")))
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
        return out

    def _back_off(self, batch: Batch, error: RuntimeError) -> list[Result]:
        """Out of device memory in one step: the scheduler lowers its limits and requeues; a lone
        sequence fails."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.counts.oom_backoffs += 1
        if len(batch.seqs) == 1:
            seq = batch.seqs[0]
            self.scheduler.finish(seq)
            return [self._fail_seq(seq, Failure("out_of_memory", f"out of device memory even alone: {error}"))]
        self.scheduler.back_off(batch)
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

    # --- results out -------------------------------------------------------------------------------

    def _finish(self, seq: Sequence) -> Result:
        if not seq.text:
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        arrival, first = self._arrivals.pop(seq.seq_id)
        self.generators.pop(seq.seq_id, None)
        self.counts.prompt_tokens += seq.num_prompt
        key = seq.adapter or "<base>"
        self.counts.per_adapter[key] = self.counts.per_adapter.get(key, 0) + 1
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
            wait_steps=None if seq.admitted_step is None else seq.admitted_step - seq.arrival_step,
        )

    def _error(self, req: Request, failure: Failure, arrival: float) -> Result:
        return Result(req, req.id, req.adapter, error=failure, arrival=arrival, finished=time.perf_counter())

    def _fail_seq(self, seq: Sequence, failure: Failure) -> Result:
        arrival, _ = self._arrivals.pop(seq.seq_id, (time.perf_counter(), None))
        self.generators.pop(seq.seq_id, None)
        return Result(
            seq.payload, seq.request_id, seq.adapter, error=failure, arrival=arrival, finished=time.perf_counter()
        )

    def next_token_logits(self, adapter: str | None, token_ids: list[int]) -> torch.Tensor:
        """float32 logits [V] after `token_ids` under `adapter`, outside any batch (a verification aid).

        Must be called while the engine is idle; uses the same slots, cache and forward as `step`.
        """
        if self.has_work():
            raise RuntimeError("next_token_logits needs an idle engine")
        self._apply(self.merger.settle(self.scheduler.step_no))
        seq = Sequence(-1, "score", adapter, list(token_ids), SamplingParams())
        if adapter is not None:
            slot, _, write = self.slots.place(adapter, self.scheduler.step_no)
            if write:
                self.model_runner.write_adapter(slot, self.store.get(adapter))
            seq.slot = slot
        self.blocks.allocate(seq)
        try:
            return self.model_runner.run([seq], is_prefill=True)[0]
        finally:
            self.blocks.free_seq(seq)

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
                    yield input_error_result(item)
                    continue
                failure = self.add_request(item, defaults)
                if failure is not None:
                    yield failure
            if not self.has_work():
                if exhausted:
                    return
                continue
            yield from self.step()
