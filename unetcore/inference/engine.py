"""The Dask driver of tiled inference: one task per output block, model loaded once per worker.

Each task reads its block plus the halo of the tiles that touch it, blends them with the global Gaussian
weights, writes only its own output chunks (blocks are unions of chunks: one writer per chunk), then writes a
completion record. A re-run skips recorded blocks, so a crash costs only the unfinished blocks, and the output
equals the whole-image sliding-window result. No process ever holds the whole image.

Optional passes after prediction, each one task per block and idempotent (re-run whole on a resume):
post-processing (objects and holes smaller than ``min_object_size``, sized on the whole image) and instance
labels (connected components merged across block faces); see :mod:`unetcore.inference.components`.

Output ``<output>/<id>.ome.zarr``: labels under ``labels/prediction`` (pyramid), instance ids under
``labels/instances`` when asked for, probabilities as the image (K, H, W, pyramid) when asked for;
``attributes.unet`` holds the run's signature, the block shape and ``complete`` (false until every pass and
pyramid is written). Completion records and scratch data live in ``<output>/<id>.blocks/``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
import torch
import zarr

from unetcore import progress as progress_bus
from unetcore.allocator import release_free_memory, tune_for_blocks, with_heap_buffers
from unetcore.atomic import atomic_write_json, replacing
from unetcore.config import InferConfig
from unetcore.errors import ConfigError, InputError, OutputExistsError, ServiceError
from unetcore.inference.components import BlockComponents, label_block, merge_faces
from unetcore.inference.predict import BlockPredictor, logits_to_outputs, resolve_device
from unetcore.inference.windows import (
    Block,
    TileGrid,
    choose_block_shape,
    plan_blocks,
    tile_evaluations,
)
from unetcore.locks import exclusive
from unetcore.metrics import confusion_counts
from unetcore.model import load_model
from unetcore.model.packaging import read_config
from unetcore.model.parts import fold_batch_norm
from unetcore.store import manifest as mf
from unetcore.store import omezarr

LABELS_NAME = "prediction"
INSTANCES_NAME = "instances"
SCRATCH = "scratch.zarr"
log = logging.getLogger("unetcore.inference")


@contextlib.contextmanager
def logs_to(handler: logging.Handler) -> Iterator[None]:
    """Send the engine's INFO lines (Dask dashboard link, cluster shape) to ``handler`` while the block runs."""
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)

Components = Literal["none", "all", "foreground"]
"""What the prediction pass labels: nothing; every region (post-processing); foreground only (instances)."""


@dataclass
class ImageResult:
    """Summary of one predicted image."""

    id: str
    output: str
    pixels: int
    blocks: int
    blocks_skipped: int
    seconds: float
    megapixels_per_s: float
    dice: float | None
    export: str | None
    preview: str | None
    block_shape: list[int] = field(default_factory=list)
    tile_evaluations: int = 0
    grid_tiles: int = 0
    instances: int | None = None


# ---------------------------------------------------------------- worker side


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


