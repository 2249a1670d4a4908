"""Where adapters live: `adapters_dir` -> an `AdapterCatalog` (name -> source, settings).

`open_catalog(adapters_dir)` accepts
- None: no adapters (an empty catalog);
- a local folder (or `file://` URL): its sub-folders are the adapters, as always;
- an fsspec URL of a folder of adapters (`s3://bucket/adapters/`, `gs://...`): its sub-folders, listed once
  at start (`remote.list_names`, cached for offline runs); `hf://org/repo[@rev]`: the repo's sub-folders
  holding an `adapter_config.json` (`hub.hub_names`);
- a manifest, a `.json` / `.yaml` / `.yml` file (local, or on a URL, fetched through the cache) mapping
  names to local paths, URLs or Hub repo ids with settings (`manifest.py`).
Only the names the catalog defines exist: a request cannot reach anything else, and every name is checked
by `names.name_problem` first. A URL holding credentials is refused (`urls.credential_problem`); a bad
folder or manifest, or a missing extra, is a `ConfigError` naming `adapters_dir`. Remote adapters are
downloaded when `local_folder` is first called (`remote.py` for fsspec URLs, `hub.py` for the Hub), not
here (a manifest on a URL and the names of a folder URL are the only reads at start). Light: no torch.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .catalog import AdapterCatalog, Catalog, apply_scale
from .manifest import Settings, parse_entries, parse_text
from .names import name_problem
from .urls import HubSource, credential_problem, is_url, kind_of, local_path, parse_hub, redact

__all__ = [
    "AdapterCatalog",
    "Catalog",
    "Settings",
    "adapter_names",
    "apply_scale",
    "name_problem",
    "open_catalog",
    "where_problem",
]


def where_problem(adapters_dir: str) -> str | None:
    """Why an `adapters_dir` value is refused before anything is read (credentials in a URL), or None."""
    problem = credential_problem(adapters_dir)
    return f"{redact(adapters_dir)} {problem}; use the standard credential chain" if problem else None


def open_catalog(adapters_dir: str | Path | None) -> Catalog:
    """The catalog of `adapters_dir` (see the module doc)."""
    if adapters_dir is None:
        return Catalog("", {})
    text = str(adapters_dir)
    problem = where_problem(text)
    if problem:
        raise ConfigError(f"adapters_dir: {problem}", fields=("adapters_dir",))
    kind = kind_of(text)
    if kind == "manifest":
        return _manifest_catalog(text)
    if kind == "url":
        return _url_catalog(text)
    return _folder_catalog(Path(local_path(text)))


def _checked_names(names: list[str], where: str) -> list[str]:
    for name in names:
        problem = name_problem(name)
        if problem:
            raise ConfigError(
                f"adapters_dir: {where}: adapter {name!r} is refused ({problem}); rename it", fields=("adapters_dir",)
            )
    return names


def adapter_names(folder: Path) -> list[str]:
    """The adapters of an adapters folder: its subfolders' names, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _folder_catalog(folder: Path) -> Catalog:
    if not folder.is_dir():
        raise ConfigError(f"adapters_dir: {folder} is not a folder", fields=("adapters_dir",))
    names = _checked_names(adapter_names(folder), str(folder))
    return Catalog(str(folder), {name: folder / name for name in names})


def _url_catalog(url: str) -> Catalog:
    shown = redact(url).rstrip("/")
    if url.lower().startswith("hf://"):
        from .hub import hub_names

        hub = parse_hub(url)
        if hub is None or hub.subfolder:
            raise ConfigError(
                f"adapters_dir: {shown}: a Hub folder of adapters is hf://org/name[@revision]", fields=("adapters_dir",)
            )
        names = _checked_names(hub_names(hub.repo, hub.revision), shown)
        return Catalog(shown, {n: HubSource(hub.repo, hub.revision, n) for n in names})
    from .remote import list_names

    names = _checked_names(list_names(url), shown)
    return Catalog(shown, {n: f"{url.rstrip('/')}/{n}" for n in names})


def _manifest_catalog(text: str) -> Catalog:
    if is_url(text):
        from ..errors import AdapterError
        from .remote import fetch_file

        try:
            path, base = fetch_file(text), None
        except AdapterError as e:
            raise ConfigError(f"adapters_dir: {e}", fields=("adapters_dir",)) from None
    else:
        path = Path(local_path(text)).expanduser()
        base = path.absolute().parent
    shown = redact(text)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"adapters_dir: {shown}: cannot read the manifest ({e})", fields=("adapters_dir",)) from None
    entries = parse_entries(parse_text(raw, shown), shown, base)
    _check_backends([e.source for e in entries.values()])
    return Catalog(shown, {n: e.source for n, e in entries.items()}, {n: e.settings for n, e in entries.items()})


def _check_backends(sources: list) -> None:
    """A `ConfigError` naming the extra to install when a source's library is missing (nothing is read)."""
    from .hub import hub_download_function
    from .remote import filesystem

    for source in sources:
        if isinstance(source, HubSource):
            hub_download_function()
        elif isinstance(source, str):
            filesystem(source)
