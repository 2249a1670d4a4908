"""The report of `inspect-adapter`: plain dataclasses, and `InspectReport.to_dict()`, the `--json` document.

Contract: everything here is data (no I/O, no torch, no rich). `to_dict()` keeps its keys stable
and `SCHEMA_VERSION` is bumped on any incompatible change. An adapter's `status` is "error"
(unreadable), "incompatible" (`problems` says what `loracli run` refuses, one line each),
"warning" (usable, see `warnings`) or "ok"; `InspectReport.ok` is False when any adapter is
"error" or "incompatible".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..model.spec import SLOT_BYTES_FORMULA

SCHEMA_VERSION = 1


@dataclass
class ShapeGroup:
    """Layers of one module type whose A and B have the same shapes."""

    layers: list[int]
    a_shape: list[int]
    b_shape: list[int]


@dataclass
class ModuleSummary:
    """One module type (e.g. q_proj) across the layers the adapter targets."""

    module: str
    layers: list[int]
    ranks: list[int]
    scales: list[float]
    parameter_count: int
    shapes: list[ShapeGroup]
    delta_norm: dict[str, float] | None  # {"min", "median", "max"} of ‖scale·B·A‖_F over layers


@dataclass
class VocabPart:
    """One tensor on the vocabulary matrices: an embedding / lm_head LoRA half or a full saved matrix."""

    module: str  # "embed_tokens" | "lm_head"
    kind: str  # `adapter_vocab.KIND_NAMES`: "LoRA A", "LoRA B", "saved base matrix", "modules_to_save matrix"
    shape: list[int]
    bytes: int  # in the engine dtype


@dataclass
class WeightsInfo:
    file: str
    format: str  # "safetensors" or "pickle"
    file_bytes: int
    tensor_count: int
    parameter_count: int
    dtypes: list[str]
    all_zero: bool
    modules: list[ModuleSummary]
    extras: dict[str, int] = field(default_factory=dict)  # DoRA magnitude / bias vectors by kind (`adapter_extras`)
    vocab: list[VocabPart] = field(default_factory=list)  # parts on embed_tokens / lm_head (`adapter_vocab`)


@dataclass
class CostInfo:
    """What the adapter costs in the engine dtype; slot bytes need the model (else None)."""

    rank: int  # the adapter's largest rank
    own_weights_bytes: int
    slot_bytes_at_rank: int | None
    smallest_max_lora_rank: int | None  # the smallest valid max_lora_rank that fits it
    extras_bytes: int = 0  # its DoRA magnitude and bias vectors (float32), part of own_weights_bytes
    vocab_bytes: int = 0  # its embedding / lm_head parts, part of own_weights_bytes; held outside the slots


@dataclass
class AdapterReport:
    name: str
    path: str
    status: str  # "ok" | "warning" | "incompatible" | "error"
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: dict | None = None
    weights: WeightsInfo | None = None
    cost: CostInfo | None = None


@dataclass
class ModelInfo:
    source: str
    folder: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass
class EngineInfo:
    dtype: str
    dtype_bytes: int
    max_lora_rank: int
    memory_budget_bytes: int
    slot_bytes: int | None  # one slot at max_lora_rank; None without a model
    slots_in_budget: int | None
    slot_bytes_formula: str = SLOT_BYTES_FORMULA
    slot_table_bytes: int | None = None  # the per-row DoRA and bias tables, part of slot_bytes; None without a model


@dataclass
class InspectReport:
    mode: str  # "adapter" | "folder"
    path: str
    model: ModelInfo | None
    engine: EngineInfo
    adapters: list[AdapterReport]

    @property
    def ok(self) -> bool:
        return all(a.status in ("ok", "warning") for a in self.adapters)

    def to_dict(self) -> dict:
        """The `--json` document (stable keys, `schema` bumps on incompatible changes)."""
        return {
            "schema": SCHEMA_VERSION,
            "mode": self.mode,
            "path": self.path,
            "ok": self.ok,
            "model": asdict(self.model) if self.model else None,
            "engine": asdict(self.engine),
            "adapters": [asdict(a) for a in self.adapters],
        }