def _worker_identity() -> tuple[int, str]:
    """(index, host) of the Dask worker running this code; (0, "") outside a worker."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return 0, ""
    name = str(worker.name)
    index = int(name) if name.isdigit() else 0
    return index, urlparse(worker.address).hostname or ""


@functools.lru_cache(maxsize=4)
def _worker_predictor(spec: ModelSpec) -> BlockPredictor:
    """Load the model once per worker process (cached by its spec, which includes the weights' hash).

    Torch gets this worker's share of the host's cores (Dask's nanny sets OMP_NUM_THREADS=1; this overrides it
    for torch), its batch norms are folded into the convolutions and its forward passes reuse their buffers
    (:mod:`unetcore.allocator`); worker ``i`` of a local GPU cluster runs on GPU ``i``.
    """
    index, _ = _worker_identity()
    torch.set_num_threads(max(1, spec.threads))
    model, config = load_model(Path(spec.model_dir))
    device = resolve_device(spec.device, index)
    bp = BlockPredictor.from_model(fold_batch_norm(model), config, device, tile=spec.tile, overlap=spec.overlap,
                                   batch_size=spec.batch_size, threshold=spec.threshold, tta=spec.tta,
                                   skip_empty=spec.skip_empty)
    bp.predictor = with_heap_buffers(bp.predictor)  # activations reused from pass to pass (unetcore.allocator)
    return bp


def _stem(block: Block) -> str:
    return f"y{block.y0}-{block.y1}_x{block.x0}-{block.x1}"


def _record_path(records: Path, block: Block, kind: str = "") -> Path:
    """Per-block files: ``<stem>.json`` (prediction done), ``<stem>.post.json``, ``<stem>.<stage>.npz`` …"""
    return Path(records) / f"{_stem(block)}{'.' + kind if kind else ''}.json"


def _side_path(records: Path, block: Block, suffix: str) -> Path:
    return Path(records) / f"{_stem(block)}.{suffix}"


def _counts(src: zarr.Group, labels: np.ndarray, block: Block, num_classes: int) -> list[list[int]] | None:
    truth = omezarr.label_array(src)
    if truth is None:
        return None
    return [c.tolist() for c in confusion_counts(labels, np.asarray(truth[block.slices]), num_classes)]


def _label_and_save(job: ImageJob, labels: np.ndarray, block: Block, stage: str, with_background: bool,
                    image_shape: tuple[int, int]) -> None:
    """Label a block's components, write the local ids to the scratch store and their summary beside them."""
    ids, comps = label_block(labels, block, image_shape, with_background)
    zarr.open_group(store=str(Path(job.records) / SCRATCH), mode="r+")[stage][block.slices] = ids
    comps.save(_side_path(Path(job.records), block, f"{stage}.npz"))


def run_block(job: ImageJob, block: Block) -> dict[str, Any]:
    """Predict one block; write its chunks, its component summary if asked, then its completion record."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    tune_for_blocks()  # once per process: the Dask nanny's malloc settings slow a CPU forward pass 1.5x
    bp = _worker_predictor(job.spec)
    src = omezarr.open_root(Path(job.input))
    image = omezarr.image_array(src)
    shape = image.shape[1:]
    grid = bp.grid(shape)
    logits = bp.logits(image, job.stats, grid, block)
    t_model = time.perf_counter() - t0
    probs, labels = logits_to_outputs(logits, bp.num_classes, bp.threshold)
    out = zarr.open_group(store=job.output, mode="r+")
    out[f"labels/{LABELS_NAME}/0"][block.slices] = labels
    if job.save_probabilities:
        out["0"][(slice(None), *block.slices)] = probs.astype(job.probability_dtype)
    if job.components != "none":
        stage = "raw" if job.components == "all" else "final"
        _label_and_save(job, labels, block, stage, job.components == "all", shape)
    record = {"block": [block.y0, block.y1, block.x0, block.x1], "counts": _counts(src, labels, block, bp.num_classes),
              "seconds": round(time.perf_counter() - t0, 4), "predict_seconds": round(t_model, 4),
              "cpu_seconds": round(time.process_time() - cpu0, 4), "worker": f"{_worker_identity()[1]}/{os.getpid()}"}
    atomic_write_json(_record_path(Path(job.records), block), record)
    del logits, probs, labels
    release_free_memory()  # what the block's buffers kept goes back: memory stays flat over many blocks
    return record


def postprocess_block(job: ImageJob, block: Block, num_classes: int) -> dict[str, Any]:
    """Apply the whole-image post-processing decisions (a per-component class table) to one block."""
    records = Path(job.records)
    raw = zarr.open_group(store=str(records / SCRATCH), mode="r")["raw"][block.slices]
    labels = np.load(_side_path(records, block, "post.npy"))[raw]
    zarr.open_group(store=job.output, mode="r+")[f"labels/{LABELS_NAME}/0"][block.slices] = labels
    if job.instances:
        _label_and_save(job, labels, block, "final", False, _image_shape(job))
    src = omezarr.open_root(Path(job.input))
    record = {"counts": _counts(src, labels, block, num_classes)}
    atomic_write_json(_record_path(records, block, "post"), record)
    return record


def relabel_block(job: ImageJob, block: Block) -> None:
    """Write one block's final instance ids: its local component ids mapped through its lookup table."""
    records = Path(job.records)
    ids = zarr.open_group(store=str(records / SCRATCH), mode="r")["final"][block.slices]
    lut = np.load(_side_path(records, block, "inst.npy"))
    zarr.open_group(store=job.output, mode="r+")[f"labels/{INSTANCES_NAME}/0"][block.slices] = lut[ids]


def _image_shape(job: ImageJob) -> tuple[int, int]:
    shape = zarr.open_group(store=job.output, mode="r")[f"labels/{LABELS_NAME}/0"].shape
    return int(shape[0]), int(shape[1])


# ---------------------------------------------------------------- cluster


def local_cluster_shape(cores: int, gpus: int, n_workers: int = 0, threads: int = 0) -> tuple[int, int]:
    """(worker processes, torch threads each) for a local cluster.

    CPU: one single-threaded worker per core (measured faster than fewer multi-threaded workers, see
    BENCHMARKS.md); GPU: one worker per GPU, sharing the cores. Explicit values win; threads default to the
    worker's share of the cores.
    """
    cores = max(1, cores)
    workers = n_workers or (gpus if gpus > 0 else cores)
    return workers, threads or max(1, cores // workers)


QUIET_WORKERS = {"distributed.worker.profile.interval": "100ms", "distributed.worker.memory.monitor-interval": "500ms"}
"""Local workers sample their stacks for the dashboard's profile every 100 ms (not 10) and their memory every 0.5 s
(not 0.1): with one single-thread worker per core, these background threads take CPU from the blocks (one 4096²
run: 29.8 vs 30.7 s, within this machine's noise; BENCHMARKS.md, inference (d))."""


def _probe(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast when a tcp:// scheduler address refuses connections (Dask itself retries for its timeout)."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme != "tcp" or not parsed.hostname or not parsed.port:
        return
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ServiceError(address, f"Dask scheduler unreachable ({exc.strerror or type(exc).__name__})",
                           "start `dask scheduler` or fix --scheduler-address") from None


@contextlib.contextmanager
def dask_client(address: str | None, n_workers: int = 0, threads_per_worker: int = 0,
                device: str = "auto") -> Iterator[Any]:
    """A Dask client on ``address``, or on a local cluster sized by :func:`local_cluster_shape`.

    Local workers run one task at a time (a task uses all of its worker's torch threads).

    Raises:
        ServiceError: the scheduler address does not answer.
    """
    import dask
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)
    if address:
        _probe(address)
        try:
            client = Client(address, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise ServiceError(address, f"Dask scheduler unreachable ({type(exc).__name__})",
                               "start `dask scheduler` or fix --scheduler-address") from None
        try:
            yield client
        finally:
            client.close()
        return
    gpus = torch.cuda.device_count() if resolve_device(device).type == "cuda" else 0
    workers, threads = local_cluster_shape(os.cpu_count() or 1, gpus, n_workers, threads_per_worker)
    with dask.config.set(QUIET_WORKERS):  # read by the nannies as they are made; they pass it to their workers
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address="127.0.0.1:0", host="127.0.0.1", memory_limit="auto")
    client = Client(cluster)
    client.unet_torch_threads = threads  # read by _torch_threads: this cluster's share of cores per worker
    log.info("Dask dashboard: %s (%d workers x %d torch threads)", client.dashboard_link, workers, threads)
    try:
        yield client
    finally:
        client.close()
        # A busy worker may take more than the nanny's 4 s to exit; it is then killed, which is fine at shutdown.
        logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
        cluster.close()


def _task_slots(client: Any) -> int:
    """Tasks the cluster runs at once (sum of its workers' threads)."""
    return max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))


