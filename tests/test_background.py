"""Skipping background (issue 15.2): the tissue mask's polarity and safety, the keep mask, exact background, and
the engine computing fewer tiles for the same labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from unetcore.config import InferConfig, IngestConfig
from unetcore.inference import (
    TileGrid,
    exact_background_logits,
    logits_to_outputs,
    masked_block_logits,
    plan_blocks,
    predict_block,
    predict_dataset,
    skips_background,
    tile_keep_mask,
    tiles_for_block,
    tissue_mask,
)
from unetcore.ingest import ingest_folder
from unetcore.store import omezarr


def slide(shape: tuple[int, ...], box: tuple[slice, ...], dark_tissue: bool = True, seed: int = 0) -> np.ndarray:
    """Flat noisy background (bright glass, or a dark floor) with textured 'tissue' inside ``box``."""
    rng = np.random.default_rng(seed)
    level, tissue = (230.0, (40, 160)) if dark_tissue else (12.0, (60, 250))
    image = rng.normal(level, 2.0, shape)
    image[box] = rng.uniform(*tissue, size=image[box].shape)
    return image.clip(0, 255).astype(np.uint8)


def store(path: Path, image: np.ndarray, chunk: int = 64) -> zarr.Group:
    data = image[None] if image.ndim in (2, 3) and image.shape[0] > 4 else image
    root = omezarr.create_image(path, data.shape, data.dtype, chunk)
    root["0"][:] = data
    omezarr.build_pyramid(root, "image")
    return root


@pytest.mark.parametrize("dark", [True, False])
def test_tissue_is_the_textured_side_whatever_its_brightness(tmp_path: Path, dark: bool) -> None:
    image = slide((1200, 1600), (slice(100, 400), slice(200, 500)), dark_tissue=dark)
    root = store(tmp_path / "s.ome.zarr", image, 256)
    tissue, why = tissue_mask(root, (128, 128), max_pixels=500_000)  # forces a pyramid level (600x800)
    assert tissue is not None, why
    assert tissue.level == 1 and tissue.factors == (2.0, 2.0) and tissue.dark_tissue is dark
    grid = TileGrid.build(image.shape, (128, 128), 0.5)
    keep = tile_keep_mask(grid, tissue)
    for i, y in enumerate(grid.ys):
        for j, x in enumerate(grid.xs):
            # within one tile of the tissue box: kept; beyond two tiles of it: skipped
            gap_y = max(100 - (y + 128), y - 400, 0)
            gap_x = max(200 - (x + 128), x - 500, 0)
            if max(gap_y, gap_x) <= 128:
                assert keep[i, j], (y, x)
            if max(gap_y, gap_x) > 2 * 128 + 4:
                assert not keep[i, j], (y, x)


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(0).integers(0, 256, (600, 600)).astype(np.uint8),  # unimodal texture everywhere
        np.full((600, 600), 7, np.uint8),  # constant
        np.where(np.arange(600)[None, :] < 300, 10, 200).repeat(600, 0).astype(np.uint8),  # two flat halves
    ],
    ids=["noise", "constant", "two-flat-halves"],
)
def test_nothing_is_skipped_without_a_clear_flat_background(tmp_path: Path, image: np.ndarray) -> None:
    tissue, why = tissue_mask(store(tmp_path / "s.ome.zarr", image), (64, 64))
    assert tissue is None and why


def test_volumes_take_the_same_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    volume = rng.normal(230, 2, (1, 40, 200, 200))
    volume[:, 5:15, 20:60, 30:70] = rng.uniform(30, 150, (1, 10, 40, 40))
    root = store(tmp_path / "v.ome.zarr", volume.clip(0, 255).astype(np.uint8))
    tissue, why = tissue_mask(root, (8, 32, 32))
    assert tissue is not None, why
    keep = tile_keep_mask(TileGrid.build((40, 200, 200), (8, 32, 32), 0.5), tissue)
    assert keep.ndim == 3 and keep.any() and not keep.all()
    assert keep[0, 2, 2] and not keep[-1, -1, -1]


def predictor(batch: np.ndarray) -> np.ndarray:
    return batch * 2.0 + 1.0


@pytest.mark.parametrize("classes", [1, 3])
def test_masked_block_equals_full_block_where_only_kept_tiles_cover_and_is_exact_background_elsewhere(
    classes: int,
) -> None:
    rng = np.random.default_rng(2)
    image = rng.random((classes, 150, 190)).astype(np.float32)
    grid = TileGrid.build((150, 190), (32, 32), 0.5)
    keep = np.zeros((len(grid.ys), len(grid.xs)), bool)
    keep[:4, :5] = True

    def read(*box: slice) -> np.ndarray:
        return image[(slice(None), *box)]

    covered_only_by_kept = np.ones((150, 190), bool)
    covered_by_kept = np.zeros((150, 190), bool)
    for i, y in enumerate(grid.ys):
        for j, x in enumerate(grid.xs):
            (covered_by_kept if keep[i, j] else covered_only_by_kept)[y:y + 32, x:x + 32] = keep[i, j]
    covered_only_by_kept &= covered_by_kept
    for block in plan_blocks((150, 190), (64, 80)):
        full = predict_block(read, (150, 190), classes, predictor, grid, block, 4)
        masked = masked_block_logits(read, (150, 190), classes, predictor, grid, block, 4, keep, classes)
        inside = covered_only_by_kept[block.slices]
        # the full block sums its Gaussian weights per axis, the masked one tile by tile: equal to float rounding
        np.testing.assert_allclose(masked[:, inside], full[:, inside], rtol=1e-6, atol=1e-6)
        outside = ~covered_by_kept[block.slices]
        np.testing.assert_array_equal(masked[:, outside], exact_background_logits(classes, (int(outside.sum()),)))
        probs, labels = logits_to_outputs(masked, classes)
        assert (labels[outside] == 0).all()
        expected = np.zeros(classes)
        expected[0] = 0.0 if classes == 1 else 1.0
        np.testing.assert_array_equal(probs[:, outside], np.broadcast_to(expected[:, None], probs[:, outside].shape))


def test_a_block_without_kept_tiles_reads_nothing() -> None:
    grid = TileGrid.build((128, 128), (32, 32), 0.5)
    keep = np.zeros((len(grid.ys), len(grid.xs)), bool)

    def read(*box: slice) -> np.ndarray:
        raise AssertionError("read")

    block = plan_blocks((128, 128), (64, 64))[0]
    assert len(tiles_for_block(grid, block)) > 0
    out = masked_block_logits(read, (128, 128), 1, predictor, grid, block, 4, keep, 1)
    assert out.shape == (1, 64, 64) and np.isneginf(out).all()


def test_engine_skips_background_tiles_and_keeps_the_labels(tmp_path: Path) -> None:
    """A slide-like image: fewer tiles computed, identical labels to the dense run, exact background far away."""
    import tifffile

    from tests.test_engine import make_model

    image = slide((640, 900), (slice(60, 260), slice(80, 330)))
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "img.tif", image)
    ingest_folder(IngestConfig(images=str(tmp_path / "images"), output=str(tmp_path / "ds"), chunk_size=128,
                               val_fraction=0.0))
    model = make_model(tmp_path / "model")
    base = dict(dataset=str(tmp_path / "ds"), model=str(model), tile=64, block_size=256, threads_per_worker=1,
                n_workers=1, export="none")
    [on] = predict_dataset(InferConfig(**base, output=str(tmp_path / "on"), skip_background=True))
    [off] = predict_dataset(InferConfig(**base, output=str(tmp_path / "off"), skip_background=False))
    assert off.background_tiles == 0 and on.background_tiles > on.tile_evaluations // 3
    labels_on = zarr.open_group(store=str(tmp_path / "on" / "img.ome.zarr"), mode="r")
    labels_off = zarr.open_group(store=str(tmp_path / "off" / "img.ome.zarr"), mode="r")
    far = (slice(500, 640), slice(600, 900))  # more than two tiles from the tissue
    np.testing.assert_array_equal(labels_on["0"][0][far], 0)
    near = (slice(0, 330), slice(0, 400))  # tissue and one tile around it: every covering tile kept
    np.testing.assert_allclose(labels_on["0"][0][near].astype(np.float32), labels_off["0"][0][near].astype(np.float32),
                               atol=1e-3, rtol=0)  # float16 probabilities; batches of other tiles may round apart
    assert (labels_off["0"][0][far].astype(np.float32) > 1e-3).any()  # the dense run computed something there


def test_engine_skips_background_in_a_volume_on_the_same_code_path(tmp_path: Path) -> None:
    from tests.test_engine import make_model

    rng = np.random.default_rng(4)
    volume = rng.normal(230, 2, (12, 160, 240))
    volume[2:8, 10:70, 20:90] = rng.uniform(30, 150, (6, 60, 70))
    (tmp_path / "images").mkdir()
    np.save(tmp_path / "images" / "vol.npy", volume.clip(0, 255).astype(np.uint8))
    ingest_folder(IngestConfig(images=str(tmp_path / "images"), output=str(tmp_path / "ds"), chunk_size=64,
                               channel_axis="zyx", val_fraction=0.0))
    model = make_model(tmp_path / "model")  # a 2-D model: the volume is predicted slice by slice
    base = dict(dataset=str(tmp_path / "ds"), model=str(model), tile=32, block_size=128, threads_per_worker=1,
                n_workers=1, export="none")
    [on] = predict_dataset(InferConfig(**base, output=str(tmp_path / "on"), skip_background=True))
    [off] = predict_dataset(InferConfig(**base, output=str(tmp_path / "off"), skip_background=False))
    assert on.background_tiles > 0 and off.background_tiles == 0
    prob_on = zarr.open_group(store=str(tmp_path / "on" / "vol.ome.zarr"), mode="r")["0"][0].astype(np.float32)
    prob_off = zarr.open_group(store=str(tmp_path / "off" / "vol.ome.zarr"), mode="r")["0"][0].astype(np.float32)
    np.testing.assert_array_equal(prob_on[:, 120:, 160:], 0)  # beyond two tiles of the tissue, in every slice
    near = (slice(2, 8), slice(0, 100), slice(0, 120))
    np.testing.assert_allclose(prob_on[near], prob_off[near], atol=1e-3, rtol=0)


def test_by_default_only_slides_skip_background(tmp_path: Path) -> None:
    """None (the default) skips for stores ingested at an mpp or from a pyramidal TIFF; True/False as asked."""
    import tifffile

    image = slide((256, 256), (slice(10, 60), slice(10, 60)))
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "plain.tif", image)
    with tifffile.TiffWriter(tmp_path / "in" / "pyramid.tif") as tif:
        tif.write(image, tile=(64, 64), subifds=1)
        tif.write(image[::2, ::2], tile=(64, 64), subfiletype=1)
    ingest_folder(IngestConfig(images=str(tmp_path / "in"), output=str(tmp_path / "ds"), val_fraction=0.0))
    attrs = {name: omezarr.unet_attrs(omezarr.open_root(tmp_path / "ds" / f"{name}.ome.zarr"))
             for name in ("plain", "pyramid")}
    assert attrs["pyramid"]["source_levels"] == 2 and "source_levels" not in attrs["plain"]
    assert skips_background(None, attrs["pyramid"]) and not skips_background(None, attrs["plain"])
    assert skips_background(None, {"level0": {"level": 1}})
    assert skips_background(True, attrs["plain"]) and not skips_background(False, attrs["pyramid"])
