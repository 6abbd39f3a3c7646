"""Ingestion: a folder of images (and masks) into a dataset of OME-Zarr stores plus a manifest.

Every image is streamed in row bands one chunk high, so memory depends on the image width and the chunk size,
never on the image height. Statistics are accumulated from the same bands. A store is built under a temporary
name and renamed when whole; only then does its entry enter the manifest. Bad files are reported, one line each,
and the others still ingest.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from unetcore import progress as progress_bus
from unetcore.config import IngestConfig
from unetcore.errors import InputError
from unetcore.io import readers
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.store.stats import StreamingStats

REPORT = "ingest_report.json"
Status = Literal["ok", "partial", "failed", "empty"]


@dataclass
class IngestReport:
    """What one ingestion did: ids added, updated, skipped, and the files that failed with their reason."""

    dataset: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    pixels: int = 0

    @property
    def status(self) -> Status:
        """ok: everything ingested or unchanged; partial: some files failed; failed: all failed."""
        done = len(self.added) + len(self.updated) + len(self.skipped)
        if self.failed and not done:
            return "failed"
        if self.failed:
            return "partial"
        return "ok" if done else "empty"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}


def _fingerprint(path: Path | None) -> list[int] | None:
    if path is None:
        return None
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _band_rows(height: int, chunk: int) -> list[tuple[int, int]]:
    return [(y, min(y + chunk, height)) for y in range(0, height, chunk)]


def _check_mask_band(band: np.ndarray, n_values: int, mask_path: Path) -> np.ndarray:
    """Map a mask band to uint8 class indices; 255 in a binary mask means foreground."""
    if band.ndim == 3:
        band = band[..., 0]
    if n_values == 2:
        band = np.where(band == 255, 1, band)
    if band.size and (band.min() < 0 or band.max() >= n_values):
        bad = int(band.max()) if band.max() >= n_values else int(band.min())
        raise InputError(
            mask_path,
            f"mask value {bad} outside the declared classes 0..{n_values - 1}",
            "fix the mask or raise --num-classes",
        )
    return band.astype(np.uint8)


def ingest_image(
    image_path: Path,
    mask_path: Path | None,
    dataset: Path,
    cfg: IngestConfig,
    *,
    entry_id: str | None = None,
) -> dict[str, Any]:
    """Ingest one image (and its mask) into ``dataset/<id>.ome.zarr``; return its manifest entry.

    Raises:
        InputError: the image or mask cannot be used; nothing is left behind in the dataset.
    """
    entry_id = entry_id or mf.image_id(image_path)
    source = readers.open_image(image_path, channel_axis=cfg.channel_axis, max_pixels=cfg.max_pixels)
    height, width, channels = source.shape_yxc
    mask = readers.open_mask(mask_path, source, cfg.num_classes) if mask_path else None
    n_values = max(2, cfg.num_classes)
    is_float = np.issubdtype(np.dtype(source.dtype), np.floating)
    stats = StreamingStats(channels, source.dtype)
    classes: set[int] = set()
    final = mf.store_path(dataset, entry_id)
    with omezarr.atomic_store(final) as tmp:
        root = omezarr.create_image(tmp, (channels, height, width), source.dtype, cfg.chunk_size, name=entry_id)
        image0 = omezarr.image_array(root)
        labels0 = None
        if mask is not None:
            group = omezarr.create_labels(root, "mask", (height, width), np.uint8, cfg.chunk_size)
            labels0 = group["0"]
        for y0, y1 in _band_rows(height, cfg.chunk_size):
            band = np.asarray(source.read(slice(y0, y1), slice(0, width)))
            if is_float and not np.isfinite(band).all():
                raise InputError(image_path, f"NaN or Inf pixel values in rows {y0}-{y1}", "clean the image")
            stats.update(band)
            image0[:, y0:y1, :] = np.moveaxis(band, -1, 0)
            if mask is not None and labels0 is not None:
                mband = _check_mask_band(np.asarray(mask.read(slice(y0, y1), slice(0, width))), n_values, mask_path)
                classes.update(int(v) for v in np.unique(mband))
                labels0[y0:y1, :] = mband
        omezarr.build_pyramid(root, "image")
        if mask is not None:
            omezarr.build_pyramid(root["labels/mask"], "label")
        image_stats = stats.result()
        omezarr.set_unet_attrs(root, {"id": entry_id, "source": str(image_path), "stats": image_stats})
    return {
        "id": entry_id,
        "source": str(Path(image_path).resolve()),
        "source_hash": mf.file_hash(image_path),
        "source_fingerprint": _fingerprint(Path(image_path)),
        "mask": str(Path(mask_path).resolve()) if mask_path else None,
        "mask_hash": mf.file_hash(mask_path) if mask_path else None,
        "mask_fingerprint": _fingerprint(mask_path),
        "store": final.name,
        "shape": [height, width],
        "channels": channels,
        "dtype": str(np.dtype(source.dtype)),
        "chunk": cfg.chunk_size,
        "has_mask": mask is not None,
        "classes": sorted(classes),
        "stats": image_stats,
    }


def _unchanged(entry: dict[str, Any] | None, image: Path, mask: Path | None, dataset: Path) -> bool:
    """True when the manifest already holds this exact image and mask (size+mtime, then content hash)."""
    if entry is None or not mf.store_path(dataset, entry["id"]).exists():
        return False
    if (entry.get("mask") is None) != (mask is None):
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
            mf.atomic_write_json(Path(dataset) / mf.MANIFEST, data)


def ingest_folder(cfg: IngestConfig) -> IngestReport:
    """Ingest every supported image of ``cfg.images`` (and masks of ``cfg.masks``) into ``cfg.output``.

    Incremental: unchanged images are skipped, changed ones re-ingested, new ones added; ``cfg.force``
    re-ingests all. Returns the report, also written to ``<output>/ingest_report.json``.

    Raises:
        InputError: the image folder (or mask folder) does not exist or holds no images.
    """
    start = time.perf_counter()
    dataset = Path(cfg.output)
    images = readers.list_images(Path(cfg.images))
    masks_dir = Path(cfg.masks) if cfg.masks else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise InputError(masks_dir, "mask folder does not exist", "check --masks")
    dataset.mkdir(parents=True, exist_ok=True)
    report = IngestReport(dataset=str(dataset))
    existing = mf.load(dataset)["images"]
    for index, image_path in enumerate(images):
        progress_bus.report("ingest", index, len(images))
        entry_id = mf.image_id(image_path)
        mask_path = readers.find_mask(masks_dir, image_path) if masks_dir else None
        old = existing.get(entry_id)
        if not cfg.force and _unchanged(old, image_path, mask_path, dataset):
            report.skipped.append(entry_id)
            continue
        try:
            entry = ingest_image(image_path, mask_path, dataset, cfg, entry_id=entry_id)
        except InputError as err:
            report.failed.append({"file": str(image_path), "error": str(err)})
            continue
        entry["split"] = old["split"] if old else mf.split_for(entry["source_hash"], cfg.val_fraction, cfg.test_fraction)
        mf.put_entry(dataset, entry)
        (report.updated if old else report.added).append(entry_id)
        report.pixels += entry["shape"][0] * entry["shape"][1]
    progress_bus.report("ingest", len(images), len(images))
    _ensure_validation(dataset, cfg.val_fraction)
    report.seconds = round(time.perf_counter() - start, 3)
    mf.atomic_write_json(dataset / REPORT, report.to_dict())
    return report


def read_report(dataset: Path) -> dict[str, Any]:
    """The last ingestion report of a dataset."""
    return json.loads((Path(dataset) / REPORT).read_text())
