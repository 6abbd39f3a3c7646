"""Losses on tiny hand-made tensors whose values can be checked by hand.

``hard(pred, k)`` turns a label image into logits so confident (+-20) that the probabilities are 0 or 1 up to
1e-8, so soft Dice equals hard Dice ``2TP / (2TP + FP + FN)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from unetcore.errors import ConfigError
from unetcore.training.losses import (
    SegmentationLoss,
    cross_entropy_loss,
    focal_loss,
    soft_dice_loss,
)

BIG = 20.0


def labels(rows: list[list[int]]) -> torch.Tensor:
    """A (1, H, W) long label image."""
    return torch.tensor([rows], dtype=torch.long)


def hard(rows: list[list[int]], k: int) -> torch.Tensor:
    """(1, K, H, W) confident logits predicting ``rows``: +-BIG for K == 1, one-hot * 2 * BIG - BIG otherwise."""
    pred = labels(rows)
    if k == 1:
        return (pred.float() * 2 - 1).unsqueeze(1) * BIG
    return torch.nn.functional.one_hot(pred, k).permute(0, 3, 1, 2).float() * 2 * BIG - BIG


@pytest.mark.parametrize(
    ("k", "pred", "target", "expected"),
    [
        (1, [[1, 0], [0, 1]], [[1, 0], [0, 1]], 0.0),  # perfect
        (1, [[0, 1], [1, 0]], [[1, 0], [0, 1]], 1.0),  # fully wrong
        (1, [[1, 1], [0, 0]], [[1, 0], [1, 0]], 0.5),  # TP=1 FP=1 FN=1: Dice 2/4
        (3, [[1, 2], [0, 0]], [[1, 2], [0, 0]], 0.0),  # perfect
        (3, [[1, 2], [0, 0]], [[1, 1], [2, 0]], 2 / 3),  # class 1: 2*1/(2+0+1)=2/3; class 2: 0 -> 1 - 1/3
        (2, [[0, 0], [0, 0]], [[1, 0], [0, 0]], 1.0),  # missed the only foreground pixel
    ],
)
def test_dice_loss_of_confident_predictions(k: int, pred, target, expected: float) -> None:
    loss = soft_dice_loss(hard(pred, k), labels(target), num_classes=k)
    assert loss.item() == pytest.approx(expected, abs=1e-4)


def test_dice_loss_of_uniform_probabilities() -> None:
    # p = 0.5 everywhere, one foreground pixel of four: Dice = 2 * 0.5 / (4 * 0.5 + 1) = 1/3.
    loss = soft_dice_loss(torch.zeros(1, 1, 2, 2), labels([[1, 0], [0, 0]]), num_classes=1)
    assert loss.item() == pytest.approx(2 / 3, abs=1e-4)


def test_dice_loss_can_include_background() -> None:
    # Same case as the 2/3 row above; class 0: TP=1 FP=1 FN=0 -> 2/3. Mean Dice (2/3 + 2/3 + 0) / 3 = 4/9.
    loss = soft_dice_loss(
        hard([[1, 2], [0, 0]], 3), labels([[1, 1], [2, 0]]), num_classes=3, include_background=True
    )
    assert loss.item() == pytest.approx(5 / 9, abs=1e-4)


def test_dice_is_batch_dice() -> None:
    # Image 1 perfect (2 fg pixels), image 2 misses its 2 fg pixels: pooled Dice = 2*2 / (2 + 4) = 2/3.
    pred = torch.cat([hard([[1, 1]], 1), hard([[0, 0]], 1)])
    target = torch.cat([labels([[1, 1]]), labels([[1, 1]])])
    assert soft_dice_loss(pred, target, num_classes=1).item() == pytest.approx(1 / 3, abs=1e-4)


@pytest.mark.parametrize(
    ("logits", "target", "weights", "expected"),
    [
        (torch.zeros(1, 1, 2, 2), [[1, 0], [0, 1]], None, math.log(2)),  # sigmoid(0) = 1/2
        (torch.zeros(1, 4, 2, 2), [[3, 0], [2, 1]], None, math.log(4)),  # softmax of zeros = 1/4
        (hard([[1, 0], [0, 1]], 1), [[1, 0], [0, 1]], None, 0.0),
        (hard([[2, 0], [1, 1]], 3), [[2, 0], [1, 1]], None, 0.0),
        # BCE per pixel: ln 2 (fg, weight 3) and ~20 (bg predicted fg, weight 1): (3 ln 2 + 20) / 4.
        (torch.tensor([[[[0.0, BIG]]]]), [[1, 0]], [1.0, 3.0], (3 * math.log(2) + BIG) / 4),
        # CE per pixel: ln 2 (class 1, weight 2) and ln 2 (class 0, weight 1): the weighted mean is still ln 2.
        (torch.zeros(1, 2, 1, 2), [[1, 0]], [1.0, 2.0], math.log(2)),
    ],
)
def test_cross_entropy(logits: torch.Tensor, target, weights, expected: float) -> None:
    class_weights = None if weights is None else torch.tensor(weights)
    loss = cross_entropy_loss(logits, labels(target), class_weights=class_weights)
    assert loss.item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    ("k", "gamma", "expected"),
    [
        (1, 2.0, 0.25 * math.log(2)),  # p_t = 1/2: (1 - 1/2)^2 * ln 2
        (4, 2.0, (3 / 4) ** 2 * math.log(4)),  # p_t = 1/4
        (4, 0.0, math.log(4)),  # gamma 0 is cross-entropy
    ],
)
def test_focal_loss_of_uniform_logits(k: int, gamma: float, expected: float) -> None:
    loss = focal_loss(torch.zeros(1, k, 2, 2), labels([[0, 0], [0, 0]]), gamma=gamma)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_focal_loss_down_weights_confident_pixels() -> None:
    logits, target = hard([[1, 0]], 2) * 0.05, labels([[1, 0]])  # p_t = sigmoid(2) ~ 0.88: (1 - p_t)^2 ~ 0.014
    assert focal_loss(logits, target).item() < 0.02 * cross_entropy_loss(logits, target).item()


@pytest.mark.parametrize("kind", ["dice_ce", "ce", "dice", "focal"])
@pytest.mark.parametrize("k", [1, 3])
def test_ignored_pixels_count_in_no_loss(kind: str, k: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, k, 3, 4)
    target = torch.randint(0, max(k, 2), (2, 3, 4))
    ignored = target.clone()
    ignored[:, :, -1] = 255  # the last column is "don't care", whatever the logits say there
    loss = SegmentationLoss(kind, k, ignore_index=255)
    assert loss(logits, ignored).item() == pytest.approx(loss(logits[..., :-1], target[..., :-1]).item(), abs=1e-6)


@pytest.mark.parametrize("kind", ["dice_ce", "ce", "dice", "focal"])
def test_fully_ignored_batch_gives_zero_loss_and_finite_gradients(kind: str) -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = SegmentationLoss(kind, 3, ignore_index=255)(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(logits.grad).all()


def test_dice_ce_is_dice_plus_ce() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5))
    expected = soft_dice_loss(logits, target, num_classes=3) + cross_entropy_loss(logits, target)
    assert SegmentationLoss("dice_ce", 3)(logits, target).item() == pytest.approx(expected.item())


def test_unknown_loss_kind_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="valid: dice_ce, ce, dice, focal"):
        SegmentationLoss("tversky", 2)  # type: ignore[arg-type]


@pytest.mark.parametrize(("k", "weights"), [(3, [1.0, 2.0]), (1, [1.0])])
def test_class_weights_of_the_wrong_length_are_refused(k: int, weights: list[float]) -> None:
    with pytest.raises(ConfigError, match="class_weights"):
        SegmentationLoss("ce", k, class_weights=weights)


def test_logits_target_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match=r"target \(N, H, W\)"):
        cross_entropy_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.long))


# --- volumes: (N, K, D, H, W) ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dice_ce", "ce", "dice", "focal"])
@pytest.mark.parametrize("k", [1, 3])
def test_a_volume_loss_is_the_loss_of_its_voxels_laid_out_flat(kind: str, k: int) -> None:
    """Batch Dice and the CE mean run over every voxel: (N, K, D, H, W) scores as (N, K, D * H, W) does."""
    torch.manual_seed(1)
    logits = torch.randn(2, k, 3, 4, 5)
    target = torch.randint(0, max(k, 2), (2, 3, 4, 5))
    target[0, 1, 2, 3] = 255
    loss = SegmentationLoss(kind, k, ignore_index=255, class_weights=[1.0, 2.0] if k == 1 else [1.0, 2.0, 0.5])
    flat = loss(logits.reshape(2, k, 12, 5), target.reshape(2, 12, 5))
    assert loss(logits, target).item() == pytest.approx(flat.item(), rel=1e-6)


def test_dice_ce_of_a_volume_by_hand() -> None:
    """Confident logits on a 2x2x2 volume: Dice from counts; CE ~ 0 where right, 2 * BIG where wrong."""
    truth = torch.tensor([[[[0, 1], [1, 1]], [[0, 0], [1, 0]]]])  # (1, 2, 2, 2): 4 foreground voxels
    pred = torch.tensor([[[[0, 1], [1, 0]], [[1, 0], [1, 0]]]])  # TP 3, FP 1, FN 1
    logits = torch.nn.functional.one_hot(pred, 2).movedim(-1, 1).float() * 2 * BIG - BIG
    dice = soft_dice_loss(logits, truth, num_classes=2)
    assert dice.item() == pytest.approx(1 - 2 * 3 / (2 * 3 + 1 + 1), abs=1e-6)
    ce = cross_entropy_loss(logits, truth)  # two of eight voxels wrong by a logit margin of 2 * BIG
    assert ce.item() == pytest.approx(2 / 8 * 2 * BIG, rel=1e-6)
    assert SegmentationLoss("dice_ce", 2)(logits, truth).item() == pytest.approx(dice.item() + ce.item(), rel=1e-6)


def test_a_volume_loss_has_gradients_and_a_perfect_prediction_scores_zero() -> None:
    target = torch.zeros(1, 4, 6, 6, dtype=torch.long)
    target[0, 1:3, 2:5, 1:4] = 1
    perfect = (torch.nn.functional.one_hot(target, 2).movedim(-1, 1).float() * 2 - 1) * BIG
    assert SegmentationLoss("dice_ce", 2)(perfect, target).item() == pytest.approx(0.0, abs=1e-5)
    logits = torch.zeros(1, 2, 4, 6, 6, requires_grad=True)
    SegmentationLoss("dice_ce", 2)(logits, target).backward()
    assert logits.grad.shape == logits.shape and logits.grad.abs().sum() > 0


def test_deep_supervision_weighs_each_halving_half_and_samples_the_target() -> None:
    from unetcore.training.losses import DeepSupervisionLoss, deep_supervision_weights, downsampled_target

    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    torch.manual_seed(1)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, 0, 0] = 255  # an ignore label stays one
    assert torch.equal(downsampled_target(target, (4, 4)), target[:, ::2, ::2])
    base = SegmentationLoss("dice_ce", 3, ignore_index=255)
    outs = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    expected = sum(w * base(o, t) for w, o, t in zip(deep_supervision_weights(3), outs,
                                                      (target, target[:, ::2, ::2], target[:, ::4, ::4])))
    loss = DeepSupervisionLoss(base)
    assert loss(outs, target).item() == pytest.approx(float(expected), rel=1e-6)
    assert loss(outs[0], target).item() == pytest.approx(base(outs[0], target).item(), rel=1e-6)
