"""Reading PEFT LoRA adapters from disk and checking them against a base model.

An adapter is a folder holding `adapter_config.json` and `adapter_model.safetensors` (PEFT's
format); its name is the folder name. Pickle weights (`adapter_model.bin`) are refused unless
`allow_pickle=True`, and even then are read with `torch.load(weights_only=True)`.

`load_adapter` returns `LoraWeights`: per (layer, module) the A matrix `[r, in]` and the B
matrix with the scale folded in, `scale * B` `[out, r]`, where scale = alpha / r, or
alpha / sqrt(r) with rsLoRA, r and alpha taken per module (rank_pattern / alpha_pattern, as
PEFT resolves them), and in `LoraWeights.vocab` the parts on the vocabulary matrices (embedding and
lm_head LoRA, `modules_to_save` copies of embed_tokens / lm_head: `adapter_vocab.py`), and in
`magnitudes` / `lora_biases` / `base_biases` the DoRA magnitudes and biases of the decoder linears
(float32 `[out]` vectors: `adapter_extras.py`). Unsupported
features (modules_to_save of other modules, PEFT variants in `peft_fields`, LoRA on a MoE block's
router or experts; its shared expert's linears are served, as modules `shared_expert.gate_proj` etc.),
incompatibilities (unknown module,
shape mismatch, a vocabulary unlike the model's, rank above `max_lora_rank`) and NaN or infinite
weights raise `AdapterError` naming the file, one line. Messages name
configuration fields, never flags (`max_lora_rank`, `allow_pickle`: `MESSAGE_FIELDS`), and list
them in the error's `fields` (`fields_named`); `spell_fields` rewrites them for a reader, e.g. into flags.

One rule for `loracli run` and `inspect-adapter`: both call `check_tensors` (what is refused:
`Findings.problems`; what is served but worth a word: `Findings.warnings`) and `nonfinite_problem`.
The rule follows what PEFT does when it loads the adapter:
- a pair whose rank differs from the config's (`r`, `rank_pattern`) is refused (PEFT: size mismatch);
- a plain `target_modules` name with no weights in the file: a name no supported model has is
  ignored (PEFT ignores a target the model lacks); a module loracli adapts is served without a
  delta when `init_lora_weights` starts B at zero (PEFT leaves the missing weights at their init
  and warns), and refused otherwise (PEFT's delta there would be random).

PEFT tensor names are paired here for every reader: `parse_lora_key` reads one name,
`group_lora_keys` gathers the A and B halves of each (layer, module), `lora_pairs` keeps the
well-formed pairs (`is_lora_pair`). torch is imported when a function needs it, so importing this
module (and `inspect-adapter`) stays light.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from .adapter_extras import config_problems, extra_problems, load_extras, parse_extra_key
from .adapter_vocab import VOCAB_MODULES, VocabWeights, load_vocab, parse_vocab_key, vocab_findings
from .errors import AdapterError
from .model.moe_spec import SHARED_EXPERT_TARGETS
from .model.spec import ALL_TARGET_MODULES, ModelSpec
from .model_source.pickle_conversion import load_tensor_pickle
from .peft_fields import refusals, unknown_fields

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
MESSAGE_FIELDS = ("max_lora_rank", "allow_pickle")  # the configuration fields adapter messages name
_FIELD_NAMES = {f: re.compile(rf"(?<![\w.-]){f}(?![\w-])") for f in MESSAGE_FIELDS}  # whole words only

_KEY = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<module>(?:shared_expert\.)?\w+?)"
    r"\.lora_(?P<ab>A|B)(?:\.[\w-]+)?\.weight$"
)  # a Qwen2-MoE shared expert's module is named by its path under mlp: "shared_expert.gate_proj"
_MOE_KEY = re.compile(  # LoRA tensors on a MoE block's parts (old per-expert names; Mixtral's block_sparse_moe)
    r"(?:^|\.)(?P<module>layers\.\d+\.(?:mlp|block_sparse_moe)\."
    r"(?P<part>experts|shared_expert_gate|gate)(?:\.[\w.]+?)?)\.lora_"
)
_MOE_PARTS = {
    "experts": "experts",
    "gate": "router",
    "shared_expert_gate": "shared expert gate",
}


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
    lora_bias: bool = False  # lora_B has a bias (PEFT >= 0.14)
    lora_dropout: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    target_regex: str | None = None  # target_modules given as one string: a regex over module paths
    exclude_modules: list[str] | str | None = None
    init_lora_weights: bool | str = True  # how PEFT initialises a module the weights leave out
    refused: list[str] = field(default_factory=list)  # variants loracli does not serve (`peft_fields.refusals`)
    unknown_fields: list[str] = field(default_factory=list)  # fields loracli does not know (served as absent)
    base_model_name: str | None = None
    task_type: str | None = None

    def module_alpha(self, module_path: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_path, self.lora_alpha))

    def module_rank(self, module_path: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_path, self.r))

    def scale(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, layer: int, module: str) -> bool:
        """Whether PEFT, built from this config, puts a LoRA on `module` of decoder `layer` (its
        `check_target_module_exists`: exclude_modules, target_modules as names or a regex,
        "all-linear", layers_to_transform / layers_pattern). Weights of other modules PEFT ignores."""
        path = ModelSpec.module_path(layer, module)
        ex = self.exclude_modules
        if ex and (re.fullmatch(ex, path) if isinstance(ex, str) else any(_names(path, e) for e in ex)):
            return False
        if self.target_regex is not None:
            return self.target_regex == "all-linear" or re.fullmatch(self.target_regex, path) is not None
        if not any(_names(path, t) for t in self.target_modules):
            return False
        wanted = self.layers_to_transform
        if wanted is None or wanted == []:
            return True
        patterns = self.layers_pattern
        if patterns:  # PEFT reads the index after one of these names; decoder layers sit under "layers"
            patterns = [patterns] if isinstance(patterns, str) else patterns
            if not any(re.match(rf"(?:^|.*?\.){p}\.\d+\.", path) for p in patterns):
                return False
        return layer == wanted if isinstance(wanted, int) else layer in wanted

    def unsupported(self) -> list[str]:
        """What `loracli run` refuses in this config, one reason each."""
        out = []
        if self.peft_type.upper() != "LORA":
            out.append(f"peft_type {self.peft_type!r} is not LORA")
        out += self.refused
        out += config_problems(self)
        return out


@dataclass
class Findings:
    """What `check_tensors` finds: `problems` make `loracli run` refuse the adapter, `warnings` do not."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class LoraWeights:
    """One adapter in memory: per (layer, module) `(A [r, in], scale*B [out, r])`."""

    name: str
    path: Path
    config: AdapterConfig
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    vocab: VocabWeights | None = None  # parts on embed_tokens / lm_head (`adapter_vocab`), held outside the slots
    # per (layer, module), float32 [out] (`adapter_extras`): DoRA magnitudes, scale * lora_B biases, trained base biases
    magnitudes: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    lora_biases: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    base_biases: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    @property
    def kinds(self) -> tuple[str, ...]:
        """What the adapter holds beyond plain LoRA pairs: of "dora", "lora_bias", "base_bias", "vocab"."""
        held = (self.magnitudes, self.lora_biases, self.base_biases, self.vocab is not None)
        return tuple(k for k, h in zip(("dora", "lora_bias", "base_bias", "vocab"), held, strict=True) if h)

    @property
    def is_plain_lora(self) -> bool:
        """Whether the adapter is LoRA pairs on the decoder linears only (nothing in `kinds`)."""
        return not self.kinds

    @property
    def max_rank(self) -> int:
        return max((a.shape[0] for a, _ in self.modules.values()), default=0)

    @property
    def has_vocab(self) -> bool:
        """Whether the adapter changes the embedding or lm_head (embedding / head LoRA, modules_to_save)."""
        return self.vocab is not None

    @property
    def nbytes(self) -> int:
        own = sum(a.nbytes + b.nbytes for a, b in self.modules.values())
        extras = sum(v.nbytes for d in (self.magnitudes, self.lora_biases, self.base_biases) for v in d.values())
        return own + extras + (self.vocab.nbytes if self.vocab is not None else 0)


