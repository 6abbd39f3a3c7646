"""glibc malloc settings for processes that run a model on the CPU.

A convolution's activations are allocated and freed anew at every forward pass. With glibc's defaults, and much
more under Dask (its nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also switches off glibc's
adaptive mmap threshold), those multi-megabyte buffers are mmapped and unmapped, or trimmed back to the kernel,
at every pass, and each pass then pays page faults to fault them in again: measured here, a single-thread UNet
forward ran 1.55x slower in a Dask worker than in a plain process, and a plain process 1.2x slower than with the
settings below (BENCHMARKS.md, inference). Keeping up to :data:`TRIM_BYTES` of freed heap and serving requests
below :data:`MMAP_BYTES` from the heap makes the buffers reused instead. The memory kept is bounded (it does not
grow with the image), so flat-memory inference stays flat.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

TRIM_BYTES = 256 * 1024 * 1024
"""Freed memory at the top of the heap that glibc keeps instead of returning it to the kernel."""

MMAP_BYTES = 32 * 1024 * 1024
"""Requests at least this large are mmapped (and unmapped when freed); smaller ones come from the heap."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def keep_tensor_buffers() -> bool:
    """Set this process's glibc trim and mmap thresholds (once); False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES)) and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES))
