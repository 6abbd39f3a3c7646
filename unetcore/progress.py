"""A tiny progress bus: library code reports ``(stage, done, total)``; front ends subscribe.

The CLI subscribes a terminal progress bar, flows a Prefect progress artifact. The library never knows which.
A module-level list (not a context variable) so reports from worker threads reach the subscribers too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

Reporter = Callable[[str, int, int], None]
_reporters: list[Reporter] = []


def report(stage: str, done: int, total: int) -> None:
    """Tell every subscriber that ``done`` of ``total`` units of ``stage`` are finished."""
    for reporter in list(_reporters):
        reporter(stage, done, total)


@contextlib.contextmanager
def subscribed(reporter: Reporter) -> Iterator[None]:
    """Receive progress reports while the ``with`` block runs."""
    _reporters.append(reporter)
    try:
        yield
    finally:
        _reporters.remove(reporter)