def _names(path: str, name: str) -> bool:
    """Whether a `target_modules` / `exclude_modules` entry names the module at `path` (PEFT's rule)."""
    return path == name or path.endswith(f".{name}")


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


def group_lora_keys(keys: Iterable[str]) -> dict[tuple[int, str], dict[str, str]]:
    """(layer, module) -> {"A": key, "B": key} over the LoRA keys (a half may be missing); other keys are left out."""
    groups: dict[tuple[int, str], dict[str, str]] = {}
    for key in keys:
        parsed = parse_lora_key(key)
        if parsed is not None:
            groups.setdefault(parsed[:2], {})[parsed[2]] = key
    return groups


def is_lora_pair(a_shape: Sequence[int], b_shape: Sequence[int]) -> bool:
    """Whether the shapes form a LoRA pair: A `[r, in]`, B `[out, r]`."""
    return len(a_shape) == 2 and len(b_shape) == 2 and a_shape[0] == b_shape[1]


def lora_pairs(shapes: Mapping[str, Sequence[int]]) -> dict[tuple[int, str], tuple[str, str]]:
    """(layer, module) -> (key of A, key of B) of the well-formed pairs of `{key: shape}`, in order."""
    pairs = {}
    for where, ab in sorted(group_lora_keys(shapes).items()):
        if set(ab) == {"A", "B"} and is_lora_pair(shapes[ab["A"]], shapes[ab["B"]]):
            pairs[where] = (ab["A"], ab["B"])
    return pairs