def _torch_threads(client: Any, cfg: InferConfig) -> int:
    """Torch threads per task: the option; else a local cluster's share of the cores; else 1 (per task slot)."""
    return cfg.threads_per_worker or int(getattr(client, "unet_torch_threads", 0) or 1)


# ---------------------------------------------------------------- driver side


def _signature(entry: dict[str, Any], model_config: dict[str, Any], weights_hash: str, cfg: InferConfig) -> str:
    """What makes two predictions of one image the same: source, model weights and output-shaping options."""
    keys = ("tile", "overlap", "threshold", "tta", "min_object_size", "save_probabilities", "probability_dtype",
            "skip_empty", "instances")
    payload = {"source": entry["source_hash"], "weights": weights_hash, "model": model_config["model"],
               **{k: getattr(cfg, k) for k in keys}}
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=16).hexdigest()


@functools.lru_cache(maxsize=8)
def _weights_hash(path: str, mtime_ns: int, size: int) -> str:
    return mf.file_hash(Path(path))


def weights_hash(model_dir: Path) -> str:
    """Content hash of a model folder's weights (cached by path, size and modification time)."""
    path = Path(model_dir) / "weights.pt"
    st = path.stat()
    return _weights_hash(str(path.resolve()), st.st_mtime_ns, st.st_size)


