"""Prediction at the model's spacing: an image whose pixel or voxel spacing differs from the one its model was
trained at is predicted on its resampled grid, and the probabilities brought back onto the image's own grid.

nnU-Net resamples every case to the plan's target spacing, predicts, resamples the probabilities back and takes
the arg-max. Here nothing of the image is resampled ahead: one block of the output (on the image's grid) maps to a
box of the model's grid (:func:`target_box`); that box is predicted with the global tile grid of the resampled
image, each read taking the image region under it (:func:`source_box`) and resampling it linearly; the box's
probabilities are resampled linearly onto the block, then thresholded (binary) or arg-maxed. Linear interpolation
is separable and reads only the two neighbours along each axis, with weights computed from global coordinates
(:func:`axis_weights`), so a block's values are bit for bit those of the whole image resampled at once; a task's
memory is its block times the zoom. Images and volumes take the same path.

When the spacings agree within :data:`TOLERANCE` on every axis, or either side's unit is unknown,
:func:`resampling_for` returns None and prediction runs unchanged (no resampling work at all).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from unetcore.inference.predict import BlockPredictor, logits_to_outputs
from unetcore.inference.stitch import predict_block
from unetcore.inference.windows import Block, Shape, TileGrid
from unetcore.store.stats import normalize

TOLERANCE = 0.05
"""Spacings closer than this (relative, on every axis) count as equal: no resampling."""
UNIT_MICROMETERS = {"nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}
"""Lengths of the OME-NGFF units a spacing may be given in, in micrometres."""


@dataclass(frozen=True)
class Resampling:
    """The map between an image's own grid (``source``) and the model's grid (``target``), per spatial axis.

    Pixel centres are aligned by their grids' outer edges (as ``skimage.transform.resize``): target index ``t``
    lies at source coordinate ``(t + 0.5) * source / target - 0.5``.
    """

    source: Shape
    target: Shape
    source_spacing: tuple[float, ...]
    target_spacing: tuple[float, ...]

    @property
    def ndim(self) -> int:
        return len(self.source)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, for the prediction store's attributes."""
        return {"source_shape": list(self.source), "model_shape": list(self.target),
                "source_spacing": list(self.source_spacing), "model_spacing": list(self.target_spacing)}


def _in_micrometers(unit: str | None) -> float | None:
    return UNIT_MICROMETERS.get(unit) if unit else None


def resampling_for(shape: Sequence[int], spacing: Sequence[float], unit: str | None,
                   model_spacing: Sequence[float] | None, model_unit: str | None,
                   tolerance: float = TOLERANCE) -> tuple[Resampling | None, str]:
    """Whether (and how) an image of ``shape`` at ``spacing`` (``unit``) is resampled for a model working at
    ``model_spacing`` (``model_unit``), and why.

    A model spacing with fewer axes (a 2-D model on a volume) applies to the last axes; the others keep their
    grid. Spacings in known, different units are converted; a unit known on one side only cannot be compared (no
    resampling). Returns ``(None, why)`` when nothing is resampled.
    """
    if model_spacing is None:
        return None, "the model records no spacing"
    n = len(model_spacing)
    if n > len(shape):
        return None, f"the model's spacing has {n} axes, the image {len(shape)}"
    if (unit is None) != (model_unit is None) or (unit and _in_micrometers(unit) is None) or (
            model_unit and _in_micrometers(model_unit) is None):
        return None, (f"spacing units not comparable (image: {unit or 'pixels'}, model: {model_unit or 'pixels'}): "
                      "predicted on the image's own grid")
    factor = (_in_micrometers(unit) / _in_micrometers(model_unit)) if unit and model_unit else 1.0
    source_spacing = tuple(float(s) for s in spacing)
    target_spacing = source_spacing[: len(shape) - n] + tuple(float(s) for s in model_spacing)
    scaled = tuple(s * factor for s in source_spacing)
    if all(abs(s - t) <= tolerance * t for s, t in zip(scaled[-n:], target_spacing[-n:])):
        return None, f"the image's spacing is the model's (within {tolerance:.0%})"
    target = tuple(max(1, round(size * s / t)) if a >= len(shape) - n else int(size)
                   for a, (size, s, t) in enumerate(zip(shape, scaled, target_spacing)))
    shown = " x ".join(f"{t:g}" for t in target_spacing)
    return (Resampling(tuple(int(v) for v in shape), target, source_spacing, target_spacing),
            f"resampled to the model's spacing {shown} ({' x '.join(map(str, target))}) and back")


# --- the pure geometry ----------------------------------------------------------------------------------------


