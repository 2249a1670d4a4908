"""An adapter's per-output-row parts on the decoder linears: DoRA magnitudes and biases.

PEFT saves three kinds of them beside a linear's LoRA pair (tensor names as
`get_peft_model_state_dict` writes them; `parse_extra_key`), each a vector over the module's
output rows `[out]`:

    <module>.lora_magnitude_vector   DoRA (use_dora): the magnitude m of each row of W + scale * B @ A
    <module>.lora_B.bias             lora_bias: the bias of lora_B, added as scale * bias
    <module>.base_layer.bias         bias "all" / "lora_only": the trained bias of an adapted module
    <module>.bias                    bias "all": the trained bias of a module without LoRA

What PEFT computes with them at inference (peft/tuners/lora/dora.py, layer.py), for one linear
`y = x @ W.T + b`:
- DoRA: y += (g - 1) * (x @ W.T) + g * scale * (x @ A.T @ B.T), g = m / ||W + scale * B @ A||
  (L2 norm of each row, bias excluded), and merged: W' = g * (W + scale * B @ A), bias unchanged;
- lora_bias: y += scale * lora_B.bias;
- a saved base bias replaces the model's bias of that module (PEFT loads it into the model).

`extra_problems` is the check `loracli run` and `inspect-adapter` share (after `adapters.check_tensors`
paired the A/B keys): a vector whose config switch is off (use_dora, lora_bias, bias), whose module
has no LoRA pair (magnitudes, lora_B biases) or no bias in the model (base biases), or whose shape is
not `[out]` of its module; a DoRA pair without its magnitude; a lora_bias pair without its bias when
PEFT would start it at a random value (init_lora_weights false). PEFT's own refusals of combinations
are in `config_problems`. `load_extras` returns the vectors in float32 (DoRA factors are formed in
float32 from them): magnitudes as saved, lora_B biases with the module's scale folded in, base biases
as saved. Light: torch is imported by the caller.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .model.spec import ALL_TARGET_MODULES, ATTN_MODULES, ModelSpec

if TYPE_CHECKING:
    import torch

    from .adapters import AdapterConfig

MAGNITUDE = "lora_magnitude_vector"
LORA_BIAS = "lora_B.bias"
BASE_BIAS = "bias"
BIAS_VALUES = ("none", "all", "lora_only")  # PEFT's values of the `bias` field
_WHAT = {MAGNITUDE: "DoRA magnitude vector", LORA_BIAS: "lora_B bias"}

_EXTRA_KEY = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<module>\w+?)\."
    r"(?:(?P<mag>lora_magnitude_vector(?:\.weight)?)|(?P<lb>lora_B(?:\.[\w-]+)?\.bias)|(?:base_layer\.)?bias)$"
)

Where = tuple[int, str]


def parse_extra_key(key: str) -> tuple[int, str, str] | None:
    """`...layers.3.self_attn.q_proj.lora_magnitude_vector` -> (3, "q_proj", MAGNITUDE); None for other keys."""
    m = _EXTRA_KEY.search(key)
    if m is None:
        return None
    kind = MAGNITUDE if m["mag"] else LORA_BIAS if m["lb"] else BASE_BIAS
    return int(m["layer"]), m["module"], kind


def config_problems(cfg: AdapterConfig) -> list[str]:
    """What PEFT's LoraConfig itself refuses about these fields (and a `bias` value it does not know)."""
    out = []
    if cfg.bias not in BIAS_VALUES:
        out.append(f"bias={cfg.bias!r} is not one of PEFT's values ({', '.join(BIAS_VALUES)})")
    if cfg.lora_bias and cfg.use_dora:
        out.append("lora_bias=true with use_dora=true: PEFT refuses lora_bias for DoRA")
    if cfg.lora_bias and cfg.init_lora_weights not in (True, False):
        init = cfg.init_lora_weights
        out.append(f"lora_bias=true with init_lora_weights={init!r}: PEFT allows lora_bias only with true or false")
    return out


def extra_problems(
    cfg: AdapterConfig,
    shapes: Mapping[str, Sequence[int]],
    pairs: Mapping[Where, tuple[str, str]],
    spec: ModelSpec | None,
) -> list[str]:
    """Problems of the magnitude and bias vectors in `shapes` (`{key: shape}`), given the served LoRA `pairs`."""
    problems = []
    found: dict[str, set[Where]] = {MAGNITUDE: set(), LORA_BIAS: set(), BASE_BIAS: set()}
    for key, shape in shapes.items():
        parsed = parse_extra_key(key)
        if parsed is None:
            continue
        layer, module, kind = parsed
        found[kind].add((layer, module))
        out = _out_features(module, pairs.get((layer, module)), shapes, spec)
        problem = _vector_problem(cfg, key, (layer, module), kind, tuple(shape), out, pairs, spec)
        if problem is not None:
            problems.append(problem)
    return problems + _missing(cfg, pairs, found)


