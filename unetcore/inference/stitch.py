"""Blending of tile predictions: the per-block kernel and the whole-image reference, for images and volumes.

``predict_block`` is the kernel that a distributed driver runs once per output block: it reads the
block plus the margin its tiles need, predicts those tiles in batches and blends them with the global
Gaussian weights, keeping only the block's pixels. Because the tile grid and the weights are global,
the result equals the same pixels of ``sliding_window`` (classic nnU-Net inference on the whole image)
up to float rounding, while memory stays proportional to one block plus one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from unetcore.inference.windows import (
    Block,
    Shape,
    TileGrid,
    divide_by_weight_sum,
    gaussian_axis_sums,
    gaussian_weight_sum,
    gaussian_weights,
    padded_shape,
    plan_blocks,
    region_for_tiles,
    tile_batches,
    tile_overlap,
    tile_window,
    tiles_for_block,
)

Predictor = Callable[[np.ndarray], np.ndarray]
"""Maps a batch ``(B, C, *tile)`` float32 to ``(B, K, *tile)`` float32 (logits; blending is linear)."""

Reader = Callable[..., np.ndarray]
"""Called with one slice per spatial axis (all inside the image), returns the image's ``(C, *box)`` pixels there."""

def _predict(predictor: Predictor, batch: np.ndarray) -> np.ndarray:
    """Run ``predictor`` and check it kept the batch and spatial sizes."""
    out = np.asarray(predictor(batch), dtype=np.float32)
    b, spatial = batch.shape[0], batch.shape[2:]
    if out.ndim != batch.ndim or out.shape[0] != b or out.shape[2:] != spatial:
        expected = ", ".join(str(v) for v in (b, "K", *spatial))
        raise ValueError(f"predictor mapped {batch.shape} to {out.shape}; expected ({expected})")
    return out


def read_padded(read: Reader, image_shape: Shape, region: Block, channels: int) -> np.ndarray:
    """Pixels of ``region`` as ``(C, *region.shape)`` float32, zero where the region leaves the image.

    A region inside the image is ``read``'s own array (no second copy: an interior block's region costs no more
    than an edge block's); one that leaves it is copied into a zeroed buffer.
    """
    lo = [max(a, 0) for a in region.start]
    hi = [min(b, n) for b, n in zip(region.stop, image_shape)]
    if list(region.start) == lo and list(region.stop) == hi:
        inner = np.asarray(read(*region.slices), dtype=np.float32)
        if inner.shape == (channels, *region.shape):
            return inner
        return np.broadcast_to(inner, (channels, *region.shape)).astype(np.float32)
    out = np.zeros((channels, *region.shape), dtype=np.float32)
    if all(a < b for a, b in zip(lo, hi)):
        inside = tuple(slice(a - r, b - r) for a, b, r in zip(lo, hi, region.start))
        out[(slice(None), *inside)] = read(*(slice(a, b) for a, b in zip(lo, hi)))
    return out


