"""A tiny progress bus: library code reports ``(stage, done, total, detail)``; front ends subscribe.

The CLI subscribes a terminal progress bar, flows a Prefect progress artifact. The library never knows which.
A module-level list (not a context variable) so reports from worker threads reach the subscribers too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

Reporter = Callable[[str, int, int, str], None]
_reporters: list[Reporter] = []


def report(stage: str, done: int, total: int, detail: str = "") -> None:
    """Tell every subscriber that ``done`` of ``total`` units of ``stage`` are finished.

    ``detail`` is a short human line about the last unit (an epoch's loss and Dice), or "".
    """
    for reporter in list(_reporters):
        reporter(stage, done, total, detail)


@contextlib.contextmanager
def subscribed(reporter: Reporter) -> Iterator[None]:
    """Receive progress reports while the ``with`` block runs."""
    _reporters.append(reporter)
    try:
        yield
    finally:
        _reporters.remove(reporter)