def served_pairs(cfg: AdapterConfig, shapes: Mapping[str, Sequence[int]]) -> dict[tuple[int, str], tuple[str, str]]:
    """The well-formed pairs (`lora_pairs`) of the modules the config targets (PEFT ignores the others)."""
    return {where: keys for where, keys in lora_pairs(shapes).items() if cfg.targets(*where)}


def fields_named(message: str) -> tuple[str, ...]:
    """The configuration fields of `MESSAGE_FIELDS` that a message names (as whole words)."""
    return tuple(f for f, pattern in _FIELD_NAMES.items() if pattern.search(message))


def spell_fields(message: str, flags: Mapping[str, str]) -> str:
    """`message` with each field of `MESSAGE_FIELDS` it names spelled as `flags` says (if it says)."""
    for f, pattern in _FIELD_NAMES.items():
        if f in flags:
            message = pattern.sub(lambda _, spelled=flags[f]: spelled, message)
    return message


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
        regex = targets if isinstance(targets, str) else None
        if regex is not None:
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
            lora_bias=bool(raw.get("lora_bias", False)),
            lora_dropout=float(raw.get("lora_dropout") or 0.0),
            modules_to_save=list(raw.get("modules_to_save") or []),
            layers_to_transform=raw.get("layers_to_transform"),
            layers_pattern=raw.get("layers_pattern"),
            target_regex=regex,
            exclude_modules=raw.get("exclude_modules"),
            refused=refusals(raw),
            unknown_fields=unknown_fields(raw),
            init_lora_weights=raw.get("init_lora_weights", True),
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
            refused = "pickle weights are refused (untrusted code); set allow_pickle to read them"
            raise AdapterError(str(pk), refused, fields=("allow_pickle",))
        return pk
    raise AdapterError(str(st), "missing (no adapter weights in the folder)")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an adapter weights file (safetensors, or a pickle the caller allowed: `load_tensor_pickle`)."""
    if path.suffix != ".safetensors":
        return load_tensor_pickle(path, lambda reason: AdapterError(str(path), reason))
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any reader failure is a corrupt file to the user
        raise AdapterError(str(path), f"unreadable weights ({type(e).__name__}: {e})") from None


def check_tensors(
    cfg: AdapterConfig, tensors: dict[str, tuple[int, ...]], spec: ModelSpec | None, max_lora_rank: int | None
) -> Findings:
    """What `loracli run` refuses (and warns about) in an adapter's config and tensors (`{key: shape}`).

    With `spec` None only what no supported model accepts is reported (no layer or shape checks).
    """
    problems = list(cfg.unsupported())
    problems += [p for p in map(_key_problem, tensors) if p is not None]
    groups = group_lora_keys(tensors)
    vocab_problems, vocab_warnings, vocab_present = vocab_findings(cfg, tensors, spec)
    if not groups and not vocab_present and not problems:
        problems.append("no LoRA weights in the file")
    problems += vocab_problems
    ignored = sorted(where for where in groups if not cfg.targets(*where))
    for (layer, module), ab in sorted(groups.items()):
        if (layer, module) in ignored:
            continue
        shapes = {half: tuple(tensors[key]) for half, key in ab.items()}
        problems += _pair_problems(cfg, layer, module, shapes, spec, max_lora_rank)
    problems += extra_problems(cfg, tensors, served_pairs(cfg, tensors), spec)
    leaves = {module.rsplit(".", 1)[-1] for _, module in groups}  # "shared_expert.gate_proj" is a gate_proj
    target_problems, warnings = _absent_targets(cfg, leaves | vocab_present)
    warnings += vocab_warnings
    if ignored:
        listed = ", ".join(f"layer {layer} {module}" for layer, module in ignored[:4])
        more = f" and {len(ignored) - 4} more" if len(ignored) > 4 else ""
        warnings.append(
            f"weights for {listed}{more}, which the config does not target (target_modules, "
            "layers_to_transform, layers_pattern, exclude_modules): ignored, as PEFT ignores them"
        )
    unknown = "a field loracli does not know (a newer PEFT?): served as if absent"
    warnings += [f"{name}: {unknown}" for name in cfg.unknown_fields]
    return Findings(problems + target_problems, warnings)


def _absent_targets(cfg: AdapterConfig, present: set[str]) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the plain `target_modules` names the weights hold nothing for (regexes are skipped)."""
    problems, warnings = [], []
    for target in cfg.target_modules:
        if not re.fullmatch(r"\w+", target) or target in present:
            continue
        head = f"target_modules: {target!r} has no weights in the file"
        if target not in ALL_TARGET_MODULES + VOCAB_MODULES:
            known = ", ".join(ALL_TARGET_MODULES + VOCAB_MODULES)
            warnings.append(f"{head} and is not a module loracli adapts ({known}): ignored, as PEFT ignores it")
        elif _zero_b_init(cfg.init_lora_weights):
            warnings.append(f"{head}: served without it, as PEFT leaves it at its initial B = 0 (no change)")
        else:
            init = cfg.init_lora_weights
            problems.append(f"{head}, and PEFT would leave it at its init_lora_weights={init!r} values, a random delta")
    return problems, warnings


