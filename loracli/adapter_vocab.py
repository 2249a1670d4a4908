"""An adapter's parts on the vocabulary matrices (`embed_tokens`, `lm_head`): reading, checking, scaling.

PEFT saves four kinds of them (tensor names as `get_peft_model_state_dict` writes them; `parse_vocab_key`):

    embed_tokens.lora_embedding_A [r, V], .lora_embedding_B [H, r]   embedding LoRA: x[t] += scale * A[:, id_t] @ B.T
    lm_head.lora_A.weight [r, H], .lora_B.weight [V, r]              head LoRA: logits += scale * (h @ A.T) @ B.T
    embed_tokens.weight / lm_head.weight [V, H]                      `modules_to_save`: the adapter's own full matrix
    embed_tokens.base_layer.weight / lm_head.base_layer.weight       the base matrix saved beside a LoRA on it
                                                                     (`save_embedding_layers`)

With a resized vocabulary PEFT also writes the wrapper's own names (`modules_to_save.weight`,
`original_module.weight`): read as the saved and the base matrix.

`load_vocab` turns them into `VocabWeights` (every part optional): the embedding LoRA as
`(A.T [V, r], scale * B [H, r])`, the head LoRA as `(A [r, H], scale * B [V, r])`, and the full
replacement matrices `embed` / `head` [V, H]. PEFT loads a saved base matrix into the model, so it
is served as a replacement too (the engine keeps no copy of one equal to the base model's). On a
model with tied embeddings the two base matrices are one tensor in PEFT: a saved copy of either
replaces both, and two copies that differ are refused; LoRA parts and `modules_to_save` copies of
the two modules stay apart, as in PEFT (a head LoRA never reaches the embedding, nor the reverse).

`vocab_findings` is the check `loracli run` and `inspect-adapter` share: `modules_to_save` naming
anything but these two modules, a full matrix whose module `modules_to_save` does not name, a
missing LoRA half, a rank unlike the config's, and shapes unlike the model's are refused; a
vocabulary size unlike the base model's (resized embeddings, added tokens) gets its own reason
saying what to do. `vocab_bytes` is an upper bound of what the parts take in the engine (from
tensor shapes only, so a safetensors header is enough). Light: torch is imported inside functions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .model.spec import ModelSpec

if TYPE_CHECKING:
    import torch

    from .adapters import AdapterConfig

VOCAB_MODULES = ("embed_tokens", "lm_head")
MODULE_PATHS = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}  # names inside the HF model
KIND_NAMES = {"A": "LoRA A", "B": "LoRA B", "base": "saved base matrix", "saved": "modules_to_save matrix"}

_VOCAB_KEY = re.compile(
    r"(?:^|\.)(?:(?P<emb>embed_tokens)\.lora_embedding_(?P<emb_ab>A|B)(?:\.[\w-]+)?"
    r"|(?P<head>lm_head)\.lora_(?P<head_ab>A|B)(?:\.[\w-]+)?\.weight"
    r"|(?P<base_mod>embed_tokens|lm_head)\.(?:base_layer|original_module)\.weight"
    r"|(?P<saved_mod>embed_tokens|lm_head)(?:\.modules_to_save(?:\.[\w-]+)?)?\.weight)$"
)


def parse_vocab_key(key: str) -> tuple[str, str] | None:
    """`...embed_tokens.lora_embedding_A` -> ("embed_tokens", "A"); `...lm_head.lora_B.weight` -> ("lm_head", "B");
    `...lm_head.base_layer.weight` -> ("lm_head", "base"); `...embed_tokens.weight` -> ("embed_tokens", "saved")."""
    m = _VOCAB_KEY.search(key)
    if m is None:
        return None
    if m["emb"]:
        return "embed_tokens", m["emb_ab"]
    if m["head"]:
        return "lm_head", m["head_ab"]
    if m["base_mod"]:
        return m["base_mod"], "base"
    return m["saved_mod"], "saved"


def vocab_keys(keys) -> dict[tuple[str, str], str]:
    """(module, kind) -> key over the vocabulary tensors of an adapter file."""
    out: dict[tuple[str, str], str] = {}
    for key in sorted(keys, key=len):  # the shortest name of a kind wins: `lm_head.weight` over its wrapper names
        parsed = parse_vocab_key(key)
        if parsed is not None:
            out.setdefault(parsed, key)
    return out


def saved_modules(cfg: AdapterConfig) -> tuple[set[str], list[str]]:
    """(vocabulary modules `modules_to_save` names, the entries it names that are not one of them)."""
    found, other = set(), []
    for entry in cfg.modules_to_save:
        name = entry.rsplit(".", 1)[-1]
        if name in VOCAB_MODULES:
            found.add(name)
        else:
            other.append(entry)
    return found, other


@dataclass
class VocabWeights:
    """An adapter's vocabulary parts in the engine dtype; None where it has none (see the module docstring)."""

    embed_lora: tuple[torch.Tensor, torch.Tensor] | None = None  # (A.T [V, r], scale * B [H, r])
    head_lora: tuple[torch.Tensor, torch.Tensor] | None = None  # (A [r, H], scale * B [V, r])
    embed: torch.Tensor | None = None  # [V, H] replaces the input embedding
    head: torch.Tensor | None = None  # [V, H] replaces lm_head

    def tensors(self) -> list[torch.Tensor]:
        pairs = [t for pair in (self.embed_lora, self.head_lora) if pair is not None for t in pair]
        return pairs + [t for t in (self.embed, self.head) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes held, a tensor shared by two parts (a tied model's saved base matrix) counted once."""
        return sum({id(t): t.nbytes for t in self.tensors()}.values())


def vocab_findings(
    cfg: AdapterConfig, shapes: Mapping[str, Sequence[int]], spec: ModelSpec | None
) -> tuple[list[str], list[str], set[str]]:
    """(problems, warnings, modules with LoRA weights) of an adapter's vocabulary tensors (`{key: shape}`)."""
    keys = vocab_keys(shapes)
    saved, other = saved_modules(cfg)
    problems = [f"modules_to_save {other}: only embed_tokens and lm_head can be served"] if other else []
    warnings = []
    for module in sorted(saved):
        if (module, "saved") not in keys:
            warnings.append(f"modules_to_save: {module!r} has no weights in the file: served as the base model's")
    for (module, kind), key in sorted(keys.items()):
        if kind == "saved" and module not in saved:
            problems.append(f"tensor {key}: a full {module} matrix, but modules_to_save does not name {module}")
        if kind in ("saved", "base"):
            problems += _matrix_problems(key, tuple(shapes[key]), spec)
    paired = set()
    for module in VOCAB_MODULES:
        ab = {half: tuple(shapes[keys[(module, half)]]) for half in "AB" if (module, half) in keys}
        if ab:
            found = _pair_problems(cfg, module, ab, spec)
            problems += found
            paired.add(module)
    return problems, warnings, paired


def _lora_axes(module: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Axis names of (A, B) of a vocabulary LoRA: which axis is the vocabulary ("V") or hidden size ("H")."""
    return (("r", "V"), ("H", "r")) if module == "embed_tokens" else (("r", "H"), ("V", "r"))


def _mismatch(where: str, shape: tuple[int, ...], axes: tuple[str, ...], spec: ModelSpec) -> str | None:
    """Why `shape` (axes named V, H or r) does not fit the model; the vocabulary size first, with what to do."""
    sizes = {"V": spec.vocab_size, "H": spec.hidden}
    for n, axis in zip(shape, axes, strict=True):
        if axis == "V" and n != spec.vocab_size:
            return (
                f"{where}: a vocabulary of {n} tokens, the base model has {spec.vocab_size} (resized embeddings or "
                f"added tokens); serve it with a base model whose vocabulary has {n} tokens"
            )
    expected = [sizes.get(a, n) for n, a in zip(shape, axes, strict=True)]
    if list(shape) != expected:
        return f"{where}: shape {list(shape)} does not match the model (expected {expected})"
    return None


def _matrix_problems(key: str, shape: tuple[int, ...], spec: ModelSpec | None) -> list[str]:
    if len(shape) != 2:
        return [f"tensor {key}: shape {list(shape)} is not a matrix"]
    if spec is None:
        return []
    mismatch = _mismatch(f"tensor {key}", shape, ("V", "H"), spec)
    return [mismatch] if mismatch else []


def _pair_problems(
    cfg: AdapterConfig, module: str, ab: dict[str, tuple[int, ...]], spec: ModelSpec | None
) -> list[str]:
    """Problems of the A and B shapes of a vocabulary LoRA (`module` embed_tokens or lm_head)."""
    where = f"{module} LoRA"
    if set(ab) != {"A", "B"}:
        return [f"{where}: {'B' if 'A' in ab else 'A'} weight missing"]
    a, b = ab["A"], ab["B"]
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        return [f"{where}: A {list(a)} and B {list(b)} do not form a LoRA pair"]
    problems = []
    config_rank = cfg.module_rank(MODULE_PATHS[module])
    if a[0] != config_rank:
        problems.append(f"{where}: rank {a[0]} in the weights, {config_rank} in adapter_config.json (r / rank_pattern)")
    if spec is not None:
        axes_a, axes_b = _lora_axes(module)
        problems += [p for p in (_mismatch(where, a, axes_a, spec), _mismatch(where, b, axes_b, spec)) if p]
    return problems[:1] if any("vocabulary" in p for p in problems) else problems


def vocab_bytes(shapes: Mapping[str, Sequence[int]], dtype_bytes: int, tied: bool = False) -> int:
    """Upper bound of the engine bytes of an adapter's vocabulary parts: every vocabulary tensor of the file, the
    two saved base matrices of a model with tied embeddings (`tied`) once (`load_vocab` keeps one tensor)."""
    keys = vocab_keys(shapes)
    total = sum(math.prod(shapes[key]) * dtype_bytes for key in keys.values())
    if tied and ("embed_tokens", "base") in keys and ("lm_head", "base") in keys:
        total -= math.prod(shapes[keys[("lm_head", "base")]]) * dtype_bytes
    return total


def load_vocab(
    cfg: AdapterConfig, tensors: Mapping[str, torch.Tensor], spec: ModelSpec, dtype: torch.dtype
) -> VocabWeights | None:
    """The checked vocabulary tensors as `VocabWeights` in `dtype` (scale folded into B); None when there are none.

    Raises ValueError (the reason) when a tied model's two saved base matrices differ.
    """
    import torch

    keys = vocab_keys(tensors)
    if not keys:
        return None

    def get(module: str, kind: str) -> torch.Tensor | None:
        key = keys.get((module, kind))
        return None if key is None else tensors[key]

    def pair(module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        a, b = get(module, "A"), get(module, "B")
        if a is None or b is None:
            return None
        scale = cfg.scale(a.shape[0], cfg.module_alpha(MODULE_PATHS[module]))
        a32, b32 = a.to(torch.float32), b.to(torch.float32) * scale
        if module == "embed_tokens":
            a32 = a32.T
        return a32.to(dtype).contiguous(), b32.to(dtype).contiguous()

    embed_base, head_base = get("embed_tokens", "base"), get("lm_head", "base")
    if spec.tie_embeddings and embed_base is not None and head_base is not None:
        if not torch.equal(embed_base, head_base):
            raise ValueError("the model ties embed_tokens and lm_head, but the two saved base matrices differ")
    if spec.tie_embeddings:
        embed_base = head_base = embed_base if embed_base is not None else head_base
    shared = None if embed_base is None else embed_base.to(dtype).contiguous()

    def matrix(module: str, base: torch.Tensor | None) -> torch.Tensor | None:
        saved = get(module, "saved")
        if saved is not None:
            return saved.to(dtype).contiguous()
        if base is None:
            return None
        return shared if base is embed_base and shared is not None else base.to(dtype).contiguous()

    return VocabWeights(
        embed_lora=pair("embed_tokens"),
        head_lora=pair("lm_head"),
        embed=matrix("embed_tokens", embed_base),
        head=matrix("lm_head", head_base),
    )
