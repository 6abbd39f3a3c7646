"""The worker side of the Dask engine: one task per output block, the model loaded once per worker process.

A block task reads its block plus the halo of the tiles that touch it, blends them with the global Gaussian
weights, writes only its own output chunks (blocks are unions of chunks: one writer per chunk), then writes its
completion record. The post-processing and instance passes are one task per block too (see
:mod:`unetcore.inference.components`). Tasks get everything through a picklable :class:`ImageJob`.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
import zarr

from unetcore.allocator import release_free_memory, tune_for_blocks, with_heap_buffers
from unetcore.atomic import atomic_write_json
from unetcore.devices import resolve_device, worker_gpu_index
from unetcore.elementwise import to_float16
from unetcore.inference.background import load_keep_mask
from unetcore.inference.components import label_block
from unetcore.inference.layout import (
    INSTANCES_NAME,
    LABELS_NAME,
    SCRATCH,
    record_path,
    side_path,
)
from unetcore.inference.predict import BlockPredictor
from unetcore.inference.resample import Resampling, block_outputs
from unetcore.inference.runtime import onnx_forward
from unetcore.inference.windows import Block
from unetcore.io import nodata_pixels
from unetcore.metrics import confusion_counts
from unetcore.model.packaging import read_config
from unetcore.store import omezarr

Components = Literal["none", "all", "foreground"]
"""What the prediction pass labels: nothing; every region (post-processing); foreground only (instances)."""


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build (and cache) its predictor; hashable, so it is the cache key."""

    model_dir: str
    weights_hash: str
    device: str
    tile: int
    overlap: float
    batch_size: int
    threshold: float
    tta: bool
    skip_empty: bool
    threads: int  # torch threads per task
    precision: str = "auto"  # forward passes: auto = bf16 on CUDA; fp32 turns autocast off
    auto_batch: bool = False  # the user left batch_size unset: on CUDA, size it from free GPU memory
    runtime: str = "torch"  # or "onnxruntime": the graph below, on the numpy block path (no torch import)
    graph: str = ""  # the model's ONNX graph (unetcore.inference.runtime.cached_graph), for onnxruntime


@dataclass(frozen=True)
class ImageJob:
    """Everything a block task needs about one image (paths, statistics, options); picklable."""

    input: str
    output: str
    records: str
    stats: dict[str, Any] = field(hash=False, compare=False)
    spec: ModelSpec
    save_probabilities: bool
    probability_dtype: str
    components: Components
    instances: bool
    resampling: Resampling | None = None  # predicted at the model's spacing (unetcore.inference.resample)
    keep: str = ""  # the background skip's tile keep mask (a .npy the driver wrote), "" = compute every tile
    nodata: float | None = None  # the source's nodata value (a GeoTIFF's): such pixels are always background


def _worker_identity() -> tuple[int, str]:
    """(index, host) of the Dask worker running this code; (0, "") outside a worker."""
    if "distributed" not in sys.modules:
        return 0, ""  # not imported: not a worker (and an in-process run does not pay its import)
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return 0, ""
    index = worker_gpu_index(worker.name, getattr(getattr(worker, "state", None), "total_resources", None))
    return index, urlparse(worker.address).hostname or ""


def load_predictor(spec: ModelSpec) -> BlockPredictor:
    """Build this worker's predictor from ``spec``: the model loaded, folded and set up for block passes.

    Torch gets this worker's share of the host's cores (Dask's nanny sets OMP_NUM_THREADS=1; this overrides it
    for torch), its batch norms are folded into the convolutions and its forward passes reuse their buffers
    (:mod:`unetcore.allocator`); worker ``i`` of a local GPU cluster runs on GPU ``i``. On onnxruntime
    (:mod:`unetcore.inference.runtime`) the graph gets those threads and torch is not imported.
    """
    if spec.runtime == "onnxruntime":
        _, config = read_config(Path(spec.model_dir))
        return BlockPredictor.from_forward(onnx_forward(Path(spec.graph), spec.threads), config, tile=spec.tile,
                                           overlap=spec.overlap, batch_size=spec.batch_size,
                                           threshold=spec.threshold, tta=spec.tta, skip_empty=spec.skip_empty)
    import torch

    from unetcore.model.packaging import load_model
    from unetcore.model.parts import fold_batch_norm

    index, _ = _worker_identity()
    torch.set_num_threads(max(1, spec.threads))
    model, config = load_model(Path(spec.model_dir))
    device = resolve_device(spec.device, index)
    bp = BlockPredictor.from_model(fold_batch_norm(model), config, device, tile=spec.tile, overlap=spec.overlap,
                                   batch_size=spec.batch_size, threshold=spec.threshold, tta=spec.tta,
                                   skip_empty=spec.skip_empty, precision=spec.precision,  # type: ignore[arg-type]
                                   auto_batch=spec.auto_batch)
    bp.predictor = with_heap_buffers(bp.predictor)  # activations reused from pass to pass (unetcore.allocator)
    if bp.kernel is not None and device.type == "cpu":
        bp.kernel.predictor = with_heap_buffers(bp.kernel.predictor)
    return bp


