"""Previews of volumes: three orthogonal mid-slices, each an input | truth | prediction strip (``preview_strip``)."""

from __future__ import annotations

from collections.abc import Sequence

import mlflow
import numpy as np

from unetcore.tracking.mlflow import preview_strip

MAX_STRETCH = 8  # a slice axis is repeated at most this many times to show the voxels' true aspect
GAP = 2  # black rows between the strips


def orthogonal_slices(volume: np.ndarray, centre: Sequence[int] | None = None) -> list[np.ndarray]:
    """The axial, coronal and sagittal slices of a ``(..., Z, Y, X)`` array through ``centre`` (default: its middle).

    Returns ``[(..., Y, X), (..., Z, X), (..., Z, Y)]``; in the last two, z runs upwards (the first slice at the
    bottom), as viewers show coronal and sagittal planes.
    """
    z, y, x = volume.shape[-3:]
    cz, cy, cx = (z // 2, y // 2, x // 2) if centre is None else (int(c) for c in centre)
    return [volume[..., cz, :, :], volume[..., ::-1, cy, :], volume[..., ::-1, :, cx]]


def _stretch(panel: np.ndarray, factor: int) -> np.ndarray:
    """Repeat the rows of an ``(h, w, 3)`` strip ``factor`` times."""
    return np.repeat(panel, factor, axis=0) if factor > 1 else panel


def volume_preview_strip(
    image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """RGB preview ``(H, W, 3)`` uint8 of a volume: its axial, coronal and sagittal mid-slices, top to bottom.

    Each row is :func:`~unetcore.tracking.mlflow.preview_strip` of one slice of ``image`` (C, Z, Y, X), ``truth``
    (Z, Y, X) or None, and ``pred`` (Z, Y, X); rows are left-aligned, padded with black, and ``GAP`` black rows
    apart. With ``spacing`` ``(z, y, x)``, the coronal and sagittal rows repeat each slice ``round(dz / dy)`` times
    (at most ``MAX_STRETCH``), so that thick slices do not look squashed.
    """
    if image.ndim != 4 or pred.shape != image.shape[1:] or (truth is not None and truth.shape != pred.shape):
        shapes = f"{image.shape}, {None if truth is None else truth.shape}, {pred.shape}"
        raise ValueError(f"expected image (C, Z, Y, X) and truth / prediction (Z, Y, X), got {shapes}")
    images = orthogonal_slices(image)
    truths = orthogonal_slices(truth) if truth is not None else [None] * 3
    preds = orthogonal_slices(pred)
    stretch = 1
    if spacing is not None:
        dz, dy, dx = (float(s) for s in spacing)
        stretch = int(min(MAX_STRETCH, max(1, round(dz / max(min(dy, dx), 1e-12)))))
    rows = [_stretch(preview_strip(i, t, p), 1 if k == 0 else stretch)
            for k, (i, t, p) in enumerate(zip(images, truths, preds))]
    width = max(r.shape[1] for r in rows)
    out = []
    for k, row in enumerate(rows):
        if k:
            out.append(np.zeros((GAP, width, 3), np.uint8))
        out.append(np.pad(row, [(0, 0), (0, width - row.shape[1]), (0, 0)]))
    return np.concatenate(out, axis=0)


def log_volume_preview(
    image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray, key: str, step: int,
    spacing: Sequence[float] | None = None,
) -> None:
    """Log :func:`volume_preview_strip` as an image series entry (as ``log_preview`` does for images)."""
    mlflow.log_image(volume_preview_strip(image, truth, pred, spacing), key=key, step=step)
