"""The one Dask client builder of the pipeline (ingestion and inference): a scheduler's address or a local cluster.

:func:`dask_cluster` yields a :class:`Cluster`: the client, and the torch threads each task may use (a local
cluster's share of the cores), which callers pass on explicitly to their tasks.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from unetcore.errors import ServiceError
from unetcore.modes import Device

log = logging.getLogger("unetcore.cluster")

QUIET_WORKERS = {"distributed.worker.profile.interval": "100ms", "distributed.worker.memory.monitor-interval": "500ms"}
"""Local workers sample their stacks for the dashboard's profile every 100 ms (not 10) and their memory every 0.5 s
(not 0.1): with one single-thread worker per core, these background threads take CPU from the blocks (one 4096²
run: 29.8 vs 30.7 s, within this machine's noise; BENCHMARKS.md, inference (d))."""

_UNREACHABLE_HINT = "start `dask scheduler` or fix --scheduler-address"


@dataclass(frozen=True)
class Cluster:
    """A connected Dask client and the torch threads one of its tasks may use.

    Attributes:
        client: the ``distributed.Client``.
        torch_threads: threads per task: the requested count, else a local cluster's share of the cores, else 1.
    """

    client: Any
    torch_threads: int = 1

    @property
    def in_process(self) -> bool:
        """True for :func:`in_process`: no Dask at all, tasks run one after the other in this process."""
        return self.client is None

    @property
    def slots(self) -> int:
        """Tasks the cluster runs at once now (the sum of its workers' threads; 1 in process)."""
        if self.client is None:
            return 1
        return max(1, sum(w.get("nthreads", 1) for w in self.client.scheduler_info()["workers"].values()))


GPU_TASKS = 2
"""Block tasks a GPU worker runs at once: one block's reads and writes overlap the other's compute on the GPU."""


def in_process(threads: int = 0) -> Cluster:
    """A :class:`Cluster` without Dask: the caller runs its tasks itself, one at a time, each with ``threads``
    torch threads (0: every core). For jobs of a few blocks a local cluster's start (seconds) costs more than it
    saves; see :func:`unetcore.inference.engine.runs_in_process`."""
    return Cluster(None, threads or max(1, os.cpu_count() or 1))


def local_cluster_shape(cores: int, gpus: int, n_workers: int = 0, threads: int = 0) -> tuple[int, int]:
    """(worker processes, torch threads each) for a local cluster.

    CPU: one single-threaded worker per core (measured faster than fewer multi-threaded workers, see
    BENCHMARKS.md); GPU: one worker per GPU, sharing the cores. Explicit values win; threads default to the
    worker's share of the cores.
    """
    cores = max(1, cores)
    workers = n_workers or (gpus if gpus > 0 else cores)
    return workers, threads or max(1, cores // workers)


def probe_scheduler(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast when a tcp:// scheduler address refuses connections (Dask itself retries for its timeout).

    Raises:
        ServiceError: nothing answers at ``address``.
    """
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme != "tcp" or not parsed.hostname or not parsed.port:
        return
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ServiceError(address, f"Dask scheduler unreachable ({exc.strerror or type(exc).__name__})",
                           _UNREACHABLE_HINT) from None


def _local_gpus(device: Device) -> int:
    """GPUs a local cluster gives one worker each: none for ``cpu``, else every visible one."""
    if device == "cpu":
        return 0
    import torch

    from unetcore.devices import gpu_is_usable

    return torch.cuda.device_count() if gpu_is_usable() else 0


@contextlib.contextmanager
def _remote(address: str, threads_per_worker: int) -> Iterator[Cluster]:
    from distributed import Client

    probe_scheduler(address)
    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError) as exc:
        raise ServiceError(address, f"Dask scheduler unreachable ({type(exc).__name__})", _UNREACHABLE_HINT) from None
    try:
        yield Cluster(client, threads_per_worker or 1)
    finally:
        client.close()


@contextlib.contextmanager
def _local(n_workers: int, threads_per_worker: int, device: Device) -> Iterator[Cluster]:
    import dask
    from distributed import Client, LocalCluster

    gpus = _local_gpus(device)
    workers, threads = local_cluster_shape(os.cpu_count() or 1, gpus, n_workers, threads_per_worker)
    with dask.config.set(QUIET_WORKERS):  # read by the nannies as they are made; they pass it to their workers
        cluster = LocalCluster(n_workers=workers, threads_per_worker=GPU_TASKS if gpus else 1, processes=True,
                               dashboard_address="127.0.0.1:0", host="127.0.0.1", memory_limit="auto")
    client = Client(cluster)
    client.run(exit_without_finalizing)
    log.info("Dask dashboard: %s (%d workers x %d torch threads)", client.dashboard_link, workers, threads)
    try:
        yield Cluster(client, threads)
    finally:
        with _quiet_shutdown():
            client.close()
            cluster.close()


def exit_without_finalizing() -> None:
    """Run on a local worker: when its process exits, flush logs and streams and end it at once (``os._exit``).

    A worker process that has imported torch spends about 4 s in the interpreter's C-level finalisation at exit,
    past the nanny's patience (0.8 x 5 s): closing the cluster then waited 4.2 s and killed it (0.2 s with
    this; /tmp measurements in BENCHMARKS.md "Volumes"). Everything a task writes is on disk when its result is
    returned, so nothing is lost; a crashed worker (signal) never reaches this hook, and a restarted one only
    closes slowly again."""
    atexit.register(_fast_exit)


def _fast_exit() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


@contextlib.contextmanager
def _quiet_shutdown() -> Iterator[None]:
    """Silence what closing a local cluster logs about itself: a busy worker may take more than the nanny's 4 s to
    exit and is then killed, and comms closed mid-message log ``CommClosedError`` tracebacks
    (``convert_stream_closed_error``); both are normal at shutdown, after every result is in."""
    names = ("distributed", "tornado", "asyncio")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def dask_cluster(address: str | None, n_workers: int = 0, threads_per_worker: int = 0,
                 device: Device = "auto") -> contextlib.AbstractContextManager[Cluster]:
    """A :class:`Cluster` on the scheduler at ``address``, or on a local cluster sized by :func:`local_cluster_shape`.

    Local workers run one task at a time (a task uses all of its worker's torch threads), bind to loopback and
    are closed on exit; a remote scheduler's client is closed, its workers stay.

    Args:
        address: ``tcp://host:port`` of a running scheduler; None or empty for a local cluster.
        n_workers: local worker processes (0: one per core, or one per GPU).
        threads_per_worker: torch threads per task (0: a local worker's share of the cores; 1 on a scheduler).
        device: ``cpu`` sizes a local cluster by cores only; ``auto``/``cuda`` by the visible GPUs.

    Raises:
        ServiceError: the scheduler address does not answer.
    """
    logging.getLogger("distributed").setLevel(logging.WARNING)
    return _remote(address, threads_per_worker) if address else _local(n_workers, threads_per_worker, device)
