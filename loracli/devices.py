"""Which device and dtype a run uses: `resolve_device("auto")`, `resolve_dtype("auto", device)`.

One place for the rule, shared by the engine, `inspect-adapter` and `bench`. torch is imported
when a function is called, so importing this module stays light.

`--dtype auto` on CPU is measured, not read from CPU flags: at first use a probe (about 1 s)
times a SmolLM2-sized matmul (`PROBE_SHAPES`) in float32 and bfloat16, and checks that the
deterministic-mode linear (`loracli.kernels.invariant.linear`) gives a row the same bits at 1, 7
and 64 rows in bfloat16, and so do deterministic attention's bfloat16 GEMMs (`fixed_attention`,
whose rows are not padded). bfloat16 is picked only when it is at least `BF16_MIN_SPEEDUP` times
faster at every shape and invariant; else float32. The figures and the pick are cached in
`<cache root>/cpu_dtype.json` under a key of the CPU's model name, its flags, the torch version
and `PROBE_VERSION`, so every later run on that kind of machine reads them (`cpu_dtype_probe`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic_files import atomic_file

if TYPE_CHECKING:
    import torch

PROBE_FILE = "cpu_dtype.json"
PROBE_SHAPES = ((64, 576, 1536), (256, 576, 1536))  # rows x in x out: SmolLM2's MLP at decode / prefill sizes
PROBE_SECONDS = 0.2  # timing per shape and dtype
BF16_MIN_SPEEDUP = 1.2
PROBE_VERSION = 2  # what the probe checks changed (2: deterministic attention's bfloat16 GEMMs): measure again
DTYPE_NAMES = ("float32", "bfloat16")


def resolve_device(name: str) -> torch.device:
    """The device `name` means: "auto" is CUDA when present, else CPU. A device torch cannot use is a
    one-line `ConfigError` naming the `device` field, not torch's error at the first tensor."""
    import torch

    from .errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not one torch knows", fields=("device",)) from None
    problem = _cuda_problem(device) if device.type == "cuda" else None
    if problem is not None:
        raise ConfigError(f"device {name!r} {problem}", fields=("device",))
    return device


def _cuda_problem(device: torch.device) -> str | None:
    """Why torch cannot use this CUDA device here; None when it can."""
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda is not None
        return "needs CUDA, and " + ("no GPU is visible" if built else f"this torch ({torch.__version__}) has none")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"does not exist: {count} GPU{'s' if count != 1 else ''} visible"
    return None


def deterministic_default(dtype_name: str) -> bool:
    """Whether deterministic mode is on when the config leaves it unset: on, except in float32.

    Measured on one `loracli bench` run each (AMD EPYC, AVX-512 BF16, 2 threads, SmolLM2-135M,
    4 adapters, 128 prompts x 32 tokens): bfloat16 194.9 tok/s off, 194.5 on (0.2% slower);
    float32 156.3 off, 129.4 on (17% slower). The mode is the default where it costs under 10%.
    Float32 without it gave identical greedy tokens at every batching the tests try, but that is
    an observation about a BLAS, not a promise.
    """
    return dtype_name != "float32"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, cpu_dtype_probe()["pick"])


def cpu_dtype_probe(seconds: float = PROBE_SECONDS) -> dict[str, Any]:
    """This machine's `--dtype auto` figures and pick: from the cache, else measured and cached.

    A cache that cannot be written only costs measuring again next time.
    """
    from .model_source import cache_root

    return cached_probe(cache_root() / PROBE_FILE, machine_key(), lambda: measure_cpu_dtypes(seconds))


def machine_key() -> str:
    """A short hash of the CPU's model name, its flags, the torch version and `PROBE_VERSION`."""
    import torch

    model, flags = _cpu_identity()
    return hashlib.sha256(f"{model}\n{flags}\n{torch.__version__}\n{PROBE_VERSION}".encode()).hexdigest()[:16]


