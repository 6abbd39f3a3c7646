"""The N-D core on volumes: 3-D tile grid, blocks, blending, flips, components, and 2-D models on volumes.

The same functions serve images and volumes; these cases are the 3-D counterparts of test_windows, test_stitch and
test_infer_units (tiny: tens of voxels a side), plus the slice-by-slice path of a 2-D model on a volume.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from unetcore.config import ModelConfig, NormalizationConfig
from unetcore.inference import (
    BACKGROUND_LOGIT,
    Block,
    BlockComponents,
    BlockPredictor,
    TileGrid,
    choose_block_shape,
    face_names,
    flip_axes,
    gaussian_weights,
    instances_blockwise,
    label_block,
    logits_to_outputs,
    plan_blocks,
    postprocess_blockwise,
    postprocess_whole,
    predict_block,
    predict_blocks_numpy,
    region_for_tiles,
    skip_empty_predictor,
    slicewise_predictor,
    sliding_window,
    tile_evaluations,
    tile_shape,
    tiles_for_block,
    torch_predictor,
    tta_predictor,
)
from unetcore.inference.layout import block_stem
from unetcore.model import UNet

# --- helpers ------------------------------------------------------------------------------------------


def affine(batch: np.ndarray) -> np.ndarray:
    """Pointwise predictor (K == C): blending any tiles of it must give back ``2x + 1`` exactly."""
    return batch * 2 + 1


def random_volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def as_predictor(net: torch.nn.Module):
    @torch.no_grad()
    def predict(batch: np.ndarray) -> np.ndarray:
        return net(torch.from_numpy(np.ascontiguousarray(batch))).numpy()

    return predict


def conv3d_net(in_channels: int = 2, out_channels: int = 3, seed: int = 0) -> torch.nn.Module:
    """Small random net whose outputs depend on a 5x5x5 neighbourhood (zero-padded at tile edges)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(in_channels, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(4, out_channels, 3, padding=1),
    ).eval()


def conv2d_net(in_channels: int = 2, out_channels: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, out_channels, 3, padding=1),
    ).eval()


