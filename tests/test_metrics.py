"""Metrics on tiny label images whose TP/FP/FN can be counted by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unetcore.metrics import (
    confusion_counts,
    dice_from_counts,
    hd95,
    iou_from_counts,
    mean_ignoring_nan,
    segmentation_scores,
)

nan = float("nan")


def same(a: float, b: float) -> bool:
    """Equal, counting NaN == NaN."""
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


@pytest.mark.parametrize(
    ("pred", "target", "num_classes", "tp", "fp", "fn"),
    [
        ([[1, 1], [0, 0]], [[1, 0], [1, 0]], 1, [1, 1], [1, 1], [1, 1]),
        ([[1, 2], [0, 0]], [[1, 1], [2, 0]], 3, [1, 1, 0], [1, 0, 1], [0, 1, 1]),
        ([[0, 0], [0, 0]], [[0, 0], [0, 0]], 2, [4, 0], [0, 0], [0, 0]),
    ],
)
def test_confusion_counts(pred, target, num_classes: int, tp, fp, fn) -> None:
    counts = confusion_counts(np.array(pred), np.array(target), num_classes)
    assert [c.tolist() for c in counts] == [tp, fp, fn]


@pytest.mark.parametrize(
    ("tp", "fp", "fn", "dice", "iou"),
    [
        (1, 1, 1, 0.5, 1 / 3),  # 2*1/(2+1+1), 1/(1+1+1)
        (4, 0, 0, 1.0, 1.0),
        (0, 2, 3, 0.0, 0.0),
        (0, 0, 0, nan, nan),  # absent from prediction and truth: undefined
    ],
)
def test_dice_and_iou_from_counts(tp: int, fp: int, fn: int, dice: float, iou: float) -> None:
    counts = [np.array([v]) for v in (tp, fp, fn)]
    assert same(dice_from_counts(*counts)[0], dice)
    assert same(iou_from_counts(*counts)[0], iou)


@pytest.mark.parametrize(
    ("values", "expected"),
    [([0.5, nan, 1.0], 0.75), ([nan, nan], nan), ([], nan), ([0.2], 0.2)],
)
def test_mean_ignoring_nan(values: list[float], expected: float) -> None:
    assert same(mean_ignoring_nan(np.array(values)), expected)


def test_binary_scores_use_class_one_as_foreground() -> None:
    scores = segmentation_scores(np.array([[1, 1], [0, 0]]), np.array([[1, 0], [1, 0]]), num_classes=1)
    assert scores["dice_per_class"] == {1: 0.5}
    assert scores["iou_per_class"] == {1: pytest.approx(1 / 3)}
    assert scores["dice_mean"] == 0.5 and scores["iou_mean"] == pytest.approx(1 / 3)


def test_multiclass_means_skip_classes_absent_from_both() -> None:
    # Class 1 perfect (Dice 1), class 2 missed (Dice 0), class 3 absent everywhere (NaN, left out of the mean).
    pred = torch.tensor([[1, 0], [0, 0]])
    target = torch.tensor([[1, 2], [0, 0]])
    scores = segmentation_scores(pred, target, num_classes=4)
    dice = scores["dice_per_class"]
    assert dice[1] == 1.0 and dice[2] == 0.0 and math.isnan(dice[3])
    assert scores["dice_mean"] == 0.5 and scores["iou_mean"] == 0.5


def test_empty_prediction_and_truth_score_nan() -> None:
    empty = np.zeros((3, 3), dtype=np.uint8)
    scores = segmentation_scores(empty, empty, num_classes=1)
    assert math.isnan(scores["dice_mean"]) and math.isnan(scores["iou_mean"])


def test_ignored_pixels_are_not_counted() -> None:
    # The wrong pixel on the right is marked 255 in the truth, so only the correct left pixel counts.
    scores = segmentation_scores(np.array([[1, 1]]), np.array([[1, 255]]), num_classes=1, ignore_index=255)
    assert scores["dice_mean"] == 1.0


def test_out_of_range_labels_are_refused() -> None:
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 1\]"):
        confusion_counts(np.array([0, 1]), np.array([0, 2]), num_classes=1)


@pytest.mark.parametrize(
    ("shift", "expected"),
    [(0, 0.0), (3, 3.0)],  # a square against itself, and against a copy moved 3 pixels right
)
def test_hd95_of_shifted_squares(shift: int, expected: float) -> None:
    target = np.zeros((20, 20), dtype=bool)
    target[5:10, 5:10] = True
    pred = np.roll(target, shift, axis=1)
    assert hd95(pred, target) == pytest.approx(expected)


@pytest.mark.parametrize("empty", ["pred", "target", "both"])
def test_hd95_is_nan_when_a_mask_is_empty(empty: str) -> None:
    square = np.zeros((8, 8), dtype=bool)
    square[2:5, 2:5] = True
    none = np.zeros_like(square)
    pred = none if empty in ("pred", "both") else square
    target = none if empty in ("target", "both") else square
    assert math.isnan(hd95(pred, target))


# --- volumes: HD95 in physical units -------------------------------------------------------------------

SPACING = (2.5, 0.8, 0.75)  # (z, y, x) mm: thick slices, each axis its own voxel size


def cubes(offset: tuple[int, int, int], shape: tuple[int, int, int] = (20, 12, 20)) -> tuple[np.ndarray, np.ndarray]:
    """A 4x4x4 cube at (1, 2, 1) and the same cube moved by ``offset`` voxels."""
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[1:5, 2:6, 1:5] = True
    z, y, x = offset
    b[1 + z : 5 + z, 2 + y : 6 + y, 1 + x : 5 + x] = True
    return a, b


def test_hd95_of_cubes_apart_along_z_is_in_slices_of_their_thickness() -> None:
    """Cubes 10 slices apart: a face voxel of one is 7, 8, 9 or 10 slices from the other's surface (16, 12, 12,
    16 of the 56 surface voxels), so the 95th percentile is 10 slices: 10 voxels, 25 mm at 2.5 mm."""
    a, b = cubes((10, 0, 0))
    assert hd95(a, b) == pytest.approx(10.0)
    assert hd95(a, b, SPACING) == pytest.approx(25.0)
    a, b = cubes((0, 0, 10))  # the same offset along x: 10 columns of 0.75 mm
    assert hd95(a, b, SPACING) == pytest.approx(7.5)


def test_hd95_of_cubes_one_slice_apart_is_one_slice_thick() -> None:
    """Overlapping cubes one slice apart: 36 surface voxels coincide, 4 lie one column (0.75 mm) from the other's
    side, 16 (a whole face) one slice (2.5 mm) from the other's face; 16 / 56 > 5 %, so HD95 is 2.5 mm."""
    a, b = cubes((1, 0, 0))
    assert hd95(a, b, SPACING) == pytest.approx(2.5)
    assert hd95(a, b) == pytest.approx(1.0)


