"""The fingerprint of a dataset: what its manifest says about the images, per image and pooled over the dataset.

Per image (a manifest entry, as ingestion wrote it): spatial shape, spacing, channels, dtype, the intensity
statistics of the whole image and of its foreground (inside the mask), its classes and their pixel counts. Per
dataset: medians and spreads of the shapes and spacings, the pooled foreground intensities, the class frequencies
and a modality hint (CT when the intensities look like Hounsfield units). Only labelled images of the train and
val splits count (what training sees), as nnU-Net fingerprints its training cases; shapes are the train split's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetcore.errors import InputError
from unetcore.store import manifest as mf

CLIP_LOW, CLIP_HIGH = 0.5, 99.5
"""Percentiles of the foreground that bound CT intensities (nnU-Net's CT normalisation)."""
HU_AIR = (-3100.0, -900.0)
"""Image minima in this range (air is -1000 HU; scanners pad with -1024, -2048 or -3024) look like CT."""
HU_MAX = 5000.0


@dataclass(frozen=True)
class ChannelSummary:
    """Intensities of one channel pooled over images: exact mean and std, percentiles from the per-image ones."""

    pixels: int
    mean: float
    std: float
    low: float  # CLIP_LOW percentile
    high: float  # CLIP_HIGH percentile
    min: float
    max: float


@dataclass(frozen=True)
class ImageFingerprint:
    """One manifest entry as the planner sees it."""

    id: str
    split: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    channels: int
    dtype: str
    classes: tuple[int, ...]
    declared_classes: int  # num_classes the image was ingested with
    class_pixels: dict[int, int] | None  # None: ingested before class counts were measured
    stats: dict[str, Any]
    foreground_stats: dict[str, Any] | None  # None: no foreground, or ingested before it was measured

    @classmethod
    def of(cls, entry: dict[str, Any]) -> ImageFingerprint:
        """The fingerprint of a manifest entry (manifests older than volumes have no spacing: pixels)."""
        shape = tuple(int(n) for n in entry["shape"])
        pixels = entry.get("class_pixels")
        return cls(
            id=entry["id"], split=entry.get("split", "train"), shape=shape,
            spacing=tuple(float(s) for s in entry.get("spacing") or [1.0] * len(shape)),
            channels=int(entry["channels"]), dtype=str(entry["dtype"]),
            classes=tuple(int(c) for c in entry.get("classes", [])),
            declared_classes=int(entry.get("options", {}).get("num_classes", 1)),
            class_pixels={int(c): int(n) for c, n in pixels.items()} if pixels is not None else None,
            stats=entry["stats"], foreground_stats=entry.get("foreground_stats"),
        )


@dataclass(frozen=True)
class AxisSpread:
    """Per spatial axis: median, minimum and maximum over images."""

    median: tuple[float, ...]
    min: tuple[float, ...]
    max: tuple[float, ...]

    @classmethod
    def of(cls, rows: Sequence[Sequence[float]]) -> AxisSpread:
        values = np.asarray(rows, np.float64)
        return cls(tuple(float(v) for v in np.median(values, 0)), tuple(float(v) for v in values.min(0)),
                   tuple(float(v) for v in values.max(0)))


@dataclass(frozen=True)
class DatasetFingerprint:
    """The dataset as the planner sees it (see the module docstring); :func:`fingerprint` builds it."""

    dataset: str
    images: tuple[ImageFingerprint, ...]  # labelled images of the train and val splits
    spatial_dims: int
    channels: int
    dtype: str
    unit: str | None
    shape: AxisSpread  # of the train split's labelled images, in voxels
    spacing: AxisSpread
    classes: tuple[int, ...]  # every class value found in the masks
    declared_classes: int
    class_frequencies: dict[int, float] | None  # share of labelled pixels per class (None: not measured)
    intensity: tuple[ChannelSummary, ...]  # whole images
    foreground: tuple[ChannelSummary, ...] | None  # inside the masks (None: not measured for any image)
    foreground_measured: int  # images whose foreground statistics ingestion measured
    modality: str  # "ct" or "other"
    modality_why: str
    class_names: tuple[str, ...] | None = None  # given at ingestion (``--class-names``), background first

    @property
    def training(self) -> tuple[ImageFingerprint, ...]:
        """The labelled images of the train split."""
        return tuple(i for i in self.images if i.split == "train")

    @property
    def num_classes(self) -> int:
        """The model's ``num_classes`` for these masks: 1 (binary) for values 0/1, else the highest value + 1.

        The count declared at ingestion is a floor (a class may be absent from every mask of a small dataset).
        """
        return model_classes(self.classes, self.declared_classes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (the per-image list reduced to its count)."""
        out = asdict(self)
        out.pop("images")
        out["n_images"] = len(self.images)
        out["n_training"] = len(self.training)
        out["num_classes"] = self.num_classes
        if self.class_frequencies is not None:
            out["class_frequencies"] = {str(c): f for c, f in self.class_frequencies.items()}
        return out


def model_classes(classes: Sequence[int], declared: int = 1) -> int:
    """``num_classes`` of a model for masks holding ``classes`` (ingested declaring ``declared``).

    Values 0/1 are binary (1); otherwise there are ``max(highest value + 1, declared)`` classes.
    """
    count = max(max(classes, default=0) + 1, declared, 2)
    return 1 if count == 2 else count


def pooled_percentile(parts: Sequence[tuple[int, dict[str, float]]], p: float) -> float:
    """Percentile ``p`` of the union of images, each given as ``(pixel count, {percentile: value})``.

    The union's distribution is the count-weighted mixture of each image's, whose CDF is interpolated between its
    stored percentiles; its ``p`` is found by inverting the mixture's CDF. Exact at the stored percentiles for one
    image.
    """
    curves = []
    for count, pcts in parts:
        levels = sorted(pcts, key=float)
        curves.append((count, np.array([pcts[k] for k in levels], np.float64),
                       np.array([float(k) / 100 for k in levels])))
    grid = np.unique(np.concatenate([values for _, values, _ in curves]))
    total = sum(count for count, _, _ in curves)
    cdf = sum(count * np.interp(grid, values, levels) for count, values, levels in curves) / max(total, 1)
    return float(np.interp(p / 100, cdf, grid))


def pool_channels(stats: Sequence[dict[str, Any]]) -> tuple[ChannelSummary, ...]:
    """Pool per-image statistics (as ingestion writes them: ``{"pixels", "channels": [...]}``) channel by channel."""
    out = []
    for c in range(len(stats[0]["channels"])):
        counts = np.array([s["pixels"] for s in stats], np.float64)
        chans = [s["channels"][c] for s in stats]
        total = counts.sum()
        mean = float(np.dot(counts, [ch["mean"] for ch in chans]) / total)
        second = float(np.dot(counts, [ch["std"] ** 2 + ch["mean"] ** 2 for ch in chans]) / total)
        parts = [(int(n), ch["percentiles"]) for n, ch in zip(counts, chans)]
        out.append(ChannelSummary(
            pixels=int(total), mean=mean, std=float(np.sqrt(max(second - mean * mean, 0.0))),
            low=pooled_percentile(parts, CLIP_LOW), high=pooled_percentile(parts, CLIP_HIGH),
            min=float(min(ch["min"] for ch in chans)), max=float(max(ch["max"] for ch in chans)),
        ))
    return tuple(out)


def modality_hint(dtype: str, channels: int, stats: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """``("ct", why)`` when the intensities look like Hounsfield units, else ``("other", why)``.

    HU-like: one channel of a signed integer or float dtype whose images' minimum (median over images) is air or a
    scanner's padding (:data:`HU_AIR`) and whose maximum stays under :data:`HU_MAX`.
    """
    low = float(np.median([s["channels"][0]["min"] for s in stats]))
    high = float(np.median([s["channels"][0]["max"] for s in stats]))
    seen = f"{dtype}, image minimum {low:g} and maximum {high:g} (medians over images)"
    if np.dtype(dtype).kind not in "if":
        return "other", f"not CT: {dtype} is unsigned (Hounsfield units go down to -1024)"
    if channels != 1:
        return "other", f"not CT: {channels} channels"
    if HU_AIR[0] <= low <= HU_AIR[1] and high <= HU_MAX:
        return "ct", f"CT: intensities look like Hounsfield units ({seen})"
    return "other", f"not CT: {seen} is not air at about -1000 HU"


def _one(values: Counter, what: str, dataset: Path, hint: str) -> Any:
    if len(values) > 1:
        found = " and ".join(str(v) for v in sorted(values))
        raise InputError(dataset, f"the labelled images have {found} {what}", hint)
    return next(iter(values))


def fingerprint(dataset: Path, manifest: dict[str, Any] | None = None) -> DatasetFingerprint:
    """The fingerprint of an ingested dataset (its ``manifest`` when already read).

    Raises:
        InputError: no manifest, no labelled image (or none in the train split), or labelled images that mix
            channel counts or 2-D and 3-D.
    """
    dataset = Path(dataset)
    manifest = manifest if manifest is not None else mf.require(dataset)
    entries = mf.entries(manifest)
    images = tuple(ImageFingerprint.of(e) for e in entries if e["has_mask"] and e.get("split", "train") != "test")
    if not images:
        raise InputError(dataset, "no image in the dataset has a mask", "ingest with --masks")
    training = [i for i in images if i.split == "train"]
    if not training:
        raise InputError(dataset, "the training split has no image with a mask", "ingest more labelled images")
    dims = _one(Counter(len(i.shape) for i in images), "spatial dimensions", dataset,
                "ingest images and volumes as separate datasets")
    channels = _one(Counter(i.channels for i in images), "channel counts", dataset,
                    "ingest images of one channel count per dataset")
    dtype = Counter(i.dtype for i in images).most_common(1)[0][0]
    units = Counter(e.get("unit") for e in entries if e["has_mask"])
    measured = [i for i in images if i.class_pixels is not None]
    frequencies = None
    if measured:
        counts: Counter = Counter()
        for i in measured:
            counts.update(i.class_pixels)
        total = sum(counts.values()) or 1
        frequencies = {c: counts[c] / total for c in sorted(counts)}
    with_foreground = [i.foreground_stats for i in images if i.foreground_stats]
    modality, why = modality_hint(dtype, channels, [i.stats for i in images])
    return DatasetFingerprint(
        dataset=str(dataset), images=images, spatial_dims=dims, channels=channels, dtype=dtype,
        unit=units.most_common(1)[0][0] if units else None,
        shape=AxisSpread.of([i.shape for i in training]), spacing=AxisSpread.of([i.spacing for i in images]),
        classes=tuple(sorted({c for i in images for c in i.classes})),
        declared_classes=max(i.declared_classes for i in images), class_frequencies=frequencies,
        intensity=pool_channels([i.stats for i in images]),
        foreground=pool_channels(with_foreground) if with_foreground else None,
        foreground_measured=len(with_foreground), modality=modality, modality_why=why,
        class_names=tuple(manifest["class_names"]) if manifest.get("class_names") else None,
    )
