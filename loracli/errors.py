"""Typed errors. Every user-facing failure is a `LoracliError` whose `str()` is one clear line.

Library errors speak in the names of configuration fields (`max_loras`, `allow_pickle`), never in
command-line flags: an error lists the fields its message names in `fields`, and the CLI (the
only layer that knows flags, `cli/flags.py`) rewrites exactly those names into its flags. The
CLI's single error handler prints that line to stderr and exits with `exit_code` (2 for
usage/config problems); tracebacks only with `LORACLI_DEBUG=1`.
"""

from __future__ import annotations


class LoracliError(Exception):
    """Base class: a one-line, user-facing error. `fields`: the config fields its message names."""

    exit_code = 2

    def __init__(self, message: str, *, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.fields = fields


class ConfigError(LoracliError):
    """An invalid option value or combination (e.g. max_cpu_loras < max_loras)."""


class ModelError(LoracliError):
    """The base model cannot be found, obtained, converted or loaded."""


class AdapterError(LoracliError):
    """An adapter is missing, malformed, unsupported or incompatible with the base model.

    `path` names the offending file or folder; `reason` is the message without it.
    """

    def __init__(self, path: str, message: str, *, fields: tuple[str, ...] = ()):
        super().__init__(f"{path}: {message}", fields=fields)
        self.path = path
        self.reason = message


class InputError(LoracliError):
    """A bad input record: names the file, the line and the field."""

    def __init__(self, file: str, line: int, field: str | None, message: str):
        where = f"{file}:{line}" + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")
        self.file = file
        self.line = line
        self.field = field
        self.reason = message