@dataclass
class ImagePlan:
    """The checked facts about one image's prediction, gathered before anything is written."""

    entry: dict[str, Any]
    src_path: Path
    out_path: Path
    records: Path
    shape: tuple[int, int]
    classes: int
    chunk: int
    signature: str
    weights: str
    resume: bool


def _existing_signature(path: Path) -> str | None:
    try:
        return omezarr.unet_attrs(zarr.open_group(store=str(path), mode="r")).get("signature")
    except Exception:  # not a store, or unreadable: treat as a different result
        return None


def plan_image(entry: dict[str, Any], dataset: Path, cfg: InferConfig, model_dir: Path, model_uri: str) -> ImagePlan:
    """Check one image against the model and the output folder, without writing anything.

    Raises:
        InputError: the image's store is missing or not an OME-Zarr image.
        ConfigError: the model expects another number of channels.
        OutputExistsError: the output holds a different prediction and ``overwrite`` is off.
    """
    src_path = mf.store_path(dataset, entry["id"])
    channels, height, width = omezarr.image_array(omezarr.open_root(src_path)).shape
    _, model_config = read_config(Path(model_dir))  # validated: a tampered config.json is one line, here
    if model_config["model"]["in_channels"] != channels:
        raise ConfigError("model", f"{model_uri} expects {model_config['model']['in_channels']} channels, "
                                   f"image '{entry['id']}' has {channels}")
    wh = weights_hash(Path(model_dir))
    signature = _signature(entry, model_config, wh, cfg)
    out_path = Path(cfg.output) / f"{entry['id']}.ome.zarr"
    resume = out_path.exists() and _existing_signature(out_path) == signature
    if out_path.exists() and not resume and not cfg.overwrite:
        raise OutputExistsError(out_path, "already holds a prediction made with other inputs, model or options")
    records = Path(cfg.output) / f"{entry['id']}.blocks"
    return ImagePlan(entry=entry, src_path=src_path, out_path=out_path, records=records, shape=(height, width),
                     classes=int(model_config["model"]["num_classes"]),
                     chunk=min(int(entry.get("chunk", 1024)), cfg.block_size), signature=signature, weights=wh,
                     resume=resume)


def _create_output(plan: ImagePlan, cfg: InferConfig, block_shape: tuple[int, int], info: dict[str, Any]) -> None:
    """Create the output store and records folder (replacing a different prediction: checked by plan_image)."""
    if plan.out_path.exists():
        shutil.rmtree(plan.out_path)
    shutil.rmtree(plan.records, ignore_errors=True)
    plan.records.mkdir(parents=True, exist_ok=True)
    # Probabilities are the store's image (K, H, W); left unwritten (empty chunks, one level) when not asked for.
    levels = None if cfg.save_probabilities else 1
    root = omezarr.create_image(plan.out_path, (plan.classes, *plan.shape), cfg.probability_dtype, plan.chunk,
                                name=f"{info['id']}-probabilities", n_levels=levels)
    omezarr.create_labels(root, LABELS_NAME, plan.shape, np.uint8, plan.chunk)
    if cfg.instances:
        omezarr.create_labels(root, INSTANCES_NAME, plan.shape, np.uint32, plan.chunk)
    omezarr.set_unet_attrs(root, {**info, "signature": plan.signature, "block_shape": list(block_shape),
                                  "complete": False})


def _ensure_scratch(plan: ImagePlan, cfg: InferConfig) -> None:
    """Create the scratch store of component ids when a pass needs it and it is not there yet."""
    path = plan.records / SCRATCH
    if not (cfg.instances or cfg.min_object_size) or path.exists():
        return
    plan.records.mkdir(parents=True, exist_ok=True)
    for stale in plan.records.glob("*.json"):  # records without their component ids cannot be resumed
        stale.unlink()
    scratch = zarr.open_group(store=str(path), mode="w", zarr_format=3)
    for stage in ("raw", "final"):
        scratch.create_array(stage, shape=plan.shape, dtype=np.uint32, chunks=(plan.chunk, plan.chunk),
                             compressors=omezarr.compressor(), fill_value=0)


