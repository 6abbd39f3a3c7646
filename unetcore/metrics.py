"""Segmentation metrics on label images, in numpy: count TP/FP/FN once, derive Dice and IoU from them.

Labels are integers ``0 .. C-1`` with ``C = max(2, num_classes)``: ``num_classes == 1`` means a binary mask
``{0, 1}`` whose foreground is class 1; for ``num_classes >= 2`` the foreground classes are ``1 .. K-1``.

A class absent from both the prediction and the ground truth has an undefined score (0 / 0): it is NaN, and
means use :func:`mean_ignoring_nan` so such classes neither reward nor punish.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # tensors are accepted, but numpy arrays need no torch import
    import torch


def _as_labels(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Flat int64 numpy copy of a label array or tensor."""
    return _as_array(labels).astype(np.int64, copy=False).ravel()


def label_count(num_classes: int) -> int:
    """Number of label values: 2 for binary (``num_classes == 1``), else ``num_classes``."""
    return max(2, num_classes)


def foreground_classes(num_classes: int) -> list[int]:
    """Foreground class labels: ``[1]`` for binary, ``1 .. K-1`` otherwise."""
    return list(range(1, label_count(num_classes)))


def confusion_counts(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class true positives, false positives and false negatives.

    Args:
        pred: predicted labels, any shape.
        target: ground-truth labels, same shape.
        num_classes: as in the model config (1 = binary).
        ignore_index: target value whose pixels are left out.

    Returns:
        ``(tp, fp, fn)``, each an int64 array of shape ``(C,)``, ``C = max(2, num_classes)``.
    """
    pred, target = _as_labels(pred), _as_labels(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.size} pixels, target {target.size}")
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    n = label_count(num_classes)
    for name, labels in (("pred", pred), ("target", target)):
        if labels.size and (labels.min() < 0 or labels.max() >= n):
            raise ValueError(f"{name} labels must lie in [0, {n - 1}], got [{labels.min()}, {labels.max()}]")
    confusion = np.bincount(target * n + pred, minlength=n * n).reshape(n, n)  # rows: truth, cols: prediction
    tp = np.diag(confusion)
    return tp, confusion.sum(axis=0) - tp, confusion.sum(axis=1) - tp


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` as float, NaN where ``den == 0``."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)


def dice_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Per-class Dice ``2TP / (2TP + FP + FN)``; NaN for a class absent from prediction and truth."""
    return _ratio(2 * tp, 2 * tp + fp + fn)


def iou_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Per-class IoU (Jaccard) ``TP / (TP + FP + FN)``; NaN for a class absent from prediction and truth."""
    return _ratio(tp, tp + fp + fn)


def mean_ignoring_nan(values: np.ndarray) -> float:
    """Mean of the non-NaN values; NaN (without a warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def segmentation_scores(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    *,
    with_hd95: bool = False,
    spacing: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Dice and IoU (and HD95) of a label prediction against the truth, over the foreground classes.

    Works on images and volumes alike; ``spacing`` (per axis, e.g. a volume's ``(z, y, x)`` in mm) puts HD95 in
    physical units, voxels otherwise. Ignored voxels count as background for HD95.

    Returns:
        ``{"dice_per_class": {label: float}, "iou_per_class": {label: float}, "dice_mean": float,
        "iou_mean": float}``, and with ``with_hd95`` also ``"hd95_per_class"`` and ``"hd95_mean"``; per-class
        dicts are keyed by foreground label, NaN marks a class absent from both inputs (for HD95: from either),
        and the means skip NaNs (NaN if every class is absent).
    """
    tp, fp, fn = confusion_counts(pred, target, num_classes, ignore_index)
    classes = foreground_classes(num_classes)
    dice = dice_from_counts(tp, fp, fn)[classes]
    iou = iou_from_counts(tp, fp, fn)[classes]
    out = {
        "dice_per_class": {c: float(d) for c, d in zip(classes, dice)},
        "iou_per_class": {c: float(i) for c, i in zip(classes, iou)},
        "dice_mean": mean_ignoring_nan(dice),
        "iou_mean": mean_ignoring_nan(iou),
    }
    if with_hd95:
        pred_np, target_np = _as_array(pred), _as_array(target)
        if ignore_index is not None:
            keep = target_np != ignore_index
            pred_np, target_np = np.where(keep, pred_np, 0), np.where(keep, target_np, 0)
        distances = {c: hd95(pred_np == c, target_np == c, spacing) for c in classes}
        out["hd95_per_class"] = distances
        out["hd95_mean"] = mean_ignoring_nan(np.array(list(distances.values())))
    return out


def _as_array(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """A label array or tensor as numpy, shape kept."""
    if hasattr(labels, "detach"):  # a torch tensor (possibly on a GPU)
        return labels.detach().cpu().numpy()
    return np.asarray(labels)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (pixels on the image edge count as boundary)."""
    from scipy import ndimage  # imported here: only HD95 needs scipy (unet predict's start-up does not)

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred_mask: np.ndarray, target_mask: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between the boundaries of two boolean masks (2-D or 3-D).

    The larger of the two directed 95th percentiles (as MONAI), in pixels or in ``spacing`` units (one voxel
    size per axis, e.g. a volume's ``(z, y, x)`` spacing in mm). Boundary voxels are those with a face
    neighbour outside the mask. NaN when either mask is empty (the distance is undefined).
    """
    pred_mask, target_mask = np.asarray(pred_mask, dtype=bool), np.asarray(target_mask, dtype=bool)
    if pred_mask.shape != target_mask.shape:
        raise ValueError(f"mask shapes differ: {pred_mask.shape} vs {target_mask.shape}")
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != pred_mask.ndim:
            raise ValueError(f"spacing {spacing} has {len(spacing)} values for {pred_mask.ndim} axes")
    if not pred_mask.any() or not target_mask.any():
        return float("nan")
    from scipy import ndimage

    pred_surface, target_surface = _surface(pred_mask), _surface(target_mask)
    to_target = ndimage.distance_transform_edt(~target_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[target_surface]
    return float(max(np.percentile(to_target, 95), np.percentile(to_pred, 95)))