def _key_problem(key: str) -> str | None:
    """Why a tensor that is not a LoRA A/B weight of a decoder layer is refused; None for those weights."""
    moe = _MOE_KEY.search(key)  # before the A/B parse: a router's `mlp.gate` parses as a module name
    if moe is not None:
        part = _MOE_PARTS[moe["part"]]
        return f"tensor {key}: LoRA on the {part} of a MoE layer ({moe['module']}) is not served"
    if parse_lora_key(key) is not None or parse_vocab_key(key) is not None:
        return None
    if parse_extra_key(key) is not None:
        return None  # DoRA magnitudes and biases of the decoder linears: `extra_problems`
    if "lora_magnitude_vector" in key:
        return f"tensor {key}: a DoRA magnitude vector of a module loracli does not adapt"
    if key.endswith(".bias"):
        return f"tensor {key}: a saved bias (bias field) of a module other than q,k,v,o,gate,up,down is not served"
    return f"tensor {key}: not a LoRA A/B weight of a decoder layer"


def _zero_b_init(init_lora_weights: bool | str) -> bool:
    """Whether PEFT starts lora_B at zero under this `init_lora_weights` (True, "gaussian"): no delta until trained."""
    return init_lora_weights is True or str(init_lora_weights).lower() == "gaussian"


def _pair_problems(
    cfg: AdapterConfig,
    layer: int,
    module: str,
    ab: dict[str, tuple[int, ...]],
    spec: ModelSpec | None,
    max_lora_rank: int | None,
) -> list[str]:
    """Problems of the A and B shapes found for one (layer, module)."""
    where = f"layer {layer} {module}"
    if set(ab) != {"A", "B"}:
        return [f"{where}: lora_{'B' if 'A' in ab else 'A'} weight missing"]
    a, b = ab["A"], ab["B"]
    if not is_lora_pair(a, b):
        return [f"{where}: A {list(a)} and B {list(b)} do not form a LoRA pair"]
    problems = []
    config_rank = cfg.module_rank(ModelSpec.module_path(layer, module))
    if a[0] != config_rank:
        problems.append(f"{where}: rank {a[0]} in the weights, {config_rank} in {CONFIG_NAME} (r / rank_pattern)")
    if max_lora_rank is not None and a[0] > max_lora_rank:
        problems.append(f"{where}: rank {a[0]} exceeds max_lora_rank {max_lora_rank}")
    mismatch = _model_mismatch(layer, module, a, b, spec)
    return problems + ([f"{where}: {mismatch}"] if mismatch else [])