def _cpu_identity() -> tuple[str, str]:
    """(model name, flags) from /proc/cpuinfo, or what `platform` knows elsewhere."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    return model, " ".join(sorted((fields.get("flags") or fields.get("Features") or "").split()))


def measure_cpu_dtypes(seconds: float = PROBE_SECONDS) -> dict[str, Any]:
    """Time `PROBE_SHAPES` in float32 and bfloat16, check bfloat16 row invariance, and pick."""
    import torch

    matmuls = []
    for rows, fan_in, fan_out in PROBE_SHAPES:
        ms = {name: 1e3 * _linear_seconds(getattr(torch, name), rows, fan_in, fan_out, seconds) for name in DTYPE_NAMES}
        matmuls.append({"rows": rows, "in": fan_in, "out": fan_out, **{f"{k}_ms": round(v, 4) for k, v in ms.items()}})
    invariant = _bf16_rows_invariant()
    return {
        "cpu": _cpu_identity()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "matmuls": matmuls,
        "bf16_invariant": invariant,
        "pick": pick_cpu_dtype(matmuls, invariant),
    }


def pick_cpu_dtype(matmuls: list[dict[str, Any]], bf16_invariant: bool) -> str:
    """bfloat16 when it is invariant and at least `BF16_MIN_SPEEDUP` times faster at every shape."""
    fast = all(m["float32_ms"] >= BF16_MIN_SPEEDUP * m["bfloat16_ms"] for m in matmuls)
    return "bfloat16" if bf16_invariant and fast else "float32"


def _linear_seconds(dtype: torch.dtype, rows: int, fan_in: int, fan_out: int, seconds: float) -> float:
    """Seconds per call of the deterministic-mode linear at this shape, over about `seconds`."""
    import torch

    from .kernels.invariant import linear

    x, w = torch.randn(rows, fan_in).to(dtype), (torch.randn(fan_out, fan_in) * fan_in**-0.5).to(dtype)
    for _ in range(3):
        linear(x, w)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls == 0:
        linear(x, w)
        calls += 1
    return elapsed / calls


def _bf16_rows_invariant() -> bool:
    """Whether, in bfloat16, the deterministic-mode linear gives rows the same bits at 1, 7 and 64 rows,
    and deterministic attention's GEMMs (`fixed_attention.attend`, rows not padded in bfloat16) give
    a row the same bits at 3 and 48 rows, 1 and 8 items, 64 and 256 keys."""
    import torch

    from .kernels.invariant import linear
    from .model.fixed_attention import bf16_attend_invariant

    rows, fan_in, fan_out = PROBE_SHAPES[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, fan_in, generator=gen).bfloat16()
    w = (torch.randn(fan_out, fan_in, generator=gen) * fan_in**-0.5).bfloat16()
    full = linear(x, w)
    return all(torch.equal(linear(x[:n], w), full[:n]) for n in (1, 7)) and bf16_attend_invariant()


def cached_probe(path: Path, key: str, measure: Callable[[], dict[str, Any]], refresh: bool = False) -> dict[str, Any]:
    """The entry `key` of the probe cache file `path`: read, or (absent, or `refresh`) measured and
    written back. A cache that cannot be written only costs measuring again next time."""
    entries = read_probe_cache(path)
    if refresh or key not in entries:
        entries[key] = measure()
        try:
            write_probe_cache(path, entries)
        except OSError:
            pass
    return entries[key]


def read_probe_cache(path: Path) -> dict[str, Any]:
    """A probe cache file's entries by machine key ({} when it is missing or unreadable); `thread_probe` shares it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_probe_cache(path: Path, entries: dict[str, Any]) -> None:
    """Replace the file in one step, so a reader never sees half of it."""
    with atomic_file(path) as f:
        f.write((json.dumps(entries, indent=2) + "\n").encode("utf-8"))


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16"."""
    return str(dtype).replace("torch.", "")


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text