def test_hd95_refuses_a_spacing_of_another_dimension() -> None:
    a, b = cubes((1, 0, 0))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, b, (1.0, 1.0))


def test_volume_scores_per_class_with_hd95_in_mm() -> None:
    """Two classes in a volume: Dice and IoU from counts, HD95 per class in mm, an absent class NaN."""
    a, b = cubes((1, 0, 0))
    truth = a.astype(np.int64)
    pred = b.astype(np.int64)
    truth[10:12, 2:4, 10:12] = 2  # class 2: 8 voxels, predicted exactly
    pred[10:12, 2:4, 10:12] = 2
    got = segmentation_scores(pred, truth, 4, with_hd95=True, spacing=SPACING)
    assert got["dice_per_class"][1] == pytest.approx(2 * 48 / (64 + 64))  # 3 of 4 slices overlap: 48 voxels
    assert got["iou_per_class"][1] == pytest.approx(48 / 80)
    assert got["dice_per_class"][2] == 1.0 and got["hd95_per_class"][2] == 0.0
    assert got["hd95_per_class"][1] == pytest.approx(2.5)
    assert math.isnan(got["hd95_per_class"][3]) and math.isnan(got["dice_per_class"][3])
    assert got["hd95_mean"] == pytest.approx(1.25)
    ignored = truth.copy()
    ignored[pred != truth] = 255  # leave out every disagreeing voxel: a perfect score
    clean = segmentation_scores(pred, ignored, 4, 255, with_hd95=True, spacing=SPACING)
    assert clean["dice_per_class"][1] == 1.0 and clean["hd95_per_class"][1] == 0.0
