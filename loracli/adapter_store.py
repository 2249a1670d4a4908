"""The disk and CPU tiers of adapters: an adapters folder and an LRU cache of loaded adapters.

`get(name)` returns the adapter's `LoraWeights` from the CPU cache (a hit) or loads, validates
and scales it from disk (a load), evicting the least recently used cached adapter beyond
`max_cpu_loras`. A failure is remembered, so later requests for a broken adapter fail at once
with the same one-line reason and no disk read. `refuse_base_names` refuses, at engine start,
an adapter folder named like the base model (Batch lines could not reach it). `vocab_costs` gives
the memory budget what each adapter's embedding / lm_head parts can take, from its file's tensor
shapes (a safetensors header; a pickle, when allowed, is read).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

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


def adapter_names(folder: Path) -> list[str]:
    """The adapters of an adapters folder: its subfolders' names, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def refuse_base_names(folder: str | Path | None, base_names: frozenset[str]) -> None:
    """Raise `ConfigError` for an adapter folder named like the base model (`base`, the model's
    name): OpenAI Batch lines naming it get the base model, so no line could ever reach it."""
    if folder is None or not Path(folder).is_dir():
        return  # no adapters, or a bad folder the store refuses
    clashes = [str(Path(folder) / name) for name in adapter_names(Path(folder)) if name in base_names]
    if clashes:
        names = ", ".join(repr(n) for n in sorted(base_names))
        raise ConfigError(
            f"adapters_dir: adapter folder {', '.join(clashes)} has a name that means the base model in "
            f"Batch lines ({names}), so no line could reach it; rename the folder",
            fields=("adapters_dir",),
        )


def vocab_costs(folder: str | Path | None, dtype_bytes: int, allow_pickle: bool, tied: bool) -> tuple[int, ...]:
    """`adapter_vocab.vocab_bytes` of each adapter of `folder` that has embedding / lm_head parts, largest first.

    An adapter whose file cannot be read counts nothing: it is refused when it is loaded.
    """
    if folder is None or not Path(folder).is_dir():
        return ()
    costs = []
    for name in adapter_names(Path(folder)):
        try:
            shapes = _shapes(weights_file(Path(folder) / name, allow_pickle))
        except (AdapterError, OSError):
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
        folder: str | Path | None,
        spec: ModelSpec,
        *,
        max_cpu_loras: int,
        max_lora_rank: int,
        allow_pickle: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None and not self.folder.is_dir():
            raise ConfigError(f"adapters_dir: {self.folder} is not a folder", fields=("adapters_dir",))
        self.spec = spec
        self.max_cpu_loras = max_cpu_loras
        self.max_lora_rank = max_lora_rank
        self.allow_pickle = allow_pickle
        self.dtype = dtype
        self.cache: OrderedDict[str, LoraWeights] = OrderedDict()
        self.failed: dict[str, str] = {}
        self.stats = StoreStats()
        self._names = adapter_names(self.folder) if self.folder else []

    def names(self) -> list[str]:
        return list(self._names)

    def has(self, name: str) -> bool:
        return name in self._names

    def get(self, name: str, *, count_hit: bool = True) -> LoraWeights:
        """The adapter's weights; `count_hit=False` for a second read of a request already counted."""
        if name in self.failed:
            raise AdapterError(str(self.folder / name), self.failed[name])
        if name in self.cache:
            self.cache.move_to_end(name)
            self.stats.cpu_hits += count_hit
            return self.cache[name]
        if not self.has(name):
            raise AdapterError(str(self.folder / name if self.folder else name), "unknown adapter")
        t0 = time.perf_counter()
        try:
            weights = load_adapter(
                self.folder / name,
                self.spec,
                max_lora_rank=self.max_lora_rank,
                allow_pickle=self.allow_pickle,
                dtype=self.dtype,
            )
        except AdapterError as e:
            self.failed[name] = e.reason if e.path == str(self.folder / name) else str(e)
            raise
        self.stats.load_seconds.append(time.perf_counter() - t0)
        self.stats.disk_loads += 1
        self.stats.disk_bytes += sum(f.stat().st_size for f in (self.folder / name).iterdir() if f.is_file())
        self.cache[name] = weights
        while len(self.cache) > self.max_cpu_loras:
            self.cache.popitem(last=False)
            self.stats.cpu_evictions += 1
        return weights
