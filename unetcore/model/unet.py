"""The UNet assembled from :mod:`unetcore.model.parts`, for inputs of any height and width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unetcore.config import ModelConfig
from unetcore.model.parts import DoubleConv, Down, OutHead, Up

# (top, left, height, width) of the original image inside the padded one.
Box = tuple[int, int, int, int]


def padded_size(size: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ``>= size`` and at least ``2 * multiple``.

    The floor of two keeps the bottleneck at least 2x2, so batch/instance/group norm always see more than
    one value per channel (a 1x1 bottleneck makes instance norm fail and the others degenerate).
    """
    return max(-(-size // multiple) * multiple, 2 * multiple)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, Box]:
    """Pad ``(N, C, H, W)`` evenly on both sides so H and W fit :func:`padded_size`.

    Reflect padding when the image is large enough for it (no artificial edge), else replicate, which
    works down to 1x1. Returns the padded tensor and the box to crop back with :func:`crop`.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = padded_size(h, multiple) - h, padded_size(w, multiple) - w
    top, left = pad_h // 2, pad_w // 2
    bottom, right = pad_h - top, pad_w - left
    if pad_h == pad_w == 0:
        return x, (0, 0, h, w)
    mode = "reflect" if max(top, bottom) < h and max(left, right) < w else "replicate"
    return F.pad(x, (left, right, top, bottom), mode=mode), (top, left, h, w)


def crop(x: torch.Tensor, box: Box) -> torch.Tensor:
    """Cut ``box`` out of the last two dims of ``x``."""
    top, left, h, w = box
    return x[..., top : top + h, left : left + w]


class UNet(nn.Module):
    """UNet (Ronneberger et al. 2015) with ``config.depth`` stages of widths ``base_channels * 2**i``.

    ``forward`` maps ``(N, in_channels, H, W)`` to logits ``(N, num_classes, H, W)`` for any H, W by
    padding to a multiple of ``2**depth`` and cropping back.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.base_channels * 2**i for i in range(config.depth + 1)]
        self.stem = DoubleConv(config.in_channels, widths[0], config.norm)
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1], config.norm) for i in range(config.depth))
        self.dropout = nn.Dropout2d(config.dropout)
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i], config.norm, config.upsample) for i in reversed(range(config.depth))
        )
        self.head = OutHead(widths[0], config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(N, in_channels, H, W)``. Returns logits ``(N, num_classes, H, W)``."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        x, box = pad_to_multiple(x, 2**self.config.depth)
        skips = []
        h = self.stem(x)
        for down in self.downs:
            skips.append(h)
            h = down(h)
        h = self.dropout(h)
        for up, skip in zip(self.ups, reversed(skips)):
            h = up(h, skip)
        return crop(self.head(h), box)


def build_model(config: ModelConfig) -> UNet:
    """The UNet described by ``config``, freshly initialised."""
    return UNet(config)
