"""An exclusive, non-blocking inter-process lock on an output location.

Two runs writing one output (two ``unet predict`` into one folder, two nights overlapping) would interleave their
chunks and completion records. :func:`exclusive` takes ``<folder>/.<what>.lock`` with ``fcntl.flock``: the kernel
releases it when the holder exits, however it exits (SIGKILL included), so a crashed run never leaves a stale
lock behind and a resumed run can always take it. A second holder is refused at once with one line, never made
to wait.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path

from unetcore.errors import UnetError

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class LockedError(UnetError):
    """Another process holds the lock on an output location.

    Args:
        path: the output location that is busy.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: another run is writing here (wait for it to finish, or choose another output)")


def lock_path(path: Path, what: str) -> Path:
    """The lock file of ``what`` inside the folder ``path``: ``<path>/.<what>.lock``.

    Args:
        path: the output folder (created if missing).
        what: a name for what is written there (an image id, ``"predict"``); characters outside
            ``[A-Za-z0-9._-]`` are replaced so that it never leaves ``path``.
    """
    safe = _SAFE.sub("_", what).strip("._") or "output"
    return Path(path) / f".{safe}.lock"


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[Path]:
    """Hold ``<path>/.<what>.lock`` exclusively while the block runs; yield the lock file's path.

    The lock file stays on disk afterwards (deleting it would let a third process lock a different inode while
    a second one still holds the old one); only the ``flock`` on it matters.

    Raises:
        LockedError: another process (or another open of the same file in this process) holds it.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    target = lock_path(folder, what)
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(folder) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # for a human wondering who holds it; not read back
            yield target
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
