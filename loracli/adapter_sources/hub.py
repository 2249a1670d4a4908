"""Adapters on the Hugging Face Hub, through `huggingface_hub` and its own cache.

`hub_folder(source)` downloads only the adapter files (`ADAPTER_FILES`, in `source.subfolder` when
given) of `source.repo` at `source.revision` with `snapshot_download` and returns their local folder;
`hub_names(repo, revision)` returns the repo's sub-folders holding an `adapter_config.json` (for
`hf://org/repo` as a folder of adapters). The files live in huggingface_hub's cache (`HF_HUB_CACHE`,
else `$HF_HOME/hub`), keyed by commit: with `HF_HUB_OFFLINE=1`, or when the Hub cannot be reached, a
cached revision is served from it and nothing else is needed. Tokens come from huggingface_hub's own
chain (`HF_TOKEN`, `hf auth login`); loracli never reads or shows them. Transient failures are retried
(`remote.retried`); a failure is an `AdapterError` naming the source; a missing `huggingface_hub` is a
`ConfigError` naming the `hub` extra.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters import CONFIG_NAME
from ..errors import AdapterError, ConfigError
from .remote import ADAPTER_FILES, ATTEMPTS, reason, retried
from .urls import HubSource

NOT_RETRIED = ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError", "LocalEntryNotFoundError")


def hub_download_function():
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(
            "adapters_dir: Hub adapters need huggingface_hub: pip install 'loracli[hub]'", fields=("adapters_dir",)
        ) from None
    return snapshot_download


def _download(source: HubSource, patterns: list[str]) -> Path:
    snapshot_download = hub_download_function()

    def once() -> str:
        try:
            return snapshot_download(source.repo, revision=source.revision, allow_patterns=patterns)
        except Exception as e:  # noqa: BLE001 - not found / offline without a cached copy: no retry
            if type(e).__name__ in NOT_RETRIED or isinstance(e, ValueError):
                raise AdapterError(str(source), reason(e)) from None
            raise

    try:
        return Path(retried(once, str(source)))
    except AdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - the download failed after its retries
        raise AdapterError(str(source), f"download failed after {ATTEMPTS} attempts ({reason(e)})") from None


def hub_folder(source: HubSource) -> Path:
    """The local folder of one adapter on the Hub (module doc)."""
    prefix = f"{source.subfolder}/" if source.subfolder else ""
    folder = _download(source, [prefix + name for name in ADAPTER_FILES])
    folder = folder / source.subfolder if source.subfolder else folder
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterError(str(source), f"no {CONFIG_NAME} in the repo{' folder' if source.subfolder else ''}")
    return folder


def hub_names(repo: str, revision: str | None) -> list[str]:
    """The sub-folders of a Hub repo that hold an adapter (their `adapter_config.json` is fetched)."""
    source = HubSource(repo, revision)
    try:
        root = _download(source, [f"*/{CONFIG_NAME}"])
    except AdapterError as e:
        raise ConfigError(f"adapters_dir: {e}", fields=("adapters_dir",)) from None
    return sorted(p.parent.name for p in root.glob(f"*/{CONFIG_NAME}"))
