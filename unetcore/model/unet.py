"""The UNet assembled from :mod:`unetcore.model.parts`, 2-D or 3-D, for inputs of any size."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from unetcore.model.parts import DoubleConv, Down, OutHead, PerAxis, Up, make_dropout

if TYPE_CHECKING:  # annotations only: the UNet reads plain attributes (a benchmark builds it without pydantic)
    from unetcore.config import ModelConfig

Box = tuple[int, ...]
"""Where the original input lies inside the padded one: its offsets, then its sizes, one per spatial axis
(``(top, left, height, width)`` in 2-D, ``(front, top, left, depth, height, width)`` in 3-D)."""


def padded_size(size: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ``>= size`` and at least ``2 * multiple``.

    The floor of two keeps the bottleneck at least 2 along every axis, so batch/instance/group norm always see more
    than one value per channel (a 1x1 bottleneck makes instance norm fail and the others degenerate). Written without
    a comparison (``max(k, 2) == (k + 2 + |k - 2|) // 2``) so that it also works on the traced sizes of an ONNX or
    TorchScript export (:mod:`unetcore.model.export`), which then keeps the padding symbolic instead of frozen; and
    with positive operands only, as ONNX's integer division truncates where Python's floors.
    """
    k = (size + multiple - 1) // multiple
    return (k + 2 + abs(k - 2)) // 2 * multiple


