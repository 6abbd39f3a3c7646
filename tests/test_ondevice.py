"""The device block kernel (torch ops end to end, nnU-Net's ``perform_everything_on_device``) against the numpy
kernel, on the CPU with the same torch code a GPU runs: probabilities within 1e-5, identical labels, for 2-D and
3-D models, with and without flip TTA and empty-tile skipping; its normalisation against numpy's; the
out-of-memory fallback; the tile batch from free memory; bf16 inference's stated tolerance (tiled vs whole)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from unetcore.config import ForegroundIntensity, ModelConfig, NormalizationConfig
from unetcore.inference import (
    Block,
    BlockPredictor,
    TileGrid,
    gaussian_weight_sum,
    gaussian_weights,
    tile_overlap,
    tiles_for_block,
    windows,
)
from unetcore.inference.ondevice import (
    DeviceKernel,
    batch_for_memory,
    blend_block,
    normalize_tensor,
    probe_batch_size,
    read_region,
    region_tensor,
    tensor_predictor,
    to_device,
)
from unetcore.inference.predict import affine_of
from unetcore.inference.windows import divide_by_weight_sum, gaussian_axis_sums
from unetcore.model import UNet
from unetcore.store import StreamingStats, normalize

CPU = torch.device("cpu")

BF16_PROB_TOLERANCE = 0.02
"""Tiled vs whole-image probabilities under bf16 autocast: a tile's logits differ by bf16 rounding (8 bits of
mantissa) when it is computed in another batch or block; labels agree but at near-ties."""


def tiny_unet(spatial_dims: int, classes: int, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = UNet(ModelConfig(base_channels=4, depth=2, in_channels=2, num_classes=classes, spatial_dims=spatial_dims,
                             **overrides)).eval()
    for m in model.modules():  # trained-looking statistics, so eval-mode outputs are not trivially scaled
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def image_with_background(shape: tuple[int, ...], dtype: type = np.uint16) -> np.ndarray:
    """Two channels of noise with a constant corner (so empty-tile skipping has tiles to skip)."""
    rng = np.random.default_rng(7)
    raw = (rng.random((2, *shape)) * 1000).astype(dtype)
    raw[(slice(None), *(slice(0, n // 2) for n in shape))] = 5
    return raw


def stats_of(raw: np.ndarray) -> dict:
    s = StreamingStats(raw.shape[0], raw.dtype)
    s.update(np.moveaxis(raw, 0, -1))
    return s.result()


def predict_all(bp: BlockPredictor, raw: np.ndarray, stats: dict, block: tuple[int, ...]
                ) -> tuple[np.ndarray, np.ndarray]:
    probs = np.zeros((max(1, bp.num_classes), *raw.shape[1:]), np.float32)
    labels = np.zeros(raw.shape[1:], np.uint8)
    for b, p, lab in bp.blocks(raw, stats, block):
        probs[(slice(None), *b.slices)], labels[b.slices] = p, lab
    return probs, labels


CASES = [  # (model dims, image shape, tile, block, classes)
    (2, (40, 52), 16, (16, 32), 1),
    (2, (40, 52), 16, (24, 24), 3),
    (3, (5, 24, 20), (4, 16, 16), (3, 16, 16), 3),
    (2, (3, 28, 20), 16, (2, 16, 16), 2),  # a 2-D model slice by slice on a volume
]


@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize(("dims", "shape", "tile", "block", "classes"), CASES)
def test_the_device_kernel_equals_the_numpy_kernel(dims: int, shape: tuple[int, ...], tile: int | tuple[int, ...],
                                                   block: tuple[int, ...], classes: int, tta: bool) -> None:
    raw = image_with_background(shape)
    stats = stats_of(raw)
    model = tiny_unet(dims, classes, **({"pool": [[1, 2, 2], [2, 2, 2]]} if dims == 3 else {}))
    config = {"model": {"num_classes": classes, "spatial_dims": dims, "in_channels": 2},
              "normalization": {"mode": "percentile"}}
    common = dict(tile=tile, overlap=0.5, batch_size=3, tta=tta, skip_empty=True)
    on_numpy = BlockPredictor.from_model(model, config, CPU, path="numpy", **common)
    on_torch = BlockPredictor.from_model(model, config, CPU, path="torch", **common)
    assert on_numpy.kernel is None and on_torch.kernel is not None
    want_p, want_l = predict_all(on_numpy, raw, stats, block)
    got_p, got_l = predict_all(on_torch, raw, stats, block)
    np.testing.assert_allclose(got_p, want_p, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got_l, want_l)
    assert want_p.std() > 1e-3  # the model says something (not one constant)


@pytest.mark.parametrize("mode", ["percentile", "zscore", "ct"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_device_normalisation_equals_numpys(mode: str, dtype: type) -> None:
    raw = (np.random.default_rng(1).random((2, 9, 11)) * 200 - (50 if dtype in (np.int16, np.float32) else 0)
           ).astype(dtype)
    foreground = [ForegroundIntensity(low=10, high=150, mean=70, std=30),
                  ForegroundIntensity(low=0, high=90, mean=40, std=0)] if mode == "ct" else None
    recipe = NormalizationConfig(mode=mode, foreground=foreground)
    stats = stats_of(raw)
    grid = TileGrid.build((9, 11), (16, 16), 0.5)  # one tile larger than the image: the region is padded
    host = read_region(lambda *box: raw[(slice(None), *box)], (9, 11), grid, Block(0, 9, 0, 11))
    affine = affine_of(stats, recipe)
    got = region_tensor(host, 2, affine, CPU).numpy()
    want = np.zeros((2, 16, 16), np.float32)
    want[:, :9, :11] = normalize(raw, stats, recipe)
    np.testing.assert_array_equal(got, want)
    # the torch ops a GPU runs (on CPU tensors here) give the same numbers
    np.testing.assert_array_equal(normalize_tensor(to_device(raw, CPU), affine).numpy(), want[:, :9, :11])


def test_out_of_memory_falls_back_to_accumulating_on_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def flaky(batch: torch.Tensor) -> torch.Tensor:  # out of memory on the first pass only
        calls.append(batch.shape[0])
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return batch[:, :1] * 2 - 1

    raw = image_with_background((30, 34))
    stats, grid, block = stats_of(raw), TileGrid.build((30, 34), (16, 16), 0.5), Block(0, 30, 0, 34)
    host = read_region(lambda *box: raw[(slice(None), *box)], (30, 34), grid, block)
    affine = affine_of(stats, NormalizationConfig())
    with caplog.at_level(logging.WARNING, "unetcore.inference"):
        probs, labels = DeviceKernel(flaky, CPU, 1).outputs(host, 2, affine, grid, block, 4, "float32")
    assert "out of memory" in caplog.text and "on the CPU" in caplog.text
    want = torch.sigmoid(torch.from_numpy(normalize(raw, stats, NormalizationConfig())[:1] * 2 - 1)).numpy()
    np.testing.assert_allclose(probs, want, atol=1e-6)  # the identity-like predictor blends to itself
    np.testing.assert_array_equal(labels, (want[0] > 0.5).astype(np.uint8))


def test_probabilities_come_back_once_in_their_stored_dtype() -> None:
    raw = image_with_background((20, 20))
    grid, block = TileGrid.build((20, 20), (16, 16), 0.5), Block(0, 20, 0, 20)
    host = read_region(lambda *box: raw[(slice(None), *box)], (20, 20), grid, block)
    kernel = DeviceKernel(lambda b: b[:, :2], CPU, 2)
    probs, labels = kernel.outputs(host, 2, affine_of(stats_of(raw), NormalizationConfig()), grid, block, 2)
    assert probs is not None and probs.dtype == np.float16 and labels.dtype == np.uint8
    none, _ = kernel.outputs(host, 2, affine_of(stats_of(raw), NormalizationConfig()), grid, block, 2, None)
    assert none is None


@pytest.mark.parametrize(("free", "per_tile", "want"), [
    (80 * 2**30, 200 * 2**20, 128),  # an 80 GB GPU, 200 MB a tile: capped at 128
    (16 * 2**30, 200 * 2**20, 32),  # 40 % of 16 GB / 200 MB
    (300 * 2**20, 200 * 2**20, 1),  # never below one tile
    (2**30, 0, 128),
])
def test_tile_batch_from_free_memory(free: int, per_tile: int, want: int) -> None:
    assert batch_for_memory(free, per_tile) == want


def test_the_batch_probe_keeps_the_given_batch_off_cuda() -> None:
    assert probe_batch_size(lambda b: b, 1, (16, 16), CPU, fallback=6) == 6


def test_bf16_inference_keeps_tiled_equal_to_whole_image_within_the_stated_tolerance() -> None:
    raw = image_with_background((48, 40), np.uint8)
    stats = stats_of(raw)
    model = tiny_unet(2, 3)
    config = {"model": {"num_classes": 3, "in_channels": 2}, "normalization": {"mode": "percentile"}}
    tiled = BlockPredictor.from_model(model, config, CPU, tile=16, overlap=0.5, batch_size=3, precision="bf16",
                                      path="torch")
    whole = BlockPredictor.from_model(model, config, CPU, tile=16, overlap=0.5, batch_size=7, precision="bf16",
                                      path="torch")
    fp32 = BlockPredictor.from_model(model, config, CPU, tile=16, overlap=0.5, batch_size=7, precision="fp32",
                                     path="torch")
    p_tiled, l_tiled = predict_all(tiled, raw, stats, (16, 24))
    p_whole, l_whole = predict_all(whole, raw, stats, (48, 40))
    p_fp32, _ = predict_all(fp32, raw, stats, (48, 40))
    assert np.abs(p_tiled - p_whole).max() <= BF16_PROB_TOLERANCE
    assert (l_tiled == l_whole).mean() >= 0.99
    assert np.abs(p_whole - p_fp32).max() <= BF16_PROB_TOLERANCE
    assert np.abs(p_whole - p_fp32).max() > 0  # bf16 really ran (the tolerance is not vacuous)


def test_blending_on_the_device_is_gaussian_weighted() -> None:
    """The kernel's blend of a constant-per-tile predictor is the hand-computed weighted mean of two tiles."""
    grid = TileGrid.build((1, 24), (1, 16), 0.5)  # tiles at x = 0 and 8
    data = torch.zeros((1, 1, 24))

    def two_values(batch: torch.Tensor) -> torch.Tensor:  # the i-th tile of the batch predicts i everywhere
        return torch.stack([torch.full((1, 1, 16), float(i)) for i in range(batch.shape[0])])

    w = gaussian_weights((1, 16))[0]
    out = blend_block(data, Block(0, 1, 0, 24), two_values, grid, Block(0, 1, 0, 24), 2, torch.from_numpy(
        np.array(gaussian_weights((1, 16)))))
    x = 12  # inside both tiles: weight w[12] on value 0, w[4] on value 1
    assert out[0, 0, x].item() == pytest.approx(w[4] / (w[12] + w[4]), abs=1e-6)
    assert out[0, 0, 2].item() == 0.0 and out[0, 0, 20].item() == 1.0


