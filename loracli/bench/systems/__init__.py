"""The systems under test, one module per family, and `build_system(job)`: the registry of them.

Contract: `build_system(job)` parses `job.system` (`loracli.bench.system_names`) and builds the
`System` its kind names; `BUILDERS` maps every kind of `system_names.KINDS` to its builder.
Modules: `interface` (what a system implements), `loracli` (`loracli`, `base`), `loracli_ray`
(`loracli-ray`), `hf` (what the transformers baselines share), `peft` (`peft-mixed`,
`peft-grouped`), `merged_swap` (`merged-swap`), `vllm` (`vllm`), `llama_cpp` (`llama-cpp`).
"""

from __future__ import annotations

from collections.abc import Callable

from ..protocol import Job
from ..system_names import SystemSpec, parse_system
from .interface import System
from .llama_cpp import LlamaCppSystem
from .loracli import LoracliSystem
from .loracli_ray import LoracliRaySystem
from .merged_swap import MergedSwapSystem
from .peft import PeftGroupedSystem, PeftMixedSystem
from .vllm import VllmSystem

BUILDERS: dict[str, Callable[[Job, SystemSpec], System]] = {
    "loracli": LoracliSystem,
    "base": LoracliSystem,
    "loracli-ray": LoracliRaySystem,
    "peft-mixed": lambda job, spec: PeftMixedSystem(job),
    "peft-grouped": lambda job, spec: PeftGroupedSystem(job),
    "merged-swap": lambda job, spec: MergedSwapSystem(job),
    "vllm": lambda job, spec: VllmSystem(job),
    "llama-cpp": LlamaCppSystem,
}


def build_system(job: Job) -> System:
    spec = parse_system(job.system)
    return BUILDERS[spec.kind](job, spec)