def pad_to_multiple(x: torch.Tensor, multiple: PerAxis) -> tuple[torch.Tensor, Box]:
    """Pad ``(N, C, *spatial)`` evenly on both sides so each spatial size fits :func:`padded_size`.

    ``multiple`` is one int for every spatial axis, or one per axis (a 3-D UNet that pools some axes less).
    Reflect padding when the input is large enough for it (no artificial edge), else replicate, which works down
    to a single pixel. Returns the padded tensor and the box to crop back with :func:`crop`.
    """
    sizes = tuple(x.shape[2:])
    multiples = (multiple,) * len(sizes) if isinstance(multiple, int) else tuple(multiple)
    if len(multiples) != len(sizes):
        raise ValueError(f"{len(multiples)} multiples for {len(sizes)} spatial axes of {tuple(x.shape)}")
    pads = [padded_size(n, m) - n for n, m in zip(sizes, multiples)]
    low = tuple(p // 2 for p in pads)
    if not any(pads):
        return x, (*low, *sizes)
    high = [p - lo for p, lo in zip(pads, low)]
    mode = "reflect" if all(max(lo, hi) < n for lo, hi, n in zip(low, high, sizes)) else "replicate"
    torch_pad = [v for lo, hi in zip(reversed(low), reversed(high)) for v in (lo, hi)]  # last axis first
    return F.pad(x, torch_pad, mode=mode), (*low, *sizes)


def crop(x: torch.Tensor, box: Box) -> torch.Tensor:
    """Cut ``box`` out of the last ``len(box) // 2`` dims of ``x``."""
    n = len(box) // 2
    return x[(..., *(slice(o, o + s) for o, s in zip(box[:n], box[n:])))]


def stage_pools(config: ModelConfig) -> list[PerAxis]:
    """The pooling factor of each down stage: ``config.pool``, or 2 along every axis."""
    return [list(p) for p in config.pool] if config.pool is not None else [2] * config.depth


def stage_kernels(config: ModelConfig) -> list[PerAxis]:
    """The convolution kernel of each stage, stem first and bottleneck last: ``config.kernels``, or 3."""
    return [list(k) for k in config.kernels] if config.kernels is not None else [3] * (config.depth + 1)


def size_multiple(config: ModelConfig) -> tuple[int, ...]:
    """Per spatial axis, the factor the input is padded to: the product of that axis' pooling factors."""
    pools = [[p] * config.spatial_dims if isinstance(p, int) else p for p in stage_pools(config)]
    return tuple(math.prod(p[axis] for p in pools) for axis in range(config.spatial_dims))


class UNet(nn.Module):
    """UNet (Ronneberger et al. 2015) with ``config.depth`` stages of widths ``base_channels * 2**i``.

    ``config.spatial_dims`` makes it 2-D or 3-D; ``config.pool`` and ``config.kernels`` give each stage's pooling
    and kernels per axis (see :func:`unetcore.model.plan_pooling`). ``forward`` maps ``(N, in_channels, *spatial)``
    to logits ``(N, num_classes, *spatial)`` for any size by padding to :func:`size_multiple` and cropping back.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        dims, pools, kernels = config.spatial_dims, stage_pools(config), stage_kernels(config)
        widths = [config.base_channels * 2**i for i in range(config.depth + 1)]
        self.multiple = size_multiple(config)
        self.stem = DoubleConv(config.in_channels, widths[0], config.norm, kernels[0], dims)
        self.downs = nn.ModuleList(
            Down(widths[i], widths[i + 1], config.norm, pools[i], kernels[i + 1], dims) for i in range(config.depth)
        )
        self.dropout = make_dropout(config.dropout, dims)
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i], config.norm, config.upsample, pools[i], kernels[i], dims)
            for i in reversed(range(config.depth))
        )
        self.head = OutHead(widths[0], config.num_classes, dims)
        # deep supervision: a head on each decoder output but the first (the coarsest, which nnU-Net weighs 0) and
        # the last (full resolution: ``head``), in decoder order
        stages = reversed(range(1, config.depth - 1))
        self.aux_heads = nn.ModuleList(OutHead(widths[i], config.num_classes, dims)
                                       for i in stages) if config.deep_supervision else None

    def _checked(self, x: torch.Tensor) -> None:
        dims = self.config.spatial_dims
        if x.ndim != dims + 2 or x.shape[1] != self.config.in_channels:
            axes = "H, W" if dims == 2 else "D, H, W"
            raise ValueError(f"expected input (N, {self.config.in_channels}, {axes}), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(N, in_channels, [D,] H, W)``. Returns logits ``(N, num_classes, [D,] H, W)``."""
        self._checked(x)
        x, box = pad_to_multiple(x, self.multiple)
        return crop(self.forward_padded(x), box)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of an input whose spatial sizes are already multiples of ``self.multiple`` (same sizes out)."""
        return self._decoded(x, with_aux=False)[-1]

    def forward_deep(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Training outputs with deep supervision: the logits (as :meth:`forward`), then each auxiliary head's, finest
        first, at its stage's resolution (cropped like the logits, to ``ceil(size / stride)`` per axis). Without
        ``deep_supervision``: ``[forward(x)]``."""
        self._checked(x)
        x, box = pad_to_multiple(x, self.multiple)
        stages = self._decoded(x, with_aux=True)
        outputs = [crop(stages[-1], box)]
        n = len(box) // 2
        for h in reversed(stages[:-1]):
            stride = [a // b for a, b in zip(x.shape[2:], h.shape[2:])]
            outputs.append(crop(h, (*(o // s for o, s in zip(box[:n], stride)),
                                    *(-(-size // s) for size, s in zip(box[n:], stride)))))
        return outputs

    def _decoded(self, x: torch.Tensor, with_aux: bool) -> list[torch.Tensor]:
        """The heads' logits of a padded input: the auxiliary heads' (coarsest first; none unless ``with_aux``),
        then the main head's."""
        skips = []
        h = self.stem(x)
        for down in self.downs:
            skips.append(h)
            h = down(h)
        h = self.dropout(h)
        heads = list(self.aux_heads) if with_aux and self.aux_heads is not None else []
        outputs = []
        for i, (up, skip) in enumerate(zip(self.ups, reversed(skips))):
            h = up(h, skip)
            if 1 <= i <= len(heads):  # decoder output i has head i - 1 (output 0, the coarsest, has none)
                outputs.append(heads[i - 1](h))
        outputs.append(self.head(h))
        return outputs


def build_model(config: ModelConfig) -> UNet:
    """The UNet described by ``config``, freshly initialised."""
    return UNet(config)