def _finish_output(plan: ImagePlan, cfg: InferConfig) -> None:
    root = zarr.open_group(store=str(plan.out_path), mode="r+")
    omezarr.build_pyramid(root[f"labels/{LABELS_NAME}"], "label")
    if cfg.instances:
        omezarr.build_pyramid(root[f"labels/{INSTANCES_NAME}"], "label")
    if cfg.save_probabilities:
        omezarr.build_pyramid(root, "image")
    omezarr.set_unet_attrs(root, {"complete": True})
    shutil.rmtree(plan.records / SCRATCH, ignore_errors=True)


def _model_dir(cfg: InferConfig, cache: Path) -> tuple[Path, str]:
    """Resolve the model URI once in the driver (an alias is pinned to its version for the whole run)."""
    from unetcore.tracking import mlflow as tracking

    uri = cfg.model
    registry = uri.startswith(("models:/", "runs:/"))
    if registry and cfg.tracking_uri.startswith("sqlite:") and not tracking.sqlite_path(cfg.tracking_uri).exists():
        raise InputError(uri, f"model URI does not resolve (no MLflow database at {cfg.tracking_uri})",
                         "train a model first or fix --tracking-uri")
    if uri.startswith("models:/") and "@" in uri:
        from mlflow import MlflowClient

        tracking.check_tracking_uri(cfg.tracking_uri)
        import mlflow

        mlflow.set_tracking_uri(cfg.tracking_uri)
        name, alias = uri[len("models:/"):].split("@", 1)
        try:
            version = MlflowClient().get_model_version_by_alias(name, alias).version
        except Exception as exc:
            raise InputError(uri, f"model URI does not resolve ({str(exc).splitlines()[0][:160]})",
                             "train a model first or check the name/alias") from None
        uri = f"models:/{name}/{version}"
    if uri.startswith(("models:/", "runs:/")) or "://" in uri:
        dst = cache / hashlib.blake2b(uri.encode(), digest_size=8).hexdigest()
        if (dst / "config.json").exists():
            return dst, uri
        return tracking.download_model(uri, cfg.tracking_uri, dst=dst), uri
    return tracking.download_model(uri), uri


def _run_tasks(client: Any, fn: Callable[..., Any], job: ImageJob, blocks: list[Block], stage: str, done: int,
               total: int, *extra: Any) -> None:
    """Run ``fn(job, block, *extra)`` for every block on the cluster, reporting progress as tasks finish."""
    from distributed import as_completed

    progress_bus.report(stage, done, total)
    if not blocks:
        return
    futures = client.map(fn, [job] * len(blocks), blocks, *[[e] * len(blocks) for e in extra], pure=False,
                         retries=2)
    for future in as_completed(futures):
        future.result()
        done += 1
        progress_bus.report(stage, done, total)


def _merge_and_write_luts(records: Path, blocks: list[Block], stage: str, suffix: str,
                          make_lut: Callable[[Any, int, BlockComponents], np.ndarray]) -> Any:
    """Merge one stage's block components across faces and write each block's lookup table."""
    def load(i: int) -> BlockComponents:
        return BlockComponents.load(_side_path(records, blocks[i], f"{stage}.npz"))

    merged = merge_faces(blocks, load)
    for i, b in enumerate(blocks):
        np.save(_side_path(records, b, suffix), make_lut(merged, i, load(i)))
    return merged