def axis_weights(size_from: int, size_to: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation along one axis from a grid of ``size_from`` onto one of ``size_to``, for output
    indices ``start..stop``: ``(i0, i1, w)``, each output value ``(1 - w) * x[i0] + w * x[i1]`` (global indices;
    coordinates clamped to the grid, as an edge-extended image)."""
    t = np.arange(start, stop, dtype=np.float64)
    coord = np.clip((t + 0.5) * (size_from / size_to) - 0.5, 0.0, size_from - 1)
    i0 = np.floor(coord).astype(np.int64)
    i1 = np.minimum(i0 + 1, size_from - 1)
    return i0, i1, (coord - i0).astype(np.float32)


def _box(size_from: Shape, size_to: Shape, box: Block) -> Block:
    """The box of the ``size_from`` grid that linear interpolation onto ``box`` (of the ``size_to`` grid) reads."""
    lo, hi = [], []
    for n_from, n_to, a, b in zip(size_from, size_to, box.start, box.stop):
        i0, i1, _ = axis_weights(n_from, n_to, a, b)
        lo.append(int(i0.min()))
        hi.append(int(i1.max()) + 1)
    return Block.from_corners(lo, hi)


def source_box(r: Resampling, box: Block) -> Block:
    """The image region (source grid) that a box of the model's grid is interpolated from."""
    return _box(r.source, r.target, box)


def target_box(r: Resampling, block: Block) -> Block:
    """The box of the model's grid whose probabilities a block of the image (source grid) is interpolated from."""
    return _box(r.target, r.source, block)


def linear_resample(data: np.ndarray, size_from: Shape, size_to: Shape, offset: Shape, box: Block) -> np.ndarray:
    """Values on ``box`` of the ``size_to`` grid, linearly interpolated from ``data`` ``(C, *region)``, a region of
    the ``size_from`` grid starting at ``offset`` that holds every index the box reads (:func:`source_box`).

    One axis at a time; an axis whose grid does not change is left as it is.
    """
    out = data
    for axis, (n_from, n_to, o, a, b) in enumerate(zip(size_from, size_to, offset, box.start, box.stop)):
        if n_from == n_to:
            out = np.take(out, np.arange(a - o, b - o), axis=axis + 1)
            continue
        i0, i1, w = axis_weights(n_from, n_to, a, b)
        shape = [1] * out.ndim
        shape[axis + 1] = -1
        w = w.reshape(shape)
        out = np.take(out, i0 - o, axis=axis + 1) * (1 - w) + np.take(out, i1 - o, axis=axis + 1) * w
    return np.ascontiguousarray(out, dtype=np.float32)


def nearest_resample(labels: np.ndarray, size_from: Shape, size_to: Shape, offset: Shape, box: Block) -> np.ndarray:
    """Labels ``(*region)`` on ``box`` of the ``size_to`` grid, each the value of the nearest voxel of ``labels``
    (a region of the ``size_from`` grid starting at ``offset``, holding every index :func:`source_box` names):
    the coordinates of :func:`axis_weights`, rounded to the closer neighbour (ties to the lower one)."""
    out = labels
    for axis, (n_from, n_to, o, a, b) in enumerate(zip(size_from, size_to, offset, box.start, box.stop)):
        i0, i1, w = axis_weights(n_from, n_to, a, b)
        out = np.take(out, np.where(w > 0.5, i1, i0) - o, axis=axis)
    return np.ascontiguousarray(out)


# --- the block kernel -----------------------------------------------------------------------------------------


def model_grid(bp: BlockPredictor, r: Resampling) -> TileGrid:
    """The global tile grid of the image resampled to the model's spacing (the same in every block)."""
    return bp.grid(r.target)


def probabilities_to_labels(probs: np.ndarray, num_classes: int, threshold: float) -> np.ndarray:
    """Labels ``(*spatial)`` uint8 of probabilities ``(K, *spatial)``: ``p > threshold`` (binary) or the arg-max."""
    if num_classes == 1:
        return (probs[0] > threshold).astype(np.uint8)
    return probs.argmax(axis=0).astype(np.uint8)


def resampled_outputs(bp: BlockPredictor, image: zarr.Array, stats: dict[str, Any], block: Block,
                      r: Resampling) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities (K, *block.shape), labels (*block.shape))`` of a block of ``image`` (C, [D,] H, W)
    predicted at the model's spacing: the model-grid box under the block is predicted (its reads resampled from
    the image), its probabilities interpolated back onto the block."""
    channels = image.shape[0]

    def read(*slices: slice) -> np.ndarray:
        box = Block.from_corners([s.start for s in slices], [s.stop for s in slices])
        src = source_box(r, box)
        data = normalize(np.asarray(image[(slice(None), *src.slices)]), stats, bp.recipe)
        return linear_resample(data, r.source, r.target, src.start, box)

    box = target_box(r, block)
    logits = predict_block(read, r.target, channels, bp.predictor, model_grid(bp, r), box, bp.batch_size)
    probs_box, _ = logits_to_outputs(logits, bp.num_classes, bp.threshold)
    probs = linear_resample(probs_box, r.target, r.source, box.start, block)
    return probs, probabilities_to_labels(probs, bp.num_classes, bp.threshold)


def block_outputs(bp: BlockPredictor, image: zarr.Array, stats: dict[str, Any], block: Block,
                  r: Resampling | None, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities, labels)`` of one block: on the image's own grid when ``r`` is None (the plain path, where
    ``keep`` skips background tiles), else at the model's spacing (:func:`resampled_outputs`)."""
    if r is None:
        logits = bp.logits(image, stats, bp.grid(tuple(image.shape[1:])), block, keep)
        return logits_to_outputs(logits, bp.num_classes, bp.threshold)
    return resampled_outputs(bp, image, stats, block, r)


def zoom_factor(r: Resampling | None) -> float:
    """How many model-grid voxels a task computes per output voxel (1 without resampling)."""
    return 1.0 if r is None else math.prod(t / s for s, t in zip(r.source, r.target))
