"""Segmentation losses: pure tensor functions, then :class:`SegmentationLoss` holding the options.

Conventions (images; volumes add a depth axis everywhere: ``(N, K, D, H, W)`` and ``(N, D, H, W)``):
    logits: ``(N, K, H, W)`` float. ``K == 1`` is binary (sigmoid, foreground is ``target == 1``);
        ``K >= 2`` is multi-class (softmax, class 0 is background).
    target: ``(N, H, W)`` integer class indices.
    ignore_index: pixels whose target equals it count in no loss; a batch with no valid pixel gives loss 0.
    class_weights: per-class weights of the cross-entropy terms; ``K`` values, or ``[background, foreground]``
        when ``K == 1``.

Dice is batch Dice (as nnU-Net's ``batch_dice``): intersections and sums run over the batch and spatial dims,
then the per-class scores are averaged over the foreground classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unetcore.errors import ConfigError
from unetcore.modes import LossKind, check_mode


def _check_shapes(logits: Tensor, target: Tensor) -> None:
    if logits.ndim not in (4, 5) or target.shape != (logits.shape[0], *logits.shape[2:]):
        shapes = f"{tuple(logits.shape)} and {tuple(target.shape)}"
        raise ValueError(f"expected logits (N, K, H, W) and target (N, H, W), or for volumes (N, K, D, H, W) and "
                         f"(N, D, H, W), got {shapes}")


def valid_mask(target: Tensor, ignore_index: int | None) -> Tensor:
    """``(N, H, W)`` bool: pixels that count (all of them when ``ignore_index`` is None)."""
    return torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index


def class_probabilities(logits: Tensor) -> Tensor:
    """``(N, K, H, W)`` probabilities: sigmoid for ``K == 1``, softmax over K otherwise."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def target_one_hot(target: Tensor, num_classes: int, valid: Tensor) -> Tensor:
    """``(N, K, H, W)`` float one-hot of ``target``; for ``K == 1`` the single channel is ``target == 1``.

    Ignored pixels are zero in every channel.
    """
    if num_classes == 1:
        onehot = (target == 1).unsqueeze(1)
    else:
        onehot = F.one_hot(target.long().masked_fill(~valid, 0), num_classes).movedim(-1, 1)
    return (onehot & valid.unsqueeze(1)).float()


def soft_dice(probs: Tensor, onehot: Tensor, valid: Tensor, smooth: float = 1e-5) -> Tensor:
    """Per-class batch soft Dice ``(K,)`` of ``probs`` and ``onehot`` ``(N, K, H, W)`` over ``valid`` pixels.

    ``(2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)``; a class absent from both scores 1.
    """
    probs = probs * valid.unsqueeze(1)
    dims = (0, *range(2, probs.ndim))
    intersection = (probs * onehot).sum(dims)
    cardinality = probs.sum(dims) + onehot.sum(dims)
    return (2 * intersection + smooth) / (cardinality + smooth)


def soft_dice_loss(
    logits: Tensor,
    target: Tensor,
    *,
    num_classes: int,
    ignore_index: int | None = None,
    smooth: float = 1e-5,
    include_background: bool = False,
) -> Tensor:
    """``1 - mean Dice`` over the foreground classes (class 1..K-1, or the single channel when K == 1).

    Args:
        logits: ``(N, K, H, W)`` or ``(N, K, D, H, W)`` with ``K == num_classes``.
        target: ``(N, H, W)`` or ``(N, D, H, W)`` class indices.
        num_classes: K, checked against ``logits``.
        ignore_index: target value excluded from the loss.
        smooth: added to numerator and denominator; keeps empty classes finite.
        include_background: also average class 0 (multi-class only).

    Returns:
        Scalar loss in [0, 1].
    """
    _check_shapes(logits, target)
    if logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} channels, expected num_classes={num_classes}")
    valid = valid_mask(target, ignore_index)
    dice = soft_dice(class_probabilities(logits), target_one_hot(target, num_classes, valid), valid, smooth)
    first = 0 if num_classes == 1 or include_background else 1
    return 1 - dice[first:].mean()


def pixel_cross_entropy(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """``(N, H, W)`` unreduced cross-entropy: BCE-with-logits for K == 1, softmax CE for K >= 2.

    Ignored pixels get an arbitrary finite value; weight them out with :func:`pixel_weights`.
    """
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], (target == 1).float(), reduction="none")
    return F.cross_entropy(logits, target.long().masked_fill(~valid, 0), reduction="none")


