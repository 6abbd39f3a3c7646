"""Pure geometry of tiled inference: tile grid, Gaussian importance map, block plan.

Everything here works on the spatial axes only, two ``(H, W)`` or three ``(D, H, W)``, with one code path, and is
free of I/O. The tile grid is computed once for the whole image (nnU-Net's rule per axis: evenly spread starts,
the last tile flush with the border), and the output is cut into blocks aligned to a fixed stride. A block takes
every tile that touches it, so blending inside a block sees exactly the tiles and weights that whole-image
inference would, and block results equal the whole-image result on the block's pixels (see
``stitch.predict_block``).
"""

from __future__ import annotations

import functools
import itertools
import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

Shape = tuple[int, ...]
"""A spatial shape or offset: ``(H, W)`` or ``(D, H, W)``."""

AXIS_NAMES = "zyx"
"""Names of the spatial axes, the last ``ndim`` of them: ``yx`` for an image, ``zyx`` for a volume."""


def _check_positive(name: str, shape: Sequence[int]) -> Shape:
    if len(shape) not in (2, 3) or any(int(v) < 1 for v in shape):
        raise ValueError(f"{name} must be two or three positive ints, got {shape!r}")
    return tuple(int(v) for v in shape)


def _check_same_ndim(**shapes: Sequence[int]) -> None:
    if len({len(s) for s in shapes.values()}) > 1:
        listed = ", ".join(f"{k}={tuple(v)!r}" for k, v in shapes.items())
        raise ValueError(f"{listed}: every shape needs the same number of spatial axes")


ALIGN_MAX = 32


def tile_alignment(tile: int, step: float) -> int:
    """The multiple that tile starts keep: the largest power of two dividing both ``tile`` and the whole step
    ``floor(step)``, at most :data:`ALIGN_MAX`.

    A UNet is equivariant only to shifts by its total pooling (16 at depth 4, 32 at depth 5), and its tile is a
    multiple of that pooling; tiles that start on such a multiple see the image at the same phase, so their blended
    labels agree with the dense grid's at every image size (BENCHMARKS.md, Inference (i)). Dividing the step too
    means the aligned grid has no more tiles than the evenly spread one.
    """
    whole = max(1, int(step))
    return max(1, min(tile & -tile, whole & -whole, ALIGN_MAX))


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of the tiles along one axis, on the phase of :func:`tile_alignment`.

    The target step is ``tile * (1 - overlap)`` (at least 1 px). nnU-Net's ``compute_steps_for_sliding_window``
    spreads ``n = ceil((size - tile) / step) + 1`` starts evenly from 0 to ``size - tile`` (flush with the far
    border); those are kept when every start but the last is a multiple of the alignment. Otherwise the grid is
    regular: the step rounded down to a multiple of the alignment (the stride), starts ``0, stride, 2 * stride,
    ...`` and one flush with the far border (nnU-Net's count of tiles when the step is a multiple of the alignment,
    as at the defaults). Either way tiles cover every pixel and no step exceeds the target. An axis no longer than
    the tile gets one tile at 0 (the image is padded to the tile).
    """
    if tile < 1 or size < 1:
        raise ValueError(f"size and tile must be >= 1, got size={size}, tile={tile}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= tile:
        return [0]
    step = max(tile * (1.0 - overlap), 1.0)
    align = tile_alignment(tile, step)
    n = math.ceil((size - tile) / step) + 1
    spread = [int(v) for v in np.round(np.linspace(0, size - tile, n))]
    if all(s % align == 0 for s in spread[:-1]):
        return spread  # nnU-Net's evenly spread starts, already on the phase
    stride = max(align, int(step) // align * align)
    n = math.ceil((size - tile) / stride) + 1
    return [k * stride for k in range(n - 1)] + [size - tile]


def padded_shape(shape: Shape, tile: Shape) -> Shape:
    """Shape the image is zero-padded to (at the far end of each axis) so that one tile fits: ``max(size, tile)``."""
    _check_same_ndim(shape=shape, tile=tile)
    return tuple(max(s, t) for s, t in zip(shape, tile))


@dataclass(frozen=True)
class TileGrid:
    """The global tile grid of one image: the tile at origin ``o`` covers ``[o[i], o[i] + tile[i])`` on axis ``i``.

    ``starts[i]`` holds the sorted tile starts along spatial axis ``i``. Tiles may extend past the image's far
    edge only when the image is smaller than the tile along that axis; that part is zero-padded on input and
    cropped on output.
    """

    shape: Shape
    tile: Shape
    starts: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, shape: Shape, tile: Shape, overlap: float) -> TileGrid:
        """Grid for an image of ``shape`` ((H, W) or (D, H, W)) with tiles ``tile`` (same axes) and ``overlap``."""
        shape, tile = _check_positive("shape", shape), _check_positive("tile", tile)
        _check_same_ndim(shape=shape, tile=tile)
        return cls(shape, tile, tuple(tuple(tile_starts(s, t, overlap)) for s, t in zip(shape, tile)))

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return len(self.shape)

    @property
    def ys(self) -> tuple[int, ...]:
        """Tile starts along the rows (the second-to-last axis)."""
        return self.starts[-2]

    @property
    def xs(self) -> tuple[int, ...]:
        """Tile starts along the columns (the last axis)."""
        return self.starts[-1]

    def tiles(self) -> Iterator[Shape]:
        """All tile origins, in C order (the last axis fastest)."""
        return itertools.product(*self.starts)

    @property
    def n_tiles(self) -> int:
        """Number of tiles in the grid."""
        return math.prod(len(s) for s in self.starts)


def _profile(n: int, sigma_scale: float) -> np.ndarray:
    # Centre at (n - 1) / 2 (nnU-Net uses n // 2) so the map is exactly symmetric for even tiles.
    d = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    return np.exp(-(d**2) / (2.0 * (n * sigma_scale) ** 2))


@functools.lru_cache(maxsize=32)
def _gaussian(tile: Shape, sigma_scale: float, dtype: np.dtype) -> np.ndarray:
    w = functools.reduce(np.multiply.outer, [_profile(n, sigma_scale) for n in tile])
    w = (w / w.max()).astype(dtype)
    # Far from the centre the map can underflow to 0; a zero weight would leave pixels covered by a
    # single tile undefined (0/0), so clamp to the smallest non-zero value as nnU-Net does.
    w[w == 0] = w[w > 0].min()
    w.flags.writeable = False
    return w


def gaussian_weights(tile: Shape, sigma_scale: float = 1 / 8, dtype: DTypeLike = np.float32) -> np.ndarray:
    """nnU-Net importance map of shape ``tile``: a Gaussian centred in the tile, max 1, strictly positive.

    ``sigma = tile * sigma_scale`` per axis (a separable product of one profile per axis). Down-weighting tile
    borders hides the network's weaker predictions near its inputs' edges. Cached; the array is read-only.
    """
    tile = _check_positive("tile", tile)
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    return _gaussian(tile, float(sigma_scale), np.dtype(dtype))


def _unit_profiles(tile: Shape, sigma_scale: float) -> list[np.ndarray]:
    """The map's per-axis factors, each scaled to max 1 (their product is the map before the float32 cast)."""
    profiles = [_profile(n, sigma_scale) for n in tile]
    return [p / p.max() for p in profiles]


