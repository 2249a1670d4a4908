"""Reading PEFT LoRA adapters from disk and checking them against a base model.

An adapter is a folder holding `adapter_config.json` and `adapter_model.safetensors` (PEFT's
format); its name is the folder name. Pickle weights (`adapter_model.bin`) are refused unless
`allow_pickle=True`, and even then are read with `torch.load(weights_only=True)`.

`load_adapter` returns `LoraWeights`: per (layer, module) the A matrix `[r, in]` and the B
matrix with the scale folded in, `scale * B` `[out, r]`, where scale = alpha / r, or
alpha / sqrt(r) with rsLoRA, r and alpha taken per module (rank_pattern / alpha_pattern, as
PEFT resolves them). Unsupported features (DoRA, LoRA bias, embedding / lm_head targets,
modules_to_save) and incompatibilities (unknown module, shape mismatch, rank above
`max_lora_rank`) raise `AdapterError` naming the file, one line.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import AdapterError
from .model.spec import TARGET_MODULES, ModelSpec

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

_KEY = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<module>\w+?)"
    r"\.lora_(?P<ab>A|B)(?:\.[\w-]+)?\.weight$"
)


@dataclass
class AdapterConfig:
    """The fields of `adapter_config.json` loracli uses or reports."""

    path: Path
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    bias: str = "none"
    lora_dropout: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)
    layers_to_transform: list[int] | int | None = None
    base_model_name: str | None = None
    task_type: str | None = None

    def module_alpha(self, module_path: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_path, self.lora_alpha))

    def module_rank(self, module_path: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_path, self.r))

    def scale(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def unsupported(self) -> list[str]:
        """What `loracli run` refuses in this config, one reason each."""
        out = []
        if self.peft_type.upper() != "LORA":
            out.append(f"peft_type {self.peft_type!r} is not LORA")
        if self.use_dora:
            out.append("DoRA (use_dora=true) is not supported")
        if self.bias != "none":
            out.append(f"bias={self.bias!r} is not supported (only 'none')")
        if self.modules_to_save:
            out.append(f"modules_to_save {self.modules_to_save} is not supported")
        bad = [t for t in self.target_modules if t in ("embed_tokens", "lm_head")]
        if bad:
            out.append(f"target modules {bad} (embedding / lm_head) are not supported")
        return out


@dataclass
class LoraWeights:
    """One adapter in memory: per (layer, module) `(A [r, in], scale*B [out, r])`."""

    name: str
    path: Path
    config: AdapterConfig
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def max_rank(self) -> int:
        return max((a.shape[0] for a, _ in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def _pattern_value(patterns: dict, module_path: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def parse_lora_key(key: str) -> tuple[int, str, str] | None:
    """`...layers.3.self_attn.q_proj.lora_A.weight` -> (3, "q_proj", "A"); None otherwise."""
    m = _KEY.search(key)
    if m is None:
        return None
    return int(m["layer"]), m["module"], m["ab"]


def read_adapter_config(folder: Path | str) -> AdapterConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(str(folder), "adapter folder not found")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(str(path), "missing (an adapter folder needs adapter_config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(str(path), f"not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterError(str(path), "must hold a JSON object")
    try:
        targets = raw.get("target_modules") or []
        if isinstance(targets, str):
            targets = [targets]
        return AdapterConfig(
            path=folder,
            peft_type=str(raw.get("peft_type", "LORA")),
            r=int(raw["r"]),
            lora_alpha=float(raw.get("lora_alpha", 8)),
            use_rslora=bool(raw.get("use_rslora", False)),
            target_modules=sorted(targets),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            use_dora=bool(raw.get("use_dora", False)),
            bias=str(raw.get("bias", "none")),
            lora_dropout=float(raw.get("lora_dropout") or 0.0),
            modules_to_save=list(raw.get("modules_to_save") or []),
            layers_to_transform=raw.get("layers_to_transform"),
            base_model_name=raw.get("base_model_name_or_path"),
            task_type=raw.get("task_type"),
        )
    except KeyError as e:
        raise AdapterError(str(path), f"missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise AdapterError(str(path), f"bad field value ({e})") from None


def weights_file(folder: Path, allow_pickle: bool) -> Path:
    st = folder / SAFETENSORS_NAME
    if st.is_file():
        return st
    pk = folder / PICKLE_NAME
    if pk.is_file():
        if not allow_pickle:
            raise AdapterError(str(pk), "pickle weights are refused (untrusted code); pass --allow-pickle to read them")
        return pk
    raise AdapterError(str(st), "missing (no adapter weights in the folder)")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an adapter weights file (safetensors, or a pickle the caller allowed)."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a corrupt file to the user
        raise AdapterError(str(path), f"unreadable weights ({type(e).__name__}: {e})") from None


def check_tensors(
    cfg: AdapterConfig, tensors: dict[str, tuple[int, ...]], spec: ModelSpec | None, max_lora_rank: int | None
) -> list[str]:
    """Problems of an adapter's tensors (`{key: shape}`) against a model; [] when compatible."""
    problems = list(cfg.unsupported())
    pairs: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    for key, shape in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            if "lora_magnitude_vector" in key:
                problems.append(f"tensor {key}: DoRA magnitude vectors are not supported")
            elif "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
                problems.append(f"tensor {key}: embedding / lm_head LoRA is not supported")
            elif key.endswith(".bias"):
                problems.append(f"tensor {key}: LoRA bias is not supported")
            else:
                problems.append(f"tensor {key}: not a LoRA A/B weight of a decoder layer")
            continue
        layer, module, ab = parsed
        pairs.setdefault((layer, module), {})[ab] = tuple(shape)
    if not pairs and not problems:
        problems.append("no LoRA weights in the file")
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layer {layer} {module}"
        if set(ab) != {"A", "B"}:
            problems.append(f"{where}: lora_{'B' if 'A' in ab else 'A'} weight missing")
            continue
        a, b = ab["A"], ab["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            problems.append(f"{where}: A {list(a)} and B {list(b)} do not form a LoRA pair")
            continue
        if max_lora_rank is not None and a[0] > max_lora_rank:
            problems.append(f"{where}: rank {a[0]} exceeds --max-lora-rank {max_lora_rank}")
        if spec is None:
            continue
        if module not in TARGET_MODULES:
            problems.append(f"{where}: module {module!r} is not a supported target ({', '.join(TARGET_MODULES)})")
            continue
        if layer >= spec.num_layers:
            problems.append(f"{where}: the model has only {spec.num_layers} layers")
            continue
        fan_in, fan_out = spec.module_shape(module)
        if a[1] != fan_in or b[0] != fan_out:
            problems.append(
                f"{where}: shape A {list(a)}, B {list(b)} does not match the model "
                f"(expected A [r, {fan_in}], B [{fan_out}, r])"
            )
    return problems


def load_adapter(
    folder: Path | str,
    spec: ModelSpec,
    *,
    max_lora_rank: int | None = None,
    allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
) -> LoraWeights:
    """Read, validate and scale one adapter; raises `AdapterError` (one line) on any problem."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    path = weights_file(folder, allow_pickle)
    tensors = read_tensors(path)
    problems = check_tensors(cfg, {k: tuple(v.shape) for k, v in tensors.items()}, spec, max_lora_rank)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise AdapterError(str(folder), problems[0] + more)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        layer, module, ab = parse_lora_key(key)
        halves.setdefault((layer, module), {})[ab] = t
    modules = {}
    for (layer, module), ab in halves.items():
        a = ab["A"].to(torch.float32)
        b = ab["B"].to(torch.float32)
        path_name = ModelSpec.module_path(layer, module)
        scale = cfg.scale(a.shape[0], cfg.module_alpha(path_name))
        modules[(layer, module)] = (a.to(dtype).contiguous(), (b * scale).to(dtype).contiguous())
    return LoraWeights(folder.name, folder, cfg, modules)