def predict_image(
    entry: dict[str, Any], dataset: Path, cfg: InferConfig, client: Any, model_dir: Path, model_uri: str,
) -> ImageResult:
    """Predict one ingested image on the Dask ``client``; resume from completion records when possible."""
    t0 = time.perf_counter()
    plan = plan_image(entry, dataset, cfg, model_dir, model_uri)
    grid = TileGrid.build(plan.shape, (cfg.tile, cfg.tile), cfg.overlap)
    if plan.resume:
        root = zarr.open_group(store=str(plan.out_path), mode="r")
        block_shape = tuple(omezarr.unet_attrs(root)["block_shape"])
        complete = bool(omezarr.unet_attrs(root).get("complete"))
    else:
        block_shape = choose_block_shape(grid, (plan.chunk, plan.chunk), cfg.block_size**2, _task_slots(client))
        info = {"id": entry["id"], "source_store": str(plan.src_path.resolve()), "model": model_uri}
        _create_output(plan, cfg, block_shape, info)
        complete = False
    if not complete:
        _ensure_scratch(plan, cfg)
        plan.records.mkdir(parents=True, exist_ok=True)
    blocks = plan_blocks(plan.shape, block_shape)
    todo = [] if complete else [b for b in blocks if not _record_path(plan.records, b).exists()]
    components: Components = "all" if cfg.min_object_size else "foreground" if cfg.instances else "none"
    spec = ModelSpec(str(model_dir), plan.weights, cfg.device, cfg.tile, cfg.overlap, cfg.batch_size, cfg.threshold,
                     cfg.tta, cfg.skip_empty, _torch_threads(client, cfg))
    job = ImageJob(str(plan.src_path), str(plan.out_path), str(plan.records), entry["stats"], spec,
                   cfg.save_probabilities, cfg.probability_dtype, components, cfg.instances)
    _run_tasks(client, run_block, job, todo, f"predict {entry['id']}", len(blocks) - len(todo), len(blocks))
    n_instances = None
    if not complete:
        if cfg.min_object_size:
            _merge_and_write_luts(plan.records, blocks, "raw", "post.npy",
                                  lambda m, i, c: m.postprocess_lut(i, c, cfg.min_object_size))
            _run_tasks(client, postprocess_block, job, blocks, f"post-process {entry['id']}", 0, len(blocks),
                       plan.classes)
        if cfg.instances:
            merged = _merge_and_write_luts(plan.records, blocks, "final", "inst.npy",
                                           lambda m, i, c: m.instance_lut(i, c))
            n_instances = merged.n_instances()
            _run_tasks(client, relabel_block, job, blocks, f"instances {entry['id']}", 0, len(blocks))
            omezarr.set_unet_attrs(zarr.open_group(store=str(plan.out_path), mode="r+"), {"instances": n_instances})
        _finish_output(plan, cfg)
    elif cfg.instances:
        n_instances = omezarr.unet_attrs(zarr.open_group(store=str(plan.out_path), mode="r")).get("instances")
    kind = "post" if cfg.min_object_size else ""
    dice = _dice_from_records(plan.records, blocks, plan.classes, kind) if entry.get("has_mask") else None
    out_dir = Path(cfg.output)
    export = _export(plan.out_path, out_dir, entry["id"], cfg.export, reuse=complete)
    preview = write_preview(plan.src_path, plan.out_path, out_dir / f"{entry['id']}_preview.png")
    seconds = time.perf_counter() - t0
    height, width = plan.shape
    return ImageResult(id=entry["id"], output=str(plan.out_path), pixels=height * width, blocks=len(blocks),
                       blocks_skipped=len(blocks) - len(todo), seconds=round(seconds, 3),
                       megapixels_per_s=round(height * width / 1e6 / max(seconds, 1e-9), 3), dice=dice,
                       export=export, preview=preview, block_shape=list(block_shape),
                       tile_evaluations=tile_evaluations(grid, block_shape), grid_tiles=grid.n_tiles,
                       instances=n_instances)


def _dice_from_records(records: Path, blocks: list[Block], num_classes: int, kind: str = "") -> float:
    """Mean foreground Dice of the whole image from the per-block confusion counts."""
    from unetcore.metrics import dice_from_counts

    total = None
    for b in blocks:
        counts = np.asarray(json.loads(_record_path(records, b, kind).read_text())["counts"], np.int64)
        total = counts if total is None else total + counts
    dice = dice_from_counts(*total)
    fg = dice[1:]
    return float(np.nanmean(fg)) if np.isfinite(fg).any() else float("nan")


EXPORT_MAX_PIXELS = 64_000_000


