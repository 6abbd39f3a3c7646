"""Geometry of tiled inference: tile starts, Gaussian map, block plan, tile lookup."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unetcore.inference.windows import (
    Block,
    TileGrid,
    gaussian_weights,
    padded_shape,
    plan_blocks,
    region_for_tiles,
    tile_alignment,
    tile_starts,
    tiles_for_block,
)


@pytest.mark.parametrize(
    ("size", "tile", "overlap", "expected"),
    [
        (512, 256, 0.5, [0, 128, 256]),
        (300, 256, 0.5, [0, 44]),  # step 128 > 44: two tiles, the second flush with the border
        (100, 256, 0.5, [0]),  # smaller than the tile: one padded tile
        (256, 256, 0.5, [0]),
        (257, 256, 0.5, [0, 1]),
        (1000, 256, 0.0, [0, 256, 512, 744]),  # 4 tiles: a regular grid of stride 256, the last flush
        (1000, 256, 0.25, [0, 192, 384, 576, 744]),  # 5 tiles, as nnU-Net's evenly spread 0, 186, ..., 744
        (1000, 64, 0.25, [0, 48, 96, 144, 192, 240, 288, 336, 384, 432, 480, 528, 576, 624, 672, 720, 768, 816, 864,
                          912, 936]),  # step 48: aligned to 16, not 32 (no more tiles than the target step needs)
        (8192, 512, 0.125, [*range(0, 7680, 448), 7680]),  # the default grid at 8192²: 19 tiles on multiples of 32
        (10, 4, 0.9, [0, 1, 2, 3, 4, 5, 6]),  # step 0.4 is raised to 1 px
    ],
)
def test_tile_starts_table(size: int, tile: int, overlap: float, expected: list[int]) -> None:
    assert tile_starts(size, tile, overlap) == expected


@pytest.mark.parametrize(("size", "tile", "overlap"), [(8192, 512, 0.125), (3000, 512, 0.125), (5000, 256, 0.5),
                                                       (777, 96, 0.25), (130, 48, 0.5), (2000, 384, 0.167)])
def test_tile_starts_stay_on_the_alignment_with_no_more_tiles_than_spread_evenly(size: int, tile: int,
                                                                                 overlap: float) -> None:
    starts = tile_starts(size, tile, overlap)
    step = tile * (1 - overlap)
    align = tile_alignment(tile, step)
    assert all(s % align == 0 for s in starts[:-1]) and starts[-1] == size - tile
    assert max(np.diff(starts)) <= step  # never a longer step than asked: the overlap is kept
    assert len(starts) == math.ceil((size - tile) / step) + 1  # nnU-Net's count of tiles


def test_tile_alignment_divides_tile_and_step_up_to_32() -> None:
    assert [tile_alignment(t, s) for t, s in ((512, 448), (256, 128), (96, 72), (48, 24), (64, 48), (7, 3.5))] == [
        32, 32, 8, 8, 16, 1]


@pytest.mark.parametrize("overlap", [-0.1, 1.0, 1.5])
def test_tile_starts_rejects_overlap_outside_0_1(overlap: float) -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 10, overlap)


@pytest.mark.parametrize(
    ("shape", "tile", "expected"),
    [((512, 300), (256, 256), (512, 300)), ((37, 45), (64, 64), (64, 64)), ((1, 700), (64, 32), (64, 700))],
)
def test_padded_shape_table(shape: tuple[int, int], tile: tuple[int, int], expected: tuple[int, int]) -> None:
    assert padded_shape(shape, tile) == expected


def test_tile_grid_lists_tiles_row_major() -> None:
    grid = TileGrid.build((300, 512), (256, 256), 0.5)
    assert grid.ys == (0, 44) and grid.xs == (0, 128, 256)
    assert grid.n_tiles == 6
    assert list(grid.tiles()) == [(0, 0), (0, 128), (0, 256), (44, 0), (44, 128), (44, 256)]


@pytest.mark.parametrize("tile", [(16, 16), (17, 9), (64, 48), (1, 1)])
def test_gaussian_max_one_symmetric_positive(tile: tuple[int, int]) -> None:
    w = gaussian_weights(tile)
    assert w.shape == tile and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0)
    assert (w > 0).all()
    np.testing.assert_allclose(w, w[::-1, :], rtol=1e-6)
    np.testing.assert_allclose(w, w[:, ::-1], rtol=1e-6)


def test_gaussian_falls_off_with_sigma_tile_over_8() -> None:
    # tile 16 -> sigma 2, centre 7.5: columns 7 and 15 lie 0.5 and 7.5 px from it,
    # so their ratio is exp(-(7.5**2 - 0.5**2) / (2 * 2**2)) = exp(-7).
    w = gaussian_weights((16, 16))
    assert w[7, 15] / w[7, 7] == pytest.approx(math.exp(-7.0), rel=1e-5)


def test_gaussian_clamps_underflow_to_smallest_positive() -> None:
    w = gaussian_weights((64, 64), sigma_scale=0.01)  # sigma 0.64 px: the corners underflow to 0
    assert (w > 0).all()
    assert w[0, 0] == w.min()


def test_gaussian_is_cached_and_read_only() -> None:
    w = gaussian_weights((32, 32))
    assert gaussian_weights((32, 32)) is w
    with pytest.raises(ValueError):
        w[0, 0] = 2.0


def test_block_slices_and_shape() -> None:
    b = Block(10, 30, 5, 8)
    assert b.slices == (slice(10, 30), slice(5, 8))
    assert b.shape == (20, 3)
    assert np.zeros((2, 40, 40))[(slice(None), *b.slices)].shape == (2, 20, 3)


def test_plan_blocks_table() -> None:
    assert plan_blocks((5, 7), (2, 4)) == [
        Block(0, 2, 0, 4), Block(0, 2, 4, 7),
        Block(2, 4, 0, 4), Block(2, 4, 4, 7),
        Block(4, 5, 0, 4), Block(4, 5, 4, 7),
    ]  # fmt: skip


def test_tiles_for_block_table() -> None:
    grid = TileGrid.build((512, 512), (256, 256), 0.5)  # starts 0, 128, 256 on both axes
    # rows [100, 130) meet tiles at 0 and 128; columns [380, 400) meet 128 (ends at 384) and 256
    assert tiles_for_block(grid, Block(100, 130, 380, 400)) == [(0, 128), (0, 256), (128, 128), (128, 256)]
    assert tiles_for_block(grid, Block(100, 130, 384, 400)) == [(0, 256), (128, 256)]  # 384 is past 128's end
    # column 255 is the last of tile 0; column 256 is the first not in it
    assert [x for _, x in tiles_for_block(grid, Block(0, 1, 255, 256))] == [0, 128]
    assert [x for _, x in tiles_for_block(grid, Block(0, 1, 256, 257))] == [128, 256]


def test_region_for_tiles_may_pass_small_image() -> None:
    assert region_for_tiles([(0, 128), (128, 256)], (256, 256)) == Block(0, 384, 128, 512)
    grid = TileGrid.build((37, 45), (64, 64), 0.5)
    assert region_for_tiles(grid.tiles(), grid.tile) == Block(0, 64, 0, 64)


# --- properties -------------------------------------------------------------------------------------

sizes = st.integers(1, 600)
tiles = st.integers(8, 128)
overlaps = st.floats(0.0, 0.9)


@settings(max_examples=50, deadline=None)
@given(size=sizes, tile=tiles, overlap=overlaps)
def test_tile_starts_cover_axis_flush_with_border(size: int, tile: int, overlap: float) -> None:
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] == max(size - tile, 0)
    gaps = np.diff(starts)
    assert (gaps > 0).all()  # no tile twice
    assert (gaps <= max(tile * (1 - overlap), 1) + 1).all()  # never coarser than the asked step (+ rounding)
    covered = np.zeros(max(size, tile), dtype=int)
    for s in starts:
        covered[s : s + tile] += 1
    assert (covered[:size] > 0).all()


@settings(max_examples=50, deadline=None)
@given(h=sizes, w=sizes, data=st.data())
def test_blocks_partition_image(h: int, w: int, data: st.DataObject) -> None:
    # At least ceil(size / 64) px per block keeps the block count (and the test) small.
    bh = data.draw(st.integers(-(-h // 64), 600), label="bh")
    bw = data.draw(st.integers(-(-w // 64), 600), label="bw")
    count = np.zeros((h, w), dtype=np.int32)
    for b in plan_blocks((h, w), (bh, bw)):
        assert b.y0 % bh == 0 and b.x0 % bw == 0  # chunk-aligned origins
        assert 0 < b.shape[0] <= bh and 0 < b.shape[1] <= bw
        count[b.slices] += 1
    assert (count == 1).all()


@settings(max_examples=50, deadline=None)
@given(h=sizes, w=sizes, tile=st.tuples(tiles, tiles), overlap=overlaps, data=st.data())
def test_tiles_for_block_equals_brute_force(
    h: int, w: int, tile: tuple[int, int], overlap: float, data: st.DataObject
) -> None:
    grid = TileGrid.build((h, w), tile, overlap)
    y0 = data.draw(st.integers(0, h - 1), label="y0")
    x0 = data.draw(st.integers(0, w - 1), label="x0")
    block = Block(y0, data.draw(st.integers(y0 + 1, h)), x0, data.draw(st.integers(x0 + 1, w)))
    brute = [
        (y, x)
        for y, x in grid.tiles()
        if y < block.y1 and y + tile[0] > block.y0 and x < block.x1 and x + tile[1] > block.x0
    ]
    assert tiles_for_block(grid, block) == brute
