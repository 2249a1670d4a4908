"""loracli: many LoRA adapters, one base model, one batched engine."""

__version__ = "0.1.0"
