"""Pure geometry of tiled inference: tile grid, Gaussian importance map, block plan.

Everything here is 2-D ``(H, W)`` and free of I/O. The tile grid is computed once for the whole image
(nnU-Net's rule: evenly spread starts, the last tile flush with the border), and the output is cut into
blocks aligned to a fixed stride. A block takes every tile that touches it, so blending inside a block
sees exactly the tiles and weights that whole-image inference would, and block results equal the
whole-image result on the block's pixels (see ``stitch.predict_block``).
"""

from __future__ import annotations

import functools
import itertools
import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

Shape2D = tuple[int, int]


def _check_positive(name: str, pair: Shape2D) -> None:
    if len(pair) != 2 or any(int(v) < 1 for v in pair):
        raise ValueError(f"{name} must be two positive ints, got {pair!r}")


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of the tiles along one axis (nnU-Net's ``compute_steps_for_sliding_window``).

    The target step is ``tile * (1 - overlap)`` (at least 1 px); ``n = ceil((size - tile) / step) + 1``
    starts are spread evenly between 0 and ``size - tile`` and rounded, so the first tile starts at 0
    and the last is flush with the border. The actual step never exceeds the target, so tiles cover
    every pixel. An axis no longer than the tile gets one tile at 0 (the image is padded to the tile).
    """
    if tile < 1 or size < 1:
        raise ValueError(f"size and tile must be >= 1, got size={size}, tile={tile}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= tile:
        return [0]
    step = max(tile * (1.0 - overlap), 1.0)
    n = math.ceil((size - tile) / step) + 1
    return [int(v) for v in np.round(np.linspace(0, size - tile, n))]


def padded_shape(shape: Shape2D, tile: Shape2D) -> Shape2D:
    """Shape the image is zero-padded to (at its bottom/right) so that one tile fits: ``max(size, tile)``."""
    return (max(shape[0], tile[0]), max(shape[1], tile[1]))


@dataclass(frozen=True)
class TileGrid:
    """The global tile grid of one image: tile ``(y0, x0)`` covers ``[y0, y0+th) x [x0, x0+tw)``.

    Tiles may extend past the image's bottom/right edge only when the image is smaller than the tile
    along that axis; that part is zero-padded on input and cropped on output.
    """

    shape: Shape2D
    tile: Shape2D
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @classmethod
    def build(cls, shape: Shape2D, tile: Shape2D, overlap: float) -> TileGrid:
        """Grid for an image of ``shape`` (H, W) with tiles ``tile`` (th, tw) and fractional ``overlap``."""
        _check_positive("shape", shape)
        _check_positive("tile", tile)
        ys = tuple(tile_starts(shape[0], tile[0], overlap))
        xs = tuple(tile_starts(shape[1], tile[1], overlap))
        return cls((int(shape[0]), int(shape[1])), (int(tile[0]), int(tile[1])), ys, xs)

    def tiles(self) -> Iterator[tuple[int, int]]:
        """All tile origins ``(y0, x0)``, row-major."""
        return itertools.product(self.ys, self.xs)

    @property
    def n_tiles(self) -> int:
        """Number of tiles in the grid."""
        return len(self.ys) * len(self.xs)


@functools.lru_cache(maxsize=32)
def _gaussian(tile: Shape2D, sigma_scale: float, dtype: np.dtype) -> np.ndarray:
    axes = []
    for n in tile:
        # Centre at (n - 1) / 2 (nnU-Net uses n // 2) so the map is exactly symmetric for even tiles.
        d = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        axes.append(np.exp(-(d**2) / (2.0 * (n * sigma_scale) ** 2)))
    w = np.outer(axes[0], axes[1])
    w = (w / w.max()).astype(dtype)
    # Far from the centre the map can underflow to 0; a zero weight would leave pixels covered by a
    # single tile undefined (0/0), so clamp to the smallest non-zero value as nnU-Net does.
    w[w == 0] = w[w > 0].min()
    w.flags.writeable = False
    return w


def gaussian_weights(
    tile: Shape2D, sigma_scale: float = 1 / 8, dtype: DTypeLike = np.float32
) -> np.ndarray:
    """nnU-Net importance map ``(th, tw)``: a Gaussian centred in the tile, max 1, strictly positive.

    ``sigma = tile * sigma_scale`` per axis. Down-weighting tile borders hides the network's weaker
    predictions near its inputs' edges. Cached; the returned array is read-only.
    """
    _check_positive("tile", tile)
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    return _gaussian((int(tile[0]), int(tile[1])), float(sigma_scale), np.dtype(dtype))


@dataclass(frozen=True)
class Block:
    """A half-open rectangle ``[y0, y1) x [x0, x1)`` of the image (or of its padded extent)."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(slice(y0, y1), slice(x0, x1))`` for indexing the last two axes."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> Shape2D:
        """``(y1 - y0, x1 - x0)``."""
        return self.y1 - self.y0, self.x1 - self.x0


def plan_blocks(shape: Shape2D, block: Shape2D) -> list[Block]:
    """Partition the image into row-major blocks whose origins are multiples of ``block``.

    The caller makes ``block`` a multiple of the output chunk, so each block is a union of whole
    chunks (edge blocks are clipped to the image) and no two blocks ever write the same chunk.
    """
    _check_positive("shape", shape)
    _check_positive("block", block)
    (h, w), (bh, bw) = shape, block
    return [
        Block(y, min(y + bh, h), x, min(x + bw, w))
        for y in range(0, h, bh)
        for x in range(0, w, bw)
    ]


def _starts_touching(starts: tuple[int, ...], tile: int, lo: int, hi: int) -> tuple[int, ...]:
    """Starts ``s`` (sorted) whose extent ``[s, s + tile)`` intersects ``[lo, hi)``: ``lo - tile < s < hi``."""
    return starts[bisect_right(starts, lo - tile) : bisect_left(starts, hi)]


def tiles_for_block(grid: TileGrid, block: Block) -> list[tuple[int, int]]:
    """Origins of all tiles of ``grid`` that overlap ``block``, row-major; O(log n) search per axis."""
    ys = _starts_touching(grid.ys, grid.tile[0], block.y0, block.y1)
    xs = _starts_touching(grid.xs, grid.tile[1], block.x0, block.x1)
    return list(itertools.product(ys, xs))


def region_for_tiles(tiles: Iterable[tuple[int, int]], tile: Shape2D) -> Block:
    """Bounding box of the tiles' extents; may pass the image's edge when the image is smaller than a tile."""
    tiles = list(tiles)
    if not tiles:
        raise ValueError("region_for_tiles needs at least one tile")
    ys = [y for y, _ in tiles]
    xs = [x for _, x in tiles]
    return Block(min(ys), max(ys) + tile[0], min(xs), max(xs) + tile[1])


def _axis_evaluations(starts: tuple[int, ...], tile: int, size: int, band: int) -> int:
    """Tiles evaluated along one axis when it is cut into bands of ``band``: a tile touching k bands counts k."""
    return sum(len(_starts_touching(starts, tile, lo, min(lo + band, size))) for lo in range(0, size, band))


def tile_evaluations(grid: TileGrid, block: Shape2D) -> int:
    """Tile evaluations of block-wise inference with blocks of ``block``; ``grid.n_tiles`` is the minimum.

    A tile that straddles a block border is predicted once per block it touches. The count factorises
    per axis because blocks form a regular grid: ``evals_y(bh) * evals_x(bw)``.
    """
    _check_positive("block", block)
    return _axis_evaluations(grid.ys, grid.tile[0], grid.shape[0], block[0]) * _axis_evaluations(
        grid.xs, grid.tile[1], grid.shape[1], block[1]
    )


def _candidates(size: int, chunk: int) -> list[int]:
    """Block edges along one axis: multiples of ``chunk`` up to the first that covers ``size``."""
    return [chunk * k for k in range(1, -(-size // chunk) + 1)]


def choose_block_shape(grid: TileGrid, chunk: Shape2D, max_pixels: int, min_blocks: int = 1) -> Shape2D:
    """Block shape ``(bh, bw)``, multiples of ``chunk``, that computes the fewest tiles twice.

    Among shapes of at most ``max_pixels`` pixels (bounding a task's memory) that give at least
    ``min_blocks`` blocks (so every worker gets work; relaxed when the image has fewer chunks), pick the
    one with the fewest :func:`tile_evaluations`; ties go to fewer, then wider blocks. A single chunk is
    always allowed, whatever ``max_pixels``.
    """
    _check_positive("chunk", chunk)
    (h, w), (cy, cx) = grid.shape, chunk
    n_chunks = -(-h // cy) * -(-w // cx)
    need = max(1, min(min_blocks, n_chunks))
    ey = {b: _axis_evaluations(grid.ys, grid.tile[0], h, b) for b in _candidates(h, cy)}
    ex = {b: _axis_evaluations(grid.xs, grid.tile[1], w, b) for b in _candidates(w, cx)}
    best: tuple[int, int, int, int, int] | None = None
    for bh, ny in ey.items():
        for bw, nx in ex.items():
            n_blocks = -(-h // bh) * -(-w // bw)
            if n_blocks < need or (bh * bw > max_pixels and (bh, bw) != (cy, cx)):
                continue
            key = (ny * nx, n_blocks, -bw, bh, bw)
            best = key if best is None or key < best else best
    assert best is not None  # (cy, cx) always qualifies: it gives n_chunks >= need blocks
    return best[3], best[4]
