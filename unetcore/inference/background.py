"""Skipping what has no signal: a tissue (foreground) mask from a low pyramid level decides which tiles run.

Slides and scans are mostly empty glass or dark background. Before any block runs, the driver reads the store's
first pyramid level of at most :data:`MASK_LEVEL_PIXELS` (2 MP; a volume's level of at most 2 M voxels), averages
its channels and splits it with Otsu's threshold (:func:`tissue_mask`). Which side is background is decided from
the data, not assumed: the background is the class that lies tight and far from the threshold (in its own standard
deviations: glass in brightfield, where tissue is darker; the dark, noisy floor in fluorescence). When that
separation is weak (below :data:`MIN_SEPARATION`) or the other class is about as well separated (no side is
clearly the flat background), nothing is skipped. The tissue is dilated by one tile, and a tile of the global
grid runs only if its footprint meets the dilated tissue (:func:`tile_keep_mask`, one bool per grid tile,
consulted by every block).

A block's pixels that no kept tile covers get exact background: logits ``-inf`` (binary: probability 0) or
``[0, -inf, ...]`` (multi-class: probability 1 for class 0), label 0. Pixels covered by a kept tile are blended
from the kept tiles only. Images and volumes take the same code path.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from unetcore.inference.stitch import Predictor, Reader, predict_block
from unetcore.inference.windows import Block, Shape, TileGrid, plan_blocks

__all__ = [
    "MASK_LEVEL_PIXELS",
    "MIN_SEPARATION",
    "TissueMask",
    "background_evaluations",
    "exact_background_logits",
    "load_keep_mask",
    "masked_block_logits",
    "skips_background",
    "tile_keep_mask",
    "tissue_mask",
]

MASK_LEVEL_PIXELS = 2_000_000
"""The tissue mask is computed on the first pyramid level with at most this many pixels (voxels)."""

MIN_SEPARATION = 3.0
"""How far (in its own standard deviations) Otsu's threshold must lie from the background class's mean.

