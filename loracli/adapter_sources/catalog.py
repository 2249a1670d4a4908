"""The adapter catalog: which adapters exist (name -> source) and how to get each one's local folder.

`AdapterCatalog` is the interface the store uses; `Catalog` is its one implementation, built by
`open_catalog` (see the package doc). `local_folder(name)` blocks while a remote adapter downloads and
is safe to call from several threads (a lock per source: `remote`, huggingface_hub's own locks).
`describe(name)` names the source for messages (a path, a redacted URL, `hf://org/name@rev/sub`).
`settings(name)`: `Settings` (pinned, scale). `apply_scale(weights, scale, source)` multiplies an
adapter's LoRA deltas by its manifest `scale` (plain LoRA only: DoRA magnitudes, LoRA biases and
vocabulary parts do not scale linearly, so such an adapter with a scale is refused).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import AdapterError
from .hub import hub_folder
from .manifest import Settings
from .remote import fetch_folder
from .urls import HubSource, redact

if TYPE_CHECKING:
    from ..adapters import LoraWeights

Source = Path | str | HubSource  # a local folder, an fsspec URL, a Hub adapter


class AdapterCatalog(Protocol):
    where: str  # the adapters_dir it came from (credentials never appear), "" for none

    def names(self) -> list[str]: ...

    def has(self, name: str) -> bool: ...

    def local_folder(self, name: str) -> Path: ...

    def describe(self, name: str) -> str: ...

    def settings(self, name: str) -> Settings: ...


class Catalog:
    """`AdapterCatalog` over a fixed {name: source} map; `where` is the adapters_dir it came from (redacted)."""

    def __init__(self, where: str, sources: dict[str, Source], settings: dict[str, Settings] | None = None):
        self.where = where
        self._sources = dict(sorted(sources.items()))
        self._settings = settings or {}

    def names(self) -> list[str]:
        return list(self._sources)

    def has(self, name: str) -> bool:
        return isinstance(name, str) and name in self._sources

    def describe(self, name: str) -> str:
        source = self._sources.get(name)
        if source is None:
            return f"{self.where}: {name}" if self.where else name
        return redact(source) if isinstance(source, str) else str(source)

    def settings(self, name: str) -> Settings:
        return self._settings.get(name, Settings())

    def pinned(self) -> tuple[str, ...]:
        """The adapters the manifest pins, in name order."""
        return tuple(n for n in self._sources if self.settings(n).pinned)

    def local_folder(self, name: str) -> Path:
        source = self._sources.get(name)
        if source is None:
            raise AdapterError(self.describe(name), "unknown adapter")
        if isinstance(source, Path):
            if not source.is_dir():
                raise AdapterError(str(source), "not a folder")
            return source
        if isinstance(source, HubSource):
            return hub_folder(source)
        return fetch_folder(source)


def apply_scale(weights: LoraWeights, scale: float, source: str) -> LoraWeights:
    """`weights` with every LoRA delta multiplied by `scale` (the B halves, in float32; A unchanged)."""
    if scale == 1.0:
        return weights
    if not weights.is_plain_lora:
        raise AdapterError(
            source,
            f"scale {scale!r} is for plain LoRA adapters; this one holds {', '.join(weights.kinds)}, "
            "which do not scale linearly",
        )
    modules = {where: (a, (b.float() * scale).to(b.dtype)) for where, (a, b) in weights.modules.items()}
    return replace(weights, modules=modules)
