"""Named UNet building blocks: double conv, down, up and the 1x1 head.

Each block maps ``(N, C_in, H, W)`` tensors to ``(N, C_out, H', W')``; the spatial change is in its docstring.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from unetcore.modes import NormKind, UpsampleKind


def group_count(channels: int, max_groups: int = 8) -> int:
    """Largest number of groups ``<= max_groups`` that divides ``channels`` (for GroupNorm)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def make_norm(kind: NormKind, channels: int) -> nn.Module:
    """Normalisation layer of the given kind over ``channels`` feature maps."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    raise ValueError(f"unknown norm {kind!r}; valid: batch, instance, group")


class DoubleConv(nn.Sequential):
    """(conv3x3 -> norm -> ReLU) x 2; keeps H, W."""

    def __init__(self, in_channels: int, out_channels: int, norm: NormKind = "batch") -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool then DoubleConv; (H, W) -> (H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int, norm: NormKind = "batch") -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels, norm))


class Up(nn.Module):
    """Up-sample x2 to ``out_channels``, concatenate the skip, DoubleConv; (H, W) -> (2H, 2W)."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: NormKind = "batch", mode: UpsampleKind = "transpose"
    ) -> None:
        super().__init__()
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        elif mode == "bilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, kernel_size=1),
            )
        else:
            raise ValueError(f"unknown upsample mode {mode!r}; valid: transpose, bilinear")
        self.conv = DoubleConv(2 * out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Args: x ``(N, in, H, W)``; skip ``(N, out, 2H, 2W)``. Returns ``(N, out, 2H, 2W)``."""
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class OutHead(nn.Conv2d):
    """1x1 conv from features to per-class logits; keeps H, W."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes, kernel_size=1)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference with every ``Conv2d -> BatchNorm2d`` pair of a ``Sequential`` folded into
    one convolution (the norm's running statistics and affine go into the conv's weights and bias).

    Equal to the eval-mode model up to float rounding (~1e-7 on logits), and about 5 % faster on CPU
    (BENCHMARKS.md, inference): the norm's pass over every activation is gone. Other norms are left as they are.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
    return folded