def predict_block(
    read: Reader,
    image_shape: Shape,
    channels: int,
    predictor: Predictor,
    grid: TileGrid,
    block: Block,
    batch_size: int,
    weights: np.ndarray | None = None,
    tiles: Sequence[Shape] | None = None,
) -> np.ndarray:
    """Blended prediction ``(K, *block.shape)`` float32 of one block, equal to whole-image inference there.

    Reads the bounding region of every tile touching ``block`` once, predicts the tiles in batches of
    ``batch_size`` and accumulates ``prediction * weight`` over the block's extent only; the sum of the weights
    comes per axis (:func:`~unetcore.inference.windows.gaussian_weight_sum`) for the default Gaussian map over
    every tile, tile by tile for other ``weights`` or a subset of ``tiles``.
    ``weights`` defaults to ``gaussian_weights(grid.tile)``. Works for images and volumes alike. ``tiles``
    computes only those grid tiles (default: all touching the block); pixels none of them covers are 0.
    """
    default = tiles is None and (weights is None or weights is gaussian_weights(grid.tile))
    w = gaussian_weights(grid.tile) if weights is None else np.asarray(weights, dtype=np.float32)
    if w.shape != grid.tile:
        raise ValueError(f"weights have shape {w.shape}, the tile is {grid.tile}")
    tiles = tiles_for_block(grid, block) if tiles is None else list(tiles)
    region = region_for_tiles(tiles, grid.tile)
    data = read_padded(read, image_shape, region, channels)

    acc: np.ndarray | None = None  # (K, *block.shape); K is known after the first forward pass
    summed = gaussian_axis_sums(grid, block) if default else None  # the denominator, per axis (no pass per tile)
    norm = np.zeros(block.shape, dtype=np.float32) if summed is None else None
    for batch in tile_batches(tiles, batch_size):
        inputs = np.stack([data[(slice(None), *tile_window(o, region.start, grid.tile))] for o in batch])
        out = _predict(predictor, inputs)
        if acc is None:
            acc = np.zeros((out.shape[1], *block.shape), dtype=np.float32)
        for origin, pred in zip(batch, out):
            in_tile, in_block = tile_overlap(origin, grid.tile, block)
            acc[(slice(None), *in_block)] += pred[(slice(None), *in_tile)] * w[in_tile]
            if norm is not None:
                norm[in_block] += w[in_tile]
    assert acc is not None  # every block is touched by at least one tile
    if norm is not None:
        np.divide(acc, norm, out=acc, where=norm > 0)
    else:  # positive everywhere: no mask pass
        assert summed is not None
        divide_by_weight_sum(acc, summed)
    return acc


def sliding_window(
    image: np.ndarray, predictor: Predictor, tile: Shape, overlap: float, batch_size: int
) -> np.ndarray:
    """Whole-image reference ``(K, *spatial)``: classic nnU-Net sliding window with full-size accumulators.

    Pads ``image`` (C, H, W) or (C, D, H, W) at the far end of each axis to at least one tile, predicts every
    tile of the global grid, sums ``prediction * weight`` and ``weight`` over the padded image, divides and
    crops. Memory grows with the image; this is the oracle ``predict_block`` is tested against.
    """
    c, *spatial = image.shape
    grid = TileGrid.build(tuple(spatial), tile, overlap)
    padded_to = padded_shape(grid.shape, grid.tile)
    padded = np.zeros((c, *padded_to), dtype=np.float32)
    padded[(slice(None), *(slice(0, n) for n in spatial))] = image
    weights = gaussian_weights(grid.tile)
    origin = (0,) * grid.ndim

    acc: np.ndarray | None = None
    summed = gaussian_weight_sum(grid, Block.covering(padded_to))  # as predict_block's: blocks equal it exactly
    norm = np.zeros(padded_to, dtype=np.float32) if summed is None else summed
    for batch in tile_batches(list(grid.tiles()), batch_size):
        out = _predict(predictor, np.stack([padded[(slice(None), *tile_window(o, origin, grid.tile))] for o in batch]))
        if acc is None:
            acc = np.zeros((out.shape[1], *padded_to), dtype=np.float32)
        for o, pred in zip(batch, out):
            window = tile_window(o, origin, grid.tile)
            acc[(slice(None), *window)] += pred * weights
            if summed is None:
                norm[window] += weights
    assert acc is not None
    crop = tuple(slice(0, n) for n in spatial)
    return acc[(slice(None), *crop)] / norm[crop]


def predict_blocks_numpy(
    image: np.ndarray,
    predictor: Predictor,
    tile: Shape,
    overlap: float,
    block: Shape,
    batch_size: int,
) -> np.ndarray:
    """Block-wise inference ``(K, *spatial)`` of an in-memory image (C, H, W) or volume (C, D, H, W)."""
    c, *spatial = image.shape
    shape = tuple(spatial)
    grid = TileGrid.build(shape, tile, overlap)
    weights = gaussian_weights(grid.tile)

    def read(*box: slice) -> np.ndarray:
        return image[(slice(None), *box)]

    out: np.ndarray | None = None
    for b in plan_blocks(shape, block):
        pred = predict_block(read, shape, c, predictor, grid, b, batch_size, weights)
        if out is None:
            out = np.empty((pred.shape[0], *shape), dtype=np.float32)
        out[(slice(None), *b.slices)] = pred
    assert out is not None
    return out


