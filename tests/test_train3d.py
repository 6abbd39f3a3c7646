"""Training on volumes: 3-D patches from OME-Zarr (read region by region), foreground oversampling on an anisotropic
pyramid, ct normalisation fitted from the foreground statistics ingestion keeps, and three-plane previews.

Volumes are tens of voxels a side, ingested from NIfTI with 64² voxels per chunk, so each test takes a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from volume_data import ramp, save_nifti

from unetcore.config import IngestConfig, NormalizationConfig, TrainConfig
from unetcore.errors import ConfigError
from unetcore.ingest import ingest_folder
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.store.stats import StreamingStats, fit_normalization, normalize
from unetcore.tracking import orthogonal_slices, preview_strip, volume_preview_strip
from unetcore.training import (
    AugmentConfig,
    ChunkCache,
    PatchDataset,
    class_locations,
    load_images,
    patch_shape,
    slice_patch,
)

SHAPE = (20, 40, 36)  # (z, y, x) at AFFINE's (2.5, 0.8, 0.75) mm


def _volumes(root: Path, n: int = 3, *, rare: bool = False, large: bool = False) -> tuple[Path, Path]:
    """``n`` int16 volumes and masks: a small class-1 blob (and with ``rare`` a one-voxel class-2 one) per volume;
    ``large``: a 4 x 8 x 8 blob instead, on the grid of a (4, 8, 8) coarse level (smaller ones vanish there)."""
    images, masks = root / "img", root / "msk"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(n):
        data = ramp(SHAPE, "int16", seed=i)
        labels = np.zeros(SHAPE, np.uint8)
        if large:
            labels[8:12, 16:24, 8 * i : 8 * i + 8] = 1
        else:
            z, y, x = 3 + 4 * i, 5 + 9 * i, 28 - 7 * i
            labels[z : z + 2, y : y + 3, x : x + 3] = 1
        if rare:
            labels[15, 30 - i, 5 + i] = 2
        data[labels == 1] = 2000 + i  # the foreground stands out of the ramp
        save_nifti(images / f"v{i}.nii.gz", data)
        save_nifti(masks / f"v{i}.nii.gz", labels)
    return images, masks


def _ingest(root: Path, **options: object) -> Path:
    images, masks = _volumes(root, rare=bool(options.pop("rare", False)), large=bool(options.pop("large", False)))
    cfg = IngestConfig(images=str(images), masks=str(masks), output=str(root / "ds"), chunk_size=64,
                       val_fraction=0.0, num_classes=3, **options)
    assert ingest_folder(cfg).status == "ok"
    return root / "ds"


@pytest.fixture(scope="module")
def volume_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _ingest(tmp_path_factory.mktemp("vol"), rare=True)


@pytest.fixture(scope="module")
def pyramid_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same volumes with a 3-level pyramid: 2.5 mm slices are never halved, rows and columns are."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(omezarr, "PYRAMID_MIN_SIZE", 8)
        return _ingest(tmp_path_factory.mktemp("pyr"), large=True)


def _dataset(ds: Path, **options: object) -> PatchDataset:
    values: dict = dict(patch_size=(6, 12, 12), batch_size=3, steps=20, normalization=NormalizationConfig(),
                        foreground_fraction=1 / 3, augment=None, seed=7)
    values.update(options)
    return PatchDataset(load_images(ds, "train"), **values)


# --- sampling -----------------------------------------------------------------------------------------


def test_volume_patches_have_their_shape_and_foreground_slots_hold_foreground(volume_ds: Path) -> None:
    data = _dataset(volume_ds)
    image, target = data[0]
    assert image.shape == (1, 6, 12, 12) and image.dtype == torch.float32
    assert target.shape == (6, 12, 12) and target.dtype == torch.int64
    fg = [bool(data[i][1].any()) for i in range(len(data)) if data.is_foreground_slot(i)]
    other = [bool(data[i][1].any()) for i in range(len(data)) if not data.is_foreground_slot(i)]
    assert len(fg) == 20 and all(fg)
    assert sum(other) < len(other) / 2  # the blobs are small: uniform patches mostly miss them


def test_oversampling_follows_the_anisotropic_pyramid(pyramid_ds: Path) -> None:
    """Locations come from the coarsest level, (5, 5, 4) for (20, 40, 36): 2.5 mm slices are halved once fewer
    than rows and columns, so a coarse voxel spans (4, 8, 8) voxels, not 8 on every axis."""
    root = omezarr.open_root(mf.store_path(pyramid_ds, "v0"))
    assert [omezarr.label_array(root, level=n).shape for n in range(4)] == [(20, 40, 36), (20, 20, 18), (10, 10, 9),
                                                                           (5, 5, 4)]
    data = _dataset(pyramid_ds, patch_size=(8, 16, 16), foreground_fraction=1.0, steps=30)
    # centres are drawn within the coarse voxel (z 8..11), so the patch (z +- 4) always holds its blob; with a
    # factor of 8 along z (as if z were halved like y and x) they would be drawn at z 16..23 and miss it
    assert all(bool(data[i][1].any()) for i in range(len(data)))


def test_patches_are_read_region_by_region(volume_ds: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[int, ...]] = []
    original = zarr.Array.__getitem__

    def spy(self: zarr.Array, key: object) -> object:
        out = original(self, key)
        reads.append(np.shape(out))
        return out

    uncached, cached = _dataset(volume_ds, cache_bytes=0), _dataset(volume_ds, cache_bytes=40_000)
    monkeypatch.setattr(zarr.Array, "__getitem__", spy)
    for i in range(6):
        uncached[i]
    assert sorted(set(reads)) == [(1, 6, 12, 12), (6, 12, 12)]  # image and label patches, nothing whole
    reads.clear()
    chunks = omezarr.image_array(omezarr.open_root(cached.images[0].store)).chunks  # (1, 8, 16, 32)
    for i in range(len(cached)):
        a, b = cached[i], uncached[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert cached.cache.nbytes <= 40_000
    assert all(len(r) in (3, 4) and all(n <= c for n, c in zip(r[-3:], chunks[1:])) for r in reads)  # chunk by chunk
    assert len(reads) < 2 * 6 * len(cached)  # chunks read before came from the cache


def test_the_chunk_cache_assembles_any_region_within_its_budget() -> None:
    data = np.random.default_rng(2).integers(0, 1000, (2, 13, 30, 41)).astype(np.int16)
    array = zarr.create_array(store=zarr.storage.MemoryStore(), shape=data.shape, dtype=data.dtype,
                              chunks=(2, 4, 8, 16))
    array[:] = data
    cache = ChunkCache(3 * 2 * 4 * 8 * 16 * 2)  # three chunks
    rng = np.random.default_rng(3)
    for _ in range(40):
        start = [int(rng.integers(0, n)) for n in data.shape[1:]]
        region = (slice(0, 2), *(slice(a, a + int(rng.integers(1, 20))) for a in start))  # stops may run past
        np.testing.assert_array_equal(cache.read("a", array, region), data[region])
        assert cache.nbytes <= cache.max_bytes
    np.testing.assert_array_equal(ChunkCache(0).read("a", array, (slice(0, 2), slice(3, 9), slice(0, 5),
                                                                   slice(7, 60))), data[:, 3:9, :5, 7:60])


def test_class_locations_read_slabs_and_match_the_whole_array() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((12, 9, 10)) < 0.3).astype(np.uint8) + (rng.random((12, 9, 10)) < 0.05).astype(np.uint8)
    labels[0, 0, 0] = 7
    array = zarr.create_array(store=zarr.storage.MemoryStore(), shape=labels.shape, dtype=np.uint8, chunks=(4, 9, 10))
    array[:] = labels
    whole = class_locations(labels, ignore_index=7, max_per_class=50, seed=3)
    read: list[int] = []

    class Recording:
        shape = array.shape

        def __getitem__(self, key: slice) -> np.ndarray:
            block = array[key]
            read.append(block.size)
            return block

    for slab in (1, 90, 200, 10_000):
        read.clear()
        got = class_locations(Recording(), ignore_index=7, max_per_class=50, seed=3, slab_voxels=slab)
        assert got.keys() == whole.keys() == {1, 2}
        for c in whole:
            np.testing.assert_array_equal(got[c], whole[c])
        assert max(read) <= max(slab, 90)  # one z slice at least
    assert got[1].shape == (50, 3) and (labels[tuple(got[2].T)] == 2).all()


def test_a_2d_model_trains_on_single_z_slices_of_the_volume_stores(volume_ds: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net's "2d" configuration: each patch is one z-slice's region, read as such (never a whole volume),
    equal to the normalised store at that slice, foreground slots on the blobs (two slices deep here)."""
    reads: list[tuple[int, ...]] = []
    original = zarr.Array.__getitem__

    def spy(self: zarr.Array, key: object) -> object:
        out = original(self, key)
        reads.append(np.shape(out))
        return out

    data = _dataset(volume_ds, patch_size=12, spatial_dims=2, cache_bytes=0)
    assert data.patch == (1, 12, 12)
    monkeypatch.setattr(zarr.Array, "__getitem__", spy)
    items = [data[i] for i in range(len(data))]
    monkeypatch.undo()
    assert sorted(set(reads)) == [(1, 1, 12, 12), (1, 12, 12)]  # one slice of image and labels per patch
    assert all(x.shape == (1, 12, 12) and t.shape == (12, 12) for x, t in items)
    assert all(bool(items[i][1].any()) for i in range(len(data)) if data.is_foreground_slot(i))
    volumes = [omezarr.open_root(img.store) for img in data.images]
    raws = [normalize(omezarr.image_array(r)[:], img.stats, NormalizationConfig()) for r, img in zip(volumes, data.images)]
    labels = [omezarr.label_array(r)[:] for r in volumes]
    for x, t in items[:9]:  # each patch is a region of one slice of one volume (found by search)
        x, t = x.numpy(), t.numpy()
        hits = [(v, z, y, c) for v, raw in enumerate(raws) for z in range(raw.shape[1])
                for y in range(raw.shape[2] - 11) for c in range(raw.shape[3] - 11)
                if np.array_equal(raw[:, z, y : y + 12, c : c + 12], x)]
        assert len(hits) == 1
        v, z, y, c = hits[0]
        np.testing.assert_array_equal(labels[v][z, y : y + 12, c : c + 12], t)
    with pytest.raises(ConfigError, match="3-D model cannot train on 2-D"):
        slice_patch(12, 2, 3)


