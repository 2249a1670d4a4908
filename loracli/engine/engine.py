"""`Engine`: the Python API. Loads the base model once, then streams requests through
schedule -> run -> postprocess steps and yields a `Result` per request as it finishes.

    engine = Engine(EngineConfig(model=..., adapters_dir=...))
    for result in engine.generate(requests):   # Requests (or InputErrors) from `requests.py`
        ...

Requests are pulled lazily from the iterable (at most `window` wait inside the engine), so a
100k-line input never sits in memory. Failures of one request (unknown or broken adapter,
prompt too long, non-finite logits) become that request's error result; the run goes on.
A request for an adapter mix (`Request.mix`) is checked at admission: at most `max_loras`
adapters, each known, loadable and plain LoRA (`NOT_PLAIN_LORA` refused); results and the
per-adapter counts name the mix ("shout*0.7+brief*0.5").
A request's structure (`SamplingParams.structure`) is compiled at admission (a schema that does not
compile, or no grammar engine installed, is that request's error) and its grammar masks its row's
logits before sampling (`structured.py`); logprobs and prompt logprobs are taken for the requests
that ask (`logprobs.py`) and handed back in the `Result`.

Adapters are loaded in the background (`adapter_loader.py`, `adapter_load_workers` threads): each
step first starts loads for the adapters its waiting requests name, and the scheduler skips the
requests of an adapter still loading while the others run; a step with nothing else to do waits
for a load. With `adapter_load_workers=0` an adapter is read inside the step that admits it.

A request for n > 1 samples is n sequences (a `SampleGroup`): its prompt is prefilled once and
its KV blocks shared (see scheduler.py); sample i draws with its own generator seeded seed + i
(wrapping at 2**64; without a seed, the run's derived seed + i), so with temperature 0 the n
answers are the same greedy one, as OpenAI gives them. Its one `Result` goes out when all n
samples have finished (`Result.choices`); when one fails, the others are dropped and the
request fails.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import fields, replace

import torch

from ..adapter_loader import AdapterLoader
from ..adapter_sources import Catalog, open_catalog
from ..adapter_store import AdapterStore, refuse_base_names, vocab_costs
from ..config import EngineConfig
from ..devices import deterministic_default, dtype_name, is_out_of_memory, resolve_device, resolve_dtype
from ..errors import AdapterError, ConfigError, InputError
from ..model.llama import CausalLM
from ..model.loader import load_config, load_state_dict, load_tokenizer
from ..model_source import default_model_name, resolve_model
from ..quantiles import percentile
from ..requests import AdapterMix, Request, RequestId
from ..results import Choice, Counters, Failure, Result, TokenLogprob, input_error_result
from ..sampling import SEED_RANGE, SamplingParams, conflict
from .block_manager import BlockManager, prefix_identity
from .logprobs import TokenText, capture, prompt_entries, record
from .memory_budget import MemoryBudget, working_bytes
from .merge_policy import MergePolicy
from .merger import MergeOrders, Merger
from .model_runner import ModelRunner
from .sampler import sample
from .scheduler import Batch, Scheduler
from .sequence import SampleGroup, Sequence, Status
from .slot_policy import SlotPolicy
from .slot_resizer import SlotResizer
from .slots import SlotManager
from .structured import EXTRA_HINT, StructuredOutputs

# LoraWeights parts beyond plain LoRA linears (DoRA magnitudes, LoRA and trained base biases,
# embedding/lm_head parts): an adapter holding any of them is refused in a mix
NOT_PLAIN_LORA = ("magnitudes", "lora_biases", "base_biases", "vocab")


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
        self.catalog = open_catalog(config.adapters_dir)  # names and sources; remote ones fetched when loaded
        refuse_base_names(self.catalog, self.base_names)
        self.pins = all_pins(config, self.catalog)
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
        self.blocks = BlockManager(num_blocks, config.block_size, prefix_caching=config.enable_prefix_caching)
        self.slots = SlotManager(slots, pinned=frozenset(self.pins))
        self.store = AdapterStore(
            self.catalog,
            self.spec,
            max_cpu_loras=config.max_cpu_loras,
            max_lora_rank=config.max_lora_rank,
            allow_pickle=config.allow_pickle,
            dtype=self.dtype,
        )
        self.loader = AdapterLoader(self.store, config.adapter_load_workers)
        self.scheduler = Scheduler(
            config, self.blocks, self.slots, self._ensure_adapter, lambda name: not self.loader.is_loading(name)
        )
        self.model_runner = ModelRunner(self.model, self.blocks)
        self.scheduler.cache_identity = self._prefix_identity
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
            weights_of=lambda name: self.loader.get(name, count_hit=False),
            verify=config.verify_slots,
        )
        self.merger = Merger(MergePolicy(config.merge_policy, credit_steps=config.starvation_steps), self.model_runner)
        self._pin(self.pins)
        self.generators: dict[int, torch.Generator] = {}
        self.counts = Counters()  # this engine's own counters; `counters()` adds the parts'
        self.swap_seconds: list[float] = []  # time to write each adapter activated by a step into its slot
        self._next_seq = 0
        self._arrivals: dict[int, tuple[float, float | None]] = {}
        self.structured = StructuredOutputs(self.tokenizer, self.spec.vocab_size, self.eos_ids, config.max_num_seqs)
        self.token_text = TokenText(self.tokenizer)

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
            working_bytes(self.spec, self._step_tokens(), cfg.max_num_seqs, elem),
            self.model.slot_bytes(),
            self.model.kv_bytes_per_row() * cfg.block_size,
            vocab_costs(self.catalog, elem, cfg.allow_pickle, self.spec.tie_embeddings),
        )

    def _step_tokens(self) -> int:
        """Most tokens of one step but a lone long prompt: a mixed step adds a token per running sequence."""
        cfg = self.config
        return cfg.max_batched_tokens + (cfg.max_num_seqs if cfg.mixed_prefill else 0)

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
        store, slots, loads = self.store.stats, self.slots.stats, self.loader.snapshot()
        return replace(
            self.counts,
            preemptions=self.scheduler.preemptions,
            disk_loads=store.disk_loads,
            disk_bytes=store.disk_bytes,
            cpu_hits=store.cpu_hits,
            background_loads=loads.background_loads,
            load_wait_seconds=loads.wait_seconds,
            load_hidden_seconds=loads.hidden_seconds,
            load_wait_steps=loads.wait_steps,
            slot_activations=slots.activations,
            slot_evictions=slots.evictions,
            prefill_tokens=self.blocks.stats.prefill_tokens,
            prefix_lookup_blocks=self.blocks.stats.lookup_blocks,
            prefix_hit_blocks=self.blocks.stats.hit_blocks,
            prefix_saved_tokens=self.blocks.stats.hit_tokens,
            per_adapter=dict(self.counts.per_adapter),
        )

    def reports(self) -> dict:
        """The slot and merge reports of `--stats` (timelines, tiers, swap times, memory split)."""
        return {"slots": {**self.resizer.report(), **self._tier_report()}, "merges": self.merger.report()}

    def _tier_report(self) -> dict:
        store, slots, loads = self.store.stats, self.slots.stats, self.loader.snapshot()
        writes_ms = [1e3 * s for s in self.swap_seconds]
        p50, p99 = percentile(writes_ms, 50), percentile(writes_ms, 99)
        return {
            "disk_loads": store.disk_loads,
            "cpu_hits": store.cpu_hits,
            "cpu_evictions": store.cpu_evictions,
            "background_loads": loads.background_loads,
            "load_wait_seconds": round(loads.wait_seconds, 3),
            "load_hidden_seconds": round(loads.hidden_seconds, 3),
            "load_wait_steps": loads.wait_steps,
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
        """Stop the adapter loader (at once: loads not started are cancelled); memory goes with the object."""
        self.loader.close()

    # --- requests in -------------------------------------------------------------------------------

    def tokenize(self, req: Request) -> list[int]:
        if req.messages is not None:
            text = self.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(req.prompt)["input_ids"]

    def _params(self, req: Request, defaults: SamplingParams) -> SamplingParams | Failure:
        """What the request sets, else the run's default, per field; a Failure when two clash."""
        values = {f.name: req.params.get(f.name, getattr(defaults, f.name)) for f in fields(SamplingParams)}
        try:
            return SamplingParams(**values)
        except ConfigError as e:
            return Failure("invalid_request", str(e), e.fields[0] if e.fields else None)

    def _token_ids_problem(self, params: SamplingParams) -> Failure | None:
        """A `logit_bias` or `stop_token_ids` token outside the vocabulary, else None."""
        vocab = self.spec.vocab_size
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            outside = [t for t in ids if t >= vocab]
            if outside:
                message = f"token id {outside[0]} is not in the vocabulary (0..{vocab - 1})"
                return Failure("invalid_request", message, name)
        return None

    def check(self, req: Request, defaults: SamplingParams) -> tuple[list[int], SamplingParams] | Failure:
        """The one admission check: the prompt's token ids and the request's sampling parameters
        (`max_tokens` cut to the context when the request did not set it), or why it cannot run."""
        if req.mix is not None:
            refused = self._check_mix(req.mix)
            if refused is not None:
                return refused
        elif req.adapter is not None and not self.store.has(req.adapter):
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
        if isinstance(params, Failure):
            return params
        refused = self._token_ids_problem(params) or self._structure_problem(params)
        if refused is not None:
            return refused
        room = self.max_model_len - len(ids)
        if params.max_tokens > room:
            if "max_tokens" in req.params:
                message = (
                    f"max_tokens {params.max_tokens} + prompt {len(ids)} tokens exceed the context of "
                    f"{self.max_model_len}"
                )
                return Failure("max_tokens_too_large", message, "max_tokens")
            params.max_tokens = room
        clash = conflict(params.min_tokens, params.max_tokens)
        if clash is not None:
            return Failure("invalid_request", f"{clash} (the room left in the context)", "min_tokens")
        if self.blocks.blocks_for(len(ids) + params.max_tokens) > self.blocks.num_blocks:
            message = "prompt + max_tokens need more KV cache than allotted (raise kv_cache_memory)"
            return Failure("too_large_for_cache", message, "max_tokens")
        return ids, params

    def _structure_problem(self, params: SamplingParams) -> Failure | None:
        """Why the request's structure cannot be used (with min_tokens, grammar engine missing, does not
        compile), else None."""
        structure = params.structure
        if structure is None:
            return None
        if params.min_tokens:
            message = "min_tokens cannot be combined with structured output: the grammar decides where it ends"
            return Failure("invalid_request", message, "min_tokens")
        try:
            reason = self.structured.compile(structure)
        except ImportError:
            return Failure("missing_extra", EXTRA_HINT, structure.source or None)
        return None if reason is None else Failure("invalid_structure", reason, structure.source or None)

    def _check_mix(self, mix: AdapterMix) -> Failure | None:
        """Why an adapter mix cannot run: more adapters than `max_loras` slots, an unknown or broken
        adapter, or one with more than plain LoRA linears (DoRA, biases, vocab parts), else None."""
        if len(mix.parts) > self.config.max_loras:
            message = f"the mix needs {len(mix.parts)} adapters in slots at once; max_loras is {self.config.max_loras}"
            return Failure("unsupported_mix", message, "adapter")
        for name in mix.adapters:
            if not self.store.has(name):
                known = ", ".join(self.store.names()) or "none"
                return Failure("unknown_adapter", f"unknown adapter {name!r} in the mix (known: {known})", "adapter")
            try:
                weights = self.loader.get(name)
            except AdapterError as e:
                return Failure("adapter_error", str(e), "adapter")
            extra = [part for part in NOT_PLAIN_LORA if getattr(weights, part, None)]
            if extra:
                message = f"adapter {name!r} has {', '.join(extra)}: a mix takes plain LoRA adapters only"
                return Failure("unsupported_mix", message, "adapter")
        return None

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
        group = SampleGroup(params.n) if params.n > 1 else None
        seqs = [
            Sequence(self._next_seq + i, req.id, req.adapter, list(ids), params, payload=req, mix=req.mix, group=group)
            for i in range(params.n)
        ]
        self._next_seq += params.n
        seed = params.seed if params.seed is not None else self.config.seed * 1_000_003 + seqs[0].seq_id
        for i, seq in enumerate(seqs):
            seq.sample_index = i
            if params.temperature > 0:
                self.generators[seq.seq_id] = torch.Generator().manual_seed(sample_seed(seed, i))
            self._arrivals[seq.seq_id] = (now, None)
            seq.arrival_step = self.scheduler.step_no
        if group is not None:
            group.members = seqs
        seqs[0].forks = seqs[1:]
        self.scheduler.add(seqs[0])
        return None

    def stop_admitting(self) -> list[RequestId]:
        """Drop the requests still waiting (not started): a resumed run does them. Returns their ids.

        A waiting sample of a request whose other samples started stays: the request is in flight."""
        waiting = self.scheduler.waiting
        started = [s for s in waiting if s.group is not None and _started(s.group)]
        dropped = [s for s in waiting if not any(s is k for k in started)]
        self._forget(dropped)
        waiting.clear()
        waiting.extend(started)
        return list(dict.fromkeys(seq.request_id for seq in dropped))

    def _forget(self, seqs: list[Sequence]) -> None:
        """Drop the timing and generators of `seqs` and of the samples still to be forked from them."""
        for seq in seqs:
            for s in [seq, *seq.forks]:
                self._arrivals.pop(s.seq_id, None)
                self.generators.pop(s.seq_id, None)
                self.structured.release(s.seq_id)

    def abort(self) -> None:
        """Drop every request, started or not, and restore unmerged weights: a job that failed or
        stopped at once leaves no work behind for the next job on this engine."""
        self.stop_admitting()
        self._forget(list(self.scheduler.waiting))
        self.scheduler.waiting.clear()
        for seq in list(self.scheduler.running):
            self.blocks.forget(seq)  # a step may have stopped before writing its KV: out of the prefix cache
            self.scheduler.finish(seq)
            self._forget([seq])
        self._apply(self.merger.settle(self.scheduler.step_no))

    def _prefix_identity(self, seq: Sequence) -> tuple | None:
        """A sequence's prefix-cache identity now (`block_manager.prefix_identity`): the merged
        adapter and, for a longrope model, whether its length takes the long RoPE table."""
        switch = self.model.rope.switch
        return prefix_identity(seq, self.model_runner.merged, switch is not None and len(seq) > switch)

    def _ensure_adapter(self, name: str) -> str | None:
        try:
            self.loader.get(name)
        except AdapterError as e:
            return str(e)
        return None

    # --- the step ----------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Result]:
        """One engine step: controllers -> schedule -> run -> postprocess. Returns the requests it finished."""
        self._between_steps()
        self._prefetch()
        batch = self.scheduler.schedule()
        out = _some(self._fail_seq(seq, Failure("adapter_error", reason, "adapter")) for seq, reason in batch.failed)
        for slot, name in batch.activations:
            t0 = time.perf_counter()
            self.model_runner.write_adapter(slot, self.loader.get(name, count_hit=False))
            self.swap_seconds.append(time.perf_counter() - t0)
        if not batch.seqs:
            if not batch.failed and self.scheduler.waiting:
                self.loader.wait_any()  # only requests of adapters still loading are left
            return out
        seqs = sorted(batch.seqs, key=self.model_runner.slot_of)
        decode = sorted(batch.decode, key=self.model_runner.slot_of)  # a mixed step's decoding sequences
        t0 = time.perf_counter()
        try:
            logits = self.model_runner.run(seqs, batch.is_prefill, decode)  # [len(seqs) + len(decode), V]
        except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(e):
                raise
            return out + self._back_off(batch, e)
        if batch.copies:
            self.model_runner.copy_blocks(batch.copies)
        seqs = seqs + decode
        if batch.forks:
            seqs, logits = _with_forks(seqs, logits, batch.forks)
        self.counts.mixed_steps += bool(decode)
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

    def _prefetch(self) -> None:
        """Start background loads for the adapters waiting requests name (not in a slot), in arrival
        order; the adapters of waiting and running requests are the store's last to evict."""
        if not self.loader.workers:
            return
        sched = self.scheduler
        wanted = dict.fromkeys(n for s in sched.waiting for n in s.adapters if self.slots.lookup(n) is None)
        needed = set(wanted).union(*(s.adapters for s in sched.running))
        self.store.protected = frozenset(needed)
        self.loader.prefetch(wanted, needed)

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
                if is_bad and seq.status is Status.RUNNING:  # not dropped with a failed sibling
                    self.blocks.forget(seq)  # its KV may be non-finite too: never share it
                    self.scheduler.finish(seq)
                    out += _some([self._fail_seq(seq, Failure("engine_error", "non-finite logits"))])
            keep = [i for i, seq in enumerate(seqs) if seq.status is Status.RUNNING]  # not failed nor dropped
            seqs, logits, greedy = [seqs[i] for i in keep], logits[keep], greedy[keep]
        greedy = self._constrain(logits, seqs, greedy)
        captured = capture(logits, seqs)
        tokens = sample(logits, seqs, self.generators, greedy, self.eos_ids) if seqs else []
        record(captured, seqs, tokens, self.token_text)
        if is_prefill:
            self._prompt_logprobs(seqs)
        now = time.perf_counter()
        self.merger.observe_step(now - t0, len(tokens))
        for seq, tok in zip(seqs, tokens, strict=True):
            if seq.status is not Status.RUNNING:  # dropped with a failed sibling this step
                continue
            seq.token_ids.append(tok)
            arrival, first = self._arrivals[seq.seq_id]
            if first is None:
                self._arrivals[seq.seq_id] = (arrival, now)
            if not self.structured.accept(seq, tok):
                self.scheduler.finish(seq)
                out += _some([self._fail_seq(seq, Failure("engine_error", f"the grammar refused token {tok}"))])
            elif self._check_finished(seq, tok):
                self.scheduler.finish(seq)
                out += self._finished(seq)
        return out

    def _constrain(self, logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor) -> torch.Tensor:
        """Mask the tokens each structured row's grammar forbids (logits [B, V], in place); the
        greedy choice [B] of the masked logits."""
        masked = self.structured.mask(logits, seqs)
        return logits.argmax(-1) if masked else greedy

    def _prompt_logprobs(self, seqs: list[Sequence]) -> None:
        """After a prefill: the prompt logprobs of the sequences that asked and have none yet."""
        for seq in seqs:
            n = seq.params.prompt_logprobs
            if n is None or seq.prompt_logprobs is not None:
                continue
            logits = self.model_runner.prompt_logits.get(seq.seq_id)
            prompt = seq.token_ids[: seq.num_prompt]
            if logits is not None:
                seq.prompt_logprobs = prompt_entries(logits, prompt, n, self.token_text)
            elif seq.num_prompt == 1:
                seq.prompt_logprobs = [None]

    def _back_off(self, batch: Batch, error: RuntimeError) -> list[Result]:
        """Out of device memory in one step: the scheduler lowers its limits and requeues; a lone
        sequence fails."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.counts.oom_backoffs += 1
        if len(batch.seqs) == 1 and not batch.decode:  # a mixed step is retried with mixing off
            seq = batch.seqs[0]
            self.blocks.forget(seq)  # its KV may be unwritten: out of the prefix cache
            self.scheduler.finish(seq)
            return _some([self._fail_seq(seq, Failure("out_of_memory", f"out of device memory even alone: {error}"))])
        self.scheduler.back_off(batch)
        return []

    def _check_finished(self, seq: Sequence, tok: int) -> bool:
        """Whether `seq` ends with `tok`; if so sets its finish reason and text. Before `min_tokens`
        output tokens only the length ends it; a stop token's text is kept only with
        `include_stop_str_in_output`, as a stop string's."""
        p = seq.params
        reason, text = None, None
        if seq.num_output >= p.min_tokens:
            reason, text = self._stopped(seq, tok)
        if reason is None and (seq.num_output >= p.max_tokens or len(seq) >= self.max_model_len):
            reason = "length"
        if reason is None:
            return False
        seq.finish_reason = reason
        seq.text = self._decode(seq.output_ids) if text is None else text
        return True

    def _stopped(self, seq: Sequence, tok: int) -> tuple[str | None, str | None]:
        """("stop", the text to keep or None for all of it) when `tok` or a stop string ends `seq`."""
        p = seq.params
        if self.structured.done(seq.seq_id):  # the grammar took EOS: nothing may follow
            return "stop", None
        if tok in p.stop_token_ids:
            return "stop", None if p.include_stop_str_in_output else self._decode(seq.output_ids[:-1])
        if not p.ignore_eos and tok in self.eos_ids:
            return "stop", None
        if p.stop:
            text = self._decode(seq.output_ids)
            start = len(self._decode(seq.output_ids[: p.min_tokens - 1])) if p.min_tokens > 1 else 0
            found = first_stop(text, p.stop, start)
            if found is not None:
                cut, stop = found
                return "stop", text[: cut + len(stop)] if p.include_stop_str_in_output else text[:cut]
        return None, None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- results out -------------------------------------------------------------------------------

    def _finished(self, seq: Sequence) -> list[Result]:
        """The result a finished sequence completes: its own, its group's once all n are done, or none yet."""
        group = seq.group
        if group is None:
            return [self._finish([seq])]
        group.finished[seq.sample_index] = seq
        return [self._finish([group.finished[i] for i in range(group.n)])] if group.done else []

    def _finish(self, samples: list[Sequence]) -> Result:
        """One request's result from its finished samples (one, or n in sample order)."""
        head = samples[0]
        times = [self._arrivals.pop(s.seq_id) for s in samples]
        for s in samples:
            self.generators.pop(s.seq_id, None)
            self.structured.release(s.seq_id)
        self.counts.prompt_tokens += head.num_prompt  # once per request, as OpenAI counts
        key = head.adapter or "<base>"
        self.counts.per_adapter[key] = self.counts.per_adapter.get(key, 0) + 1
        firsts = [first for _, first in times if first is not None]
        return Result(
            head.payload,
            head.request_id,
            head.adapter,
            head.text,
            head.finish_reason,
            head.num_prompt,
            sum(s.num_output for s in samples),
            token_ids=list(head.output_ids),
            arrival=times[0][0],
            first_token=min(firsts, default=None),
            finished=time.perf_counter(),
            wait_steps=None if head.admitted_step is None else head.admitted_step - head.arrival_step,
            choices=[Choice(s.text, s.finish_reason, list(s.output_ids), _logprobs_of(s)) for s in samples]
            if head.group
            else [],
            logprobs=_logprobs_of(head),
            prompt_logprobs=head.prompt_logprobs,
        )

    def _error(self, req: Request, failure: Failure, arrival: float) -> Result:
        return Result(req, req.id, req.adapter, error=failure, arrival=arrival, finished=time.perf_counter())

    def _fail_seq(self, seq: Sequence, failure: Failure) -> Result | None:
        """The request's error result; for one of n samples the others are dropped, and None when
        the request already failed."""
        group, members = seq.group, [seq]
        if group is not None:
            if group.failed:
                return None
            group.failed, members = True, group.members
            for other in members:
                if other is not seq:
                    self.scheduler.drop(other)
        now = time.perf_counter()
        arrival = min(self._arrivals.pop(s.seq_id, (now, None))[0] for s in members)
        for s in members:
            self.generators.pop(s.seq_id, None)
            self.structured.release(s.seq_id)
        return Result(
            seq.payload, seq.request_id, seq.adapter, error=failure, arrival=arrival, finished=time.perf_counter()
        )

    def next_token_logits(
        self, adapter: str | None, token_ids: list[int], mix: AdapterMix | None = None
    ) -> torch.Tensor:
        """float32 logits [V] after `token_ids` under `adapter` (or the adapter `mix`), outside any
        batch (a verification aid).

        Must be called while the engine is idle; uses the same slots, cache and forward as `step`.
        """
        if self.has_work():
            raise RuntimeError("next_token_logits needs an idle engine")
        self._apply(self.merger.settle(self.scheduler.step_no))
        name = adapter if mix is None else mix.name
        seq = Sequence(-1, "score", name, list(token_ids), SamplingParams(), mix=mix)
        placed = self.slots.place_all(seq.adapters, self.scheduler.step_no)
        for part, (slot, write) in zip(seq.adapters, placed, strict=True):
            if write:
                self.model_runner.write_adapter(slot, self.loader.get(part))
        seq.hold([slot for slot, _ in placed])
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