def tiny_unet(spatial_dims: int, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(**{"base_channels": 4, "depth": 2, "in_channels": 2, "num_classes": 3,
                            "spatial_dims": spatial_dims, **overrides})
    model = UNet(config).eval()
    for m in model.modules():  # trained-looking statistics, so the eval-mode output is not trivially scaled
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


# --- tile grid ----------------------------------------------------------------------------------------


def test_tile_grid_3d_has_starts_per_axis_in_c_order() -> None:
    # z: 20 / 8 / 0.5: step 4, ceil(12 / 4) + 1 = 4 starts, linspace(0, 12, 4) = 0 4 8 12
    # y: 33 / 16 / 0.5: step 8, ceil(17 / 8) + 1 = 4 starts; spread 0 5.67 11.33 17 is off the alignment (8), so
    #    a regular grid of stride 8 and one tile flush with the border: 0 8 16 17
    # x: 7 <= 8: one padded tile
    grid = TileGrid.build((20, 33, 7), (8, 16, 8), 0.5)
    assert grid.starts == ((0, 4, 8, 12), (0, 8, 16, 17), (0,))
    assert grid.ndim == 3 and grid.n_tiles == 16
    assert grid.ys == (0, 8, 16, 17) and grid.xs == (0,)
    assert list(grid.tiles())[:5] == [(0, 0, 0), (0, 8, 0), (0, 16, 0), (0, 17, 0), (4, 0, 0)]


@pytest.mark.parametrize(("shape", "tile"), [((10, 10, 10), (4, 4)), ((10, 10), (4, 4, 4)), ((5,), (5,)),
                                             ((0, 4, 4), (2, 2, 2))])
def test_tile_grid_refuses_mismatched_or_bad_axes(shape: tuple[int, ...], tile: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        TileGrid.build(shape, tile, 0.5)


def test_gaussian_3d_is_the_product_of_the_axis_profiles() -> None:
    # tile 8: sigma 1, centre 3.5. The maximum sits on the 8 central voxels (0.5 from the centre on each axis);
    # voxel (0, 3, 3) lies 3.5 from it along z: exp(-(3.5**2 - 0.5**2) / 2) = exp(-6).
    w = gaussian_weights((8, 8, 8))
    assert w.shape == (8, 8, 8) and w.max() == pytest.approx(1.0)
    assert w[0, 3, 3] == pytest.approx(math.exp(-6.0), rel=1e-5)
    assert w[3, 3, 3] == w[4, 4, 4] == pytest.approx(1.0)
    # anisotropic (4, 16, 8): sigma (0.5, 2, 1). z: 1.5 vs 0.5 from the centre: exp(-(2.25 - 0.25) / 0.5) = exp(-4);
    # y: 7.5 vs 0.5: exp(-(56.25 - 0.25) / 8) = exp(-7).
    a = gaussian_weights((4, 16, 8))
    assert a[0, 7, 3] == pytest.approx(math.exp(-4.0), rel=1e-5)
    assert a[1, 0, 3] == pytest.approx(math.exp(-7.0), rel=1e-5)
    np.testing.assert_allclose(a, np.multiply.outer(gaussian_weights((4, 1, 1))[:, 0, 0], gaussian_weights((16, 8))),
                               rtol=1e-6)


def test_gaussian_3d_clamps_underflow_to_smallest_positive() -> None:
    w = gaussian_weights((24, 24, 24), sigma_scale=0.01)
    assert (w > 0).all() and w[0, 0, 0] == w.min()


# --- blocks -------------------------------------------------------------------------------------------


def test_block_3d_bounds_slices_shape_and_axes() -> None:
    b = Block(1, 4, 2, 6, 3, 5)
    assert b.start == (1, 2, 3) and b.stop == (4, 6, 5) and b.bounds == (1, 4, 2, 6, 3, 5)
    assert b.slices == (slice(1, 4), slice(2, 6), slice(3, 5))
    assert b.shape == (3, 4, 2) and b.ndim == 3
    assert (b.z0, b.z1, b.y0, b.y1, b.x0, b.x1) == (1, 4, 2, 6, 3, 5)
    assert np.zeros((2, 9, 9, 9))[(slice(None), *b.slices)].shape == (2, 3, 4, 2)
    assert b == Block.from_corners((1, 2, 3), (4, 6, 5)) and hash(b) == hash(Block(1, 4, 2, 6, 3, 5))
    assert pickle.loads(pickle.dumps(b)) == b and repr(b) == "Block(1, 4, 2, 6, 3, 5)"
    assert Block.covering((3, 5)) == Block(0, 3, 0, 5)
    with pytest.raises(AttributeError, match="no z axis"):
        _ = Block(0, 1, 0, 1).z0
    with pytest.raises(ValueError, match="pair per axis"):
        Block(0, 1, 2)


def test_block_file_stems_name_every_axis() -> None:
    assert block_stem(Block(10, 30, 5, 8)) == "y10-30_x5-8"  # the 2-D records keep their names
    assert block_stem(Block(0, 16, 32, 64, 0, 7)) == "z0-16_y32-64_x0-7"


def test_plan_blocks_3d_table() -> None:
    assert plan_blocks((3, 5, 4), (2, 3, 4)) == [
        Block(0, 2, 0, 3, 0, 4), Block(0, 2, 3, 5, 0, 4),
        Block(2, 3, 0, 3, 0, 4), Block(2, 3, 3, 5, 0, 4),
    ]  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 40)] * 3), data=st.data())
def test_blocks_partition_volume(shape: tuple[int, int, int], data: st.DataObject) -> None:
    block = tuple(data.draw(st.integers(-(-n // 5), 40), label=f"block{i}") for i, n in enumerate(shape))
    count = np.zeros(shape, np.int32)
    for b in plan_blocks(shape, block):
        assert all(s % e == 0 for s, e in zip(b.start, block))
        count[b.slices] += 1
    assert (count == 1).all()


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 60)] * 3), tile=st.tuples(*[st.integers(4, 24)] * 3),
       overlap=st.floats(0.0, 0.8), data=st.data())
