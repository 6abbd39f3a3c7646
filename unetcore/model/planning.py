"""How a UNet pools and convolves along each axis, planned from the voxel spacing (nnU-Net's rule).

A volume whose slices are much thicker than its pixels (CT at 5 mm x 0.8 mm x 0.8 mm) should not be pooled along z
until the in-plane axes have been pooled to a comparable spacing, and its first convolutions should not mix slices
(kernel 1 along z: 1x3x3). :func:`plan_pooling` gives each stage's pooling and kernels per axis; the result goes
into :class:`~unetcore.config.ModelConfig` ``pool`` and ``kernels``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MIN_FEATURE_MAP = 4
"""Smallest edge of a feature map after pooling (nnU-Net's ``min_feature_map_size``): an axis pools only while
its feature map is at least twice this."""


@dataclass(frozen=True)
class PoolingPlan:
    """Per-stage pooling (``depth`` lists) and kernels (``depth + 1`` lists: stem first, bottleneck last), per axis."""

    pool: list[list[int]]
    kernels: list[list[int]]

    @property
    def multiple(self) -> tuple[int, ...]:
        """Per axis, the product of its pooling factors: input sizes are padded to multiples of it."""
        return tuple(math.prod(p[axis] for p in self.pool) for axis in range(len(self.kernels[0])))


def plan_pooling(spacing: Sequence[float], patch: Sequence[int], depth: int) -> PoolingPlan:
    """Pooling and kernels of a ``depth``-stage UNet for voxels of ``spacing`` and patches of ``patch`` (same axes).

    At each stage, following nnU-Net's ``get_pool_and_conv_props``: among the axes whose feature map is still at least
    ``2 * MIN_FEATURE_MAP``, those whose current spacing is less than twice the finest of them are pooled by 2 (their
    spacing doubles); the others keep stride 1, so a coarse axis waits until the fine ones have caught up. An axis'
    kernel is 1 until its spacing first comes within twice the finest spacing, then 3 for good; the bottleneck
    always uses 3. Isotropic spacing gives 2 and 3 everywhere (the default UNet).

    Raises:
        ValueError: mismatched or non-positive inputs, or a patch too small to pool ``depth`` times.
    """
    if len(spacing) != len(patch) or len(spacing) not in (2, 3):
        raise ValueError(f"spacing {tuple(spacing)} and patch {tuple(patch)} need the same 2 or 3 axes")
    if min(spacing) <= 0 or min(patch) < 1 or depth < 1:
        raise ValueError(f"spacing and patch must be positive and depth >= 1; got {tuple(spacing)}, {tuple(patch)}, "
                         f"{depth}")
    dims = len(spacing)
    current, size = [float(s) for s in spacing], [int(n) for n in patch]
    kernel = [1] * dims
    pools, kernels = [], []
    for stage in range(depth):
        finest = min(current)
        kernel = [3 if k == 3 or current[d] / finest < 2 else 1 for d, k in enumerate(kernel)]
        kernels.append(list(kernel))
        room = [d for d in range(dims) if size[d] >= 2 * MIN_FEATURE_MAP]
        if not room:
            raise ValueError(f"patch {tuple(patch)} is too small for {depth} stages: before stage {stage + 1} every "
                             f"axis is under {2 * MIN_FEATURE_MAP}; use a larger patch or a smaller depth")
        finest_room = min(current[d] for d in room)
        pooled = {d for d in room if current[d] / finest_room < 2}
        pools.append([2 if d in pooled else 1 for d in range(dims)])
        for d in pooled:
            current[d] *= 2
            size[d] = math.ceil(size[d] / 2)
    kernels.append([3] * dims)
    return PoolingPlan(pools, kernels)