@dataclass(frozen=True, init=False, repr=False)
class Block:
    """A half-open box of the image (or of its padded extent): ``[start[i], stop[i])`` along spatial axis ``i``.

    Built from its bounds axis by axis: ``Block(y0, y1, x0, x1)`` for an image, ``Block(z0, z1, y0, y1, x0, x1)``
    for a volume (the order of :attr:`slices`); ``y0 .. x1`` name the last two axes whatever the dimension.
    """

    start: Shape
    stop: Shape

    def __init__(self, *bounds: int) -> None:
        if len(bounds) not in (4, 6):
            raise ValueError(f"a block needs a (start, stop) pair per axis, 2 or 3 axes; got {bounds!r}")
        object.__setattr__(self, "start", tuple(int(v) for v in bounds[0::2]))
        object.__setattr__(self, "stop", tuple(int(v) for v in bounds[1::2]))

    @classmethod
    def from_corners(cls, start: Sequence[int], stop: Sequence[int]) -> Block:
        """The block ``[start, stop)`` (one value per axis each)."""
        _check_same_ndim(start=start, stop=stop)
        return cls(*itertools.chain.from_iterable(zip(start, stop)))

    @classmethod
    def covering(cls, shape: Shape) -> Block:
        """The block of a whole image of ``shape``."""
        return cls.from_corners((0,) * len(shape), shape)

    def __repr__(self) -> str:
        return f"Block({', '.join(str(v) for v in self.bounds)})"

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return len(self.start)

    @property
    def bounds(self) -> tuple[int, ...]:
        """``(start0, stop0, start1, stop1, ...)``: the constructor's arguments."""
        return tuple(itertools.chain.from_iterable(zip(self.start, self.stop)))

    @property
    def slices(self) -> tuple[slice, ...]:
        """One ``slice(start, stop)`` per spatial axis, for indexing the last ``ndim`` axes."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    @property
    def shape(self) -> Shape:
        """``stop - start`` per axis."""
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def z0(self) -> int:
        """First slice (volumes only)."""
        return self._axis("z", 0)

    @property
    def z1(self) -> int:
        """End of the slices (volumes only)."""
        return self._axis("z", 1)

    @property
    def y0(self) -> int:
        """First row."""
        return self.start[-2]

    @property
    def y1(self) -> int:
        """End of the rows."""
        return self.stop[-2]

    @property
    def x0(self) -> int:
        """First column."""
        return self.start[-1]

    @property
    def x1(self) -> int:
        """End of the columns."""
        return self.stop[-1]

    def _axis(self, name: str, end: int) -> int:
        axis = self.ndim - len(AXIS_NAMES) + AXIS_NAMES.index(name)
        if axis < 0:
            raise AttributeError(f"a {self.ndim}-D block has no {name} axis")
        return (self.start, self.stop)[end][axis]


def plan_blocks(shape: Shape, block: Shape) -> list[Block]:
    """Partition the image into blocks whose origins are multiples of ``block``, in C order (last axis fastest).

    The caller makes ``block`` a multiple of the output chunk, so each block is a union of whole
    chunks (edge blocks are clipped to the image) and no two blocks ever write the same chunk.
    """
    shape, block = _check_positive("shape", shape), _check_positive("block", block)
    _check_same_ndim(shape=shape, block=block)
    starts = [range(0, s, b) for s, b in zip(shape, block)]
    return [
        Block.from_corners(lo, tuple(min(a + b, s) for a, b, s in zip(lo, block, shape)))
        for lo in itertools.product(*starts)
    ]


def tile_batches(tiles: Sequence[Shape], size: int) -> Iterator[Sequence[Shape]]:
    """``tiles`` in consecutive batches of at most ``size`` (the order kept, so blending sums in one order)."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for i in range(0, len(tiles), size):
        yield tiles[i : i + size]


