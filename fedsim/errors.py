"""Errors that the CLI turns into exit codes: bad input is exit 2, a clear one-line message."""

from __future__ import annotations

from typing import Any


class ConfigError(Exception):
    """Bad user input (scenario file, CLI flag, data file).

    The message names the file, the dotted key path, the bad value and what is allowed,
    on one line. The CLI prints it without a traceback and exits with code 2.
    """

    def __init__(self, msg: str, *, file: str | None = None, key: str | None = None,
                 value: Any = ..., allowed: str | None = None) -> None:
        self.file, self.key, self.value, self.allowed, self.msg = file, key, value, allowed, msg
        super().__init__(self._format())

    def _format(self) -> str:
        where = ": ".join(p for p in (self.file, self.key) if p)
        text = self.msg
        if self.value is not ...:
            text = f"{text} (got {_short_repr(self.value)})"
        if self.allowed:
            text = f"{text}; allowed: {self.allowed}"
        return f"{where}: {text}" if where else text

    def at(self, *, file: str | None = None, prefix: str | None = None) -> ConfigError:
        """Return the same error located in `file` and/or under key `prefix`."""
        key = ".".join(p for p in (prefix, self.key) if p) or None
        return ConfigError(self.msg, file=file or self.file, key=key, value=self.value,
                           allowed=self.allowed)


def check_output_file(path: str, key: str) -> None:
    """ConfigError unless `path` can be written as a file: an existing directory, a missing or
    read-only parent folder are bad input (named by the flag `key`), not a crash after the work."""
    import os

    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError("output path is a directory", key=key, value=path, allowed="a file path")
    if not os.path.isdir(parent):
        raise ConfigError("the output file's folder does not exist", key=key, value=path,
                          allowed="a path in an existing folder")
    if not os.access(parent, os.W_OK):
        raise ConfigError("the output file's folder is not writable", key=key, value=path)


def _short_repr(value: Any, limit: int = 200) -> str:
    """repr of `value`, cut to `limit` characters (a huge value never floods the one-line message);
    containers are cut before they are rendered whole."""
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 20:
        head = list(value.items() if isinstance(value, dict) else value)[:20]
        return f"{type(value).__name__} of {len(value)} items starting {_short_repr(head, limit)}"
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class RunInterrupted(Exception):
    """A run stopped on a signal after checkpointing; `code` is the exit code (128 + signal).

    The message says how to continue (`fedsim resume RUN_DIR`)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class RunDiverged(Exception):
    """A run stopped because its losses became NaN or infinite (exit 1, one line; the run folder
    stays ``.partial`` with ``status: diverged`` in its summary)."""
