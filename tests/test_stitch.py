"""Blending: block-wise inference equals whole-image inference, and both equal a pointwise oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unetcore.inference.stitch import (
    predict_block,
    predict_blocks_numpy,
    read_padded,
    sliding_window,
    tta_predictor,
)
from unetcore.inference.windows import Block, TileGrid, gaussian_weights, plan_blocks


def affine(batch: np.ndarray) -> np.ndarray:
    """Pointwise predictor (K == C): blending any tiles of it must give back ``2x + 1`` exactly."""
    return batch * 2 + 1


def random_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def conv_net(in_channels: int = 2, out_channels: int = 3, seed: int = 0) -> torch.nn.Module:
    """Small random net whose outputs depend on a 5x5 neighbourhood (zero-padded at tile edges)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, out_channels, 3, padding=1),
    ).eval()


def as_predictor(net: torch.nn.Module):
    @torch.no_grad()
    def predict(batch: np.ndarray) -> np.ndarray:
        return net(torch.from_numpy(batch)).numpy()

    return predict


# --- read_padded ------------------------------------------------------------------------------------


def test_read_padded_zero_fills_outside_image() -> None:
    image = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    calls = []

    def read(ys: slice, xs: slice) -> np.ndarray:
        calls.append((ys, xs))
        return image[:, ys, xs]

    out = read_padded(read, (3, 4), Block(1, 5, 2, 6), channels=2)
    assert calls == [(slice(1, 3), slice(2, 4))]  # only the in-bounds part is read
    assert out.shape == (2, 4, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], [[6, 7, 0, 0], [10, 11, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(out[1, :2, :2], image[1, 1:3, 2:4])


def test_read_padded_region_wholly_outside_reads_nothing() -> None:
    def read(ys: slice, xs: slice) -> np.ndarray:
        raise AssertionError("nothing to read")

    assert not read_padded(read, (3, 4), Block(3, 5, 0, 4), channels=1).any()


def test_read_padded_interior_region_is_the_read_itself() -> None:
    """A region inside the image is not copied into a zero buffer: a block's memory does not grow with its halo."""
    image = np.arange(2 * 6 * 7, dtype=np.float32).reshape(2, 6, 7)
    read_back: list[np.ndarray] = []

    def read(ys: slice, xs: slice) -> np.ndarray:
        read_back.append(image[:, ys, xs].copy())
        return read_back[-1]

    out = read_padded(read, (6, 7), Block(1, 5, 2, 6), channels=2)
    assert np.shares_memory(out, read_back[0])
    np.testing.assert_array_equal(out, image[:, 1:5, 2:6])
    one = read_padded(lambda ys, xs: image[0, ys, xs], (6, 7), Block(1, 5, 2, 6), channels=2)  # broadcast as before
    np.testing.assert_array_equal(one, np.broadcast_to(image[0, 1:5, 2:6], (2, 4, 4)))


# --- the pointwise oracle ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(333, 517), (37, 45), (1, 700), (64, 48)])
@pytest.mark.parametrize("block", [(32, 40), (100, 150), (1000, 1000)])
def test_blocks_of_affine_predictor_equal_affine_image(shape: tuple[int, int], block: tuple[int, int]) -> None:
    image = random_image((2, *shape))
    out = predict_blocks_numpy(image, affine, (64, 48), 0.5, block, batch_size=4)
    np.testing.assert_allclose(out, affine(image), atol=1e-5)


def test_sliding_window_of_affine_predictor_equals_affine_image() -> None:
    image = random_image((2, 37, 150))
    np.testing.assert_allclose(sliding_window(image, affine, (64, 64), 0.25, 3), affine(image), atol=1e-5)


# --- tiled equals whole-image -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def conv_case() -> tuple[np.ndarray, object]:
    return random_image((2, 150, 170), seed=1), as_predictor(conv_net())


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("block", [(64, 64), (100, 100), (300, 300), (150, 170)])
def test_blocks_equal_whole_image_sliding_window(
    conv_case: tuple[np.ndarray, object], overlap: float, block: tuple[int, int]
) -> None:
    image, predictor = conv_case
    expected = sliding_window(image, predictor, (48, 48), overlap, batch_size=5)
    out = predict_blocks_numpy(image, predictor, (48, 48), overlap, block, batch_size=3)
    assert out.shape == (3, 150, 170)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_conv_case_is_not_pointwise(conv_case: tuple[np.ndarray, object]) -> None:
    # Guards the test above: tiling changes this net's output (zero padding at tile edges, seen in
    # full without overlap), so agreement with sliding_window is not automatic.
    image, predictor = conv_case
    whole = predictor(image[None])[0]
    assert np.abs(sliding_window(image, predictor, (48, 48), 0.0, 4) - whole).max() > 1e-2


def test_tta_blocks_equal_tta_sliding_window(conv_case: tuple[np.ndarray, object]) -> None:
    image, predictor = conv_case
    tta = tta_predictor(predictor)
    expected = sliding_window(image, tta, (48, 48), 0.5, 4)
    np.testing.assert_allclose(predict_blocks_numpy(image, tta, (48, 48), 0.5, (64, 64), 4), expected, atol=1e-5)


# --- the kernel's contract --------------------------------------------------------------------------


def test_predict_block_reads_block_plus_tile_margin_once() -> None:
    image = random_image((1, 1000, 1000))
    grid = TileGrid.build((1000, 1000), (64, 64), 0.5)
    block = Block(256, 384, 512, 640)
    calls = []

    def read(ys: slice, xs: slice) -> np.ndarray:
        calls.append((ys, xs))
        return image[:, ys, xs]

    out = predict_block(read, (1000, 1000), 1, affine, grid, block, batch_size=8)
    assert out.shape == (1, 128, 128)
    ((ys, xs),) = calls
    assert ys.start > block.y0 - 64 and ys.stop < block.y1 + 64
    assert xs.start > block.x0 - 64 and xs.stop < block.x1 + 64
    np.testing.assert_allclose(out, affine(image[(slice(None), *block.slices)]), atol=1e-5)


def test_predict_block_rejects_predictor_that_changes_tile_size() -> None:
    grid = TileGrid.build((100, 100), (32, 32), 0.5)
    image = random_image((1, 100, 100))
    with pytest.raises(ValueError, match="predictor mapped"):
        predict_block(lambda ys, xs: image[:, ys, xs], (100, 100), 1, lambda b: b[..., 1:, :], grid,
                      Block(0, 50, 0, 50), 4)  # fmt: skip


def test_tta_averages_flipped_predictions() -> None:
    # A predictor that multiplies by the column index j of a 4-wide tile: flipping W maps j to 3 - j,
    # so the mean over the 4 flips is (j + 3 - j) / 2 = 1.5 everywhere on a ones input.
    ramp = np.arange(4, dtype=np.float32)
    out = tta_predictor(lambda b: b * ramp)(np.ones((2, 1, 3, 4), dtype=np.float32))
    np.testing.assert_allclose(out, 1.5)


# --- properties -------------------------------------------------------------------------------------


@st.composite
def tiling_cases(draw: st.DrawFn) -> tuple[tuple[int, int], tuple[int, int], float, tuple[int, int]]:
    """(shape, tile, overlap, block) with at most 6 tiles and 6 blocks per axis, so a case runs fast.

    Sizes go up to 600 when the step allows it; small tiles with high overlap get smaller images.
    """
    overlap = draw(st.floats(0.0, 0.9))
    shape, tile, block = [], [], []
    for axis in "yx":
        t = draw(st.integers(8, 128), label=f"tile_{axis}")
        step = max(t * (1 - overlap), 1)
        n = draw(st.integers(1, min(600, int(t + 5 * step))), label=f"size_{axis}")
        b = draw(st.integers(-(-n // 6), 600), label=f"block_{axis}")
        shape.append(n), tile.append(t), block.append(b)
    return (shape[0], shape[1]), (tile[0], tile[1]), overlap, (block[0], block[1])


@settings(max_examples=50, deadline=None)
@given(case=tiling_cases())
def test_any_tiling_reproduces_affine_oracle(
    case: tuple[tuple[int, int], tuple[int, int], float, tuple[int, int]],
) -> None:
    shape, tile, overlap, block = case
    grid = TileGrid.build(shape, tile, overlap)

    # Every pixel is covered and gets a positive accumulated weight.
    weight_sum = np.zeros((grid.ys[-1] + tile[0], grid.xs[-1] + tile[1]), dtype=np.float32)
    for y, x in grid.tiles():
        weight_sum[y : y + tile[0], x : x + tile[1]] += gaussian_weights(tile)
    assert (weight_sum[: shape[0], : shape[1]] > 0).all()

    # Blocks partition the image.
    count = np.zeros(shape, dtype=np.int32)
    for b in plan_blocks(shape, block):
        count[b.slices] += 1
    assert (count == 1).all()

    image = random_image((1, *shape))
    out = predict_blocks_numpy(image, affine, tile, overlap, block, batch_size=8)
    assert out.shape == (1, *shape)
    np.testing.assert_allclose(out, affine(image), atol=1e-5)
