"""The names of the systems under test, as `--systems` takes them: parsing only, no system code.

Contract: `parse_systems("loracli,peft-mixed,loracli:max-loras=4")` -> `SystemSpec`s, in order,
without repeats; `all` = every kind of `ALL_KINDS`. `parse_system(name)` -> one `SystemSpec`
(kind, `EngineConfig` overrides, `ClusterOptions` settings), validated by `EngineConfig` and
`ClusterOptions` themselves. Invalid names and settings raise a one-line `ConfigError`; errors
about one setting name its field (and carry it in `fields`). Nothing here uses torch.

Kinds (what each one runs: `loracli.bench.systems`):

- `loracli[:KEY=VALUE...]`: the engine; settings change `EngineConfig` fields
  (`loracli:max-loras=4:gpu-memory-utilization=0.5`; KEY in dashes or underscores, or one of
  `ALIASES`: `prefix-caching=false` sets `enable_prefix_caching`, as `run --no-prefix-caching` does).
- `loracli-ray[:KEY=VALUE...]`: the same engines as `loracli run --ray` replicas on a local Ray
  instance; KEY is an `EngineConfig` field or one of `CLUSTER_FIELDS` (`workers=2`). Not in `all`:
  it needs Ray and starts a Ray instance, so it is asked for by name.
- `llama-cpp[:KEY=VALUE...]`: llama.cpp's `llama-server` (`systems/llama_cpp.py`); KEY is one of
  `LLAMA_CPP_SETTINGS`: `server` (the binary, else `llama-server` on PATH), `convert` (llama.cpp's
  `convert_lora_to_gguf.py`), `convert-model` (its `convert_hf_to_gguf.py`), `model` (a GGUF of the
  base model), `parallel` (server slots, default 64), all read as text but `parallel`.
- `base`, `peft-mixed`, `peft-grouped`, `merged-swap`, `vllm`: no settings.

A VALUE is read as the type of the field it sets (`setting_value`): integers, numbers, true/false
(`parse_bool`), text, `none` for optional fields, sizes such as `1100MiB` for `BYTE_FIELDS`, and
adapter names joined by `+` for tuples of names (`pinned=a+b`: `,` and `:` already separate
systems and settings).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from types import NoneType, UnionType
from typing import Union, get_args, get_origin, get_type_hints

from ..cluster.options import ClusterOptions
from ..config import EngineConfig
from ..errors import ConfigError
from ..sizes import parse_bytes

KINDS = ("loracli", "peft-mixed", "peft-grouped", "merged-swap", "base", "vllm", "llama-cpp", "loracli-ray")
ALL_KINDS = KINDS[:-1]  # `all`: every kind but loracli-ray
SETTING_KINDS = ("loracli", "loracli-ray", "llama-cpp")  # the kinds that take KEY=VALUE settings
LLAMA_CPP_SETTINGS = {"server": str, "convert": str, "convert_model": str, "model": str, "parallel": int}
CLUSTER_FIELDS = ("workers", "worker_cpus", "worker_gpus", "routing", "ship_adapters")  # loracli-ray only
FIXED_ENGINE_FIELDS = ("model", "adapters_dir", "dtype", "device")  # the same for every system
BYTE_FIELDS = ("memory_budget", "kv_cache_memory")  # take sizes such as 512MiB
NAMES_SEPARATOR = "+"  # between the names of a tuple-of-names setting
ALIASES = {"prefix_caching": "enable_prefix_caching"}  # setting -> EngineConfig field, where `run`'s flag differs


@dataclass(frozen=True)
class SystemSpec:
    name: str  # as written, e.g. "loracli:max-loras=4"
    kind: str
    overrides: tuple[tuple[str, object], ...] = ()  # EngineConfig field -> value (loracli, loracli-ray)
    cluster: tuple[tuple[str, object], ...] = ()  # ClusterOptions field -> value (loracli-ray only)
    settings: tuple[tuple[str, object], ...] = ()  # LLAMA_CPP_SETTINGS key -> value (llama-cpp only)


def setting_name(field: str) -> str:
    """A field as a bench setting spells it (`max_loras` -> `max-loras`): what the user typed."""
    return field.replace("_", "-")


def parse_bool(name: str, raw: str) -> bool:
    """true/false (or 1/0, any case) -> bool; anything else is a ConfigError naming the setting.

    Bench setting errors name the setting as written in `--systems`, and list no `fields`: the
    CLI must not rewrite them into `loracli run` flags."""
    text = raw.strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise ConfigError(f"--systems: {setting_name(name)} must be true or false, got {raw!r}")
    return text in ("true", "1")


def setting_value(owner: type, name: str, raw: str) -> object:
    """`raw` read as the type of the field `name` of the dataclass `owner` (EngineConfig, ClusterOptions)."""
    hint = get_type_hints(owner)[name]
    text = raw.strip()
    args = get_args(hint)
    if get_origin(hint) in (Union, UnionType) and len(args) == 2 and NoneType in args:
        if text.lower() == "none":
            return None
        hint = next(arg for arg in args if arg is not NoneType)
    if name in BYTE_FIELDS:
        return parse_bytes(text, f"--systems: {setting_name(name)}")
    if hint is bool:
        return parse_bool(name, raw)
    if hint is str:
        return text
    if hint == tuple[str, ...]:
        return tuple(part.strip() for part in text.split(NAMES_SEPARATOR) if part.strip())
    expected = {int: "an integer", float: "a number"}
    if hint not in expected:
        raise TypeError(f"{owner.__name__}.{name}: no bench setting parser for the type {hint}")
    try:
        return hint(text)
    except ValueError:
        raise ConfigError(f"--systems: {setting_name(name)} must be {expected[hint]}, got {raw!r}") from None


def engine_settings() -> list[str]:
    """The EngineConfig fields a `loracli:KEY=VALUE` setting may change."""
    return sorted(f.name for f in fields(EngineConfig) if f.name not in FIXED_ENGINE_FIELDS)


def parse_system(text: str) -> SystemSpec:
    """`loracli:max-loras=4:max-num-seqs=16` -> SystemSpec("...", "loracli", (("max_loras", 4), ...))."""
    name = text.strip()
    kind, _, rest = name.partition(":")
    if kind not in KINDS:
        raise ConfigError(f"--systems: unknown system {name!r} (known: {', '.join(KINDS)}, all, loracli:KEY=VALUE)")
    if not rest:
        return SystemSpec(name, kind)
    if kind not in SETTING_KINDS:
        raise ConfigError(f"--systems: only {', '.join(SETTING_KINDS)} take settings, got {name!r}")
    if kind == "llama-cpp":
        return SystemSpec(name, kind, settings=llama_cpp_settings(rest))
    overrides, cluster = [], []
    for item in rest.split(":"):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--systems: expected KEY=VALUE after '{kind}:', got {item!r}")
        field_name = key.strip().replace("-", "_")
        field_name = ALIASES.get(field_name, field_name)
        if kind == "loracli-ray" and field_name in CLUSTER_FIELDS:
            cluster.append((field_name, setting_value(ClusterOptions, field_name, value)))
        elif field_name in engine_settings():
            overrides.append((field_name, setting_value(EngineConfig, field_name, value)))
        else:
            known = ", ".join(map(setting_name, engine_settings()))
            raise ConfigError(f"--systems: {key.strip()!r} is not an engine setting (known: {known})")
    EngineConfig(**dict(overrides))  # validates values with the engine's own messages
    if cluster:
        ClusterOptions(**dict(cluster))
    return SystemSpec(name, kind, tuple(overrides), tuple(cluster))


def llama_cpp_settings(rest: str) -> tuple[tuple[str, object], ...]:
    """`server=/x:parallel=8` -> (("server", "/x"), ("parallel", 8)); a ConfigError naming a bad setting."""
    out = []
    for item in rest.split(":"):
        key, sep, value = item.partition("=")
        name = key.strip().replace("-", "_")
        if not sep or name not in LLAMA_CPP_SETTINGS:
            known = ", ".join(map(setting_name, LLAMA_CPP_SETTINGS))
            raise ConfigError(f"--systems: llama-cpp takes KEY=VALUE with KEY one of {known}, got {item!r}")
        if LLAMA_CPP_SETTINGS[name] is int:
            if not value.strip().isdigit() or int(value) < 1:
                raise ConfigError(f"--systems: llama-cpp {setting_name(name)} must be an integer >= 1, got {value!r}")
            out.append((name, int(value)))
        elif not value.strip():
            raise ConfigError(f"--systems: llama-cpp {setting_name(name)} needs a path, got nothing")
        else:
            out.append((name, value.strip()))
    return tuple(out)


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
