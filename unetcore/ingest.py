"""Ingestion: a folder of images and volumes (and masks) into a dataset of OME-Zarr stores plus a manifest.

One image is cut into *leaves*: regions two chunks long on every spatial axis (or the full extent of an axis
when the file decodes units that wide: whole-width strips, whole NIfTI.gz or DICOM slices), so that a leaf
covers whole chunks of level 0 and, halved, whole chunks of level 1. Images and volumes take this one path; a
volume's chunks and pyramid follow its voxel spacing (:func:`unetcore.store.omezarr.chunk_shape`,
:func:`~unetcore.store.omezarr.halving`) and its store keeps the source's geometry (spacing, unit, affine).
A small thread pool handles leaves in parallel (tifffile, blosc and most numpy loops release the GIL): each leaf
is read once, checked, written to level 0, halved in memory and written to level 1, and summarised into its own
statistics, which the driver merges in leaf order (so the result does not depend on the thread count). Levels 2+
are then built from level 1. Memory is a few leaves per thread, whatever the image size.

A mask is streamed first, in the same leaves, with its values checked on the way (one pass, and a bad mask fails
before any image pixel is written). A store is built under a temporary name and renamed when whole; only then
does its entry enter the manifest. Bad files are reported, one line each, and the others still ingest.

Many images run in parallel on Dask (``n_workers`` or ``scheduler_address``): one task per image, the manifest
written by the driver only. An ingestion holds ``<dataset>/.ingest.lock`` while it runs, so leftovers of an
interrupted run (``.<id>.ome.zarr.tmp-*``) can be deleted safely at the start of the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import zarr

from unetcore import progress as progress_bus
from unetcore.atomic import atomic_write_json
from unetcore.config import IngestConfig
from unetcore.errors import InputError
from unetcore.fs import check_writable
from unetcore.io import readers
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.store.stats import StreamingStats

REPORT = "ingest_report.json"
RUN_LOCK = ".ingest.lock"
Status = Literal["ok", "partial", "failed", "empty"]
log = logging.getLogger("unetcore.ingest")

_MAX_AUTO_THREADS = 8
_LEAF_MEMORY = 1 << 30  # bytes of leaves in flight, at most (unless a single leaf is bigger)
_LEFTOVER_PATTERNS = (".*.ome.zarr.tmp-*", ".*.ome.zarr.old-*")
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class IngestReport:
    """What one ingestion did: ids added, updated, skipped, and the files that failed with their reason."""

    dataset: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    ignored: list[dict[str, str]] = field(default_factory=list)
    without_mask: list[str] = field(default_factory=list)
    unmatched_masks: list[str] = field(default_factory=list)
    masks_given: bool = False
    cleaned: list[str] = field(default_factory=list)
    seconds: float = 0.0
    pixels: int = 0

    @property
    def no_mask_matched(self) -> bool:
        """Masks were given but not one image found its mask (names that do not match, e.g. ``mask_0.png``)."""
        done = len(self.added) + len(self.updated) + len(self.skipped)
        return self.masks_given and done > 0 and len(self.without_mask) >= done

    @property
    def status(self) -> Status:
        """ok: everything ingested or unchanged; partial: some files failed, or masks were given and none matched;
        failed: all failed."""
        done = len(self.added) + len(self.updated) + len(self.skipped)
        if self.failed and not done:
            return "failed"
        if self.failed or self.no_mask_matched:
            return "partial"
        return "ok" if done else "empty"

    def warnings(self, examples: int = 3) -> list[str]:
        """One line per thing the user gave that was not used: ignored files, images without a mask, masks of
        no image (a count and the first names)."""
        def names(items: list[str]) -> str:
            shown = ", ".join(Path(i).name for i in items[:examples])
            return shown + (f", ... ({len(items) - examples} more)" if len(items) > examples else "")

        lines = []
        if self.ignored:
            reasons = sorted({i["reason"] for i in self.ignored})
            lines.append(f"ignored {len(self.ignored)} input(s) that are not images: "
                         f"{names([i['file'] for i in self.ignored])} ({'; '.join(reasons)})")
        if self.masks_given and self.without_mask:
            lines.append(f"{len(self.without_mask)} image(s) have no mask (a mask has the image's stem, or "
                         f"<stem>_mask): {names(self.without_mask)}")
        if self.unmatched_masks:
            lines.append(f"{len(self.unmatched_masks)} mask file(s) match no image: {names(self.unmatched_masks)}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status, "warnings": self.warnings()}


# --- statistics ---------------------------------------------------------------------------------------------


# --- geometry and pyramid -----------------------------------------------------------------------------------


def chunk_leaves(shape: tuple[int, ...], chunk: int | tuple[int, ...],
                 decode_unit: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Work units in raster order, each whole chunks of levels 0 and 1 and whole decode units of the source.

    A leaf is ``2 * chunk`` long on every axis, grown to a multiple of the source's decode unit (a TIFF strip, a
    big Zarr chunk) so that no unit is decoded twice; a unit as long as the image on an axis makes the leaves span
    that axis (full-width bands of a striped TIFF, whole slices of a NIfTI.gz or DICOM series).
    """
    chunks = (chunk,) * len(shape) if isinstance(chunk, int) else tuple(chunk)
    extents = []
    for size, unit, c in zip(shape, decode_unit, chunks):
        step = 2 * c
        extents.append(size if unit >= size else -(-unit // step) * step)
    starts = [range(0, size, extent) for size, extent in zip(shape, extents)]
    return [
        tuple(slice(o, min(o + e, n)) for o, e, n in zip(origin, extents, shape))
        for origin in itertools.product(*starts)
    ]


class _InOrder:
    """Lets leaves be read strictly one after the other, in leaf order, when the source wants it (a gzip stream
    cannot seek back cheaply); a no-op otherwise. Leaves start in order on the pool, so a turn always comes."""

    def __init__(self, active: bool) -> None:
        self.active, self._next, self._cond = active, 0, threading.Condition()

    @contextlib.contextmanager
    def turn(self, index: int) -> Iterator[None]:
        if not self.active:
            yield
            return
        with self._cond:
            self._cond.wait_for(lambda: self._next == index)
        try:
            yield
        finally:
            with self._cond:
                self._next = index + 1
                self._cond.notify_all()


def _ordered(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """``fn`` over ``items`` on the pool, results in item order, at most ``window`` items in flight."""
    pending: deque[Any] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def thread_count(threads: int, leaf_bytes: int) -> int:
    """Threads for one image: as asked (0 = one per core, at most 8), fewer if their leaves would pass 1 GiB."""
    wanted = threads or min(_MAX_AUTO_THREADS, os.cpu_count() or 1)
    return max(1, min(wanted, _LEAF_MEMORY // max(1, 3 * leaf_bytes)))  # a leaf, its copy and temporaries


# --- one image ----------------------------------------------------------------------------------------------


def _level1(root: zarr.Group | zarr.Array, spatial_dims: int) -> tuple[Any, tuple[int, ...]]:
    """Level 1 of a pyramid group (or None) and the factors it divides level 0's axes by."""
    if "1" not in root:
        return None, (2,) * spatial_dims
    return root["1"], omezarr.level_factors(root["0"], root["1"], spatial_dims)


def _halved(region: tuple[slice, ...], factors: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(r.start // f, r.stop // f) for r, f in zip(region, factors))


def _write_mask(mask: readers.MaskSource, root: zarr.Group, leaves: list[tuple[slice, ...]],
                pool: ThreadPoolExecutor, window: int, chunk: int | tuple[int, ...], n_levels: int,
                spacing: tuple[float, ...] | None = None, unit: str | None = None
                ) -> tuple[frozenset[int], dict[str, int]]:
    """Stream the mask into ``labels/mask`` (levels 0 and 1), checking it on the way.

    Returns its classes and the pixel count of each (``{"0": n0, "1": n1, ...}``, keys as JSON writes them).
    """
    group = omezarr.create_labels(root, "mask", mask.spatial_shape, np.uint8, chunk, n_levels=n_levels,
                                  spacing=spacing, unit=unit)
    level0 = group["0"]
    level1, factors = _level1(group, mask.spatial_dims)
    order = _InOrder(mask.sequential)

    def leaf(item: tuple[int, tuple[slice, ...]]) -> tuple[set[int], np.ndarray]:
        index, region = item
        with order.turn(index):
            labels, seen = mask.read_checked(*region)
        labels = labels[..., 0].astype(np.uint8)
        level0[region] = labels
        if level1 is not None:
            level1[_halved(region, factors)] = omezarr.halve(labels, "label", factors)
        return seen, np.bincount(labels.ravel(), minlength=256)

    seen: set[int] = set()
    counts = np.zeros(256, np.int64)
    for values, leaf_counts in _ordered(pool, leaf, enumerate(leaves), window):
        seen |= values
        counts += leaf_counts
    classes = mask.check_seen(seen)
    omezarr.build_pyramid(group, "label", first=2, pool=pool)
    return classes, {str(c): int(counts[c]) for c in sorted(classes)}


def _write_image(source: readers.ImageSource, root: zarr.Group, leaves: list[tuple[slice, ...]],
                 pool: ThreadPoolExecutor, window: int, foreground_pixels: int = 0
                 ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Stream the image into levels 0 and 1, then build the rest of the pyramid.

    Returns its statistics and, when the store already holds a mask with ``foreground_pixels`` > 0, the
    statistics of the pixels inside it (mask > 0; read back leaf by leaf from the mask just written).
    """
    channels, pixels_total = source.channels, int(np.prod(source.spatial_shape, dtype=np.int64))
    level0 = omezarr.image_array(root, 0)
    labels0 = root["labels/mask/0"] if foreground_pixels and "labels" in root else None
    level1, factors = _level1(root, source.spatial_dims)
    is_float = source.dtype.kind == "f"
    words = ("slice", "row", "column")[-source.spatial_dims:]
    order = _InOrder(source.sequential)

    def leaf(item: tuple[int, tuple[slice, ...]]) -> tuple[StreamingStats, StreamingStats | None]:
        index, region = item
        with order.turn(index):
            pixels = source.read(*region)
        if is_float and not np.isfinite(pixels).all():
            where = np.argwhere(~np.isfinite(pixels))[0][: source.spatial_dims]
            at = ", ".join(f"{w} {r.start + int(i)}" for w, r, i in zip(words, region, where))
            raise InputError(source.path, f"image contains NaN or Inf values (e.g. at {at})",
                             "replace them (e.g. with 0) before ingesting")
        stats = StreamingStats(channels, source.dtype, pixels_total)
        stats.update(pixels)
        inside = None
        if labels0 is not None:
            inside = StreamingStats(channels, source.dtype, foreground_pixels)
            inside.update(pixels[np.asarray(labels0[region]) > 0])
        moved = np.moveaxis(pixels, -1, 0)
        level0[(slice(None), *region)] = moved
        if level1 is not None:
            level1[(slice(None), *_halved(region, factors))] = omezarr.halve(moved, "image", factors)
        return stats, inside

    total = StreamingStats(channels, source.dtype, pixels_total)
    foreground = StreamingStats(channels, source.dtype, foreground_pixels) if labels0 is not None else None
    for stats, inside in _ordered(pool, leaf, enumerate(leaves), window):
        total.merge(stats)
        if foreground is not None and inside is not None:
            foreground.merge(inside)
    omezarr.build_pyramid(root, "image", first=2, pool=pool)
    return total.result(), foreground.result() if foreground is not None and foreground.count else None


def _work_plan(source: readers.ImageSource, mask: readers.MaskSource | None, chunk: int | tuple[int, ...],
               threads: int) -> tuple[list[tuple[slice, ...]], int]:
    """The leaves of an image (whole decode units of the image and of its mask) and the threads to use."""
    units = [source.decode_unit] + ([mask.decode_unit] if mask is not None else [])
    leaves = chunk_leaves(source.spatial_shape, chunk, tuple(max(axis) for axis in zip(*units)))
    leaf_bytes = int(np.prod([r.stop - r.start for r in leaves[0]], dtype=np.int64)) * source.channels
    return leaves, thread_count(threads, leaf_bytes * source.dtype.itemsize)


def _store_geometry(source: readers.ImageSource) -> tuple[tuple[float, ...] | None, str | None]:
    """Spacing and unit for the store's metadata: a volume's own; a 2-D image stays in pixels (as before)."""
    if source.spatial_dims == 2:
        return None, None
    return source.geometry.spacing, source.geometry.unit


def ingest_image(
    image_path: Path,
    mask_path: Path | None,
    dataset: Path,
    cfg: IngestConfig,
    *,
    entry_id: str | None = None,
    threads: int | None = None,
) -> mf.ManifestEntry:
    """Ingest one image (and its mask) into ``dataset/<id>.ome.zarr``; return its manifest entry.

    Args:
        threads: threads writing this image's chunks (default ``cfg.threads``; 0 = one per core, at most 8).

    Raises:
        InputError: the image or mask cannot be used; nothing is left behind in the dataset.
    """
    image_path, mask_path = Path(image_path), Path(mask_path) if mask_path else None
    entry_id = entry_id or mf.image_id(image_path)
    fingerprints = (_fingerprint(image_path), _fingerprint(mask_path))  # before reading: a later edit shows
    source = readers.open_image(image_path, channel_axis=cfg.channel_axis, max_pixels=cfg.max_pixels)
    mask = None
    if mask_path is not None:
        mask = readers.open_mask(mask_path, source, cfg.num_classes, max_pixels=cfg.max_pixels, scan=False)
    spacing, unit = _store_geometry(source)
    spatial, channels = source.spatial_shape, source.channels
    chunk = omezarr.chunk_shape(spatial, cfg.chunk_size, spacing)
    leaves, workers = _work_plan(source, mask, chunk, cfg.threads if threads is None else threads)
    n_levels = omezarr.n_levels_for(spatial, spacing=spacing) if cfg.pyramid else 1
    geometry = source.geometry.to_dict(source.spatial_dims)
    classes: frozenset[int] = frozenset()
    class_pixels: dict[str, int] | None = None
    pool = ThreadPoolExecutor(workers, thread_name_prefix=f"ingest-{entry_id}")
    try:
        with omezarr.atomic_store(mf.store_path(dataset, entry_id)) as tmp:
            try:
                hashes = [pool.submit(mf.file_hash, p) if p else None for p in (image_path, mask_path)]
                root = omezarr.create_image(tmp, (channels, *spatial), source.dtype, chunk, name=entry_id,
                                            n_levels=n_levels, spacing=spacing, unit=unit)
                if mask is not None:
                    classes, class_pixels = _write_mask(mask, root, leaves, pool, 2 * workers, chunk, n_levels,
                                                        spacing, unit)
                inside = sum(n for c, n in (class_pixels or {}).items() if c != "0")
                stats, foreground_stats = _write_image(source, root, leaves, pool, 2 * workers, inside)
                image_hash, mask_hash = (h.result() if h else None for h in hashes)
            finally:  # no thread may still write into the store when it is renamed or deleted
                pool.shutdown(wait=True, cancel_futures=True)
            attrs = {"id": entry_id, "source": str(image_path), "source_hash": image_hash, "stats": stats}
            if source.spatial_dims == 3:  # a 2-D store's metadata stays as before volumes
                attrs["geometry"] = geometry
            if foreground_stats is not None:  # what `ct` normalisation pools over the training set
                attrs["foreground_stats"] = foreground_stats
            omezarr.set_unet_attrs(root, attrs)
    finally:
        source.close()
        if mask is not None:
            mask.close()
    return {
        "id": entry_id,
        "source": str(image_path.resolve()),
        "source_hash": image_hash,
        "source_fingerprint": fingerprints[0],
        "mask": str(mask_path.resolve()) if mask_path else None,
        "mask_hash": mask_hash,
        "mask_fingerprint": fingerprints[1],
        "store": mf.store_path(dataset, entry_id).name,
        "shape": list(spatial),
        "channels": channels,
        "dtype": str(np.dtype(source.dtype)),
        "chunk": cfg.chunk_size,
        "options": _options(cfg),
        "has_mask": mask is not None,
        "classes": sorted(classes),
        "stats": stats,
        "foreground_stats": foreground_stats,
        "class_pixels": class_pixels,
        "spatial_dims": source.spatial_dims,
        "spacing": geometry["spacing"],
        "unit": geometry["unit"],
        "affine": geometry["affine"],
    }


# --- a folder -----------------------------------------------------------------------------------------------


def _fingerprint(path: Path | None) -> list[int] | None:
    """Size and modification time of a file; for a folder (a Zarr input), file count, total size, newest mtime."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_dir():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    stats = [p.stat() for p in path.rglob("*") if p.is_file()]
    return [len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]


def _options(cfg: IngestConfig) -> dict[str, Any]:
    """The options that shape a store: changing one re-ingests the image."""
    return {"chunk": cfg.chunk_size, "num_classes": cfg.num_classes, "channel_axis": cfg.channel_axis,
            "pyramid": cfg.pyramid}


def _unchanged(entry: dict[str, Any] | None, image: Path, mask: Path | None, dataset: Path,
               cfg: IngestConfig) -> bool:
    """True when the manifest already holds this exact image and mask, ingested with the same options.

    Size and mtime decide first, then the content hash. The store must be there and carry the entry's source
    hash (an interrupted re-ingestion may have renamed a new store in before its entry was written).
    """
    if entry is None or entry.get("options") != _options(cfg):
        return False
    if (entry.get("mask") is None) != (mask is None):
        return False
    try:
        stored = omezarr.unet_attrs(omezarr.open_root(mf.store_path(dataset, entry["id"])))
    except InputError:
        return False
    if stored.get("source_hash") != entry.get("source_hash"):
        return False
    if entry.get("source_fingerprint") == _fingerprint(image) and entry.get("mask_fingerprint") == _fingerprint(mask):
        return True
    same_image = entry.get("source_hash") == mf.file_hash(image)
    same_mask = mask is None or entry.get("mask_hash") == mf.file_hash(mask)
    return same_image and same_mask


def _ensure_validation(dataset: Path, val_fraction: float) -> None:
    """With a validation fraction > 0, make sure at least one image is in ``val`` (tiny datasets)."""
    if val_fraction <= 0:
        return
    with mf.locked(dataset):
        data = mf.load(dataset)
        items = list(data["images"].values())
        if len(items) < 2 or any(e["split"] == "val" for e in items):
            return
        train = sorted((e for e in items if e["split"] == "train"), key=lambda e: e["source_hash"])
        if len(train) >= 2:
            train[0]["split"] = "val"
            atomic_write_json(Path(dataset) / mf.MANIFEST, data)


def _record_class_names(dataset: Path, names: list[str] | None) -> None:
    """Keep the class names given at ingestion in the manifest (``class_names``); without the option, the names
    an earlier ingestion recorded stay."""
    if names is None:
        return
    with mf.locked(dataset):
        data = mf.load(dataset)
        if data.get("class_names") != list(names):
            data["class_names"] = list(names)
            atomic_write_json(Path(dataset) / mf.MANIFEST, data)


@contextlib.contextmanager
def _claimed(dataset: Path) -> Iterator[list[str]]:
    """Hold the dataset's ingestion lock; delete what interrupted runs left (yielded: the names deleted).

    Raises:
        InputError: another ingestion holds the lock.
    """
    dataset.mkdir(parents=True, exist_ok=True)
    with open(dataset / RUN_LOCK, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(dataset, "another ingestion is writing to this dataset",
                             "wait for it to finish, then run again") from None
        leftovers = sorted({p for pattern in _LEFTOVER_PATTERNS for p in dataset.glob(pattern)})
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        if leftovers:
            log.info("removed %d leftover(s) of an interrupted ingestion", len(leftovers))
        try:
            yield [p.name for p in leftovers]
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass(frozen=True)
class _Job:
    """One image to ingest."""

    image: Path
    mask: Path | None
    entry_id: str


def _plan(images: list[Path], cfg: IngestConfig, dataset: Path, report: IngestReport) -> list[_Job]:
    """The images to (re-)ingest; unchanged ones go to ``report.skipped``, unusable ones to ``report.failed``."""
    masks_dir = Path(cfg.masks) if cfg.masks else None
    existing = mf.load(dataset)["images"]
    jobs: list[_Job] = []
    owners: dict[str, Path] = {}
    for image_path in images:
        entry_id = mf.image_id(image_path)
        if entry_id in owners:
            report.failed.append(_failure(image_path, InputError(
                image_path, f"same image id '{entry_id}' as {owners[entry_id].name}", "rename one of them")))
            continue
        owners[entry_id] = image_path
        try:
            mask_path = readers.find_mask(masks_dir, image_path) if masks_dir else None
            if masks_dir is not None and mask_path is None:
                report.without_mask.append(entry_id)
            if not cfg.force and _unchanged(existing.get(entry_id), image_path, mask_path, dataset, cfg):
                report.skipped.append(entry_id)
                continue
        except (InputError, OSError) as err:
            report.failed.append(_failure(image_path, err))
            continue
        jobs.append(_Job(image_path, mask_path, entry_id))
    return jobs


def _unmatched_masks(masks_dir: Path, images: list[Path]) -> list[str]:
    """Mask files of ``masks_dir`` that are the mask of none of ``images`` (and are not one of the images)."""
    used = {p.resolve() for p in images}
    for image in images:
        with contextlib.suppress(InputError, OSError):
            mask = readers.find_mask(masks_dir, image)
            if mask is not None:
                used.add(mask.resolve())
    return [str(p) for p in readers.list_images(masks_dir, empty_ok=True) if p.resolve() not in used]


def _failure(path: Path, err: Exception) -> dict[str, str]:
    """A report line for a file that could not be ingested."""
    if isinstance(err, InputError):
        return {"file": str(path), "error": str(err)}
    return {"file": str(path), "error": f"{path}: {type(err).__name__}: {err}"}


def _ingest_job(job: _Job, dataset: Path, cfg: IngestConfig, threads: int) -> dict[str, Any]:
    """Run one job; return ``{"entry": ...}`` or ``{"failed": ...}`` (plain data, so it crosses to Dask)."""
    try:
        return {"entry": ingest_image(job.image, job.mask, dataset, cfg, entry_id=job.entry_id, threads=threads)}
    except (InputError, OSError) as err:
        return {"failed": _failure(job.image, err)}


def _record(result: dict[str, Any], dataset: Path, cfg: IngestConfig, report: IngestReport) -> None:
    """Put a finished image into the manifest (the driver only) and the report."""
    if "failed" in result:
        report.failed.append(result["failed"])
        return
    entry = result["entry"]
    old = mf.load(dataset)["images"].get(entry["id"])
    entry["split"] = old["split"] if old else mf.split_for(entry["source_hash"], cfg.val_fraction, cfg.test_fraction)
    mf.put_entry(dataset, entry)
    (report.updated if old else report.added).append(entry["id"])
    report.pixels += int(np.prod(entry["shape"], dtype=np.int64))


def _run_here(jobs: list[_Job], dataset: Path, cfg: IngestConfig) -> Iterator[dict[str, Any]]:
    """One image after the other in this process, each with the chunk-parallel thread pool."""
    for job in jobs:
        yield _ingest_job(job, dataset, cfg, cfg.threads)


def _run_on_dask(jobs: list[_Job], dataset: Path, cfg: IngestConfig) -> Iterator[dict[str, Any]]:
    """One Dask task per image; results as they finish. Workers must see the input and dataset folders."""
    from distributed import as_completed

    from unetcore.cluster import dask_cluster

    with dask_cluster(cfg.scheduler_address, cfg.n_workers, cfg.threads, device="cpu") as cluster:
        futures = [cluster.client.submit(_ingest_job, job, dataset, cfg, cluster.torch_threads,
                                         key=f"ingest-{job.entry_id}", pure=False)
                   for job in jobs]
        for future in as_completed(futures):
            yield future.result()


def check_ingestable(cfg: IngestConfig, *, empty_ok: bool = False) -> list[Path]:
    """Everything that can be refused before any image is read: the inputs, the mask folder, the output.

    Returns the images to consider (``cfg.images`` is a folder, one file or a glob).

    Raises:
        InputError: no images (unless ``empty_ok``), a missing mask folder, or an output folder that cannot be
            created or written.
    """
    images = readers.list_images(cfg.images, empty_ok=empty_ok)
    if cfg.masks is not None and not Path(cfg.masks).is_dir():
        raise InputError(cfg.masks, "mask folder does not exist", "check --masks")
    check_writable(Path(cfg.output))
    return images


def ingest_folder(cfg: IngestConfig, *, empty_ok: bool = False) -> IngestReport:
    """Ingest every supported image of ``cfg.images`` (and masks of ``cfg.masks``) into ``cfg.output``.

    Incremental: unchanged images are skipped, changed ones re-ingested, new ones added; ``cfg.force``
    re-ingests all. Images go one after the other (each written chunk-parallel with ``cfg.threads``), or one
    Dask task each with ``cfg.n_workers`` / ``cfg.scheduler_address``. Returns the report, also written to
    ``<output>/ingest_report.json``.

    ``empty_ok`` makes an input without images a normal, empty run (an inbox on a quiet night).

    Raises:
        InputError: see :func:`check_ingestable`; or another ingestion is writing to the dataset.
        ServiceError: the Dask scheduler cannot be reached.
    """
    start = time.perf_counter()
    dataset = Path(cfg.output)
    images = check_ingestable(cfg, empty_ok=empty_ok)
    report = IngestReport(dataset=str(dataset), masks_given=cfg.masks is not None,
                          ignored=readers.ignored_inputs(cfg.images))
    with _claimed(dataset) as cleaned:
        report.cleaned = cleaned
        jobs = _plan(images, cfg, dataset, report)
        if cfg.masks is not None:
            report.unmatched_masks = _unmatched_masks(Path(cfg.masks), images)
        total = len(jobs)
        progress_bus.report("ingest", 0, total)
        parallel = bool(cfg.n_workers > 0 or cfg.scheduler_address) and total > 1
        results = _run_on_dask(jobs, dataset, cfg) if parallel else _run_here(jobs, dataset, cfg)
        for done, result in enumerate(results, start=1):
            _record(result, dataset, cfg, report)
            progress_bus.report("ingest", done, total)
        _ensure_validation(dataset, cfg.val_fraction)
        _record_class_names(dataset, cfg.class_names)
        report.seconds = round(time.perf_counter() - start, 3)
        atomic_write_json(dataset / REPORT, report.to_dict())
    return report


def read_report(dataset: Path) -> dict[str, Any]:
    """The last ingestion report of a dataset."""
    return json.loads((Path(dataset) / REPORT).read_text())