def _out_features(
    module: str, pair: tuple[str, str] | None, shapes: Mapping[str, Sequence[int]], spec: ModelSpec | None
) -> int | None:
    """The module's output rows: from the model, else from its B, else unknown."""
    if spec is not None and module in spec.target_modules:
        return spec.module_shape(module)[1]
    return shapes[pair[1]][0] if pair is not None else None


def _vector_problem(
    cfg: AdapterConfig,
    key: str,
    where: Where,
    kind: str,
    shape: tuple[int, ...],
    out: int | None,
    pairs: Mapping[Where, tuple[str, str]],
    spec: ModelSpec | None,
) -> str | None:
    """Why one magnitude / bias vector is refused; None when it is served."""
    layer, module = where
    known = ALL_TARGET_MODULES if spec is None else spec.target_modules
    if module not in known:
        return f"tensor {key}: module {module!r} is not a supported target ({', '.join(known)})"
    if spec is not None and layer >= spec.num_layers:
        return f"tensor {key}: the model has only {spec.num_layers} layers"
    switch = _switch_problem(cfg, key, where, kind, pairs, spec)
    if switch is not None:
        return switch
    if len(shape) != 1 or (out is not None and shape[0] != out):
        expected = f"[{out}]" if out is not None else "one dimension"
        return f"layer {layer} {module}: {kind} shape {list(shape)} does not match the module (expected {expected})"
    return None


def _switch_problem(
    cfg: AdapterConfig,
    key: str,
    where: Where,
    kind: str,
    pairs: Mapping[Where, tuple[str, str]],
    spec: ModelSpec | None,
) -> str | None:
    """Why a vector does not fit the config (its switch is off) or the module (no pair, no bias to replace)."""
    if kind == BASE_BIAS:
        if cfg.bias == "none":
            return f"tensor {key}: a trained base bias, but bias is 'none' in the config"
        if spec is not None and not _has_bias(spec, where[1]):
            return f"tensor {key}: the model's {where[1]} has no bias to replace (bias={cfg.bias!r})"
        return None
    if not cfg.targets(*where):
        return None  # PEFT ignores the vectors of a module the config does not target, as its pair
    switch = "use_dora" if kind == MAGNITUDE else "lora_bias"
    if not (cfg.use_dora if kind == MAGNITUDE else cfg.lora_bias):
        return f"tensor {key}: a {_WHAT[kind]}, but {switch} is false in the config"
    if where not in pairs:
        return f"tensor {key}: a {_WHAT[kind]} without a LoRA pair on its module"
    return None


def _has_bias(spec: ModelSpec, module: str) -> bool:
    if module in ("q_proj", "k_proj", "v_proj", "qkv_proj"):
        return spec.qkv_bias
    return spec.o_bias if module in ATTN_MODULES else spec.mlp_bias


def _missing(cfg: AdapterConfig, pairs: Mapping[Where, tuple[str, str]], found: dict[str, set[Where]]) -> list[str]:
    """Pairs lacking the vector their config asks for (a lora_B bias may be missing when PEFT starts it at zero)."""
    problems = []
    for layer, module in sorted(pairs):
        if cfg.use_dora and (layer, module) not in found[MAGNITUDE]:
            problems.append(f"layer {layer} {module}: {MAGNITUDE} missing (use_dora is true: DoRA needs one per pair)")
        if cfg.lora_bias and cfg.init_lora_weights is not True and (layer, module) not in found[LORA_BIAS]:
            problems.append(
                f"layer {layer} {module}: {LORA_BIAS} missing (lora_bias is true), and PEFT would leave it "
                f"at its init_lora_weights={cfg.init_lora_weights!r} values, a random bias"
            )
    return problems


def load_extras(
    cfg: AdapterConfig, tensors: Mapping[str, torch.Tensor], pairs: Mapping[Where, tuple[str, str]]
) -> tuple[dict[Where, torch.Tensor], dict[Where, torch.Tensor], dict[Where, torch.Tensor]]:
    """(magnitudes, scale * lora_B biases, base biases) per (layer, module), float32, of checked `tensors`.

    Vectors of modules without a served pair (PEFT ignores an untargeted module) are left out, except
    base biases, which PEFT loads into any module.
    """
    import torch

    out: dict[str, dict[Where, torch.Tensor]] = {MAGNITUDE: {}, LORA_BIAS: {}, BASE_BIAS: {}}
    for key, tensor in tensors.items():
        parsed = parse_extra_key(key)
        if parsed is None:
            continue
        layer, module, kind = parsed
        where = (layer, module)
        if kind != BASE_BIAS and where not in pairs:
            continue
        vector = tensor.to(torch.float32)
        if kind == LORA_BIAS:
            rank = tensors[pairs[where][0]].shape[0]
            vector = vector * cfg.scale(rank, cfg.module_alpha(ModelSpec.module_path(layer, module)))
        out[kind][where] = vector.contiguous()
    return out[MAGNITUDE], out[LORA_BIAS], out[BASE_BIAS]
