"""The Dask driver of tiled inference: the front door (:func:`check_predictable`) and the runs that follow it.

The driver plans every image first (:mod:`~unetcore.inference.plan`), then runs one task per output block on
the cluster (:mod:`~unetcore.inference.tasks`), each writing its own chunks and a completion record. A re-run
skips recorded blocks, so a crash costs only the unfinished blocks, and the output equals the whole-image
sliding-window result. No process ever holds the whole image.

Optional passes after prediction, each one task per block and idempotent (re-run whole on a resume):
post-processing (objects and holes smaller than ``min_object_size``, sized on the whole image) and instance
labels (connected components merged across block faces); see :mod:`unetcore.inference.components`.

Images and volumes take the same path: a volume is cut into 3-D blocks, predicted with 3-D tiles by a 3-D model
or slice by slice by a 2-D one, and its instances are 3-D components merged across the blocks' six faces.

Output ``<output>/<id>.ome.zarr``: labels under ``labels/prediction`` (pyramid), instance ids under
``labels/instances`` when asked for, probabilities as the image (K, [D,] H, W, pyramid) when asked for, with the
input's axes, spacing and (for a volume) geometry; ``attributes.unet`` holds the run's signature, the block shape
and ``complete`` (false until every pass and pyramid is written). Completion records and scratch data live in ``<output>/<id>.blocks/``
(:mod:`~unetcore.inference.layout`). One run writes into an output folder at a time (``.predict.lock``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from unetcore import progress as progress_bus
from unetcore.cluster import Cluster, dask_cluster, in_process, probe_scheduler
from unetcore.config import InferConfig
from unetcore.devices import check_device
from unetcore.fs import check_writable
from unetcore.inference.background import background_evaluations, skips_background, tile_keep_mask, tissue_mask
from unetcore.inference.components import BlockComponents, merge_faces
from unetcore.inference.layout import KEEP_MASK, MODEL_CACHE, record_path, side_path
from unetcore.inference.outputs import dice_from_records, export_mask, write_preview
from unetcore.inference.plan import (
    ImagePlan,
    check_model_fits,
    chosen_entries,
    create_output,
    ensure_scratch,
    finish_output,
    plan_image,
)
from unetcore.inference.predict import tile_shape
from unetcore.inference.provenance import prediction_provenance, stored_provenance
from unetcore.inference.resample import zoom_factor
from unetcore.inference.runtime import job_runtime, runtime_and_graph
from unetcore.inference.shapes import objects_table_path
from unetcore.inference.tasks import (
    Components,
    ImageJob,
    ModelSpec,
    postprocess_block,
    relabel_block,
    run_block,
)
from unetcore.inference.windows import (
    Block,
    TileGrid,
    choose_block_shape,
    plan_blocks,
    tile_evaluations,
)
from unetcore.locks import exclusive, lock_path
from unetcore.store import omezarr

if TYPE_CHECKING:
    from unetcore.tracking.pinned import PinnedModel

log = logging.getLogger("unetcore.inference")
OnError = Callable[[dict[str, Any], Exception], None]
OnResult = Callable[[dict[str, Any], "ImageResult"], None]


@contextlib.contextmanager
def logs_to(handler: logging.Handler) -> Iterator[None]:
    """Send the engine's INFO lines (Dask dashboard link, cluster shape) to ``handler`` while the block runs."""
    loggers = [log, logging.getLogger("unetcore.cluster")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


@dataclass
class ImageResult:
    """Summary of one predicted image or volume (``pixels`` and ``megapixels_per_s`` count a volume's voxels)."""

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
    background_tiles: int = 0  # tile evaluations the background skip saved (of tile_evaluations)
    objects: str | None = None  # the object table beside a GeoJSON export
    provenance: dict[str, Any] | None = None  # what made it (unetcore.inference.provenance), as the store keeps it


def results_to_dicts(results: list[ImageResult]) -> list[dict[str, Any]]:
    """The results as plain JSON-able dicts (for flows, reports and the CLI)."""
    return [asdict(r) for r in results]


@dataclass
class PredictionCheck:
    """What :func:`check_predictable` found usable: the dataset, the pinned model and one plan per image."""

    dataset: Path
    model: PinnedModel
    plans: list[ImagePlan]

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [p.entry for p in self.plans]


# ---------------------------------------------------------------- the front door


def _pinned(cfg: InferConfig) -> PinnedModel:
    """The run's model, resolved once (an alias pinned to its version), downloaded into the output's cache.

    A version already in that cache, of a local sqlite registry, is found without importing MLflow (seconds).
    """
    from unetcore.tracking import pin_cached

    cache = Path(cfg.output) / MODEL_CACHE
    cached = pin_cached(cfg.model, cfg.tracking_uri, cache)
    if cached is not None:
        return cached
    from unetcore.tracking.mlflow import pin_model

    return pin_model(cfg.model, cfg.tracking_uri, cache)


@contextlib.contextmanager
def _output_lock(out_dir: Path) -> Iterator[None]:
    """Hold the output folder's ``predict`` lock (one run writes into a folder at a time); checks it is writable.

    A run that fails before writing anything leaves no folder behind when it had to create it (the lock file
    alone is removed with it).
    """
    check_writable(out_dir)
    created = not out_dir.exists()
    try:
        with exclusive(out_dir, "predict"):
            yield
    except BaseException:
        lock = lock_path(out_dir, "predict")
        if created and out_dir.is_dir() and {p.name for p in out_dir.iterdir()} <= {lock.name}:
            lock.unlink(missing_ok=True)
            out_dir.rmdir()
        raise


def _plan_all(entries: list[dict[str, Any]], cfg: InferConfig, model: PinnedModel,
              on_error: OnError | None) -> list[ImagePlan]:
    """One plan per entry; an entry that cannot be planned raises, or goes to ``on_error`` when given."""
    plans = []
    for entry in entries:
        try:
            plans.append(plan_image(entry, Path(cfg.dataset), cfg, model))
        except Exception as exc:
            if on_error is None:
                raise
            on_error(entry, exc)
    return plans


def check_predictable(cfg: InferConfig) -> PredictionCheck:
    """Everything that can fail before any work: dataset, chosen images, model, each image, the output folder.

    Writes nothing (but a registry model's download into ``<output>/.models``).

    Raises:
        InputError: no manifest, no image in the split, the model URI or an image store cannot be used, or the
            output folder cannot be written; ConfigError: an unknown image id, or the model does not fit an
            image or the dataset's task (dims, the masks' classes); OutputExistsError: an output holds a different prediction; ServiceError: the tracking server
            does not answer.
    """
    dataset, entries = chosen_entries(cfg)
    check_device(cfg.device)
    job_runtime(cfg)
    model = _pinned(cfg)
    check_model_fits(model, dataset, entries)
    check_writable(Path(cfg.output))
    return PredictionCheck(dataset=dataset, model=model, plans=_plan_all(entries, cfg, model, None))


# ---------------------------------------------------------------- running


def _run_tasks(cluster: Cluster, fn: Callable[..., Any], job: ImageJob, blocks: list[Block], stage: str, done: int,
               total: int, *extra: Any) -> None:
    """Run ``fn(job, block, *extra)`` for every block on the cluster (in this process, one after the other, for
    :func:`~unetcore.cluster.in_process`), reporting progress as tasks finish."""
    progress_bus.report(stage, done, total)
    if not blocks:
        return
    if cluster.in_process:
        for block in blocks:
            fn(job, block, *extra)
            done += 1
            progress_bus.report(stage, done, total)
        return
    from distributed import as_completed

    futures = cluster.client.map(fn, [job] * len(blocks), blocks, *[[e] * len(blocks) for e in extra], pure=False,
                                 retries=2)
    for future in as_completed(futures):
        future.result()
        done += 1
        progress_bus.report(stage, done, total)


def _merge_and_write_luts(records: Path, blocks: list[Block], stage: str, suffix: str,
                          make_lut: Callable[[Any, int, BlockComponents], np.ndarray]) -> Any:
    """Merge one stage's block components across faces and write each block's lookup table."""
    def load(i: int) -> BlockComponents:
        return BlockComponents.load(side_path(records, blocks[i], f"{stage}.npz"))

    merged = merge_faces(blocks, load)
    for i, b in enumerate(blocks):
        np.save(side_path(records, b, suffix), make_lut(merged, i, load(i)))
    return merged


def _component_passes(plan: ImagePlan, cfg: InferConfig, cluster: Cluster, job: ImageJob,
                      blocks: list[Block]) -> int | None:
    """Post-processing and instance passes after prediction; the number of instances when asked for."""
    image_id = plan.entry["id"]
    if cfg.min_object_size:
        _merge_and_write_luts(plan.records, blocks, "raw", "post.npy",
                              lambda m, i, c: m.postprocess_lut(i, c, cfg.min_object_size))
        _run_tasks(cluster, postprocess_block, job, blocks, f"post-process {image_id}", 0, len(blocks), plan.classes)
    if not cfg.instances:
        return None
    merged = _merge_and_write_luts(plan.records, blocks, "final", "inst.npy", lambda m, i, c: m.instance_lut(i, c))
    n_instances = merged.n_instances()
    _run_tasks(cluster, relabel_block, job, blocks, f"instances {image_id}", 0, len(blocks))
    omezarr.set_unet_attrs(zarr.open_group(store=str(plan.out_path), mode="r+"), {"instances": n_instances})
    return n_instances


def predict_image(plan: ImagePlan, cfg: InferConfig, cluster: Cluster, model: PinnedModel) -> ImageResult:
    """Predict one planned image or volume on ``cluster``; resume from completion records when possible.

    Blocks hold at most ``block_size**2`` pixels or voxels (whole output chunks), so a task's memory is the same
    for an image and a volume. Torch threads per task: ``cfg.threads_per_worker``, else the cluster's own count.
    """
    t0 = time.perf_counter()
    entry = plan.entry
    grid = TileGrid.build(plan.shape, tile_shape(cfg.tile, plan.model_dims, len(plan.shape)), cfg.overlap)
    complete = False
    if plan.resume:
        attrs = omezarr.unet_attrs(zarr.open_group(store=str(plan.out_path), mode="r"))
        block_shape, complete = tuple(attrs["block_shape"]), bool(attrs.get("complete"))
    # a finished output runs no block: it needs no graph (nor its export)
    runtime, graph = ("torch", "") if complete else runtime_and_graph(
        cfg, model.directory, plan.weights, Path(cfg.output) / MODEL_CACHE, model.uri)
    if not plan.resume:
        # a block computes its box of the model's grid: fewer output voxels when that grid is finer
        budget = cfg.block_size**2
        if cluster.in_process and "block_size" not in cfg.model_fields_set:
            budget = max(budget, IN_PROCESS_MAX_PIXELS)  # a small job's image in one block: no tile computed twice
        budget = max(1, int(budget / max(1.0, zoom_factor(plan.resampling))))
        block_shape = choose_block_shape(grid, plan.chunk, budget, cluster.slots)
        resampling = plan.resampling.to_dict() if plan.resampling else None
        info = {"id": entry["id"], "source_store": str(plan.src_path.resolve()), "model": model.uri,
                "provenance": prediction_provenance(cfg, model, entry, plan.weights, plan.signature, resampling,
                                                    runtime),
                **_slide_placement(plan)}
        create_output(plan, cfg, block_shape, info)
    if not complete:
        ensure_scratch(plan, cfg)
        plan.records.mkdir(parents=True, exist_ok=True)
    blocks = plan_blocks(plan.shape, block_shape)
    todo = [] if complete else [b for b in blocks if not record_path(plan.records, b).exists()]
    skip = skips_background(cfg.skip_background, omezarr.unet_attrs(omezarr.open_root(plan.src_path)))
    skip = skip and plan.resampling is None  # the keep mask is on the store's tile grid
    keep, background = _keep_mask(plan, grid, block_shape) if skip and todo else ("", 0)
    components: Components = "all" if cfg.min_object_size else "foreground" if cfg.instances else "none"
    tile = tuple(cfg.tile) if isinstance(cfg.tile, list) else cfg.tile  # a spec is hashed (cached models)
    spec = ModelSpec(str(model.directory), plan.weights, cfg.device, tile, cfg.overlap, cfg.batch_size,
                     cfg.threshold, cfg.tta, cfg.skip_empty, cfg.threads_per_worker or cluster.torch_threads,
                     cfg.precision, "batch_size" not in cfg.model_fields_set, runtime, str(graph))
    job = ImageJob(str(plan.src_path), str(plan.out_path), str(plan.records), entry["stats"], spec,
                   cfg.save_probabilities, cfg.probability_dtype, components, cfg.instances, plan.resampling, keep,
                   nodata=(plan.georef or {}).get("nodata"))
    _run_tasks(cluster, run_block, job, todo, f"predict {entry['id']}", len(blocks) - len(todo), len(blocks))
    if not complete:
        n_instances = _component_passes(plan, cfg, cluster, job, blocks)
        finish_output(plan, cfg, blocks)
    elif cfg.instances:
        n_instances = omezarr.unet_attrs(zarr.open_group(store=str(plan.out_path), mode="r")).get("instances")
    else:
        n_instances = None
    kind = "post" if cfg.min_object_size else ""
    dice = dice_from_records(plan.records, blocks, plan.classes, kind) if entry.get("has_mask") else None
    out_dir = Path(cfg.output)
    export = export_mask(plan.out_path, out_dir, entry["id"], cfg.export, reuse=complete, source=plan.src_path)
    provenance = stored_provenance(zarr.open_group(store=str(plan.out_path), mode="r"))
    preview = write_preview(plan.src_path, plan.out_path, out_dir / f"{entry['id']}_preview.png")
    seconds = time.perf_counter() - t0
    pixels = math.prod(plan.shape)
    return ImageResult(id=entry["id"], output=str(plan.out_path), pixels=pixels, blocks=len(blocks),
                       blocks_skipped=len(blocks) - len(todo), seconds=round(seconds, 3),
                       megapixels_per_s=round(pixels / 1e6 / max(seconds, 1e-9), 3), dice=dice,
                       export=export, preview=preview, block_shape=list(block_shape),
                       tile_evaluations=tile_evaluations(grid, block_shape), grid_tiles=grid.n_tiles,
                       instances=n_instances, provenance=provenance,
                       objects=str(objects_table_path(Path(export))) if cfg.export == "geojson" else None,
                       background_tiles=background)



def _slide_placement(plan: ImagePlan) -> dict[str, Any]:
    """A slide's ``mpp`` and ``level0`` transform from its store (ingested with ``--mpp``), for the prediction."""
    attrs = omezarr.unet_attrs(omezarr.open_root(plan.src_path))
    return {k: attrs[k] for k in ("mpp", "level0") if k in attrs}


def _keep_mask(plan: ImagePlan, grid: TileGrid, block_shape: tuple[int, ...]) -> tuple[str, int]:
    """Write the background skip's tile keep mask into the records folder: its path ("" when every tile runs) and
    the tile evaluations it saves."""
    tissue, why = tissue_mask(omezarr.open_root(plan.src_path), grid.tile)
    keep = tile_keep_mask(grid, tissue) if tissue is not None else None
    if keep is None or keep.all():
        log.info("background of %s: nothing skipped (%s)", plan.entry["id"], why if keep is None else
                 "tissue reaches every tile")
        return "", 0
    path = plan.records / KEEP_MASK
    np.save(path, keep)
    saved = background_evaluations(grid, block_shape, keep)
    log.info("background of %s: %d of %d tiles skipped (%s)", plan.entry["id"], int((~keep).sum()), keep.size, why)
    return str(path), saved


IN_PROCESS_MAX_PIXELS = 4096 * 4096
"""A job of at most this many pixels (voxels), summed over its images, runs in this process when no scheduler
and no worker count is given: a local cluster's start (processes, imports, model loads: 4-5 s on 2 cores) costs
more than its parallel workers save on it (BENCHMARKS.md, inference start-up). Without ``--block-size`` such a job's
images are each one block (at most this many pixels: a few hundred MB of arrays), so no tile is computed twice."""


def runs_in_process(cfg: InferConfig, plans: list[ImagePlan]) -> bool:
    """Whether ``predict_entries`` runs the job's blocks in this process instead of on a local Dask cluster.

    Only a small job (:data:`IN_PROCESS_MAX_PIXELS`) with neither ``scheduler_address`` nor ``n_workers`` set; the
    output is the same either way (blocks are computed alike wherever they run).
    """
    small = sum(math.prod(p.shape) for p in plans) <= IN_PROCESS_MAX_PIXELS
    return small and not cfg.scheduler_address and cfg.n_workers == 0


def _run_plans(plans: list[ImagePlan], cfg: InferConfig, model: PinnedModel, cluster: Cluster | None,
               on_error: OnError | None, on_result: OnResult | None) -> list[ImageResult]:
    """Predict the planned images one after the other, on ``cluster``, in this process for a small job, or on a
    cluster started for them."""
    if not plans:
        return []
    results: list[ImageResult] = []
    if cluster is None and runs_in_process(cfg, plans):
        cluster = in_process(cfg.threads_per_worker)
        log.info("small job (%d image(s), %.1f MP): blocks run in this process with %d %s threads, no Dask "
                 "cluster (--workers N starts one)", len(plans), sum(math.prod(p.shape) for p in plans) / 1e6,
                 cluster.torch_threads, job_runtime(cfg))
    with (contextlib.nullcontext(cluster) if cluster is not None else
          dask_cluster(cfg.scheduler_address, cfg.n_workers, cfg.threads_per_worker, cfg.device)) as active:
        for plan in plans:
            try:
                result = predict_image(plan, cfg, active, model)
            except Exception as exc:
                if on_error is None:
                    raise
                on_error(plan.entry, exc)
                continue
            results.append(result)
            if on_result is not None:
                on_result(plan.entry, result)
    return results


def predict_entries(cfg: InferConfig, entries: list[dict[str, Any]], model: PinnedModel,
                    cluster: Cluster | None = None, on_error: OnError | None = None,
                    on_result: OnResult | None = None) -> list[ImageResult]:
    """Predict the manifest ``entries`` of ``cfg.dataset`` with the pinned ``model`` into ``cfg.output``.

    Holds the output folder's lock for the whole run; every entry is planned before a cluster is started.
    ``cluster`` reuses a running one (else one is started from ``cfg`` for the run).

    Args:
        on_error: when given, an image that cannot be planned or predicted is reported as
            ``on_error(entry, error)`` and the others carry on; when None, the first failure raises.
        on_result: called as ``on_result(entry, result)`` after each image (e.g. to record it at once).

    Returns:
        One result per image predicted, in the order of ``entries``.

    Raises:
        LockedError: another run writes into the output folder; InputError: it cannot be written;
        ServiceError: the scheduler is unreachable; without ``on_error``, any image's error.
    """
    if not entries:
        return []
    cfg = with_model_tile(cfg, model)
    check_model_fits(model, Path(cfg.dataset), entries)
    if cluster is None and cfg.scheduler_address:
        probe_scheduler(cfg.scheduler_address)  # before the lock, which creates the output folder
    with _output_lock(Path(cfg.output)):
        plans = _plan_all(entries, cfg, model, on_error)
        return _run_plans(plans, cfg, model, cluster, on_error, on_result)


DENSE_3D = {"overlap": 0.5, "batch_size": 4}
"""What a model trained on volumes uses for the options not given: the dense overlap and batch measured for
volumes (the defaults, tile 512 with 64 px overlap and one tile a pass, were measured on images only)."""


def with_model_tile(cfg: InferConfig, model: PinnedModel) -> InferConfig:
    """``cfg`` for a model trained on volumes (``task.spatial_dims`` 3 in its ``config.json``: a 3-D model, or a
    2-D one trained on their slices): its own tile (``tile`` there: the tile it was validated with; a 3-D model's
    patch, an edge or one per axis, or a 2-D model's slice tile) and :data:`DENSE_3D`, for the options ``cfg`` was
    made without; else ``cfg`` as it is (a model trained on images keeps the defaults, tile 512, overlap 0.125)."""
    config = json.loads((Path(model.directory) / "config.json").read_text())
    model_dims = int(config.get("model", {}).get("spatial_dims", 2))
    if int(config.get("task", {}).get("spatial_dims", model_dims)) != 3:
        return cfg
    update = {k: v for k, v in DENSE_3D.items() if k not in cfg.model_fields_set}
    if "tile" not in cfg.model_fields_set and config.get("tile") is not None:
        update["tile"] = config["tile"]
    return cfg.model_copy(update=update) if update else cfg


def predict_dataset(cfg: InferConfig, cluster: Cluster | None = None) -> list[ImageResult]:
    """Predict the images of an ingested dataset (all, one split, or listed ids) on Dask.

    Every check of :func:`check_predictable` runs once, before anything is written or a cluster is started
    (the images are planned under the output's lock). ``cluster`` reuses a running one instead of starting one.

    Raises:
        InputError: the dataset or model URI cannot be used; ConfigError: the model does not fit an image;
        OutputExistsError: an output holds a different prediction; LockedError: another run writes into the
        output folder; ServiceError: a server is unreachable.
    """
    _, entries = chosen_entries(cfg)
    check_device(cfg.device)
    job_runtime(cfg)
    return predict_entries(cfg, entries, _pinned(cfg), cluster)