def all_pins(config: EngineConfig, catalog: Catalog) -> tuple[str, ...]:
    """The `pinned` config field's adapters, then those the manifest pins (`pinned: true`), once each."""
    pins = tuple(dict.fromkeys((*config.pinned, *catalog.pinned())))
    smallest = config.max_loras if config.min_loras is None else config.min_loras
    if len(pins) > smallest:
        raise ConfigError(
            f"pinned and the adapters_dir manifest pin {len(pins)} adapters but min_loras is {smallest}: "
            "pinned adapters must fit in the smallest slot count",
            fields=("pinned", "adapters_dir", "min_loras"),
        )
    return pins


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded `seed`: seed + index, wrapped into the seed range."""
    value = seed + index
    return value - (1 << 64) if value > SEED_RANGE[1] else value


def first_stop(text: str, stops: list[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest (position, stop string) in `text` of a stop string ending after `start`, or None."""
    found = [(i, stop) for stop in stops if (i := text.find(stop, max(0, start - len(stop) + 1))) >= 0]
    return min(found, key=lambda f: f[0], default=None)


def _with_forks(
    seqs: list[Sequence], logits: torch.Tensor, forks: list[tuple[Sequence, list[Sequence]]]
) -> tuple[list[Sequence], torch.Tensor]:
    """The step's rows plus one per sample forked this step: a copy of its sample 0's logits row."""
    row = {id(seq): i for i, seq in enumerate(seqs)}
    index = list(range(len(seqs))) + [row[id(parent)] for parent, children in forks for _ in children]
    return seqs + [child for _, children in forks for child in children], logits[index]  # [B + forks, V]


def _started(group: SampleGroup) -> bool:
    return any(member.admitted_step is not None for member in group.members)


def _logprobs_of(seq: Sequence) -> list[TokenLogprob] | None:
    """A sequence's output-token logprobs when its request asked for them, else None."""
    return list(seq.logprobs) if seq.params.logprobs is not None else None


def _some(results) -> list[Result]:
    """The results that are there (a failed sample's siblings give none)."""
    return [r for r in results if r is not None]