def test_tiles_for_block_3d_equals_brute_force(shape: tuple[int, int, int], tile: tuple[int, int, int],
                                               overlap: float, data: st.DataObject) -> None:
    grid = TileGrid.build(shape, tile, overlap)
    start = [data.draw(st.integers(0, n - 1)) for n in shape]
    stop = [data.draw(st.integers(s + 1, n)) for s, n in zip(start, shape)]
    block = Block.from_corners(start, stop)
    brute = [o for o in grid.tiles() if all(a < b1 and a + t > b0 for a, t, b0, b1 in zip(o, tile, start, stop))]
    assert tiles_for_block(grid, block) == brute
    region = region_for_tiles(brute, tile)
    assert all(r0 <= b0 and r1 >= b1 for r0, r1, b0, b1 in zip(region.start, region.stop, start, stop))


def brute_force_evaluations(grid: TileGrid, block: tuple[int, ...]) -> int:
    return sum(len(tiles_for_block(grid, b)) for b in plan_blocks(grid.shape, block))


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 70)] * 3), block=st.tuples(*[st.integers(8, 40)] * 3),
       tile=st.integers(6, 30), overlap=st.sampled_from([0.0, 0.25, 0.5]))
def test_tile_evaluations_3d_equals_brute_force(shape: tuple[int, int, int], block: tuple[int, int, int], tile: int,
                                                overlap: float) -> None:
    grid = TileGrid.build(shape, (tile, tile // 2 + 3, tile), overlap)
    assert tile_evaluations(grid, block) == brute_force_evaluations(grid, block)


def test_block_shape_3d_fewest_evaluations_under_the_voxel_cap() -> None:
    grid = TileGrid.build((40, 96, 96), (16, 32, 32), 0.5)
    chunk, cap = (8, 32, 32), 24 * 64 * 64
    shape = choose_block_shape(grid, chunk, cap, min_blocks=2)
    candidates = [(z, y, x) for z in range(8, 41, 8) for y in range(32, 97, 32) for x in range(32, 97, 32)
                  if z * y * x <= cap and math.prod(-(-n // b) for n, b in zip(grid.shape, (z, y, x))) >= 2]
    best = min(tile_evaluations(grid, c) for c in candidates)
    assert all(b % c == 0 for b, c in zip(shape, chunk)) and math.prod(shape) <= cap
    assert tile_evaluations(grid, shape) == best
    assert choose_block_shape(grid, chunk, 1, min_blocks=1000) == chunk  # one chunk is always allowed


# --- blending on volumes --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(13, 21, 17), (5, 9, 40), (1, 30, 3)])
@pytest.mark.parametrize("block", [(4, 8, 8), (7, 10, 30), (64, 64, 64)])
def test_blocks_of_affine_predictor_equal_affine_volume(shape: tuple[int, int, int], block: tuple[int, int, int]) -> None:
    volume = random_volume((2, *shape))
    out = predict_blocks_numpy(volume, affine, (6, 12, 10), 0.5, block, batch_size=5)
    np.testing.assert_allclose(out, affine(volume), atol=1e-5)


@pytest.fixture(scope="module")
def conv3d_case() -> tuple[np.ndarray, object]:
    return random_volume((2, 19, 27, 23), seed=1), as_predictor(conv3d_net())


@pytest.mark.parametrize("overlap", [0.0, 0.5])
@pytest.mark.parametrize(("tile", "block"), [((8, 12, 12), (8, 8, 8)), ((8, 12, 12), (19, 27, 23)),
                                             ((4, 16, 10), (5, 14, 9)), ((12, 12, 12), (16, 16, 16))])
def test_volume_blocks_equal_whole_volume_sliding_window(
    conv3d_case: tuple[np.ndarray, object], overlap: float, tile: tuple[int, int, int], block: tuple[int, int, int]
) -> None:
    volume, predictor = conv3d_case
    expected = sliding_window(volume, predictor, tile, overlap, batch_size=7)
    out = predict_blocks_numpy(volume, predictor, tile, overlap, block, batch_size=3)
    assert out.shape == (3, 19, 27, 23)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_conv3d_case_is_not_pointwise(conv3d_case: tuple[np.ndarray, object]) -> None:
    volume, predictor = conv3d_case
    whole = predictor(volume[None])[0]
    assert np.abs(sliding_window(volume, predictor, (8, 12, 12), 0.0, 4) - whole).max() > 1e-2


@pytest.mark.parametrize("pool", [None, [[1, 2, 2], [2, 2, 2]]])
def test_tiny_3d_unet_blocks_equal_one_block_and_sliding_window(pool: list[list[int]] | None) -> None:
    volume = random_volume((2, 11, 25, 18), seed=2)
    predictor = as_predictor(tiny_unet(3, pool=pool))
    tile = (8, 16, 16)
    expected = sliding_window(volume, predictor, tile, 0.5, batch_size=4)
    grid = TileGrid.build(volume.shape[1:], tile, 0.5)
    one = predict_block(lambda *box: volume[(slice(None), *box)], volume.shape[1:], 2, predictor, grid,
                        Block.covering(volume.shape[1:]), batch_size=4)
    blocks = predict_blocks_numpy(volume, predictor, tile, 0.5, (4, 8, 8), batch_size=3)
    np.testing.assert_allclose(one, expected, atol=1e-5)
    np.testing.assert_allclose(blocks, expected, atol=1e-5)
    assert np.abs(expected).max() > 0.1  # a real signal, not all zeros


def test_predict_block_3d_reads_block_plus_tile_margin_once() -> None:
    volume = random_volume((1, 60, 60, 60))
    grid = TileGrid.build((60, 60, 60), (8, 16, 16), 0.5)
    block = Block(16, 32, 16, 32, 32, 48)
    calls = []

    def read(*box: slice) -> np.ndarray:
        calls.append(box)
        return volume[(slice(None), *box)]

    out = predict_block(read, (60, 60, 60), 1, affine, grid, block, batch_size=8)
    ((zs, ys, xs),) = calls
    assert zs.start > 16 - 8 and zs.stop < 32 + 8
    assert ys.start > 16 - 16 and ys.stop < 32 + 16 and xs.start > 32 - 16 and xs.stop < 48 + 16
    np.testing.assert_allclose(out, affine(volume[(slice(None), *block.slices)]), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), overlap=st.floats(0.0, 0.8))
def test_any_3d_tiling_reproduces_affine_oracle(data: st.DataObject, overlap: float) -> None:
    tile = tuple(data.draw(st.integers(3, 12), label=f"tile{i}") for i in range(3))
    shape = tuple(data.draw(st.integers(1, t + 3 * max(1, int(t * (1 - overlap)))), label=f"size{i}")
                  for i, t in enumerate(tile))
    block = tuple(data.draw(st.integers(-(-n // 3), 30), label=f"block{i}") for i, n in enumerate(shape))
    volume = random_volume((1, *shape))
    np.testing.assert_allclose(predict_blocks_numpy(volume, affine, tile, overlap, block, 6), affine(volume),
                               atol=1e-5)


# --- flips, skipped tiles -----------------------------------------------------------------------------


def test_flip_axes_2d_are_todays_four_and_3d_has_eight() -> None:
    assert flip_axes(2) == [(), (-1,), (-2,), (-2, -1)]
    assert len(flip_axes(3)) == 8 and len(set(flip_axes(3))) == 8
    assert set(flip_axes(3)) >= {(), (-3,), (-3, -2, -1)}


def test_tta_on_volumes_averages_eight_flips() -> None:
    # Multiplying by the slice index k of a 4-deep tile: flipping z maps k to 3 - k, so the mean is 1.5 everywhere.
    calls = []

    def by_slice(batch: np.ndarray) -> np.ndarray:
        calls.append(1)
        return batch * np.arange(4, dtype=np.float32)[:, None, None]

    out = tta_predictor(by_slice)(np.ones((2, 1, 4, 3, 5), np.float32))
    np.testing.assert_allclose(out, 1.5)
    assert len(calls) == 8


def test_tta_volume_blocks_equal_tta_sliding_window(conv3d_case: tuple[np.ndarray, object]) -> None:
    volume, predictor = conv3d_case[0][:, :10, :14, :13], conv3d_case[1]
    tta = tta_predictor(predictor)
    expected = sliding_window(volume, tta, (6, 8, 8), 0.5, 8)
    np.testing.assert_allclose(predict_blocks_numpy(volume, tta, (6, 8, 8), 0.5, (5, 8, 8), 8), expected, atol=1e-5)
    assert np.abs(expected - sliding_window(volume, predictor, (6, 8, 8), 0.5, 8)).max() > 1e-3  # flips matter


def test_skip_empty_on_volumes_never_runs_constant_tiles() -> None:
    seen: list[np.ndarray] = []

    def foreground(batch: np.ndarray) -> np.ndarray:
        seen.append(batch)
        return np.full((batch.shape[0], 2, *batch.shape[2:]), 5.0, np.float32)

    volume = np.zeros((1, 16, 24, 24), np.float32)
    volume[:, 12:] = random_volume((1, 4, 24, 24))
    predictor = skip_empty_predictor(foreground, 2)
    out = sliding_window(volume, predictor, (8, 8, 8), 0.5, 4)
    grid = TileGrid.build((16, 24, 24), (8, 8, 8), 0.5)
    assert seen and sum(len(b) for b in seen) == sum(1 for z, _, _ in grid.tiles() if z + 8 > 12)
    np.testing.assert_array_equal(predict_blocks_numpy(volume, predictor, (8, 8, 8), 0.5, (8, 16, 16), 4), out)
    np.testing.assert_allclose(out[0, :8], BACKGROUND_LOGIT, atol=1e-5)  # multi-class: class 0 sure, others not
    np.testing.assert_allclose(out[1, :8], -BACKGROUND_LOGIT, atol=1e-5)
    np.testing.assert_allclose(out[:, 12:], 5.0, atol=1e-5)


def test_logits_to_outputs_on_volumes() -> None:
    logits = np.random.default_rng(0).normal(size=(3, 4, 5, 6)).astype(np.float32)
    probs, labels = logits_to_outputs(logits, 3)
    assert probs.shape == (3, 4, 5, 6) and labels.shape == (4, 5, 6)
    np.testing.assert_array_equal(labels, logits.argmax(axis=0))


# --- a 2-D model on a volume: slice by slice ------------------------------------------------------------


@pytest.mark.parametrize("block", [(2, 24, 20), (5, 40, 37), (1, 16, 64)])
def test_2d_model_on_volume_equals_per_slice_2d_prediction(block: tuple[int, int, int]) -> None:
    volume = random_volume((2, 5, 40, 37), seed=3)
    predictor = as_predictor(conv2d_net())
    per_slice = np.stack([sliding_window(volume[:, z], predictor, (16, 16), 0.5, 3) for z in range(5)], axis=1)
    out = predict_blocks_numpy(volume, slicewise_predictor(predictor), (1, 16, 16), 0.5, block, batch_size=3)
    np.testing.assert_allclose(out, per_slice, atol=1e-6)


def test_slicewise_folds_depth_into_the_batch() -> None:
    batches = []

    def record(batch: np.ndarray) -> np.ndarray:
        batches.append(batch.shape)
        return batch[:, :1] * 3

    x = random_volume((2, 2, 3, 4, 5))
    out = slicewise_predictor(record)(x)
    assert batches == [(6, 2, 4, 5)] and out.shape == (2, 1, 3, 4, 5)
    np.testing.assert_allclose(out, x[:, :1] * 3)
    assert slicewise_predictor(record)(x[:, :, 0]).shape == (2, 1, 4, 5)  # a 2-D batch passes through


def test_tile_shape_per_model_and_image() -> None:
    assert tile_shape(64, 2, 2) == (64, 64)
    assert tile_shape(64, 2, 3) == (1, 64, 64)  # a 2-D model on a volume: one slice deep
    assert tile_shape(32, 3, 3) == (32, 32, 32)
    assert tile_shape((16, 64, 64), 3, 3) == (16, 64, 64)
    with pytest.raises(ValueError, match="3-D model cannot predict a 2-D image"):
        tile_shape(32, 3, 2)
    with pytest.raises(ValueError, match="axes"):
        tile_shape((16, 64), 3, 3)


def zscore_stats(image: np.ndarray) -> dict:
    return {"channels": [{"mean": float(c.mean()), "std": float(c.std())} for c in image]}


def zscored(image: np.ndarray, stats: dict) -> np.ndarray:
    mean = np.array([c["mean"] for c in stats["channels"]], np.float32)
    std = np.array([c["std"] for c in stats["channels"]], np.float32)
    shape = (-1,) + (1,) * (image.ndim - 1)
    return ((image.astype(np.float32) - mean.reshape(shape)) * (1 / std).reshape(shape)).astype(np.float32)


@pytest.fixture(scope="module")
def stored_volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[zarr.Array, np.ndarray, dict]:
    rng = np.random.default_rng(4)
    raw = (rng.random((2, 4, 24, 20)) * 1000).astype(np.uint16)
    path = Path(tmp_path_factory.mktemp("vol")) / "v.zarr"
    array = zarr.create_array(store=str(path), shape=raw.shape, chunks=(2, 3, 16, 16), dtype=raw.dtype)
    array[:] = raw
    return array, raw, zscore_stats(raw)


@pytest.mark.parametrize(("tta", "skip_empty"), [(False, False), (True, True)])
def test_2d_unet_predicts_a_stored_volume_slice_by_slice(stored_volume: tuple[zarr.Array, np.ndarray, dict],
                                                         tta: bool, skip_empty: bool) -> None:
    array, raw, stats = stored_volume
    model = tiny_unet(2)
    config = {"model": {"num_classes": 3}, "normalization": {"mode": "zscore"}}  # an old config.json: no spatial_dims
    bp = BlockPredictor.from_model(model, config, torch.device("cpu"), tile=16, overlap=0.5, batch_size=4, tta=tta,
                                   skip_empty=skip_empty)
    assert bp.spatial_dims == 2 and bp.grid((4, 24, 20)).tile == (1, 16, 16)
    got_probs = np.zeros((3, 4, 24, 20), np.float32)
    got_labels = np.zeros((4, 24, 20), np.uint8)
    for block, probs, labels in bp.blocks(array, stats, (3, 16, 32)):
        got_probs[(slice(None), *block.slices)], got_labels[block.slices] = probs, labels
    plain = torch_predictor(model, torch.device("cpu"))
    plain = tta_predictor(plain) if tta else plain
    normalised = zscored(raw, stats)
    for z in range(4):
        logits = sliding_window(normalised[:, z], plain, (16, 16), 0.5, 4)
        probs, labels = logits_to_outputs(logits, 3)
        np.testing.assert_allclose(got_probs[:, z], probs, atol=1e-5)
        assert (got_labels[z] != labels).mean() < 1e-3  # argmax ties at float rounding aside


def test_3d_unet_predicts_a_stored_volume_like_the_whole_volume_window(
    stored_volume: tuple[zarr.Array, np.ndarray, dict],
) -> None:
    array, raw, stats = stored_volume
    pool = [[1, 2, 2], [2, 2, 2]]
    model = tiny_unet(3, pool=pool)
    config = {"model": {"num_classes": 3, "spatial_dims": 3}, "normalization": {"mode": "zscore"}}
    bp = BlockPredictor.from_model(model, config, torch.device("cpu"), tile=(4, 16, 16), overlap=0.5, batch_size=2)
    got = np.zeros((3, 4, 24, 20), np.float32)
    for block, probs, _ in bp.blocks(array, stats, (3, 16, 16)):
        got[(slice(None), *block.slices)] = probs
    logits = sliding_window(zscored(raw, stats), torch_predictor(model, torch.device("cpu"), 3), (4, 16, 16), 0.5, 3)
    np.testing.assert_allclose(got, logits_to_outputs(logits, 3)[0], atol=1e-5)
    with pytest.raises(ValueError, match="3-D model cannot predict a 2-D image"):
        bp.grid((30, 26))


# --- components across 3-D block faces -------------------------------------------------------------------


def test_face_names_per_dimension() -> None:
    assert face_names(2) == [("top", "bottom"), ("left", "right")]
    assert face_names(3) == [("front", "back"), ("top", "bottom"), ("left", "right")]


def test_label_block_3d_keeps_six_faces_and_round_trips(tmp_path: Path) -> None:
    sem = np.zeros((4, 5, 6), np.uint8)
    sem[0, 1:3, 1:3] = 1  # on the front face
    sem[3, 4, 5] = 2  # a corner voxel: back, bottom and right faces
    ids, comps = label_block(sem, Block(4, 8, 0, 5, 10, 16), (8, 20, 16), with_background=False)
    assert comps.n == 2 and sorted(comps.faces) == ["back", "bottom", "front", "left", "right", "top"]
    assert comps.faces["front"].shape == (5, 6) and comps.faces["left"].shape == (4, 5)
    assert comps.faces["back"][4, 5] == comps.faces["right"][3, 4] == ids[3, 4, 5]
    assert list(comps.border) == [False, False, True]  # only the corner voxel lies on the volume's border
    comps.save(tmp_path / "c.npz")
    back = BlockComponents.load(tmp_path / "c.npz")
    assert sorted(back.faces) == sorted(comps.faces)
    assert all(np.array_equal(back.faces[k], comps.faces[k]) for k in comps.faces)


def test_object_crossing_blocks_along_z_gets_one_id() -> None:
    sem = np.zeros((12, 6, 6), np.uint8)
    sem[:, 1, 1] = 1  # a rod through every z block
    sem[11, 1:5, 1] = 1  # then along y at the back
    sem[5, 4, 4] = 1  # a separate dot
    sem[6, 4, 5] = 1  # diagonal to the dot: not 6-connected to it
    inst = instances_blockwise(sem, (4, 4, 4))
    assert len({int(inst[0, 1, 1]), int(inst[11, 4, 1])}) == 1
    assert inst.max() == 3 and inst[5, 4, 4] != inst[6, 4, 5]


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 14)] * 3), block=st.tuples(*[st.integers(1, 8)] * 3),
       p=st.floats(0.2, 0.8), seed=st.integers(0, 10_000))
def test_blockwise_3d_instances_equal_scipy_labelling(shape: tuple[int, int, int], block: tuple[int, int, int],
                                                      p: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sem = ((rng.random(shape) < p) * rng.integers(1, 3, shape)).astype(np.uint8)
    inst = instances_blockwise(sem, block).astype(np.int64)
    ref = np.zeros(shape, np.int64)
    for value in (1, 2):
        ids, _ = ndimage.label(sem == value)  # the default structure: the 6 face neighbours
        ref[ids > 0] = ids[ids > 0] + ref.max()
    assert inst.max() == len(np.unique(ref[ref > 0]))
    assert ((inst > 0) == (ref > 0)).all()
    assert len(set(zip(inst.ravel().tolist(), ref.ravel().tolist()))) == len(np.unique(ref))


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 12)] * 3), block=st.tuples(*[st.integers(1, 7)] * 3),
       m=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_blockwise_3d_postprocessing_equals_whole_volume(shape: tuple[int, int, int], block: tuple[int, int, int],
                                                         m: int, seed: int) -> None:
    sem = (np.random.default_rng(seed).random(shape) < 0.5).astype(np.uint8)
    np.testing.assert_array_equal(postprocess_blockwise(sem, block, m), postprocess_whole(sem, m))


def test_read_padded_volume_recipe_is_applied_per_channel() -> None:
    # BlockPredictor.logits normalises a volume slab per channel, like an image band.
    raw = np.stack([np.full((2, 3, 4), 10.0), np.full((2, 3, 4), 30.0)]).astype(np.float32)
    raw[1, 1] = 50.0
    array = zarr.create_array(store=zarr.storage.MemoryStore(), shape=raw.shape, dtype=np.float32, chunks=raw.shape)
    array[:] = raw
    stats = {"channels": [{"mean": 10.0, "std": 2.0}, {"mean": 40.0, "std": 10.0}]}
    bp = BlockPredictor(lambda b: b, 2, NormalizationConfig(mode="zscore"), (2, 3, 4), 0.0, 1, spatial_dims=3)
    out = bp.logits(array, stats, bp.grid((2, 3, 4)), Block.covering((2, 3, 4)))
    np.testing.assert_allclose(out[0], 0.0)
    np.testing.assert_allclose(out[1, 0], -1.0)
    np.testing.assert_allclose(out[1, 1], 1.0)
