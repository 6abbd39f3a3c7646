"""Core numeric behaviours checked against independent oracles, written here from their definitions.

Each oracle is computed without the code under test (Gaussian blending by hand, on images and volumes, percentiles from a known
order statistic, labelling with scipy, thresholds with numpy), and each is chosen so that a plausible broken
implementation fails it: ``scripts/mutation_check.py`` swaps such versions in and requires these tests to fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from unetcore.config import NormalizationConfig
from unetcore.inference.components import instances_blockwise, postprocess_blockwise
from unetcore.inference.predict import logits_to_outputs
from unetcore.inference.stitch import predict_blocks_numpy, sliding_window
from unetcore.inference.windows import gaussian_weights
from unetcore.store.stats import StreamingStats, fit_normalization, normalize
from unetcore.training.augment import AugmentConfig, augment_pair

# --- Gaussian blending ---------------------------------------------------------------------------------


def _gaussian_1d(n: int) -> np.ndarray:
    """nnU-Net's importance profile along one axis: centred in the tile, sigma = n / 8."""
    d = np.arange(n, dtype=np.float64) - (n - 1) / 2
    return np.exp(-(d**2) / (2 * (n / 8) ** 2))


def _tile_value(y0: int, x0: int) -> float:
    """A different constant for every tile origin (deterministic, so every visit of a tile agrees)."""
    return float(10 * np.sin(12.9898 * y0 + 78.233 * x0))


class ConstantPerTile:
    """Predictor on a coordinate image (channel 0 = row, 1 = column): tile ``(y0, x0)`` answers ``_tile_value``.

    The origin is read from the tile's first pixel, so the predictor also records which tiles ran.
    """

    def __init__(self) -> None:
        self.origins: set[tuple[int, int]] = set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = np.empty((batch.shape[0], 1, *batch.shape[2:]), np.float32)
        for i, tile in enumerate(batch):
            origin = int(tile[0, 0, 0]), int(tile[1, 0, 0])
            self.origins.add(origin)
            out[i] = _tile_value(*origin)
        return out


def _coordinates(h: int, w: int) -> np.ndarray:
    return np.stack(np.mgrid[0:h, 0:w]).astype(np.float32)


def _blend_by_hand(shape: tuple[int, int], tile: tuple[int, int], ys: list[int], xs: list[int],
                   weight: np.ndarray) -> np.ndarray:
    """Each pixel: sum over the tiles covering it of value * weight, over the sum of their weights (float64)."""
    (h, w), (th, tw) = shape, tile
    num = np.zeros((max(h, th) + th, max(w, tw) + tw))
    den = np.zeros_like(num)
    for y0 in ys:
        for x0 in xs:
            num[y0:y0 + th, x0:x0 + tw] += _tile_value(y0, x0) * weight
            den[y0:y0 + th, x0:x0 + tw] += weight
    return num[:h, :w] / den[:h, :w]


# Tile starts by hand (n = ceil((size - tile) / step) + 1 starts; nnU-Net's evenly spread ones when they fall on the
# alignment, the largest power of two dividing tile and step (<= 32), else a regular grid of that stride, the last
# tile flush with the border):
# 100 / 32 / 0.5: step 16, alignment 16, spread 0 13.6 ... not on it: 0 16 32 48 64, then 68
# 130 / 48 / 0.5: step 24, alignment 8, spread 0 20.5 41 ... not on it: 0 24 48 72, then 82
# 20 / 32: one tile at 0 (the image is padded); 90 / 32 / 0.25: step 24, alignment 8: 0 24 48, then 58
BLEND_CASES = [
    ((100, 130), (32, 48), 0.5, [0, 16, 32, 48, 64, 68], [0, 24, 48, 72, 82]),
    ((20, 90), (32, 32), 0.25, [0], [0, 24, 48, 58]),
]