def _export(out_path: Path, out_dir: Path, image_id: str, kind: str, reuse: bool = False) -> str | None:
    """Export the label mask as PNG (small images) or tiled BigTIFF (any size, streamed by tiles).

    ``reuse`` keeps an export that already exists (the prediction was complete before this run).
    """
    if kind == "none":
        return None
    labels = zarr.open_group(store=str(out_path), mode="r")[f"labels/{LABELS_NAME}/0"]
    h, w = labels.shape
    png = kind == "png" and h * w <= EXPORT_MAX_PIXELS
    dst = out_dir / f"{image_id}_mask.{'png' if png else 'tif'}"
    if reuse and dst.exists():
        return str(dst)
    if png:
        from skimage import io as skio

        with replacing(dst) as tmp:
            skio.imsave(tmp, np.asarray(labels[:]), check_contrast=False)
        return str(dst)
    import tifffile

    tile = 256
    def tiles() -> Iterator[np.ndarray]:
        for y in range(0, h, tile):
            band = np.asarray(labels[y:y + tile, :])
            for x in range(0, w, tile):
                t = np.zeros((tile, tile), np.uint8)
                part = band[:, x:x + tile]
                t[: part.shape[0], : part.shape[1]] = part
                yield t

    with replacing(dst) as tmp:
        tifffile.imwrite(tmp, tiles(), shape=(h, w), dtype=np.uint8, tile=(tile, tile), bigtiff=True,
                         compression="zlib")
    return str(dst)


def write_preview(src_path: Path, out_path: Path, dst: Path, max_edge: int = 1024) -> str:
    """A down-sampled overlay PNG (prediction in magenta over the image) from the coarsest pyramid levels."""
    from PIL import Image
    from skimage.transform import resize

    from unetcore.tracking.mlflow import preview_strip

    src = omezarr.open_root(src_path)
    levels = sorted(int(k) for k in src.array_keys() if k.isdigit())
    image = np.asarray(src[str(levels[-1])][:])
    pred_group = zarr.open_group(store=str(out_path), mode="r")[f"labels/{LABELS_NAME}"]
    plevels = sorted(int(k) for k in pred_group.array_keys() if k.isdigit())
    pred = np.asarray(pred_group[str(plevels[-1])][:])
    scale = min(1.0, max_edge / max(image.shape[1:]))
    shape = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[2] * scale)))
    if shape != image.shape[1:]:
        image = np.stack([resize(ch.astype(np.float32), shape, preserve_range=True) for ch in image])
    if shape != pred.shape:
        pred = resize(pred, shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.uint8)
    strip = preview_strip(image, None, pred)[:, shape[1]:]  # the overlay panel only
    with replacing(dst) as tmp:
        Image.fromarray(strip).save(tmp, format="PNG", compress_level=1)  # a preview: speed over size
    return str(dst)


def _chosen_entries(cfg: InferConfig) -> tuple[Path, list[dict[str, Any]]]:
    dataset = Path(cfg.dataset)
    manifest = mf.require(dataset)
    chosen = mf.entries(manifest, cfg.split)
    if cfg.images:
        unknown = sorted(set(cfg.images) - {e["id"] for e in chosen})
        if unknown:
            raise ConfigError("images", f"not in the dataset's '{cfg.split}' split: {', '.join(unknown)}")
        chosen = [e for e in chosen if e["id"] in cfg.images]
    if not chosen:
        raise InputError(dataset, f"no images in split '{cfg.split}'", "use --split all")
    return dataset, chosen


def predict_dataset(cfg: InferConfig, client: Any | None = None) -> list[ImageResult]:
    """Predict the images of an ingested dataset (all, one split, or listed ids) on Dask.

    Every image is checked (store, channels, output conflicts) before anything is written or a cluster is
    started. ``client`` reuses an existing Dask client instead of starting one.

    Raises:
        InputError: the dataset or model URI cannot be used; ConfigError: the model does not fit an image;
        OutputExistsError: an output holds a different prediction; ServiceError: the scheduler is unreachable.
    """
    dataset, chosen = _chosen_entries(cfg)
    out_dir = Path(cfg.output)
    model_dir, model_uri = _model_dir(cfg, out_dir / ".models")
    for entry in chosen:
        plan_image(entry, dataset, cfg, model_dir, model_uri)
    if client is None and cfg.scheduler_address:
        _probe(cfg.scheduler_address)  # before the lock, which creates the output folder
    with exclusive(out_dir, "predict"):  # one run writes into an output folder at a time
        own = dask_client(cfg.scheduler_address, cfg.n_workers, cfg.threads_per_worker, cfg.device)
        with contextlib.nullcontext(client) if client is not None else own as active:
            return [predict_image(entry, dataset, cfg, active, model_dir, model_uri) for entry in chosen]


def results_to_dicts(results: list[ImageResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
