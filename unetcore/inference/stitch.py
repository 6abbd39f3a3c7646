"""Blending of tile predictions: the per-block kernel and the whole-image reference.

``predict_block`` is the kernel that a distributed driver runs once per output block: it reads the
block plus the margin its tiles need, predicts those tiles in batches and blends them with the global
Gaussian weights, keeping only the block's pixels. Because the tile grid and the weights are global,
the result equals the same pixels of ``sliding_window`` (classic nnU-Net inference on the whole image)
up to float rounding, while memory stays proportional to one block plus one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from unetcore.inference.windows import (
    Block,
    Shape2D,
    TileGrid,
    gaussian_weights,
    padded_shape,
    plan_blocks,
    region_for_tiles,
    tiles_for_block,
)

Predictor = Callable[[np.ndarray], np.ndarray]
"""Maps a batch ``(B, C, th, tw)`` float32 to ``(B, K, th, tw)`` float32 (logits; blending is linear)."""

Reader = Callable[[slice, slice], np.ndarray]
"""Returns the image's ``(C, h, w)`` pixels at ``(ys, xs)``; both slices lie inside the image."""

_T = TypeVar("_T")


def _batches(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _predict(predictor: Predictor, batch: np.ndarray) -> np.ndarray:
    """Run ``predictor`` and check it kept the batch and spatial sizes."""
    out = np.asarray(predictor(batch), dtype=np.float32)
    b, _, th, tw = batch.shape
    if out.ndim != 4 or out.shape[0] != b or out.shape[2:] != (th, tw):
        raise ValueError(f"predictor mapped {batch.shape} to {out.shape}; expected ({b}, K, {th}, {tw})")
    return out


def read_padded(read: Reader, image_shape: Shape2D, region: Block, channels: int) -> np.ndarray:
    """Pixels of ``region`` as ``(C, rh, rw)`` float32, zero where the region leaves the image."""
    out = np.zeros((channels, *region.shape), dtype=np.float32)
    y0, y1 = max(region.y0, 0), min(region.y1, image_shape[0])
    x0, x1 = max(region.x0, 0), min(region.x1, image_shape[1])
    if y0 < y1 and x0 < x1:
        dy, dx = y0 - region.y0, x0 - region.x0
        out[:, dy : dy + y1 - y0, dx : dx + x1 - x0] = read(slice(y0, y1), slice(x0, x1))
    return out


def _overlap(y: int, x: int, tile: Shape2D, block: Block) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Where tile ``(y, x)`` meets ``block``: (slices in tile coordinates, slices in block coordinates)."""
    y0, y1 = max(y, block.y0), min(y + tile[0], block.y1)
    x0, x1 = max(x, block.x0), min(x + tile[1], block.x1)
    in_tile = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
    in_block = (slice(y0 - block.y0, y1 - block.y0), slice(x0 - block.x0, x1 - block.x0))
    return in_tile, in_block


def predict_block(
    read: Reader,
    image_shape: Shape2D,
    channels: int,
    predictor: Predictor,
    grid: TileGrid,
    block: Block,
    batch_size: int,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Blended prediction ``(K, bh, bw)`` float32 of one block, equal to whole-image inference there.

    Reads the bounding region of every tile touching ``block`` once, predicts the tiles in batches of
    ``batch_size`` and accumulates ``prediction * weight`` and ``weight`` over the block's extent only.
    ``weights`` defaults to ``gaussian_weights(grid.tile)``.
    """
    w = gaussian_weights(grid.tile) if weights is None else np.asarray(weights, dtype=np.float32)
    if w.shape != grid.tile:
        raise ValueError(f"weights have shape {w.shape}, the tile is {grid.tile}")
    tiles = tiles_for_block(grid, block)
    region = region_for_tiles(tiles, grid.tile)
    data = read_padded(read, image_shape, region, channels)
    th, tw = grid.tile

    acc: np.ndarray | None = None  # (K, bh, bw); K is known after the first forward pass
    norm = np.zeros(block.shape, dtype=np.float32)
    for batch in _batches(tiles, batch_size):
        inputs = np.stack(
            [data[:, y - region.y0 : y - region.y0 + th, x - region.x0 : x - region.x0 + tw] for y, x in batch]
        )
        out = _predict(predictor, inputs)
        if acc is None:
            acc = np.zeros((out.shape[1], *block.shape), dtype=np.float32)
        for (y, x), pred in zip(batch, out):
            in_tile, in_block = _overlap(y, x, grid.tile, block)
            acc[(slice(None), *in_block)] += pred[(slice(None), *in_tile)] * w[in_tile]
            norm[in_block] += w[in_tile]
    assert acc is not None  # every block is touched by at least one tile
    acc /= norm
    return acc


def sliding_window(
    image: np.ndarray, predictor: Predictor, tile: Shape2D, overlap: float, batch_size: int
) -> np.ndarray:
    """Whole-image reference ``(K, H, W)``: classic nnU-Net sliding window with full-size accumulators.

    Pads ``image`` (C, H, W) at the bottom/right to at least one tile, predicts every tile of the global
    grid, sums ``prediction * weight`` and ``weight`` over the padded image, divides and crops. Memory
    grows with the image; this is the oracle ``predict_block`` is tested against.
    """
    c, h, w = image.shape
    grid = TileGrid.build((h, w), tile, overlap)
    ph, pw = padded_shape((h, w), grid.tile)
    padded = np.zeros((c, ph, pw), dtype=np.float32)
    padded[:, :h, :w] = image
    weights = gaussian_weights(grid.tile)
    th, tw = grid.tile

    acc: np.ndarray | None = None
    norm = np.zeros((ph, pw), dtype=np.float32)
    for batch in _batches(list(grid.tiles()), batch_size):
        out = _predict(predictor, np.stack([padded[:, y : y + th, x : x + tw] for y, x in batch]))
        if acc is None:
            acc = np.zeros((out.shape[1], ph, pw), dtype=np.float32)
        for (y, x), pred in zip(batch, out):
            acc[:, y : y + th, x : x + tw] += pred * weights
            norm[y : y + th, x : x + tw] += weights
    assert acc is not None
    return acc[:, :h, :w] / norm[:h, :w]


def predict_blocks_numpy(
    image: np.ndarray,
    predictor: Predictor,
    tile: Shape2D,
    overlap: float,
    block: Shape2D,
    batch_size: int,
) -> np.ndarray:
    """Block-wise inference ``(K, H, W)`` of an in-memory image (C, H, W): ``predict_block`` per block."""
    c, h, w = image.shape
    grid = TileGrid.build((h, w), tile, overlap)
    weights = gaussian_weights(grid.tile)

    def read(ys: slice, xs: slice) -> np.ndarray:
        return image[:, ys, xs]

    out: np.ndarray | None = None
    for b in plan_blocks((h, w), block):
        pred = predict_block(read, (h, w), c, predictor, grid, b, batch_size, weights)
        if out is None:
            out = np.empty((pred.shape[0], h, w), dtype=np.float32)
        out[(slice(None), *b.slices)] = pred
    assert out is not None
    return out


def tta_predictor(predictor: Predictor) -> Predictor:
    """Wrap ``predictor`` with flip test-time augmentation: mean over the 4 flips of the (H, W) axes.

    Each flipped input is predicted and flipped back before averaging, so the output stays aligned
    with the input and tiled blending is unchanged.
    """
    flips: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))

    def predict(batch: np.ndarray) -> np.ndarray:
        total: np.ndarray | None = None
        for axes in flips:
            x = np.ascontiguousarray(np.flip(batch, axes)) if axes else batch
            y = np.asarray(predictor(x), dtype=np.float32)
            y = np.flip(y, axes) if axes else y
            total = y.copy() if total is None else total + y
        assert total is not None
        return total / len(flips)

    return predict


BACKGROUND_LOGIT = 12.0
"""Magnitude of the logits given to skipped tiles: sigmoid(-12) ≈ 6e-6, softmax margin 24 for class 0."""


def background_logits(num_classes: int, shape: Shape2D) -> np.ndarray:
    """Logits ``(K, h, w)`` that say "background" with high confidence: binary -L; multi-class +L for class 0."""
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
