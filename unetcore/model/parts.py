"""Named UNet building blocks: double conv, down, up and the 1x1 head, for 2-D or 3-D inputs.

Each block maps ``(N, C_in, *spatial)`` tensors to ``(N, C_out, *spatial')``, with ``spatial`` ``(H, W)`` when
``dims=2`` (the default) or ``(D, H, W)`` when ``dims=3``; the spatial change is in its docstring. Kernels, pooling
and up-sampling factors are one int (every axis) or one value per axis, so a 3-D stage can leave a coarse axis alone
(pool ``(1, 2, 2)``, kernel ``(1, 3, 3)``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unetcore.modes import NormKind, UpsampleKind

PerAxis = int | Sequence[int]
"""One size for every spatial axis, or one per axis."""

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_BATCH = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_DROPOUT = {2: nn.Dropout2d, 3: nn.Dropout3d}
_LINEAR = {2: "bilinear", 3: "trilinear"}


def _check_dims(dims: int) -> int:
    if dims not in _CONV:
        raise ValueError(f"spatial dims must be 2 or 3, got {dims!r}")
    return dims


def _per_axis(size: PerAxis) -> int | tuple[int, ...]:
    """``size`` as torch takes it: an int stays an int (the 2-D layers stay exactly as before), a sequence a tuple."""
    return int(size) if isinstance(size, int) else tuple(int(v) for v in size)


def _same_padding(kernel: int | tuple[int, ...]) -> int | tuple[int, ...]:
    return kernel // 2 if isinstance(kernel, int) else tuple(k // 2 for k in kernel)


def group_count(channels: int, max_groups: int = 8) -> int:
    """Largest number of groups ``<= max_groups`` that divides ``channels`` (for GroupNorm)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def make_norm(kind: NormKind, channels: int, dims: int = 2) -> nn.Module:
    """Normalisation layer of the given kind over ``channels`` feature maps of ``dims`` spatial axes."""
    dims = _check_dims(dims)
    if kind == "batch":
        return _BATCH[dims](channels)
    if kind == "instance":
        return _INSTANCE[dims](channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    raise ValueError(f"unknown norm {kind!r}; valid: batch, instance, group")


def make_dropout(p: float, dims: int = 2) -> nn.Module:
    """Channel dropout (whole feature maps) for ``dims`` spatial axes."""
    return _DROPOUT[_check_dims(dims)](p)


class DoubleConv(nn.Sequential):
    """(conv ``kernel`` -> norm -> ReLU) x 2 with same padding; keeps the spatial size (odd kernels)."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: NormKind = "batch", kernel: PerAxis = 3, dims: int = 2
    ) -> None:
        conv, k = _CONV[_check_dims(dims)], _per_axis(kernel)
        super().__init__(
            conv(in_channels, out_channels, kernel_size=k, padding=_same_padding(k), bias=False),
            make_norm(norm, out_channels, dims),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, kernel_size=k, padding=_same_padding(k), bias=False),
            make_norm(norm, out_channels, dims),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """Max-pool by ``pool`` (per axis) then DoubleConv; each axis shrinks by its factor: 2 maps (H, W) to (H/2, W/2)."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: NormKind = "batch", pool: PerAxis = 2, kernel: PerAxis = 3,
        dims: int = 2,
    ) -> None:
        pool_layer = _POOL[_check_dims(dims)](_per_axis(pool))
        super().__init__(pool_layer, DoubleConv(in_channels, out_channels, norm, kernel, dims))


class Up(nn.Module):
    """Up-sample by ``scale`` (per axis) to ``out_channels``, concatenate the skip, DoubleConv; (H, W) -> (2H, 2W)."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: NormKind = "batch", mode: UpsampleKind = "transpose",
        scale: PerAxis = 2, kernel: PerAxis = 3, dims: int = 2,
    ) -> None:
        super().__init__()
        dims, s = _check_dims(dims), _per_axis(scale)
        if mode == "transpose":
            self.up: nn.Module = _CONV_T[dims](in_channels, out_channels, kernel_size=s, stride=s)
        elif mode == "bilinear":  # trilinear in 3-D
            factor = s if isinstance(s, int) else tuple(float(v) for v in s)
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=factor, mode=_LINEAR[dims], align_corners=False),
                _CONV[dims](in_channels, out_channels, kernel_size=1),
            )
        else:
            raise ValueError(f"unknown upsample mode {mode!r}; valid: transpose, bilinear")
        self.conv = DoubleConv(2 * out_channels, out_channels, norm, kernel, dims)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Args: x ``(N, in, *s)``; skip ``(N, out, *(s * scale))``. Returns ``(N, out, *(s * scale))``."""
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class OutHead(nn.Module):
    """1x1 (1x1x1) conv from features to per-class logits; keeps the spatial size.

    Holds ``weight`` and ``bias`` itself (as a plain convolution does), so its state_dict keys are ``weight`` and
    ``bias`` whatever ``dims``.
    """

    def __init__(self, in_channels: int, num_classes: int, dims: int = 2) -> None:
        super().__init__()
        conv = _CONV[_check_dims(dims)](in_channels, num_classes, kernel_size=1)
        self.in_channels, self.out_channels, self.dims = in_channels, num_classes, dims
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(N, in_channels, *spatial)``. Returns ``(N, num_classes, *spatial)``."""
        return (F.conv2d if self.dims == 2 else F.conv3d)(x, self.weight, self.bias)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference with every ``Conv -> BatchNorm`` pair (2-D or 3-D) of a ``Sequential``
    folded into one convolution (the norm's running statistics and affine go into the conv's weights and bias).

    Equal to the eval-mode model up to float rounding (~1e-7 on logits), and about 5 % faster on CPU
    (BENCHMARKS.md, inference): the norm's pass over every activation is gone. Other norms are left as they are.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = ((nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if any(isinstance(conv, c) and isinstance(norm, n) for c, n in pairs) and norm.track_running_stats:
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
    return folded