_predictor_factory: Callable[[ModelSpec], BlockPredictor] = load_predictor


_build_lock = threading.Lock()  # a GPU worker runs two block tasks at once: the first builds, the second waits


@functools.lru_cache(maxsize=4)
def _built(spec: ModelSpec) -> BlockPredictor:
    return _predictor_factory(spec)


def worker_predictor(spec: ModelSpec) -> BlockPredictor:
    """This process's predictor for ``spec``, built once (cached by the spec, which includes the weights' hash)."""
    with _build_lock:
        return _built(spec)


def set_worker_predictor_factory(factory: Callable[[ModelSpec], BlockPredictor] | None) -> None:
    """Test and benchmark seam: build this process's predictors with ``factory`` (None: :func:`load_predictor`).

    Run it on the workers (``client.run``) before the tasks; the predictor cache is emptied.
    """
    global _predictor_factory
    _predictor_factory = factory or load_predictor
    _built.cache_clear()


@dataclass(frozen=True)
class BlockStores:
    """The arrays a block task reads and writes, opened once per worker and job (:func:`block_stores`).

    The outputs write every chunk they cover (``write_empty_chunks``): zarr's test of each chunk against the fill
    value costs more than writing an empty chunk's few bytes (labels 20 → 7 ms a 2048² block, BENCHMARKS.md).
    """

    image: zarr.Array
    truth: zarr.Array | None
    labels: tuple[zarr.Array, ...]  # level 0, and level 1 where the pyramid has one
    probabilities: tuple[zarr.Array, ...]


def _written_levels(group: zarr.Group) -> tuple[zarr.Array, ...]:
    config = {"write_empty_chunks": True}
    return tuple(group[k].with_config(config) for k in ("0", "1") if k in group)


@functools.lru_cache(maxsize=4)
def _open_stores(source: str, output: str, token: tuple[int, ...]) -> BlockStores:
    src = omezarr.open_root(Path(source))
    out = zarr.open_group(store=output, mode="r+")
    return BlockStores(omezarr.image_array(src), omezarr.label_array(src),
                       _written_levels(out[f"labels/{LABELS_NAME}"]), _written_levels(out))


def block_stores(job: ImageJob) -> BlockStores:
    """The job's arrays, reused by this process's later blocks of the same stores: opening them reads a dozen
    metadata files (≈ 12 ms a block). A store written anew (``--overwrite``) has a new root ``zarr.json``, whose
    inode, size and modification time are in the cache key, so it is opened again."""
    token = []
    for root in (job.input, job.output):
        st = os.stat(Path(root) / "zarr.json")
        token += [st.st_ino, st.st_size, st.st_mtime_ns]
    return _open_stores(job.input, job.output, tuple(token))


def _counts(truth: zarr.Array | None, labels: np.ndarray, block: Block, num_classes: int) -> list[list[int]] | None:
    if truth is None:
        return None
    return [c.tolist() for c in confusion_counts(labels, np.asarray(truth[block.slices]), num_classes)]


def _nodata_here(job: ImageJob, image: zarr.Array, block: Block) -> np.ndarray | None:
    """Where the block's source pixels are nodata on every band (None when the source has no nodata value)."""
    if job.nodata is None:
        return None
    return nodata_pixels(np.asarray(image[(slice(None), *block.slices)]), job.nodata)


def _label_and_save(job: ImageJob, labels: np.ndarray, block: Block, stage: str, with_background: bool,
                    image_shape: tuple[int, ...]) -> None:
    """Label a block's components, write the local ids to the scratch store and their summary beside them."""
    ids, comps = label_block(labels, block, image_shape, with_background)
    zarr.open_group(store=str(Path(job.records) / SCRATCH), mode="r+")[stage][block.slices] = ids
    comps.save(side_path(Path(job.records), block, f"{stage}.npz"))