def test_volumes_smaller_than_the_patch_are_padded(volume_ds: Path) -> None:
    image, target = _dataset(volume_ds, patch_size=(24, 8, 8))[2]
    assert image.shape == (1, 24, 8, 8) and target.shape == (24, 8, 8)
    assert (image[:, 20:] == 0).all() and (target[20:] == 0).all()


def test_volume_patches_are_deterministic_and_augmented_in_shape(volume_ds: Path) -> None:
    a = _dataset(volume_ds, augment=AugmentConfig(p_affine=1), patch_size=(6, 12, 16))
    b = _dataset(volume_ds, augment=AugmentConfig(p_affine=1), patch_size=(6, 12, 16))
    for i in (0, 4, 11):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
        assert a[i][0].shape == (1, 6, 12, 16) and set(torch.unique(a[i][1]).tolist()) <= {0, 1, 2}
    plain = _dataset(volume_ds, patch_size=(6, 12, 16))
    assert not torch.equal(a[0][0], plain[0][0])


def test_class_balanced_sampling_of_volumes_centres_the_rare_class_half_the_time(volume_ds: Path) -> None:
    """One voxel of class 2 per volume against 18 of class 1: class-balanced slots centre on it half the time."""
    images = load_images(volume_ds, "train")
    share = {}
    for mode in ("foreground", "class_balanced"):
        data = PatchDataset(images, (2, 2, 2), 1, 300, NormalizationConfig(), 1.0, None, seed=1, sampling=mode)
        centres = [int(data[i][1][1, 1, 1]) for i in range(len(data))]
        share[mode] = centres.count(2) / len(centres)
    assert share["foreground"] < 0.15
    assert 0.38 < share["class_balanced"] < 0.62


