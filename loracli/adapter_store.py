"""The disk and CPU tiers of adapters: an adapter catalog and an LRU cache of loaded adapters.

The catalog (`adapter_sources`: a folder, a folder URL or a manifest) says which adapters exist and
gives each one's local folder, downloading a remote one into the cache first. `get(name)` returns the
adapter's `LoraWeights` from the CPU cache (a hit) or fetches, loads, validates and scales it (times its
manifest `scale`) from disk (a load), evicting the least recently used cached adapter beyond
`max_cpu_loras`. A failure is remembered, so later requests for a broken adapter fail at once
with the same one-line reason and no disk read. `refuse_base_names` refuses, at engine start,
an adapter folder named like the base model (Batch lines could not reach it). `vocab_costs` gives
the memory budget what each adapter's embedding / lm_head parts can take, from its file's tensor
shapes (a safetensors header; a pickle, when allowed, is read).

Thread-safe: `get` may run in the background loader's threads (`adapter_loader.py`) while the
engine reads the cache; a lock guards the cache, `failed` and the stats, the read itself runs
outside it. Eviction spares the adapters in `protected` (those the engine's waiting and running
requests need, set by the engine each step) unless only they are left.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .adapter_sources import AdapterCatalog, apply_scale, open_catalog
from .adapter_vocab import vocab_bytes
from .adapters import LoraWeights, load_adapter, read_tensors, weights_file
from .errors import AdapterError, ConfigError
from .model.spec import ModelSpec


@dataclass
class StoreStats:
    disk_loads: int = 0
    cpu_hits: int = 0
    cpu_evictions: int = 0
    disk_bytes: int = 0  # bytes of adapter files read by disk loads
    load_seconds: list[float] = field(default_factory=list)


def refuse_base_names(catalog: AdapterCatalog, base_names: frozenset[str]) -> None:
    """Raise `ConfigError` for an adapter named like the base model (`base`, the model's
    name): OpenAI Batch lines naming it get the base model, so no line could ever reach it."""
    clashes = [catalog.describe(name) for name in catalog.names() if name in base_names]
    if clashes:
        names = ", ".join(repr(n) for n in sorted(base_names))
        raise ConfigError(
            f"adapters_dir: adapter folder {', '.join(clashes)} has a name that means the base model in "
            f"Batch lines ({names}), so no line could reach it; rename the folder",
            fields=("adapters_dir",),
        )


def vocab_costs(catalog: AdapterCatalog, dtype_bytes: int, allow_pickle: bool, tied: bool) -> tuple[int, ...]:
    """`adapter_vocab.vocab_bytes` of each adapter of `catalog` that has embedding / lm_head parts, largest first.

    Remote adapters are fetched for this (into the cache). An adapter whose file cannot be fetched or read
    counts nothing: it is refused when it is loaded.
    """
    costs = []
    for name in catalog.names():
        try:
            shapes = _shapes(weights_file(catalog.local_folder(name), allow_pickle))
        except (AdapterError, ConfigError, OSError):
            continue
        cost = vocab_bytes(shapes, dtype_bytes, tied)
        if cost:
            costs.append(cost)
    return tuple(sorted(costs, reverse=True))


def _shapes(path: Path) -> dict[str, list[int]]:
    """{key: shape} of an adapter weights file: a safetensors header, or a pickle (which the caller allowed) read."""
    if path.suffix != ".safetensors":
        return {k: list(v.shape) for k, v in read_tensors(path).items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # noqa: BLE001 - a broken header: refused when the adapter is loaded
        return {}


class AdapterStore:
    def __init__(
        self,
        catalog: AdapterCatalog | str | Path | None,
        spec: ModelSpec,
        *,
        max_cpu_loras: int,
        max_lora_rank: int,
        allow_pickle: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        # an adapters_dir (folder, URL, manifest: `adapter_sources`) or its already opened catalog
        self.catalog = open_catalog(catalog) if catalog is None or isinstance(catalog, (str, Path)) else catalog
        self.spec = spec
        self.max_cpu_loras = max_cpu_loras
        self.max_lora_rank = max_lora_rank
        self.allow_pickle = allow_pickle
        self.dtype = dtype
        self.cache: OrderedDict[str, LoraWeights] = OrderedDict()
        self.failed: dict[str, str] = {}
        self.stats = StoreStats()
        self.protected: frozenset[str] = frozenset()  # evicted last: adapters queued or running requests need
        self._lock = threading.Lock()
        self._ahead: set[str] = set()  # loaded with count_hit=False, not yet read for a request
        self._names = self.catalog.names()

    def names(self) -> list[str]:
        return list(self._names)

    def has(self, name: str) -> bool:
        return self.catalog.has(name)

    def get(self, name: str, *, count_hit: bool = True) -> LoraWeights:
        """The adapter's weights; `count_hit=False` for a second read of a request already counted, or
        a load ahead of the request (the background loader's): that request's read is then no hit."""
        with self._lock:
            if name in self.failed:
                raise AdapterError(self.catalog.describe(name), self.failed[name])
            if name in self.cache:
                self.cache.move_to_end(name)
                if count_hit:
                    self.stats.cpu_hits += name not in self._ahead
                    self._ahead.discard(name)
                return self.cache[name]
        if not self.has(name):
            raise AdapterError(self.catalog.describe(name), "unknown adapter")
        t0 = time.perf_counter()
        source, folder = self.catalog.describe(name), None
        try:
            folder = self.catalog.local_folder(name)  # a remote adapter downloads (into the cache) here
            weights = load_adapter(
                folder,
                self.spec,
                max_lora_rank=self.max_lora_rank,
                allow_pickle=self.allow_pickle,
                dtype=self.dtype,
            )
            weights = apply_scale(weights, self.catalog.settings(name).scale, source)
        except AdapterError as e:
            shown = str(e) if folder is None else str(e).replace(str(folder), source)
            reason = e.reason if e.path in (source, str(folder)) else shown
            with self._lock:
                self.failed[name] = reason
            if folder is None or str(folder) == source:
                raise
            raise AdapterError(source, reason, fields=e.fields) from None  # a cached copy: name the source
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        with self._lock:
            self.stats.load_seconds.append(seconds)
            self.stats.disk_loads += 1
            self.stats.disk_bytes += size
            self.cache[name] = weights
            if not count_hit:
                self._ahead.add(name)
            self._evict(keep=name)
        return weights

    def _evict(self, keep: str) -> None:
        """Drop least recently used adapters beyond `max_cpu_loras` (never `keep`; `protected` ones last)."""
        while len(self.cache) > self.max_cpu_loras:
            others = [n for n in self.cache if n != keep]
            victim = next((n for n in others if n not in self.protected), others[0])
            del self.cache[victim]
            self._ahead.discard(victim)
            self.stats.cpu_evictions += 1

    def cached_names(self) -> set[str]:
        """The adapters in the CPU cache now (a copy: loader threads may change the cache)."""
        with self._lock:
            return set(self.cache)

    def settled(self, name: str) -> bool:
        """Whether `get(name)` would return at once: the adapter is cached or its load failed."""
        with self._lock:
            return name in self.cache or name in self.failed
