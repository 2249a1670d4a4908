"""`loracli inspect-adapter`: what a PEFT LoRA adapter holds, what it costs in the engine, and
whether `loracli run` accepts it.

`inspect_path(path, ...)` computes an `InspectReport` (plain data; `to_dict()` is the `--json`
document) and `render(report, console, flags=...)` prints it with rich. The modules:

- `analysis`: `inspect_path` and the checks and costs behind it (its docstring: the contract);
- `report`: the report dataclasses and `to_dict`;
- `weights`: reading a weights file lazily (header first, one tensor at a time);
- `modules`: per module type shapes, ranks, scales and delta norms;
- `lines`: folding problem and warning lines that differ only by a layer number;
- `render`: the rich tables.

Importing this package does not import torch (nor rich): they are imported when used.
"""

from .analysis import inspect_path
from .render import render
from .report import InspectReport

__all__ = ["InspectReport", "inspect_path", "render"]
