"""Typed errors that users can cause.

Every error a user can provoke (a bad file, a bad parameter, an unreachable server) is raised as a
subclass of :class:`UnetError`. Its ``str()`` is one line naming the thing and the fix; the CLI prints
exactly that line and exits non-zero, flows turn it into a failed task state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from unetcore.redact import redact


class UnetError(Exception):
    """Base class of all errors a user can cause; ``str(err)`` is a single actionable line."""

    exit_code: int = 2


class InputError(UnetError):
    """A file or folder given by the user cannot be used.

    Args:
        path: the offending file or folder.
        reason: what is wrong with it.
        hint: what the user can do about it (optional).
    """

    def __init__(self, path: str | Path, reason: str, hint: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.hint = hint
        msg = f"{self.path}: {reason}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class ConfigError(UnetError):
    """A parameter value is invalid.

    Args:
        field: the parameter's name as the user typed it.
        reason: what is wrong and which values are allowed.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"parameter '{field}': {reason}")


class ServiceError(UnetError):
    """A server the pipeline needs (MLflow, Prefect, Dask scheduler) cannot be reached."""

    def __init__(self, url: str, reason: str, hint: str = "") -> None:
        self.url = redact(url)
        msg = f"{self.url}: {reason}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class OutputExistsError(UnetError):
    """The output location already holds a different result."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {reason} (pass --overwrite to replace it, or choose another output)")


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or "no details"."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else "no details"


@contextlib.contextmanager
def reading(path: str | Path, reason: str) -> Iterator[None]:
    """Turn a library's exception inside the block into one :class:`InputError` line naming the file.

    Our own errors and ``MemoryError`` pass through unchanged.
    """
    try:
        yield
    except (InputError, MemoryError):
        raise
    except Exception as exc:
        raise InputError(path, f"{reason} ({type(exc).__name__}: {first_line(exc)})") from exc
