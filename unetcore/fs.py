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
    """Prove that ``folder`` can be created and written, leaving nothing behind.

    A temporary file is written (and removed) in ``folder``, or, when it does not exist yet, in its nearest
    existing parent, which is where it would be created.

    Raises:
        InputError: naming the folder and why it cannot be written.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(existing))
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise InputError(folder, f"cannot write here ({os_error_reason(exc)})",
                         "choose another output folder or fix its permissions") from None