def flip_axes(ndim: int) -> list[tuple[int, ...]]:
    """The ``2**ndim`` flips of the last ``ndim`` axes as axis tuples: 2-D ``[(), (-1,), (-2,), (-2, -1)]``."""
    return [tuple(-(k + 1) for k in reversed(range(ndim)) if i >> k & 1) for i in range(2**ndim)]


def tta_predictor(predictor: Predictor) -> Predictor:
    """Wrap ``predictor`` with flip test-time augmentation: mean over every flip of the spatial axes.

    4 passes for 2-D tiles ``(B, C, h, w)``, 8 for 3-D tiles ``(B, C, d, h, w)``. Each flipped input is predicted
    and flipped back before averaging, so the output stays aligned with the input and tiled blending is unchanged.
    """

    def predict(batch: np.ndarray) -> np.ndarray:
        flips = flip_axes(batch.ndim - 2)
        total: np.ndarray | None = None
        for axes in flips:
            x = np.ascontiguousarray(np.flip(batch, axes)) if axes else batch
            y = np.asarray(predictor(x), dtype=np.float32)
            y = np.flip(y, axes) if axes else y
            total = y.copy() if total is None else total + y
        assert total is not None
        return total / len(flips)

    return predict


def slicewise_predictor(predictor: Predictor) -> Predictor:
    """Let a 2-D ``predictor`` predict 3-D tiles slice by slice (nnU-Net's "2d" configuration on a volume).

    A batch ``(B, C, d, h, w)`` is predicted as the ``B * d`` images ``(C, h, w)`` of its slices and folded back to
    ``(B, K, d, h, w)``; 2-D batches pass through unchanged. With tiles one slice deep, blending a volume gives
    exactly the 2-D prediction of each slice.
    """

    def predict(batch: np.ndarray) -> np.ndarray:
        if batch.ndim == 4:
            return predictor(batch)
        if batch.ndim != 5:
            raise ValueError(f"slice-wise prediction takes (B, C, d, h, w) batches, got {batch.shape}")
        b, c, d, h, w = batch.shape
        slices = np.ascontiguousarray(np.moveaxis(batch, 2, 1).reshape(b * d, c, h, w))
        out = _predict(predictor, slices)
        return np.moveaxis(out.reshape(b, d, out.shape[1], h, w), 1, 2)

    return predict


BACKGROUND_LOGIT = 12.0
"""Magnitude of the logits given to skipped tiles: sigmoid(-12) ≈ 6e-6, softmax margin 24 for class 0."""


def background_logits(num_classes: int, shape: Shape) -> np.ndarray:
    """Logits ``(K, *shape)`` that say "background" with high confidence: binary -L; multi-class +L for class 0."""
    k = max(1, num_classes)
    out = np.full((k, *shape), -BACKGROUND_LOGIT, dtype=np.float32)
    if num_classes > 1:
        out[0] = BACKGROUND_LOGIT
    return out


def constant_tiles(batch: np.ndarray) -> np.ndarray:
    """Mask ``(B,)`` of tiles whose every channel is constant over the tile (no signal to segment)."""
    flat = batch.reshape(batch.shape[0], batch.shape[1], -1)
    return (flat.max(axis=-1) == flat.min(axis=-1)).all(axis=-1)


def skip_empty_predictor(predictor: Predictor, num_classes: int) -> Predictor:
    """Wrap ``predictor`` so that constant tiles get :func:`background_logits` without running the model.

    Percentile normalisation clips saturated background (e.g. white slide glass) to exactly 1, and padding
    outside a scan is exactly 0, so such areas cost nothing. The decision is per tile of the global grid,
    so tiled and whole-image inference still agree.
    """

    def predict(batch: np.ndarray) -> np.ndarray:
        skip = constant_tiles(batch)
        if not skip.any():
            return predictor(batch)
        out = np.empty((batch.shape[0], max(1, num_classes), *batch.shape[2:]), dtype=np.float32)
        out[skip] = background_logits(num_classes, batch.shape[2:])
        if not skip.all():
            out[~skip] = _predict(predictor, np.ascontiguousarray(batch[~skip]))
        return out

    return predict