@pytest.mark.parametrize("tile", [(32, 32), (32, 48), (17, 9)])
def test_gaussian_weights_follow_the_formula(tile: tuple[int, int]) -> None:
    expected = np.outer(_gaussian_1d(tile[0]), _gaussian_1d(tile[1]))
    np.testing.assert_allclose(gaussian_weights(tile), expected / expected.max(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("shape", "tile", "overlap", "ys", "xs"), BLEND_CASES)
def test_every_blended_pixel_is_the_gaussian_weighted_mean_of_its_tiles(
    shape: tuple[int, int], tile: tuple[int, int], overlap: float, ys: list[int], xs: list[int]
) -> None:
    weight = np.outer(_gaussian_1d(tile[0]), _gaussian_1d(tile[1]))
    expected = _blend_by_hand(shape, tile, ys, xs, weight)
    uniform = _blend_by_hand(shape, tile, ys, xs, np.ones(tile))
    assert np.abs(expected - uniform).max() > 1.0  # the case tells Gaussian from uniform blending apart

    image = _coordinates(*shape)
    whole = ConstantPerTile()
    out = sliding_window(image, whole, tile, overlap, batch_size=3)
    assert whole.origins == {(y, x) for y in ys for x in xs}
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-4)
    for block in [(16, 16), (40, 56), (shape[0], 23)]:
        blocks = ConstantPerTile()
        np.testing.assert_allclose(predict_blocks_numpy(image, blocks, tile, overlap, block, 4)[0], expected,
                                   rtol=1e-5, atol=1e-4)
        assert blocks.origins == whole.origins


# --- Gaussian blending of volumes -------------------------------------------------------------------------


def _tile_value_3d(z0: int, y0: int, x0: int) -> float:
    return float(10 * np.sin(4.1414 * z0 + 12.9898 * y0 + 78.233 * x0))


class ConstantPerTile3D:
    """Predictor on a coordinate volume (channels z, y, x): the tile at ``(z0, y0, x0)`` answers ``_tile_value_3d``."""

    def __init__(self) -> None:
        self.origins: set[tuple[int, int, int]] = set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = np.empty((batch.shape[0], 1, *batch.shape[2:]), np.float32)
        for i, tile in enumerate(batch):
            origin = int(tile[0, 0, 0, 0]), int(tile[1, 0, 0, 0]), int(tile[2, 0, 0, 0])
            self.origins.add(origin)
            out[i] = _tile_value_3d(*origin)
        return out


@pytest.mark.parametrize("tile", [(8, 16, 4), (5, 7, 9)])
def test_gaussian_weights_3d_follow_the_formula(tile: tuple[int, int, int]) -> None:
    expected = np.multiply.outer(np.outer(_gaussian_1d(tile[0]), _gaussian_1d(tile[1])), _gaussian_1d(tile[2]))
    np.testing.assert_allclose(gaussian_weights(tile), expected / expected.max(), rtol=1e-6, atol=1e-7)


def test_every_blended_voxel_is_the_gaussian_weighted_mean_of_its_tiles() -> None:
    # Starts by hand: z 20 / 8 / 0.5: step 4, n 4, spread 0 4 8 12 (on the alignment 4); y 26 / 16: step 8, n 3,
    # spread 0 5 10 is off the alignment 8: 0 8, then 10; x 9 / 8: step 4, n 2: 0 1.
    shape, tile, starts = (20, 26, 9), (8, 16, 8), ([0, 4, 8, 12], [0, 8, 10], [0, 1])
    weight = np.multiply.outer(np.outer(_gaussian_1d(8), _gaussian_1d(16)), _gaussian_1d(8))
    num, den, uniform_num, uniform_den = (np.zeros((28, 32, 16)) for _ in range(4))
    for z0 in starts[0]:
        for y0 in starts[1]:
            for x0 in starts[2]:
                box = (slice(z0, z0 + 8), slice(y0, y0 + 16), slice(x0, x0 + 8))
                num[box] += _tile_value_3d(z0, y0, x0) * weight
                den[box] += weight
                uniform_num[box] += _tile_value_3d(z0, y0, x0)
                uniform_den[box] += 1
    inside = tuple(slice(0, n) for n in shape)
    expected = num[inside] / den[inside]
    assert np.abs(expected - uniform_num[inside] / uniform_den[inside]).max() > 1.0  # Gaussian, not uniform

    volume = np.stack(np.mgrid[0:20, 0:26, 0:9]).astype(np.float32)
    whole = ConstantPerTile3D()
    np.testing.assert_allclose(sliding_window(volume, whole, tile, 0.5, batch_size=5)[0], expected, rtol=1e-5,
                               atol=1e-4)
    assert whole.origins == {(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]}
    for block in [(4, 8, 8), (7, 26, 5), (20, 13, 9)]:
        blocks = ConstantPerTile3D()
        np.testing.assert_allclose(predict_blocks_numpy(volume, blocks, tile, 0.5, block, 4)[0], expected, rtol=1e-5,
                                   atol=1e-4)
        assert blocks.origins == whole.origins


