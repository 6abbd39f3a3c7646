"""File-system checks made before any work, so that an unwritable output costs no time and prints one line."""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

from unetcore.errors import InputError

_REASONS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
            errno.ENOSPC: "no space left on the device", errno.ENOTDIR: "a parent is not a folder"}


def os_error_reason(exc: OSError) -> str:
    """A short, true reason for an ``OSError`` (``permission denied``, ``read-only file system``, ...)."""
    return _REASONS.get(exc.errno or 0, exc.strerror or type(exc).__name__)


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written in it (then removed).

    Raises:
        InputError: naming the folder and why it cannot be written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise InputError(folder, f"cannot write here ({os_error_reason(exc)})",
                         "choose another output folder or fix its permissions") from None