def _model_mismatch(
    layer: int, module: str, a: tuple[int, ...], b: tuple[int, ...], spec: ModelSpec | None
) -> str | None:
    """Why a well-formed pair does not fit the model (with `spec` None: any supported model)."""
    known = ALL_TARGET_MODULES + SHARED_EXPERT_TARGETS if spec is None else spec.lora_targets  # the model's
    if module not in known:
        return f"module {module!r} is not a supported target ({', '.join(known)})"
    if spec is None:
        return None
    if layer >= spec.num_layers:
        return f"the model has only {spec.num_layers} layers"
    if module not in spec.layer_targets(layer):
        if spec.is_sparse(layer):
            return f"layer {layer} is a MoE layer: it has no {module} (LoRA on the experts is not served)"
        return f"layer {layer} is a dense layer: it has no {module}"
    fan_in, fan_out = spec.module_shape(module)
    if a[1] != fan_in or b[0] != fan_out:
        return f"shape A {list(a)}, B {list(b)} does not match the model (expected A [r, {fan_in}], B [{fan_out}, r])"
    return None


def load_adapter(
    folder: Path | str,
    spec: ModelSpec,
    *,
    max_lora_rank: int | None = None,
    allow_pickle: bool = False,
    dtype: torch.dtype | None = None,
) -> LoraWeights:
    """Read, validate and scale one adapter into `dtype` (None: float32); raises `AdapterError` (one line)."""
    import torch

    folder = Path(folder)
    cfg = read_adapter_config(folder)
    path = weights_file(folder, allow_pickle)
    tensors = read_tensors(path)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = check_tensors(cfg, shapes, spec, max_lora_rank).problems
    if problems:
        message = problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
        raise AdapterError(str(folder), message, fields=fields_named(message))
    pairs = served_pairs(cfg, shapes)
    checked = [key for pair in pairs.values() for key in pair] + [k for k in tensors if parse_vocab_key(k)]
    checked += [k for k in tensors if parse_extra_key(k)]
    nonfinite = (nonfinite_problem(key, tensors[key]) for key in checked)
    problem = next((p for p in nonfinite if p is not None), None)
    if problem is not None:
        raise AdapterError(str(path), problem)
    dtype = torch.float32 if dtype is None else dtype
    modules = {where: _scaled_pair(cfg, where, tensors[ka], tensors[kb], dtype) for where, (ka, kb) in pairs.items()}
    try:
        vocab = load_vocab(cfg, tensors, spec, dtype)
    except ValueError as e:
        raise AdapterError(str(path), str(e)) from None
    magnitudes, lora_biases, base_biases = load_extras(cfg, tensors, pairs)
    return LoraWeights(folder.name, folder, cfg, modules, vocab, magnitudes, lora_biases, base_biases)


def nonfinite_problem(key: str, tensor: torch.Tensor) -> str | None:
    """Why a tensor holding NaN or infinite values is refused (every request would fail); None when all are finite."""
    import torch

    if bool(torch.isfinite(tensor.sum(dtype=torch.float64))):  # half the time of isfinite(): a NaN or an
        return None  # infinity always leaves the sum non-finite
    finite = torch.isfinite(tensor)
    if bool(finite.all()):  # only the sum overflowed
        return None
    nan = int(torch.isnan(tensor).sum())
    infinite = tensor.numel() - int(finite.sum()) - nan
    return f"tensor {key}: non-finite values ({nan} NaN, {infinite} infinite)"


def _scaled_pair(
    cfg: AdapterConfig, where: tuple[int, str], a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, scale * B) in `dtype`, scaled in float32 with the module's own rank and alpha."""
    import torch

    a = a.to(torch.float32)
    b = b.to(torch.float32)
    scale = cfg.scale(a.shape[0], cfg.module_alpha(ModelSpec.module_path(*where)))
    return a.to(dtype).contiguous(), (b * scale).to(dtype).contiguous()