# --- percentile normalisation ----------------------------------------------------------------------------


def _stats(values_cyx: np.ndarray) -> dict:
    acc = StreamingStats(values_cyx.shape[0], values_cyx.dtype)
    acc.update(np.moveaxis(values_cyx, 0, -1))
    return acc.result()


def _shuffled(values: np.ndarray, shape: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(values).reshape(shape)


def test_integer_percentile_normalisation_clips_outliers_on_both_sides() -> None:
    # 1000 uint16 pixels: 5 at 0, the ramp 1005..1994, 5 at 65535. The 1st percentile is the 10th smallest value
    # (1009), the 99th the 990th (1989); min-max scaling would use 0 and 65535 instead.
    ch0 = np.concatenate([np.zeros(5), np.arange(1005, 1995), np.full(5, 65535)]).astype(np.uint16)
    ch1 = ch0 // 2  # order statistics halve too: 504 and 994
    image = np.stack([_shuffled(ch0, (25, 40), 1), _shuffled(ch1, (25, 40), 2)])
    recipe = NormalizationConfig(mode="percentile", low_percentile=1, high_percentile=99)
    out = normalize(image, _stats(image), recipe)
    assert out.dtype == np.float32
    for c, (lo, hi) in enumerate([(1009, 1989), (504, 994)]):
        expected = np.clip((image[c].astype(np.float64) - lo) / (hi - lo), 0, 1)
        np.testing.assert_allclose(out[c], expected, rtol=1e-6, atol=1e-7)
    at = {int(v): float(out[0][image[0] == v][0]) for v in (0, 1009, 1499, 1989, 65535)}
    assert at == {0: 0.0, 1009: 0.0, 1499: pytest.approx(0.5, abs=1e-6), 1989: pytest.approx(1.0, abs=1e-6),
                  65535: 1.0}


def test_float_percentile_and_zscore_normalisation_are_exact() -> None:
    # 1001 float pixels: 5 at -1000, the ramp 0..990, 5 at 10000. np.percentile's linear rule puts the 1st
    # percentile at sorted[10] = 5 and the 99th at sorted[990] = 985 exactly.
    values = np.concatenate([np.full(5, -1000.0), np.arange(991.0), np.full(5, 10000.0)]).astype(np.float32)
    image = _shuffled(values, (7, 143), 3)[None]
    stats = _stats(image)
    out = normalize(image, stats, NormalizationConfig(mode="percentile", low_percentile=1, high_percentile=99))
    np.testing.assert_allclose(out[0], np.clip((image[0] - 5.0) / 980.0, 0, 1), rtol=1e-6, atol=1e-6)
    assert out[0][image[0] == 495.0] == pytest.approx(0.5, abs=1e-6)
    z = normalize(image, stats, NormalizationConfig(mode="zscore"))
    as64 = values.astype(np.float64)
    np.testing.assert_allclose(z[0], (image[0] - as64.mean()) / as64.std(), rtol=1e-5, atol=1e-5)
    assert z.max() > 3 and z.min() < -1  # zscore is not clipped


# --- ct normalisation: the training set's foreground ------------------------------------------------------


def _foreground_entry(name: str, values: np.ndarray) -> dict:
    """A labelled manifest entry whose foreground statistics (streamed, as ingestion keeps them) are ``values``."""
    return {"id": name, "has_mask": True, "foreground_stats": _stats(values.reshape(1, 1, -1))}


def test_ct_normalisation_clips_to_the_pooled_foreground_percentiles_then_z_scores() -> None:
    # Two CTs whose foregrounds are 0..999 and 1000..1999 HU. Over the training set's 2000 foreground voxels the
    # 0.5th percentile is the 10th smallest (9) and the 99.5th the 1990th (1989); mean 999.5, std of 0..1999.
    # Naive versions: the mean of the per-image percentiles (4 and 1004 -> 504; 994 and 1994 -> 1494), or a
    # z-score with each image's own statistics, give other numbers.
    a, b = np.arange(1000, dtype=np.int16), np.arange(1000, 2000, dtype=np.int16)
    entries = [_foreground_entry("a", a), _foreground_entry("b", b),
               {"id": "unlabelled", "has_mask": False}]
    recipe = fit_normalization(NormalizationConfig(mode="ct"), entries)
    pooled = np.arange(2000, dtype=np.float64)
    (fitted,) = recipe.foreground
    assert (fitted.low, fitted.high) == (9.0, 1989.0)
    assert fitted.mean == pytest.approx(999.5) and fitted.std == pytest.approx(pooled.std(), rel=1e-12)
    block = np.array([-3000, -500, 9, 500, 1989, 2500, 30000], np.int16).reshape(1, 1, 1, 7)  # (C, D, H, W)
    out = normalize(block, {"channels": [{}]}, recipe)  # ct ignores the image's own statistics
    expected = (np.clip(block.astype(np.float64), 9, 1989) - 999.5) / pooled.std()
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out.dtype == np.float32 and out.shape == block.shape
    assert out[0, 0, 0, 0] == out[0, 0, 0, 2] and out[0, 0, 0, -1] == out[0, 0, 0, 4]  # clipped before scaling
    naive = (block.astype(np.float64) - 999.5) / pooled.std()  # z-score alone: outliers stay outliers
    assert not np.allclose(out, naive, rtol=1e-3)
    per_image = normalize(block, _stats(a.reshape(1, 1, -1)), NormalizationConfig(mode="zscore"))
    assert not np.allclose(out, per_image, rtol=1e-3)


def test_ct_percentiles_of_one_float_image_are_numpys() -> None:
    """One training image: the fitted clip range is np.percentile of its foreground sample, exactly."""
    values = np.random.default_rng(4).normal(40.0, 300.0, 5000).astype(np.float32)
    recipe = fit_normalization(NormalizationConfig(mode="ct"), [_foreground_entry("a", values)])
    (fitted,) = recipe.foreground
    lo, hi = np.percentile(values, [0.5, 99.5])
    assert fitted.low == pytest.approx(float(lo), abs=1e-4) and fitted.high == pytest.approx(float(hi), abs=1e-4)
    assert fitted.mean == pytest.approx(float(values.astype(np.float64).mean()), rel=1e-9)


def test_ct_percentiles_of_overlapping_images_follow_the_pooled_cdf() -> None:
    # foregrounds 0..999 (1000 voxels) and 0..1999 step 0.5 (4000 voxels): the pooled CDF is a mixture, 1 : 4
    a = np.arange(1000, dtype=np.float32)
    b = np.arange(0, 2000, 0.5, dtype=np.float32)
    recipe = fit_normalization(NormalizationConfig(mode="ct", low_percentile=2, high_percentile=98),
                               [_foreground_entry("a", a), _foreground_entry("b", b)])
    pooled = np.concatenate([a, b]).astype(np.float64)
    lo, hi = np.percentile(pooled, [2, 98])
    (fitted,) = recipe.foreground
    assert fitted.low == pytest.approx(lo, abs=1.0) and fitted.high == pytest.approx(hi, abs=1.0)
    assert abs(fitted.high - (np.percentile(a, 98) + np.percentile(b, 98)) / 2) > 400  # not the mean of percentiles


# --- logits to labels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.8])
def test_binary_labels_are_probability_above_the_threshold(threshold: float) -> None:
    logits = np.random.default_rng(0).uniform(-4, 4, (1, 20, 30)).astype(np.float32)
    probs, labels = logits_to_outputs(logits, 1, threshold)
    sigmoid = 1 / (1 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_allclose(probs, sigmoid, rtol=1e-6)
    np.testing.assert_array_equal(labels, (sigmoid[0] > threshold).astype(np.uint8))
    assert 0 < labels.mean() < 1


def test_multiclass_labels_are_the_softmax_argmax() -> None:
    logits = np.random.default_rng(1).normal(0, 2, (4, 16, 16)).astype(np.float32)
    probs, labels = logits_to_outputs(logits, 4)
    e = np.exp(logits.astype(np.float64) - logits.max(axis=0))
    np.testing.assert_allclose(probs, e / e.sum(axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(labels, logits.argmax(axis=0))
    assert set(np.unique(labels)) == {0, 1, 2, 3}


# --- connected components across block faces -----------------------------------------------------------


def _scipy_instances(semantic: np.ndarray) -> np.ndarray:
    """4-connected components of equal class, from scipy (each class labelled on its own, ids made unique)."""
    out = np.zeros(semantic.shape, np.int64)
    for value in np.unique(semantic[semantic > 0]):
        ids, _ = ndimage.label(semantic == value)
        out[ids > 0] = ids[ids > 0] + out.max()
    return out


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return ((a > 0) == (b > 0)).all() and len(pairs) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("classes", [1, 2])
def test_blockwise_instances_equal_scipy_labelling(classes: int) -> None:
    grains = ndimage.gaussian_filter(np.random.default_rng(classes).random((90, 70)), 2.0)
    foreground = grains > np.median(grains)
    # two classes: the right half is class 2, so objects of both classes cross faces and touch at x = 35
    semantic = (foreground * (1 + (classes == 2) * (np.mgrid[0:90, 0:70][1] >= 35))).astype(np.uint8)
    reference = _scipy_instances(semantic)
    crossing = [i for i in np.unique(reference[reference > 0])
                if len({(y // 16, x // 16) for y, x in zip(*np.nonzero(reference == i))}) > 1]
    assert len(crossing) >= 3  # several objects span blocks: a missing face merge would split them
    assert _same_partition(instances_blockwise(semantic, (16, 16)).astype(np.int64), reference)


def test_blockwise_postprocessing_equals_scipy_rules() -> None:
    rng = np.random.default_rng(5)
    semantic = (ndimage.gaussian_filter(rng.random((80, 96)), 1.5) > 0.5).astype(np.uint8)
    min_size = 12
    objects, _ = ndimage.label(semantic == 1)
    holes, _ = ndimage.label(semantic == 0)
    object_size, hole_size = np.bincount(objects.ravel()), np.bincount(holes.ravel())
    on_border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    expected = semantic.copy()
    expected[(objects > 0) & (object_size[objects] < min_size)] = 0
    small_hole = (holes > 0) & (hole_size[holes] < min_size) & ~np.isin(holes, on_border)
    expected[small_hole] = 1
    assert (expected != semantic).sum() > 20  # objects removed and holes filled, some across block faces
    np.testing.assert_array_equal(postprocess_blockwise(semantic, (16, 16), min_size), expected)


def test_blockwise_3d_instances_equal_scipy_labelling() -> None:
    grains = ndimage.gaussian_filter(np.random.default_rng(7).random((24, 30, 28)), 1.5)
    semantic = (grains > np.median(grains)).astype(np.uint8)
    semantic[:, :, 14:] *= 2  # two classes touching at x = 14: they must stay apart
    reference = _scipy_instances(semantic)  # scipy's default 3-D structure: the 6 face neighbours
    crossing_z = [i for i in np.unique(reference[reference > 0])
                  if len({z // 8 for z in np.nonzero(reference == i)[0]}) > 1]
    assert len(crossing_z) >= 3  # objects cross the z faces: a merge along y and x only would split them
    assert _same_partition(instances_blockwise(semantic, (8, 10, 8)).astype(np.int64), reference)


def test_blockwise_3d_postprocessing_equals_scipy_rules() -> None:
    rng = np.random.default_rng(8)
    semantic = (ndimage.gaussian_filter(rng.random((20, 24, 22)), 1.2) > 0.5).astype(np.uint8)
    semantic[rng.random(semantic.shape) < 0.03] ^= 1  # specks and pinholes, some of them across block faces
    min_size = 15
    objects, _ = ndimage.label(semantic == 1)
    holes, _ = ndimage.label(semantic == 0)
    object_size, hole_size = np.bincount(objects.ravel()), np.bincount(holes.ravel())
    faces = [holes[0], holes[-1], holes[:, 0], holes[:, -1], holes[:, :, 0], holes[:, :, -1]]
    on_border = np.unique(np.concatenate([f.ravel() for f in faces]))
    expected = semantic.copy()
    expected[(objects > 0) & (object_size[objects] < min_size)] = 0
    expected[(holes > 0) & (hole_size[holes] < min_size) & ~np.isin(holes, on_border)] = 1
    assert (expected != semantic).sum() > 100
    changed, _ = ndimage.label(expected != semantic)
    assert any(len({tuple(v // 8) for v in np.argwhere(changed == i)}) > 1 for i in range(1, changed.max() + 1))
    np.testing.assert_array_equal(postprocess_blockwise(semantic, (8, 8, 8), min_size), expected)


# --- augmentation: image and mask stay aligned ---------------------------------------------------------


def _blobs(size: int, seed: int) -> np.ndarray:
    """A smooth image: four off-centre Gaussian blobs (so that rotations and zooms move them)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    image = np.zeros((size, size))
    for cy, cx in rng.uniform(0.2 * size, 0.8 * size, (4, 2)):
        sigma = rng.uniform(0.08, 0.12) * size
        image += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return image.astype(np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


SPATIAL_ONLY = {"p_intensity": 0, "p_gamma": 0, "p_noise": 0, "p_blur": 0}


@pytest.mark.parametrize(("name", "cfg"), [
    ("affine", AugmentConfig(p_flip=0, p_rot90=0, p_affine=1, max_rotation_deg=180, scale_range=(0.7, 1.4),
                             **SPATIAL_ONLY)),
    ("scale only", AugmentConfig(p_flip=0, p_rot90=0, p_affine=1, max_rotation_deg=0, scale_range=(0.6, 0.8),
                                 **SPATIAL_ONLY)),
    ("every spatial step", AugmentConfig(p_flip=1, p_rot90=1, p_affine=1, max_rotation_deg=180, **SPATIAL_ONLY)),
])
def test_the_mask_stays_the_threshold_of_the_augmented_image(name: str, cfg: AugmentConfig) -> None:
    moved = 0
    for seed in range(10):
        smooth = _blobs(128, seed)
        image = np.stack([smooth, 2 * smooth + 1])  # channels must move together too
        mask = (smooth > 0.5).astype(np.int64)
        out_image, out_mask = augment_pair(image, mask, np.random.default_rng(seed), cfg)
        assert set(np.unique(out_mask)) <= {0, 1}
        np.testing.assert_allclose(out_image[1], 2 * out_image[0] + 1, atol=1e-5)
        assert _iou(out_image[0] > 0.5, out_mask == 1) > 0.95, (name, seed)
        moved += _iou(out_mask == 1, mask == 1) < 0.8
    assert moved >= 5  # the transforms really moved the objects, so a mask left in place would be caught


def test_flips_and_quarter_turns_keep_the_mask_exactly_the_threshold() -> None:
    cfg = AugmentConfig(p_flip=1, p_rot90=1, p_affine=0, **SPATIAL_ONLY)
    for seed in range(4):
        smooth = _blobs(64, seed)
        out_image, out_mask = augment_pair(smooth[None], (smooth > 0.5).astype(np.int64),
                                           np.random.default_rng(seed), cfg)
        np.testing.assert_array_equal(out_mask, out_image[0] > 0.5)


# --- augmentation of volumes ----------------------------------------------------------------------------


def _blobs_3d(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A sum of a few Gaussian blobs (smooth, values ~0..1.5): thresholding it at 0.5 gives round objects."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float64)
    image = np.zeros(shape)
    for _ in range(3):
        centre = [rng.uniform(0.3, 0.7) * n for n in shape]
        sigma = rng.uniform(0.16, 0.2) * max(shape)
        image += np.exp(-sum((g - c) ** 2 for g, c in zip(grid, centre)) / (2 * sigma**2))
    return image.astype(np.float32)


@pytest.mark.parametrize(("name", "cfg"), [
    ("in-plane rotation + scaling", AugmentConfig(p_flip=0, p_rot90=0, p_affine=1, max_rotation_deg=180,
                                                  scale_range=(0.7, 1.4), **SPATIAL_ONLY)),
    ("scale only", AugmentConfig(p_flip=0, p_rot90=0, p_affine=1, max_rotation_deg=0, scale_range=(0.6, 0.8),
                                 **SPATIAL_ONLY)),
    ("every spatial step", AugmentConfig(p_flip=1, p_rot90=1, p_affine=1, max_rotation_deg=180, **SPATIAL_ONLY)),
])
def test_the_mask_stays_the_threshold_of_the_augmented_volume(name: str, cfg: AugmentConfig) -> None:
    moved = 0
    for seed in range(6):
        smooth = _blobs_3d((48, 80, 80), seed)  # objects of ~20 voxels radius: few of them lie on the surface
        image = np.stack([smooth, 2 * smooth + 1])
        mask = (smooth > 0.5).astype(np.int64)
        out_image, out_mask = augment_pair(image, mask, np.random.default_rng(seed), cfg)
        assert out_image.shape == image.shape and out_mask.shape == mask.shape
        assert set(np.unique(out_mask)) <= {0, 1}
        np.testing.assert_allclose(out_image[1], 2 * out_image[0] + 1, atol=1e-5)
        assert _iou(out_image[0] > 0.5, out_mask == 1) > 0.95, (name, seed)
        moved += _iou(out_mask == 1, mask == 1) < 0.8
    assert moved >= 3


def test_volume_flips_cover_every_axis_and_quarter_turns_stay_in_plane() -> None:
    smooth = _blobs_3d((12, 20, 20), 1)
    flips = AugmentConfig(p_flip=1, p_rot90=0, p_affine=0, **SPATIAL_ONLY)
    out_image, out_mask = augment_pair(smooth[None], (smooth > 0.5).astype(np.int64), np.random.default_rng(0), flips)
    np.testing.assert_array_equal(out_image[0], smooth[::-1, ::-1, ::-1])
    np.testing.assert_array_equal(out_mask, smooth[::-1, ::-1, ::-1] > 0.5)
    turns = AugmentConfig(p_flip=0, p_rot90=1, p_affine=0, **SPATIAL_ONLY)
    out_image, out_mask = augment_pair(smooth[None], (smooth > 0.5).astype(np.int64), np.random.default_rng(0), turns)
    assert any(np.array_equal(out_image[0], np.rot90(smooth, k, axes=(1, 2))) for k in (1, 2, 3))
    np.testing.assert_array_equal(out_mask, out_image[0] > 0.5)
    # a plane that is not square turns by half turns only: the patch keeps its shape for the batch
    wide = _blobs_3d((8, 16, 24), 2)
    for seed in range(4):
        out_image, out_mask = augment_pair(wide[None], (wide > 0.5).astype(np.int64), np.random.default_rng(seed),
                                           turns)
        assert out_image.shape == (1, 8, 16, 24) and out_mask.shape == (8, 16, 24)
        np.testing.assert_array_equal(out_image[0], wide[:, ::-1, ::-1])


def test_volume_intensity_steps_keep_the_mask_and_change_the_image() -> None:
    smooth = _blobs_3d((10, 16, 16), 3)
    image, mask = np.stack([smooth, smooth]), (smooth > 0.5).astype(np.int64)
    cfg = AugmentConfig(p_flip=0, p_rot90=0, p_affine=0, p_intensity=1, p_gamma=1, p_noise=1, p_blur=1)
    out_image, out_mask = augment_pair(image, mask, np.random.default_rng(0), cfg)
    np.testing.assert_array_equal(out_mask, mask)
    assert out_image.shape == image.shape and out_image.dtype == np.float32
    assert np.abs(out_image - image).mean() > 0.01