@pytest.mark.parametrize(("shape", "tile", "block"), [
    ((700, 530), (256, 256), Block(256, 700, 0, 512)),
    ((40, 70, 53), (16, 32, 32), Block(8, 40, 0, 64, 16, 53)),
    ((30, 20), (64, 64), Block(0, 30, 0, 20)),  # one tile larger than the image
])
def test_the_weight_sum_per_axis_equals_the_tile_by_tile_sum(shape: tuple[int, ...], tile: tuple[int, ...],
                                                              block: Block) -> None:
    grid = TileGrid.build(shape, tile, 0.5)
    w = gaussian_weights(grid.tile)
    by_tile = np.zeros(block.shape, np.float32)
    for origin in tiles_for_block(grid, block):
        in_tile, in_block = tile_overlap(origin, grid.tile, block)
        by_tile[in_block] += w[in_tile]
    np.testing.assert_allclose(gaussian_weight_sum(grid, block), by_tile, rtol=1e-6)
    assert gaussian_weight_sum(grid, block, sigma_scale=1e-3) is None  # clamped zeros: not separable
    acc = np.random.default_rng(0).normal(0, 3, (2, *block.shape)).astype(np.float32)
    expected = acc / gaussian_weight_sum(grid, block)
    sums = gaussian_axis_sums(grid, block)
    assert sums is not None
    for slab in (7, 5000, windows.SLAB_ELEMENTS):  # 1 row; several rows, the last slab partial (first two cases)
        got = acc.copy()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(windows, "SLAB_ELEMENTS", slab)
            divide_by_weight_sum(got, sums)
        np.testing.assert_array_equal(got, expected)  # the map's division, bit for bit, without the map


def test_tensor_predictor_runs_channels_last_in_float32_on_the_cpu() -> None:
    model = tiny_unet(2, 1)
    run = tensor_predictor(model, CPU, 2)
    out = run(torch.rand(2, 2, 16, 16))
    assert out.dtype == torch.float32 and out.shape == (2, 1, 16, 16)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.ndim == 4)
