"""Reading an adapter manifest: a JSON or YAML file mapping adapter names to sources and settings.

    {"adapters": {
        "shout": "./adapters/shout",                          # a local folder (relative to the manifest)
        "brief": "s3://bucket/adapters/brief",                # any fsspec URL of an adapter folder
        "sql":   "org/sql-lora@v2",                           # a Hub repo id, optional @revision
        "chat":  {"source": "org/many-loras", "revision": "main", "subfolder": "chat",
                  "pinned": true, "scale": 0.5}}}

A source string is a URL when it has a scheme (`hf://org/name[@rev][/subfolder]` is the Hub), a local path
when it starts with `/`, `./`, `../`, `~` or `file://`, and otherwise a Hub repo id `org/name[@rev][/sub]`;
anything else is refused. The object form adds `revision` and `subfolder` (Hub: inside the repo; URL or
path: joined to it; `revision` only for the Hub) and the settings `pinned` (bool: loaded at start and never
evicted from its slot, like the `pinned` config field) and `scale` (a finite number multiplying the
adapter's LoRA deltas, as a weight does in a mix). Unknown keys, unsafe names (`names.name_problem`) and
URLs holding credentials (`urls.credential_problem`) are refused: `ConfigError` naming the manifest and the
entry. Reads the one file; nothing is downloaded here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .names import name_problem
from .urls import HubSource, credential_problem, is_url, local_path, parse_hub, redact

ENTRY_KEYS = ("source", "revision", "subfolder", "pinned", "scale")
LOCAL_PREFIXES = ("/", "./", "../", "~", "file://")


@dataclass(frozen=True)
class Settings:
    """Per-adapter settings: `pinned` (see the module doc) and `scale`, the default multiplier of its deltas."""

    pinned: bool = False
    scale: float = 1.0


@dataclass(frozen=True)
class Entry:
    """One manifest entry: where the adapter is (a local `Path`, a URL string or a `HubSource`) and its settings."""

    source: Path | str | HubSource
    settings: Settings


def _fail(manifest: str, where: str, problem: str) -> ConfigError:
    return ConfigError(f"adapters_dir: {manifest}: {where}: {problem}", fields=("adapters_dir",))


def parse_text(text: str, manifest: str) -> dict:
    """The manifest's object (JSON, or YAML for .yaml / .yml)."""
    if manifest.lower().endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"adapters_dir: {manifest}: YAML manifests need PyYAML: pip install pyyaml", fields=("adapters_dir",)
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise _fail(manifest, "YAML", str(e).splitlines()[0]) from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise _fail(manifest, "JSON", str(e)) from None
    if not isinstance(data, dict) or set(data) != {"adapters"} or not isinstance(data["adapters"], dict):
        raise _fail(manifest, "top level", 'must be an object with one key, "adapters": {name: source, ...}')
    return data["adapters"]


def parse_entries(adapters: dict, manifest: str, base: Path | None) -> dict[str, Entry]:
    """{name: Entry} of a manifest's "adapters" object; `base` resolves relative paths (None: refused)."""
    entries = {}
    for name, value in adapters.items():
        problem = name_problem(name)
        if problem:
            raise _fail(manifest, f"adapters.{name!r}", problem)
        entries[name] = _entry(value, manifest, f"adapters.{name}", base)
    return entries


def _entry(value: object, manifest: str, where: str, base: Path | None) -> Entry:
    if isinstance(value, str):
        value = {"source": value}
    if not isinstance(value, dict):
        raise _fail(manifest, where, "must be a source string or an object with a source")
    unknown = sorted(set(value) - set(ENTRY_KEYS), key=str)
    if unknown:
        raise _fail(manifest, f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(ENTRY_KEYS)})")
    text = value.get("source")
    if not isinstance(text, str) or not text:
        raise _fail(manifest, f"{where}.source", "missing: a local path, a URL or a Hub repo id")
    for key in ("revision", "subfolder"):
        if key in value and (not isinstance(value[key], str) or not value[key] or ".." in value[key].split("/")):
            raise _fail(manifest, f"{where}.{key}", "must be a non-empty string without '..'")
    source = _source(text, value.get("revision"), value.get("subfolder"), manifest, where, base)
    return Entry(source, _settings(value, manifest, where))


def _source(
    text: str, revision: str | None, sub: str | None, manifest: str, where: str, base: Path | None
) -> Path | str | HubSource:
    problem = credential_problem(text)
    if problem:
        raise _fail(manifest, f"{where}.source", f"{redact(text)} {problem}; use the standard credential chain")
    hub = parse_hub(text) if text.lower().startswith("hf://") or not (is_url(text) or _looks_local(text)) else None
    if hub is not None:
        if revision and hub.revision and revision != hub.revision:
            raise _fail(manifest, f"{where}.revision", f"differs from the source's @{hub.revision}")
        subfolder = "/".join(p for p in (hub.subfolder, sub) if p) or None
        return HubSource(hub.repo, revision or hub.revision, subfolder)
    if revision:
        raise _fail(manifest, f"{where}.revision", "only a Hub source has a revision")
    if is_url(text):
        if text.lower().startswith("hf://"):
            raise _fail(manifest, f"{where}.source", "not a Hub model repo: hf://org/name[@revision][/subfolder]")
        return text.rstrip("/") + (f"/{sub.strip('/')}" if sub else "")
    if not _looks_local(text):
        raise _fail(
            manifest,
            f"{where}.source",
            f"{text!r} is not a local path (start it with /, ./, ../ or ~), a URL or a Hub repo id org/name[@revision]",
        )
    path = Path(local_path(text)).expanduser()
    if not path.is_absolute():
        if base is None:
            raise _fail(manifest, f"{where}.source", "a relative path in a manifest on a URL: give a URL")
        path = base / path
    return path / sub if sub else path


def _looks_local(text: str) -> bool:
    return text.lower().startswith(LOCAL_PREFIXES)


def _settings(value: dict, manifest: str, where: str) -> Settings:
    pinned = value.get("pinned", False)
    if not isinstance(pinned, bool):
        raise _fail(manifest, f"{where}.pinned", f"must be true or false, got {pinned!r}")
    scale = value.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise _fail(manifest, f"{where}.scale", f"must be a finite number, got {scale!r}")
    return Settings(pinned, float(scale))