def pixel_weights(target: Tensor, valid: Tensor, num_classes: int, class_weights: Tensor | None) -> Tensor:
    """``(N, H, W)`` weight of each pixel: its class weight (1 without weights), 0 where ignored."""
    if class_weights is None:
        return valid.float()
    expected = 2 if num_classes == 1 else num_classes
    if class_weights.numel() != expected:
        raise ValueError(f"class_weights needs {expected} values for num_classes={num_classes}")
    class_weights = class_weights.to(device=target.device, dtype=torch.float32)
    if num_classes == 1:
        weights = torch.where(target == 1, class_weights[1], class_weights[0])
    else:
        weights = class_weights[target.long().masked_fill(~valid, 0)]
    return weights * valid


def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """``sum(values * weights) / sum(weights)``, and 0 when all weights are 0 (fully ignored batch)."""
    return (values * weights).sum() / weights.sum().clamp_min(torch.finfo(values.dtype).tiny)


def cross_entropy_loss(
    logits: Tensor, target: Tensor, *, ignore_index: int | None = None, class_weights: Tensor | None = None
) -> Tensor:
    """Mean (class-weighted) cross-entropy over valid pixels: BCE for K == 1, softmax CE for K >= 2."""
    _check_shapes(logits, target)
    valid = valid_mask(target, ignore_index)
    weights = pixel_weights(target, valid, logits.shape[1], class_weights)
    return weighted_mean(pixel_cross_entropy(logits, target, valid), weights)


def focal_loss(
    logits: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    *,
    ignore_index: int | None = None,
    class_weights: Tensor | None = None,
) -> Tensor:
    """Focal loss (Lin et al. 2017): ``(1 - p_t)**gamma * CE`` averaged over valid pixels; gamma=0 is CE."""
    _check_shapes(logits, target)
    valid = valid_mask(target, ignore_index)
    ce = pixel_cross_entropy(logits, target, valid)
    p_true = torch.exp(-ce)
    weights = pixel_weights(target, valid, logits.shape[1], class_weights)
    return weighted_mean((1 - p_true) ** gamma * ce, weights)


class SegmentationLoss(nn.Module):
    """Holds the loss options; ``forward(logits (N, K, [D,] H, W), target (N, [D,] H, W)) -> scalar``.

    Kinds: ``dice_ce`` (Dice + cross-entropy, as nnU-Net), ``ce``, ``dice``, ``focal``.
    """

    def __init__(
        self,
        kind: LossKind,
        num_classes: int,
        ignore_index: int | None = None,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_mode(LossKind, kind, "loss")
        expected = 2 if num_classes == 1 else num_classes
        if class_weights is not None and len(class_weights) != expected:
            raise ConfigError(
                "class_weights", f"needs {expected} values for num_classes={num_classes}, got {len(class_weights)}"
            )
        self.kind = kind
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Args: logits ``(N, K, [D,] H, W)``; target ``(N, [D,] H, W)`` class indices. Returns a scalar."""
        ce_options = {"ignore_index": self.ignore_index, "class_weights": self.class_weights}
        if self.kind == "ce":
            return cross_entropy_loss(logits, target, **ce_options)
        if self.kind == "focal":
            return focal_loss(logits, target, **ce_options)
        dice = soft_dice_loss(logits, target, num_classes=self.num_classes, ignore_index=self.ignore_index)
        if self.kind == "dice":
            return dice
        return dice + cross_entropy_loss(logits, target, **ce_options)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_classes={self.num_classes}, ignore_index={self.ignore_index}"


def deep_supervision_weights(n: int) -> list[float]:
    """Loss weights of ``n`` outputs, full resolution first: halved per stage, summing to 1 (nnU-Net's)."""
    raw = [0.5**i for i in range(n)]
    return [w / sum(raw) for w in raw]


def downsampled_target(target: Tensor, size: Sequence[int]) -> Tensor:
    """``target`` ``(N, *spatial)`` at ``size`` by nearest sampling (a stride-``s`` output sees ``target[..., ::s]``;
    an ignore label stays one)."""
    if tuple(target.shape[1:]) == tuple(size):
        return target
    return F.interpolate(target[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(target.dtype)


class DeepSupervisionLoss(nn.Module):
    """``loss`` over a model's outputs at several resolutions (:meth:`unetcore.model.UNet.forward_deep`): the
    sum of each output's loss against the target sampled to its size, weighted by
    :func:`deep_supervision_weights`. A plain tensor is the one full-resolution output."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, outputs: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
        weights = deep_supervision_weights(len(outs))
        total = weights[0] * self.loss(outs[0].float(), target)
        for w, out in zip(weights[1:], outs[1:]):
            total = total + w * self.loss(out.float(), downsampled_target(target, out.shape[2:]))
        return total
