"""The dataset manifest: one JSON file listing every ingested image, written atomically.

``<dataset>/manifest.json`` maps image ids to entries (source, content hashes, shape, dtype, channels, mask,
class values, statistics, split, store path, and where the voxels lie: spatial dims, spacing, unit, affine, a
GeoTIFF's georeferencing; and notes on what a source said that its store does not use). An image is listed only after its store is complete. Updates
hold an exclusive lock on ``manifest.lock`` so two ingestions of one dataset never lose each other's entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from unetcore.atomic import atomic_write_json
from unetcore.errors import InputError
from unetcore.modes import Split


class ManifestEntry(TypedDict):
    """One ingested image as the manifest lists it (written by ingestion, read by training, inference, nightly)."""

    id: str
    source: str
    source_hash: str
    source_fingerprint: list[int]  # size and mtime (a folder store: file count, bytes, newest mtime)
    mask: str | None
    mask_hash: str | None
    mask_fingerprint: list[int] | None
    store: str  # <id>.ome.zarr, relative to the dataset
    shape: list[int]  # [height, width], or [depth, height, width] for a volume
    channels: int
    dtype: str
    chunk: int
    options: dict[str, Any]  # the ingestion options that shaped the store
    has_mask: bool
    classes: list[int]
    stats: dict[str, Any]
    # what ingestion measured inside the mask (absent from manifests written before the fingerprint; None: no mask
    # or no foreground): the statistics of the foreground pixels, and each class's pixel count by class ("0": n0)
    foreground_stats: NotRequired[dict[str, Any] | None]
    class_pixels: NotRequired[dict[str, int] | None]
    split: NotRequired[Split]  # given when the entry is put into the manifest
    # where the voxels lie (absent from manifests written before volumes: read them with .get, 2 / [1, 1] / None)
    spatial_dims: NotRequired[int]  # 2 or 3, the length of shape
    spacing: NotRequired[list[float]]  # per spatial axis ([z,] y, x), from the source; [1, 1(, 1)] if unknown
    unit: NotRequired[str | None]  # unit of spacing (millimeter, micrometer, ...), None if unknown
    affine: NotRequired[list[list[float]] | None]  # a volume's 4x4 voxel (x, y, z) -> world, as nibabel gives it
    # a GeoTIFF's georeferencing (unetcore.io.geotiff's contract; None or absent: not georeferenced)
    georef: NotRequired[dict[str, Any] | None]
    notes: NotRequired[list[str]]  # what the source said but the store does not use (a photo's DPI, a bad CRS)


MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def file_hash(path: Path, chunk: int = 1 << 22) -> str:
    """Content hash (BLAKE2b, 128-bit hex) of a file or, for a directory store, of its files' bytes."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=16)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def image_id(path: Path) -> str:
    """A safe id from a file name: its stem with anything outside ``[A-Za-z0-9._-]`` replaced.

    A DICOM series' folder keeps its whole name (``1.2.840.1``: series folders are often named by UID).
    Ids become file names inside the dataset folder, so they can never contain a path separator or ``..``.
    """
    name = Path(path).name
    for suffix in (".ome.zarr", ".ome.tiff", ".ome.tif", ".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        if not (Path(path).is_dir() and not name.lower().endswith(".zarr")):
            name = Path(name).stem
    safe = _SAFE_ID.sub("_", name).strip("._") or "image"
    return safe


def split_for(content_hash: str, val_fraction: float, test_fraction: float) -> Split:
    """Deterministic split from a content hash: the hash read as a number in [0, 1)."""
    u = int(content_hash[:8], 16) / 0x1_0000_0000
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def store_path(dataset: Path, entry_id: str) -> Path:
    """Where image ``entry_id``'s store lives inside ``dataset``."""
    return Path(dataset) / f"{entry_id}.ome.zarr"


def load(dataset: Path) -> dict[str, Any]:
    """Read the manifest (an empty one if the dataset is new)."""
    path = Path(dataset) / MANIFEST
    if not path.exists():
        return {"version": MANIFEST_VERSION, "images": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"unreadable manifest ({exc.__class__.__name__})", "re-run ingest with --force") from None
    if not isinstance(data, dict) or "images" not in data:
        raise InputError(path, "not a dataset manifest", "point to a folder written by `unet ingest`")
    return data


def require(dataset: Path) -> dict[str, Any]:
    """Read the manifest of an existing dataset, or raise naming the folder."""
    if not (Path(dataset) / MANIFEST).exists():
        raise InputError(dataset, "is not an ingested dataset (no manifest.json)", "run `unet ingest` first")
    return load(dataset)


@contextlib.contextmanager
def locked(dataset: Path) -> Iterator[None]:
    """Hold the dataset's exclusive update lock."""
    Path(dataset).mkdir(parents=True, exist_ok=True)
    with open(Path(dataset) / "manifest.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def put_entry(dataset: Path, entry: ManifestEntry) -> None:
    """Add or replace one entry (read-modify-write under the lock)."""
    with locked(dataset):
        data = load(dataset)
        data["images"][entry["id"]] = entry
        atomic_write_json(Path(dataset) / MANIFEST, data)


def entries(manifest: dict[str, Any], split: str = "all") -> list[ManifestEntry]:
    """Entries in id order, optionally only one split."""
    items = [manifest["images"][k] for k in sorted(manifest["images"])]
    return items if split == "all" else [e for e in items if e["split"] == split]


def manifest_hash(dataset: Path) -> str:
    """Hash of the manifest's content (logged with training runs)."""
    return file_hash(Path(dataset) / MANIFEST)