def _write_level1(levels: tuple[zarr.Array, ...], kind: Literal["image", "label"], block: Block,
                  values: np.ndarray) -> bool:
    return len(levels) > 1 and omezarr.write_halved_level(levels[0], levels[1], kind, block.slices, values)


def run_block(job: ImageJob, block: Block) -> dict[str, Any]:
    """Predict one block; write its chunks, its component summary if asked, then its completion record."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    tune_for_blocks(len(block.slices))  # the Dask nanny's malloc settings slow a CPU forward pass 1.5x
    bp = worker_predictor(job.spec)
    stores = block_stores(job)
    image = stores.image
    shape = image.shape[1:]
    stored = job.probability_dtype if job.save_probabilities else None
    keep = load_keep_mask(job.keep) if job.keep else None
    if job.resampling is None and keep is None:  # on the block predictor's kernel (on a GPU: one copy back)
        probs, labels = bp.outputs(image, job.stats, bp.grid(shape), block, stored)
    else:  # resampling or background skipping: the numpy block path
        resampled, labels = block_outputs(bp, image, job.stats, block, job.resampling, keep)
        probs = None if stored is None else to_float16(resampled) if stored == "float16" else resampled
    t_model = time.perf_counter() - t0
    empty = _nodata_here(job, image, block)
    if empty is not None:
        labels[empty] = 0
        if probs is not None:
            probs[(slice(None), empty)] = 0.0
            if bp.num_classes > 1:
                probs[(0, empty)] = 1.0
    stores.labels[0][block.slices] = labels
    # level 1 of the pyramids while other blocks run; labels only when no later pass rewrites them
    halved = {"labels": job.components != "all" and _write_level1(stores.labels, "label", block, labels)}
    if probs is not None:
        stores.probabilities[0][(slice(None), *block.slices)] = probs
        halved["probabilities"] = _write_level1(stores.probabilities, "image", block, probs)
    if job.components != "none":
        stage = "raw" if job.components == "all" else "final"
        _label_and_save(job, labels, block, stage, job.components == "all", shape)
    record = {"block": list(block.bounds), "counts": _counts(stores.truth, labels, block, bp.num_classes),
              "level1": halved,
              "seconds": round(time.perf_counter() - t0, 4), "predict_seconds": round(t_model, 4),
              "cpu_seconds": round(time.process_time() - cpu0, 4), "worker": f"{_worker_identity()[1]}/{os.getpid()}"}
    atomic_write_json(record_path(Path(job.records), block), record)
    del probs, labels
    release_free_memory()  # what the block's buffers kept goes back: memory stays flat over many blocks
    return record


def postprocess_block(job: ImageJob, block: Block, num_classes: int) -> dict[str, Any]:
    """Apply the whole-image post-processing decisions (a per-component class table) to one block."""
    records = Path(job.records)
    raw = zarr.open_group(store=str(records / SCRATCH), mode="r")["raw"][block.slices]
    labels = np.load(side_path(records, block, "post.npy"))[raw]
    empty = _nodata_here(job, omezarr.image_array(omezarr.open_root(Path(job.input))), block)
    if empty is not None:  # filling holes must not fill the source's nodata
        labels[empty] = 0
    zarr.open_group(store=job.output, mode="r+")[f"labels/{LABELS_NAME}/0"][block.slices] = labels
    if job.instances:
        _label_and_save(job, labels, block, "final", False, _image_shape(job))
    record = {"counts": _counts(omezarr.label_array(omezarr.open_root(Path(job.input))), labels, block, num_classes)}
    atomic_write_json(record_path(records, block, "post"), record)
    return record


def relabel_block(job: ImageJob, block: Block) -> None:
    """Write one block's final instance ids: its local component ids mapped through its lookup table."""
    records = Path(job.records)
    ids = zarr.open_group(store=str(records / SCRATCH), mode="r")["final"][block.slices]
    lut = np.load(side_path(records, block, "inst.npy"))
    zarr.open_group(store=job.output, mode="r+")[f"labels/{INSTANCES_NAME}/0"][block.slices] = lut[ids]


def _image_shape(job: ImageJob) -> tuple[int, ...]:
    shape = zarr.open_group(store=job.output, mode="r")[f"labels/{LABELS_NAME}/0"].shape
    return tuple(int(v) for v in shape)