def tile_window(origin: Shape, offset: Shape, tile: Shape) -> tuple[slice, ...]:
    """The slices of the tile at ``origin`` in an array whose first element lies at ``offset``."""
    return tuple(slice(o - a, o - a + t) for o, a, t in zip(origin, offset, tile))


def tile_overlap(origin: Shape, tile: Shape, block: Block) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Where the tile at ``origin`` meets ``block``: (slices in tile coordinates, slices in block coordinates)."""
    lo = [max(o, a) for o, a in zip(origin, block.start)]
    hi = [min(o + t, b) for o, t, b in zip(origin, tile, block.stop)]
    in_tile = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))
    in_block = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, block.start))
    return in_tile, in_block


def _starts_touching(starts: tuple[int, ...], tile: int, lo: int, hi: int) -> tuple[int, ...]:
    """Starts ``s`` (sorted) whose extent ``[s, s + tile)`` intersects ``[lo, hi)``: ``lo - tile < s < hi``."""
    return starts[bisect_right(starts, lo - tile) : bisect_left(starts, hi)]


def tiles_for_block(grid: TileGrid, block: Block) -> list[Shape]:
    """Origins of all tiles of ``grid`` that overlap ``block``, in C order; O(log n) search per axis."""
    _check_same_ndim(grid=grid.shape, block=block.start)
    per_axis = [
        _starts_touching(s, t, lo, hi) for s, t, lo, hi in zip(grid.starts, grid.tile, block.start, block.stop)
    ]
    return list(itertools.product(*per_axis))


def region_for_tiles(tiles: Iterable[Shape], tile: Shape) -> Block:
    """Bounding box of the tiles' extents; may pass the image's edge when the image is smaller than a tile."""
    origins = np.asarray(list(tiles), dtype=np.int64)
    if origins.size == 0:
        raise ValueError("region_for_tiles needs at least one tile")
    return Block.from_corners(origins.min(axis=0).tolist(), (origins.max(axis=0) + np.asarray(tile)).tolist())


def gaussian_weight_sum(grid: TileGrid, block: Block, sigma_scale: float = 1 / 8) -> np.ndarray | None:
    """The blend's denominator on ``block``: the sum of the Gaussian weights of every tile touching it, float32.

    Computed per axis, without a pass over each tile: the map is a product of one profile per axis and the tiles
    touching a block are the product of per-axis starts, so the sum is the outer product of per-axis sums
    (:func:`gaussian_axis_sums`; equal to the tile-by-tile sum up to float32 rounding, ~1e-7 relative), positive
    everywhere. None when the map's zeros were clamped (a very small ``sigma_scale``): then it is not separable,
    and the caller sums tile by tile.
    """
    sums = gaussian_axis_sums(grid, block, sigma_scale)
    return None if sums is None else functools.reduce(np.multiply.outer, sums)  # in float32: no float64 map


def gaussian_axis_sums(grid: TileGrid, block: Block, sigma_scale: float = 1 / 8) -> list[np.ndarray] | None:
    """The per-axis factors of :func:`gaussian_weight_sum` (float32, one per axis of ``block``), or None."""
    _check_same_ndim(grid=grid.shape, block=block.start)
    unit = _unit_profiles(grid.tile, float(sigma_scale))
    if np.float32(math.prod(float(q.min()) for q in unit)) == 0:
        return None
    sums = []
    for starts, t, lo, hi, q in zip(grid.starts, grid.tile, block.start, block.stop, unit):
        total = np.zeros(hi - lo, dtype=np.float64)
        for o in _starts_touching(starts, t, lo, hi):
            a, b = max(o, lo), min(o + t, hi)
            total[a - lo : b - lo] += q[a - o : b - o]
        sums.append(total.astype(np.float32))  # a pixel's axis sums are the same in every block that holds it
    return sums


SLAB_ELEMENTS = 64 * 1024
"""About how many elements of the weight-sum map :func:`divide_by_weight_sum` builds at a time (256 KiB)."""


def divide_by_weight_sum(acc: np.ndarray, sums: list[np.ndarray]) -> None:
    """``acc`` ``(K, *block)`` divided in place by the outer product of ``sums`` (:func:`gaussian_axis_sums`): the
    values of dividing by :func:`gaussian_weight_sum`'s map, bit for bit, which is built a slab of the first axis
    at a time (in cache) instead of whole (a block-sized array, one more pass over memory)."""
    rows = max(1, SLAB_ELEMENTS // math.prod(s.size for s in sums[1:]))
    for a in range(0, sums[0].size, rows):
        acc[:, a : a + rows] /= functools.reduce(np.multiply.outer, [sums[0][a : a + rows], *sums[1:]])


def _axis_evaluations(starts: tuple[int, ...], tile: int, size: int, band: int) -> int:
    """Tiles evaluated along one axis when it is cut into bands of ``band``: a tile touching k bands counts k."""
    return sum(len(_starts_touching(starts, tile, lo, min(lo + band, size))) for lo in range(0, size, band))


def tile_evaluations(grid: TileGrid, block: Shape) -> int:
    """Tile evaluations of block-wise inference with blocks of ``block``; ``grid.n_tiles`` is the minimum.

    A tile that straddles a block border is predicted once per block it touches. The count factorises
    per axis because blocks form a regular grid: ``evals_y(bh) * evals_x(bw)`` (times ``evals_z(bd)``).
    """
    block = _check_positive("block", block)
    _check_same_ndim(grid=grid.shape, block=block)
    return math.prod(
        _axis_evaluations(s, t, n, b) for s, t, n, b in zip(grid.starts, grid.tile, grid.shape, block)
    )


def _candidates(size: int, chunk: int) -> list[int]:
    """Block edges along one axis: multiples of ``chunk`` up to the first that covers ``size``."""
    return [chunk * k for k in range(1, -(-size // chunk) + 1)]


def choose_block_shape(grid: TileGrid, chunk: Shape, max_voxels: int, min_blocks: int = 1) -> Shape:
    """Block shape, multiples of ``chunk`` per axis, that computes the fewest tiles twice.

    Among shapes of at most ``max_voxels`` pixels or voxels (bounding a task's memory) that give at least
    ``min_blocks`` blocks (so every worker gets work; relaxed when the image has fewer chunks), pick the
    one with the fewest :func:`tile_evaluations`; ties go to fewer blocks, then to the longest last axis
    (wider rows), then to the shortest leading axes. A single chunk is always allowed, whatever ``max_voxels``.
    """
    chunk = _check_positive("chunk", chunk)
    _check_same_ndim(grid=grid.shape, chunk=chunk)
    n_chunks = math.prod(-(-s // c) for s, c in zip(grid.shape, chunk))
    need = max(1, min(min_blocks, n_chunks))
    per_axis = [
        {b: _axis_evaluations(st, t, n, b) for b in _candidates(n, c)}
        for st, t, n, c in zip(grid.starts, grid.tile, grid.shape, chunk)
    ]
    best: tuple[int, ...] | None = None
    for shape in itertools.product(*per_axis):
        n_blocks = math.prod(-(-s // b) for s, b in zip(grid.shape, shape))
        if n_blocks < need or (math.prod(shape) > max_voxels and shape != chunk):
            continue
        evals = math.prod(e[b] for e, b in zip(per_axis, shape))
        key = (evals, n_blocks, -shape[-1], *shape[:-1])
        best = key if best is None or key < best else best
    assert best is not None  # the chunk itself always qualifies: it gives n_chunks >= need blocks
    return (*best[3:], -best[2])