A unimodal histogram gives about 1.3 (Gaussian) or 1.7 (flat); slide glass or a dark fluorescence floor against
tissue gives well above 3 (at most 0.13 % of Gaussian background pixels beyond the threshold)."""

DOMINANCE = 2.0
"""The background class must be this many times better separated than the other one (else: no clear side)."""


@dataclass(frozen=True)
class TissueMask:
    """Where the signal is, on a low pyramid level.

    ``mask``: bool, True on tissue (dilated by one tile when built by :func:`tissue_mask`); ``factors``: level-0
    pixels per mask pixel, per spatial axis; ``level``: the store level it was computed on; ``threshold`` and
    ``separation`` (the background's, see :data:`MIN_SEPARATION`); ``dark_tissue``: True when the background is
    the brighter class.
    """

    mask: np.ndarray
    factors: tuple[float, ...]
    level: int
    threshold: float
    separation: float
    dark_tissue: bool

    @property
    def tissue_fraction(self) -> float:
        """Share of the (dilated) mask that is tissue."""
        return float(self.mask.mean())


def _mask_level(root: zarr.Group, max_pixels: int) -> int | None:
    """The first image level of the store with at most ``max_pixels`` spatial pixels (voxels), or None."""
    levels = sorted(int(k) for k in root.array_keys() if k.isdigit())
    for level in levels:
        if math.prod(root[str(level)].shape[1:]) <= max_pixels:
            return level
    return None


def tissue_mask(root: zarr.Group, tile: Shape, max_pixels: int = MASK_LEVEL_PIXELS
                ) -> tuple[TissueMask | None, str]:
    """The dilated tissue mask of an image store, or None and why nothing can be skipped.

    ``tile`` is the inference tile (level-0 pixels per axis): the tissue is dilated by it.
    """
    level = _mask_level(root, max_pixels)
    if level is None:
        return None, f"no pyramid level of at most {max_pixels:,} pixels"
    low = np.asarray(root[str(level)][:], dtype=np.float32).mean(axis=0)
    full = root["0"].shape[1:]
    factors = tuple(n / m for n, m in zip(full, low.shape))
    values = low.ravel()
    if values.size < 2 or float(values.min()) == float(values.max()):
        return None, "the image is constant"
    from skimage.filters import threshold_otsu  # imported here: only a slide's mask needs it (start-up)

    threshold = float(threshold_otsu(values))
    bright = low > threshold
    share = float(bright.mean())
    if share in (0.0, 1.0):
        return None, "Otsu's threshold does not split the image"
    spread = []  # per class (dark, bright): the threshold's distance from its mean, in its standard deviations
    for values_c in (low[~bright], low[bright]):
        std = float(values_c.std())
        gap = abs(threshold - float(values_c.mean()))
        spread.append(np.inf if std == 0 else gap / std)
    dark_tissue = spread[1] > spread[0]  # the tighter class, far from the threshold, is the background
    separation, other = max(spread), min(spread)
    if separation < MIN_SEPARATION:
        return None, f"weak foreground/background separation ({separation:.2f} < {MIN_SEPARATION})"
    if np.isinf(other) or separation < DOMINANCE * other:
        return None, f"no class is clearly the flat background (separations {spread[0]:.3g}, {spread[1]:.3g})"
    tissue = ~bright if dark_tissue else bright
    radius = [max(1, math.ceil(t / f)) for t, f in zip(tile, factors)]
    from scipy import ndimage  # imported here, as threshold_otsu

    dilated = ndimage.maximum_filter(tissue, size=[2 * r + 1 for r in radius], mode="constant", cval=False)
    return TissueMask(dilated, factors, level, threshold, separation, dark_tissue), (
        f"Otsu on level {level} {'x'.join(map(str, low.shape))}, separation {separation:.2f}, "
        f"{'dark' if dark_tissue else 'bright'} tissue")


def tile_keep_mask(grid: TileGrid, tissue: TissueMask) -> np.ndarray:
    """One bool per tile of ``grid`` (shape ``len(starts)`` per axis): True where the tile's footprint meets
    ``tissue.mask``."""
    mask = tissue.mask.astype(np.int64)
    integral = np.pad(mask, [(1, 0)] * mask.ndim).cumsum(axis=0)
    for axis in range(1, mask.ndim):
        integral = integral.cumsum(axis=axis)
    lows, highs = [], []
    for starts, t, f, n in zip(grid.starts, grid.tile, tissue.factors, mask.shape):
        s = np.asarray(starts, dtype=np.float64)
        lows.append(np.clip(np.floor(s / f).astype(np.int64), 0, n))
        highs.append(np.clip(np.ceil((s + t) / f).astype(np.int64), 0, n))
    total = np.zeros(tuple(len(s) for s in grid.starts), dtype=np.int64)
    for corner in itertools.product((0, 1), repeat=mask.ndim):
        index = np.ix_(*[(h if c else lo) for c, lo, h in zip(corner, lows, highs)])
        sign = (-1) ** (mask.ndim - sum(corner))
        total += sign * integral[index]
    return total > 0


def _index_ranges(grid: TileGrid, block: Block) -> tuple[slice, ...]:
    """Per axis, the range of tile indices whose tiles touch ``block`` (a contiguous run: starts are sorted)."""
    out = []
    for starts, t, lo, hi in zip(grid.starts, grid.tile, block.start, block.stop):
        s = np.asarray(starts)
        out.append(slice(int(np.searchsorted(s, lo - t, side="right")), int(np.searchsorted(s, hi, side="left"))))
    return tuple(out)


def exact_background_logits(num_classes: int, shape: Shape) -> np.ndarray:
    """Logits ``(K, *shape)`` whose probabilities are exactly background: binary ``-inf`` (sigmoid 0);
    multi-class 0 for class 0 and ``-inf`` for the others (softmax exactly one-hot)."""
    out = np.full((max(1, num_classes), *shape), -np.inf, dtype=np.float32)
    if num_classes > 1:
        out[0] = 0.0
    return out


def masked_block_logits(read: Reader, image_shape: Shape, channels: int, predictor: Predictor, grid: TileGrid,
                        block: Block, batch_size: int, keep: np.ndarray, num_classes: int) -> np.ndarray:
    """:func:`~unetcore.inference.stitch.predict_block` computing only the tiles ``keep`` marks; the block's
    pixels no kept tile covers get :func:`exact_background_logits` (a block of no kept tile reads nothing)."""
    ranges = _index_ranges(grid, block)
    local = keep[ranges]
    if local.all():
        return predict_block(read, image_shape, channels, predictor, grid, block, batch_size)
    out = exact_background_logits(num_classes, block.shape)
    if not local.any():
        return out
    per_axis = [grid.starts[a][r] for a, r in enumerate(ranges)]
    tiles = [origin for origin, k in zip(itertools.product(*per_axis), local.ravel()) if k]
    logits = predict_block(read, image_shape, channels, predictor, grid, block, batch_size, tiles=tiles)
    covered = np.zeros(block.shape, dtype=bool)
    for origin in tiles:
        covered[tuple(slice(max(o - b0, 0), max(0, min(o + t, b1) - b0))
                      for o, t, b0, b1 in zip(origin, grid.tile, block.start, block.stop))] = True
    out[:, covered] = logits[:, covered]
    return out


def background_evaluations(grid: TileGrid, block_shape: Shape, keep: np.ndarray) -> int:
    """Tile evaluations that the keep mask saves with blocks of ``block_shape`` (a tile counts once per block it
    touches, as :func:`~unetcore.inference.windows.tile_evaluations` counts them)."""
    return sum(int((~keep[_index_ranges(grid, b)]).sum()) for b in plan_blocks(grid.shape, block_shape))


def skips_background(option: bool | None, source_attrs: dict) -> bool:
    """Whether a prediction skips background: as asked, else (None) only for slides, i.e. stores ingested at an
    mpp (``level0`` in their attributes) or from a pyramidal TIFF (``source_levels`` > 1)."""
    if option is not None:
        return option
    return "level0" in source_attrs or int(source_attrs.get("source_levels", 1)) > 1


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> np.ndarray:
    return np.load(path)


def load_keep_mask(path: str | Path) -> np.ndarray:
    """A keep mask saved with ``np.save`` by the driver, loaded once per process (cached by path and mtime)."""
    return _load(str(path), Path(path).stat().st_mtime_ns)
