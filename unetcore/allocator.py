"""glibc malloc settings for the processes that predict blocks on the CPU (Dask workers).

A convolution's activations are allocated and freed anew at every forward pass. Dask's nanny starts workers with
``MALLOC_TRIM_THRESHOLD_=65536``, which also pins glibc's mmap threshold at 128 KiB: every multi-megabyte
activation buffer was then mmapped, unmapped when freed and faulted in again at the next pass, and a
single-thread UNet forward ran 1.55x slower in a Dask worker than in a plain process (BENCHMARKS.md, inference).

:func:`tune_for_blocks` keeps up to :data:`TRIM_BYTES` of freed heap instead of returning it to the kernel, and
:func:`heap_buffers` serves requests below :data:`FORWARD_MMAP_BYTES` from the heap while a forward pass runs, so
its buffers are reused from one pass to the next. Outside forward passes requests of :data:`ARRAY_MMAP_BYTES` or
more are mmapped, a threshold set per block by its number of spatial axes:

* images (2 MiB): a block's image, accumulators and outputs (4-16 MiB) go back to the kernel when freed, so they
  do not fragment the heap, while a tile's temporaries and a chunk's buffers (1 MiB at the default tile and chunks)
  come from the heap and are reused within the block. At Dask's 128 KiB every such buffer was mapped, faulted in and
  unmapped again: the identity pipeline ran 1.3-1.4x slower at a gigapixel (BENCHMARKS.md, ninth session);
* volumes (128 KiB, Dask's): there the heap's 1 MiB buffers (64³ float32 tiles, the ingestion's 1 M-voxel chunks)
  bought no speed and a worker's peak grew with the volume (512×1024² vs 256³: ×1.08 at 2 MiB, ×1.06 at
  128 KiB; BENCHMARKS.md, tenth session). Measured with a 3-D UNet; a 2-D model predicting a volume slice by
  slice gets the volume's threshold too (not measured).

Every thread allocates from one heap (:data:`ARENAS`): with a heap per thread (the task's, zarr's I/O and codec
threads), a worker's peak crept up with the number of blocks it had run, by 35-70 MB, until each heap was warm.
:func:`release_free_memory` returns what the heap kept after each block. A worker's peak memory then grows little
with the image (BENCHMARKS.md, inference (c)).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

TRIM_BYTES = 256 * 1024 * 1024
"""Freed memory at the top of the heap that glibc keeps instead of returning it to the kernel."""

FORWARD_MMAP_BYTES = 32 * 1024 * 1024
"""During a forward pass, requests at least this large are mmapped; smaller ones come from the heap."""

ARRAY_MMAP_BYTES: dict[int, int] = {2: 2 * 1024 * 1024, 3: 128 * 1024}
"""Outside forward passes, requests at least this large are mmapped (and unmapped when freed), by the block's number
of spatial axes; Dask's is 128 KiB."""

ARENAS = 1
"""glibc heaps (arenas) the process's threads share: one, so the buffers they reuse are warm in one heap, not in
one per thread."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_T = TypeVar("_T")
_R = TypeVar("_R")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return None
    return libc


_block_mmap_bytes: list[int] = []  # the threshold the last block set (empty: no block tuned this process)


@functools.cache
def _tune_process() -> bool:
    libc = _libc()
    return libc is not None and all(libc.mallopt(option, value) for option, value in (
        (_M_TRIM_THRESHOLD, TRIM_BYTES), (_M_ARENA_MAX, ARENAS)))


def tune_for_blocks(spatial_dims: int = 2) -> bool:
    """Set this process's trim threshold and arena count (once) and the mmap threshold for the arrays of a block
    with ``spatial_dims`` axes (:data:`ARRAY_MMAP_BYTES`); False where the C library is not glibc. Threads that
    already have a heap of their own keep it."""
    libc = _libc()
    threshold = ARRAY_MMAP_BYTES[min(max(spatial_dims, 2), 3)]
    if libc is None or not _tune_process():
        return False
    if threshold == block_mmap_bytes():  # unchanged: no reset under another thread's forward pass
        return True
    if not libc.mallopt(_M_MMAP_THRESHOLD, threshold):
        return False
    _block_mmap_bytes[:] = [threshold]
    return True


def block_mmap_bytes() -> int | None:
    """The mmap threshold the last :func:`tune_for_blocks` set in this process (None: none has run)."""
    return _block_mmap_bytes[0] if _block_mmap_bytes else None


@contextlib.contextmanager
def heap_buffers() -> Iterator[None]:
    """Inside the ``with``, serve requests below :data:`FORWARD_MMAP_BYTES` from the (kept) heap; after it, the
    block's threshold again (:func:`tune_for_blocks`; an image's where no block set one)."""
    if block_mmap_bytes() is None and not tune_for_blocks():
        yield
        return
    libc, after = _libc(), block_mmap_bytes()
    assert libc is not None and after is not None
    libc.mallopt(_M_MMAP_THRESHOLD, FORWARD_MMAP_BYTES)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, after)


def with_heap_buffers(fn: Callable[[_T], _R]) -> Callable[[_T], _R]:
    """``fn`` (a batch predictor) run inside :func:`heap_buffers`."""

    @functools.wraps(fn)
    def run(batch: _T) -> _R:
        with heap_buffers():
            return fn(batch)

    return run


def release_free_memory() -> None:
    """Return the free pages glibc holds (top of the heap and holes inside it) to the kernel; a no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
