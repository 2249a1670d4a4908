"""Engine configuration: one dataclass, validated in `__post_init__` with typed errors.

Invalid values raise `ConfigError` with a one-line message naming the field (`max_loras`) and
listing it in `ConfigError.fields`; only the CLI turns field names into flags. The config is
frozen once validated: defaults derived in `__post_init__` are filled in then, and live limits
(those the engine lowers after running out of memory) belong to the scheduler. Nothing here
touches tensors or files.
"""

from __future__ import annotations

from dataclasses import dataclass

from .adapter_sources import where_problem
from .errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
MAX_LORA_RANK_LIMIT = 512
MERGE_POLICIES = ("auto", "never", "always-single")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}", fields=(name,))


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs besides the requests themselves.

    `max_lora_rank` accepts any power of two from 1 to 512 (vLLM's list {1,8,16,32,64,128,256,
    512} plus 2 and 4; 320 is not a power of two and is refused).
    """

    model: str | None = None  # None = the embedded default model
    adapters_dir: str | None = None  # a folder, a folder URL or a manifest (adapter_sources); no credentials in URLs
    dtype: str = "auto"
    device: str = "auto"
    max_loras: int = 8
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None  # None = max(32, max_loras)
    adapter_load_workers: int = 2  # threads loading queued requests' adapters ahead; 0 = load in the step
    max_num_seqs: int = 128  # measured: 1.05-1.20x the throughput of 64 on the CPU (docs/PERFORMANCE.md)
    max_batched_tokens: int = 4096
    max_model_len: int | None = None  # None = the model's context length
    block_size: int = 16
    num_kv_blocks: int | None = None  # None = sized from kv_cache_memory
    kv_cache_memory: int = 1 << 30  # bytes for the paged KV cache when num_kv_blocks is None
    allow_pickle: bool = False
    seed: int = 0
    starvation_steps: int = 64  # a request blocked on adapter slots this long stops new admissions
    # Adapter slots that resize themselves (engine/slot_policy.py, engine/slot_resizer.py).
    min_loras: int | None = None  # None = max_loras (a fixed slot count)
    dynamic_slots: bool | None = None  # None = on when min_loras < max_loras
    pinned: tuple[str, ...] = ()  # adapters loaded at start and never evicted from their slots
    memory_budget: int | None = None  # bytes for weights + slots + KV + working buffers; None = no trading
    gpu_memory_utilization: float | None = None  # CUDA: budget = this fraction of the device's memory
    slot_cooldown_steps: int = 32  # demand below the slot count this long before a shrink
    resize_window_steps: int = 256  # oscillation guard: more than max_resizes in this window freezes
    max_resizes: int = 8
    verify_slots: bool = False  # after every resize, check each slot's weights against the CPU copy
    merge_policy: str = "auto"  # auto | never | always-single (engine/merge_policy.py)
    # Batch-invariant kernels: a request's tokens do not depend on what shares its batch (model/llama.py).
    # None = on unless the model runs in float32 (`devices.deterministic_default`).
    deterministic: bool | None = None
    # Reuse the KV blocks of a prompt prefix another request of the same adapter computed (engine/block_manager.py).
    enable_prefix_caching: bool = True
    # Admit new prompts into decode steps: one forward holds the running sequences' next tokens and the
    # new prompts (engine/scheduler.py); off, a step is all prefill or all decode.
    mixed_prefill: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}", fields=("dtype",))
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}", fields=("device",))
        for name in (
            "max_loras",
            "max_lora_rank",
            "max_num_seqs",
            "max_batched_tokens",
            "block_size",
            "kv_cache_memory",
            "starvation_steps",
        ):
            _positive(name, getattr(self, name))
        r = self.max_lora_rank
        if r > MAX_LORA_RANK_LIMIT or r & (r - 1):
            raise ConfigError(
                f"max_lora_rank must be a power of two from 1 to {MAX_LORA_RANK_LIMIT}, got {r}",
                fields=("max_lora_rank",),
            )
        if self.max_cpu_loras is None:
            self._derive("max_cpu_loras", max(32, self.max_loras))
        _positive("max_cpu_loras", self.max_cpu_loras)
        if self.max_cpu_loras < self.max_loras:
            raise ConfigError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})",
                fields=("max_cpu_loras", "max_loras"),
            )
        w = self.adapter_load_workers
        if not isinstance(w, int) or isinstance(w, bool) or w < 0:
            raise ConfigError(
                f"adapter_load_workers must be an integer >= 0 (0: load adapters in the engine step), got {w!r}",
                fields=("adapter_load_workers",),
            )
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.num_kv_blocks is not None:
            _positive("num_kv_blocks", self.num_kv_blocks)
        self._check_slots()
        if self.deterministic is not None and not isinstance(self.deterministic, bool):
            raise ConfigError(
                f"deterministic must be true, false or unset, got {self.deterministic!r}", fields=("deterministic",)
            )
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigError(
                f"enable_prefix_caching must be true or false, got {self.enable_prefix_caching!r}",
                fields=("enable_prefix_caching",),
            )
        if not isinstance(self.mixed_prefill, bool):
            raise ConfigError(
                f"mixed_prefill must be true or false, got {self.mixed_prefill!r}", fields=("mixed_prefill",)
            )
        if isinstance(self.adapters_dir, str) and (problem := where_problem(self.adapters_dir)):
            raise ConfigError(f"adapters_dir: {problem}", fields=("adapters_dir",))
        if self.merge_policy not in MERGE_POLICIES:
            raise ConfigError(
                f"merge_policy must be one of {', '.join(MERGE_POLICIES)}, got {self.merge_policy!r}",
                fields=("merge_policy",),
            )

    def _derive(self, name: str, value) -> None:
        """Fill in a default that depends on other fields (during validation only: the config is frozen)."""
        object.__setattr__(self, name, value)

    def _check_slots(self) -> None:
        if self.min_loras is None:
            self._derive("min_loras", self.max_loras)
        _positive("min_loras", self.min_loras)
        if self.min_loras > self.max_loras:
            raise ConfigError(
                f"min_loras ({self.min_loras}) must be <= max_loras ({self.max_loras})",
                fields=("min_loras", "max_loras"),
            )
        if self.dynamic_slots is None:
            self._derive("dynamic_slots", self.min_loras < self.max_loras)
        for name in ("slot_cooldown_steps", "resize_window_steps", "max_resizes"):
            _positive(name, getattr(self, name))
        self._derive("pinned", tuple(dict.fromkeys(p for p in self.pinned if p)))
        if len(self.pinned) > self.min_loras:
            raise ConfigError(
                f"pinned names {len(self.pinned)} adapters but min_loras is {self.min_loras}: "
                "pinned adapters must fit in the smallest slot count",
                fields=("pinned", "min_loras"),
            )
        if self.memory_budget is not None:
            _positive("memory_budget", self.memory_budget)
        u = self.gpu_memory_utilization
        if u is not None:
            if not (isinstance(u, float | int) and 0 < u <= 1):
                raise ConfigError(
                    f"gpu_memory_utilization must be in (0, 1], got {u!r}", fields=("gpu_memory_utilization",)
                )
            if self.memory_budget is not None:
                raise ConfigError(
                    "give memory_budget or gpu_memory_utilization, not both",
                    fields=("memory_budget", "gpu_memory_utilization"),
                )