def test_patch_shapes_must_fit_the_images(tmp_path: Path, volume_ds: Path) -> None:
    assert patch_shape(64, 3) == (64, 64, 64) and patch_shape([8, 16, 16], 3) == (8, 16, 16)
    with pytest.raises(ConfigError, match="patch_shape"):
        _dataset(volume_ds, patch_size=(12, 12))
    assert TrainConfig(dataset="x", patch_shape=[16, 64, 64]).patch_shape == [16, 64, 64]
    with pytest.raises(ValueError):
        TrainConfig(dataset="x", patch_shape=[16])


def test_a_split_of_images_and_volumes_is_refused(tmp_path: Path) -> None:
    images, masks = _volumes(tmp_path, n=1)
    np.save(images / "flat.npy", ramp((40, 40), "uint8"))
    np.save(masks / "flat.npy", np.ones((40, 40), np.uint8))
    ingest_folder(IngestConfig(images=str(images), masks=str(masks), output=str(tmp_path / "ds"), chunk_size=64,
                               val_fraction=0.0))
    with pytest.raises(ConfigError, match="mixes images and volumes"):
        load_images(tmp_path / "ds", "train")


# --- volumes of mixed spacings --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1 mm volume (20, 16, 16) and a 2 mm-slice one (10, 16, 16) of the same extent, each with a blob."""
    root = tmp_path_factory.mktemp("mixed")
    images, masks = root / "img", root / "msk"
    images.mkdir()
    masks.mkdir()
    for name, depth, z_mm, seed in (("fine", 20, 1.0, 0), ("coarse", 10, 2.0, 1)):
        data, labels = ramp((depth, 16, 16), "int16", seed=seed), np.zeros((depth, 16, 16), np.uint8)
        labels[depth // 2 - 1 : depth // 2 + 1, 4:8, 6:10] = 1
        data[labels == 1] = 2500
        affine = np.diag([1.0, 1.0, z_mm, 1.0])  # nibabel's (x, y, z)
        save_nifti(images / f"{name}.nii.gz", data, affine)
        save_nifti(masks / f"{name}.nii.gz", labels, affine)
    cfg = IngestConfig(images=str(images), masks=str(masks), output=str(root / "ds"), chunk_size=64,
                       val_fraction=0.0)
    assert ingest_folder(cfg).status == "ok"
    return root / "ds"


def test_a_volume_of_another_spacing_is_sampled_at_the_models_spacing(mixed_ds: Path) -> None:
    """At 1 mm the 2 mm volume is sampled on its (20, 16, 16) grid: its patches equal the whole volume resampled
    by scikit-image (linear, edge-aligned) for the image and every slice twice for the labels; the 1 mm one is
    read as it is."""
    from skimage.transform import resize

    images = {img.store.name.split(".")[0]: img for img in load_images(mixed_ds, "train", None, (1.0, 1.0, 1.0),
                                                                       "millimeter")}
    coarse, fine = images["coarse"], images["fine"]
    assert fine.resampling is None and coarse.grid == (20, 16, 16) and coarse.shape == (10, 16, 16)
    data = PatchDataset(list(images.values()), (8, 12, 12), 2, 20, NormalizationConfig(), 0.5, None, seed=3)
    root = omezarr.open_root(coarse.store)
    whole = normalize(np.asarray(omezarr.image_array(root)[:]), coarse.stats, NormalizationConfig())
    expected = resize(whole, (1, 20, 16, 16), order=1, mode="edge", anti_aliasing=False)
    truth = np.repeat(np.asarray(omezarr.label_array(root)[:]), 2, axis=0)
    for origin in ((0, 0, 0), (5, 2, 3), (12, 4, 4), (7, 1, 0)):
        image, target = data.read_patch(coarse, origin)
        box = tuple(slice(o, o + 8 if a == 0 else o + 12) for a, o in enumerate(origin))
        np.testing.assert_allclose(image, expected[(slice(None), *box)], atol=1e-5)
        np.testing.assert_array_equal(target, truth[box])
    raw, labels = data.read_patch(fine, (3, 2, 1))
    fine_root = omezarr.open_root(fine.store)
    np.testing.assert_array_equal(labels, np.asarray(omezarr.label_array(fine_root)[3:11, 2:14, 1:13]))
    # foreground slots centre on the blob, which spans 4 slices of the resampled grid
    assert all(bool(data[i][1].any()) for i in range(len(data)) if data.is_foreground_slot(i))
    # without a spacing (or at the coarse one's own) nothing is resampled
    assert all(img.resampling is None for img in load_images(mixed_ds, "train"))


def test_validation_predicts_a_volume_of_another_spacing_at_the_models(mixed_ds: Path) -> None:
    """Scored block by block at the task's spacing, a volume gives the Dice of its prediction made whole (one
    block) at that spacing, and another Dice than on its own grid."""
    from unetcore.inference import BlockPredictor
    from unetcore.inference.resample import resampled_outputs, resampling_for
    from unetcore.inference.windows import Block
    from unetcore.metrics import confusion_counts, dice_from_counts
    from unetcore.planning import TaskSignature
    from unetcore.training.validation import evaluate

    def bright(batch: np.ndarray) -> np.ndarray:  # logits: a blurred "brighter than 0.9", so resampling shows
        return (batch - 0.9) * 20.0

    bp = BlockPredictor(bright, 1, NormalizationConfig(), (8, 8, 8), 0.5, 2, spatial_dims=3)
    [entry] = [e for e in mf.entries(mf.require(mixed_ds)) if e["id"] == "coarse"]
    task = TaskSignature(1, 1, 3, spacing=(1.0, 1.0, 1.0), unit="millimeter")
    scored = evaluate(bp, mixed_ds, [entry], block_size=8, task=task)["val_dice"]
    root = omezarr.open_root(mf.store_path(mixed_ds, "coarse"))
    image, truth = omezarr.image_array(root), np.asarray(omezarr.label_array(root)[:])
    r, _ = resampling_for(entry["shape"], entry["spacing"], entry["unit"], task.spacing, task.unit)
    assert r is not None
    _, labels = resampled_outputs(bp, image, entry["stats"], Block.covering(tuple(entry["shape"])), r)
    whole = dice_from_counts(*confusion_counts(labels, truth, 1))[1]
    assert scored == pytest.approx(float(whole), abs=1e-12)
    own = evaluate(bp, mixed_ds, [entry], block_size=8)["val_dice"]
    assert own != pytest.approx(scored, abs=1e-6)
    assert evaluate(bp, mixed_ds, [entry], block_size=8, task=TaskSignature(1, 1, 3, (2.0, 1.0, 1.0),
                                                                            unit="millimeter"))["val_dice"] == own


# --- ct normalisation from the ingested foreground statistics -----------------------------------------


def test_ingestion_keeps_the_statistics_of_the_foreground(volume_ds: Path, tmp_path: Path) -> None:
    entry = mf.load(volume_ds)["images"]["v1"]
    root = omezarr.open_root(mf.store_path(volume_ds, "v1"))
    raw, labels = omezarr.image_array(root)[0], omezarr.label_array(root)[:]
    fg = StreamingStats(1, np.dtype("int16"))
    fg.update(raw[labels > 0][:, None])
    assert entry["foreground_stats"] == fg.result() == omezarr.unet_attrs(root)["foreground_stats"]
    assert entry["foreground_stats"]["pixels"] == 18 + 1
    whole = StreamingStats(1, np.dtype("int16"))
    whole.update(raw[..., None])
    assert entry["stats"] == whole.result()  # the image's own statistics are as before
    (tmp_path / "img").mkdir()
    save_nifti(tmp_path / "img" / "bare.nii.gz", ramp(SHAPE))
    ingest_folder(IngestConfig(images=str(tmp_path / "img"), output=str(tmp_path / "ds"), chunk_size=64))
    assert mf.load(tmp_path / "ds")["images"]["bare"].get("foreground_stats") is None  # no mask, no foreground


def test_ct_patches_are_clipped_and_z_scored_with_the_training_foreground(volume_ds: Path) -> None:
    entries = mf.entries(mf.load(volume_ds), "train")
    recipe = fit_normalization(NormalizationConfig(mode="ct", low_percentile=1, high_percentile=99), entries)
    fg = np.concatenate([omezarr.image_array(root)[0][omezarr.label_array(root)[:] > 0].astype(np.float64)
                         for root in (omezarr.open_root(mf.store_path(volume_ds, e["id"])) for e in entries)])
    (fitted,) = recipe.foreground
    assert fitted.mean == pytest.approx(fg.mean()) and fitted.std == pytest.approx(fg.std())
    assert fitted.low < 2000 < fitted.high  # blobs at 2000..2002, rare voxels anywhere in the ramp
    data = _dataset(volume_ds, normalization=recipe)
    image, _ = data[0]
    stored = NormalizationConfig(**recipe.model_dump())  # as the model's config.json gives it back
    origin_raw = omezarr.image_array(omezarr.open_root(data.images[0].store))[:]
    out = normalize(origin_raw, data.images[0].stats, stored)
    expected = (np.clip(origin_raw.astype(np.float64), fitted.low, fitted.high) - fitted.mean) / fitted.std
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert image.min() >= expected.min() - 1e-5 and image.max() <= expected.max() + 1e-5


def test_ct_needs_fitted_and_ingested_foreground_statistics(volume_ds: Path) -> None:
    entries = mf.entries(mf.load(volume_ds), "train")
    with pytest.raises(ConfigError, match="not been fitted"):
        normalize(np.zeros((1, 2, 2, 2)), entries[0]["stats"], NormalizationConfig(mode="ct"))
    old = [{k: v for k, v in e.items() if k != "foreground_stats"} for e in entries]
    with pytest.raises(ConfigError, match="re-ingest"):
        fit_normalization(NormalizationConfig(mode="ct"), old)
    fitted = fit_normalization(NormalizationConfig(mode="ct"), entries)
    with pytest.raises(ConfigError, match="the image has 2"):
        normalize(np.zeros((2, 2, 2, 2)), {"channels": [{}, {}]}, fitted)
    assert fit_normalization(NormalizationConfig(mode="zscore"), old) == NormalizationConfig(mode="zscore")


# --- previews -----------------------------------------------------------------------------------------


def test_orthogonal_slices_cut_through_the_middle_with_z_upwards() -> None:
    volume = np.arange(2 * 5 * 6 * 7).reshape(2, 5, 6, 7)
    axial, coronal, sagittal = orthogonal_slices(volume)
    np.testing.assert_array_equal(axial, volume[:, 2])
    np.testing.assert_array_equal(coronal, volume[:, ::-1, 3, :])
    np.testing.assert_array_equal(sagittal, volume[:, ::-1, :, 3])
    assert [s.shape for s in orthogonal_slices(volume[0], (1, 2, 3))] == [(6, 7), (5, 7), (5, 6)]


def test_a_volume_preview_is_three_strips_of_mid_slices() -> None:
    image = ramp((5, 12, 10), "float32")[None]
    truth = np.zeros((5, 12, 10), np.uint8)
    truth[1:4, 4:8, 3:7] = 1
    pred = np.roll(truth, 1, axis=2)
    out = volume_preview_strip(image, truth, pred)
    rows = [preview_strip(i, t, p) for i, t, p in zip(orthogonal_slices(image), orthogonal_slices(truth),
                                                       orthogonal_slices(pred))]
    assert out.dtype == np.uint8 and out.shape == (12 + 2 + 5 + 2 + 5, 36, 3)  # the sagittal strip is 3 x 12 wide
    np.testing.assert_array_equal(out[:12, :30], rows[0])
    np.testing.assert_array_equal(out[14:19, :30], rows[1])
    np.testing.assert_array_equal(out[21:26], rows[2])
    assert (out[12:14] == 0).all() and (out[:12, 30:] == 0).all()
    assert (out[:12, 10:20] != out[:12, 20:30]).any()  # truth and prediction differ where the roll moved them
    stretched = volume_preview_strip(image, None, pred, spacing=(2.5, 0.8, 0.75))  # 2.5 / 0.75 -> 3 rows a slice
    assert stretched.shape == (12 + 2 + 15 + 2 + 15, 24, 3)
    np.testing.assert_array_equal(stretched[14:29:3, :20], preview_strip(orthogonal_slices(image)[1], None,
                                                                   orthogonal_slices(pred)[1]))
    with pytest.raises(ValueError, match=r"\(C, Z, Y, X\)"):
        volume_preview_strip(image[0], truth, pred)
