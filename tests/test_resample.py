"""Prediction at the model's spacing: when to resample, linear resampling against scikit-image's, block-wise ==
whole image, an image at half the spacing predicts what the model sees at its own, and `predict` on a volume whose
spacing is not the model's keeps the input's shape and geometry (with the same spacing: no resampling at all).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage as ndi
from skimage.transform import resize
from volume_data import AFFINE, save_nifti

from unetcore.cluster import dask_cluster
from unetcore.config import InferConfig, IngestConfig, ModelConfig, NormalizationConfig
from unetcore.inference import (
    Block,
    BlockPredictor,
    Resampling,
    block_outputs,
    linear_resample,
    logits_to_outputs,
    plan_blocks,
    predict_dataset,
    resampling_for,
    source_box,
    target_box,
)
from unetcore.ingest import ingest_folder
from unetcore.model import build_model, load_model, save_model
from unetcore.planning import TaskSignature
from unetcore.store import manifest as mf
from unetcore.store import omezarr

IDENTITY = {"channels": [{"mean": 0.0, "std": 1.0}]}  # zscore statistics that leave intensities as they are


# --- when -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "spacing", "unit", "model", "model_unit", "target"), [
    ((100, 80), (0.5, 0.5), "micrometer", (1.0, 1.0), "micrometer", (50, 40)),
    ((100, 80), (1.04, 0.97), "micrometer", (1.0, 1.0), "micrometer", None),  # within 5 %
    ((100, 80), (0.5, 0.5), "micrometer", (0.0005, 0.0005), "millimeter", None),  # the same length, other unit
    ((100, 80), (1.0, 1.0), None, (0.5, 0.5), "micrometer", None),  # pixels against micrometres: not comparable
    ((100, 80), (1.0, 1.0), None, (2.0, 2.0), None, (50, 40)),  # pixels on both sides compare
    ((10, 64, 64), (4.0, 0.8, 0.8), "millimeter", (5.0, 0.8, 0.8), "millimeter", (8, 64, 64)),
    ((10, 64, 64), (4.0, 0.8, 0.8), "millimeter", (1.6, 1.6), "millimeter", (10, 32, 32)),  # a 2-D model: in-plane
    ((10, 64, 64), (4.0, 0.8, 0.8), "millimeter", None, None, None),  # a model that records no spacing
])
def test_an_image_is_resampled_only_when_its_spacing_is_not_the_models(shape, spacing, unit, model, model_unit,
                                                                       target) -> None:
    r, why = resampling_for(shape, spacing, unit, model, model_unit)
    assert (r.target if r else None) == target, why
    assert why


# --- linear resampling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), [((37, 53), (74, 26)), ((9, 20, 31), (5, 41, 15)), ((33, 63), (33, 140))])
def test_linear_resampling_is_scikit_images_and_block_wise_equals_whole(src, dst) -> None:
    x = np.random.default_rng(0).random((2, *src)).astype(np.float32)
    reference = np.stack([resize(c, dst, order=1, mode="edge", anti_aliasing=False) for c in x])
    whole = linear_resample(x, src, dst, (0,) * len(src), Block.covering(dst))
    np.testing.assert_allclose(whole, reference, atol=1e-6)
    r = Resampling(src, dst, (1.0,) * len(src), (1.0,) * len(src))
    tiled = np.full_like(whole, np.nan)
    for b in plan_blocks(dst, (7,) * len(dst)):  # awkward block edges
        box = source_box(r, b)
        tiled[(slice(None), *b.slices)] = linear_resample(x[(slice(None), *box.slices)], src, dst, box.start, b)
    assert np.array_equal(tiled, whole)  # bit for bit


def test_a_block_reads_only_the_model_grid_box_under_it() -> None:
    r = Resampling((300, 260), (150, 130), (0.5, 0.5), (1.0, 1.0))
    box = target_box(r, Block(96, 192, 0, 96))
    assert box.start == (47, 0) and box.stop == (97, 49)  # half the block and a one-voxel interpolation rim


# --- prediction at the model's spacing ------------------------------------------------------------------------


def blob_detector(batch: np.ndarray) -> np.ndarray:
    """A scale-sensitive 'model': the negative Laplacian of Gaussian at sigma 3 px (bright discs of radius ~4 px
    light up, much larger ones only along their rims)."""
    out = np.stack([[-9 * ndi.gaussian_laplace(c, 3.0, mode="nearest") for c in b] for b in batch])
    return out[:, :1] - 0.15


def discs(shape: tuple[int, int], radius: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    image = np.zeros(shape, np.float32)
    for _ in range(n):
        cy, cx = rng.uniform(radius, np.array(shape) - radius)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = 1.0
    return image[None]


def predict_labels(image: np.ndarray, r: Resampling | None, block: int = 96) -> np.ndarray:
    bp = BlockPredictor(blob_detector, 1, NormalizationConfig(mode="zscore"), 64, 0.5, 4)
    labels = np.zeros(image.shape[1:], np.uint8)
    for b in plan_blocks(image.shape[1:], (block,) * (image.ndim - 1)):
        probs, labels[b.slices] = block_outputs(bp, image, IDENTITY, b, r)
        assert probs.shape == (1, *b.shape)
    return labels


def test_an_image_at_half_the_spacing_predicts_what_the_model_sees_at_its_own() -> None:
    at_model = discs((150, 130), 4.5, 25, 0)  # spacing 1, the model's
    fine = resize(at_model[0], (300, 260), order=1, mode="edge", anti_aliasing=False)[None].astype(np.float32)
    expected = resize(predict_labels(at_model, None), (300, 260), order=0, preserve_range=True,
                      anti_aliasing=False).astype(np.uint8)
    r, _ = resampling_for((300, 260), (0.5, 0.5), None, (1.0, 1.0), None)
    resampled = predict_labels(fine, r)
    assert resampled.shape == fine.shape[1:]
    boundary = ndi.binary_dilation(expected != ndi.binary_erosion(expected), iterations=2)
    assert not ((resampled != expected) & ~boundary).any()  # differences only within 2 px of a boundary
    plain = predict_labels(fine, None)  # the model on the fine grid: the discs look twice too large
    assert ((plain != expected) & ~boundary).sum() > 100
    assert np.array_equal(predict_labels(fine, r, block=1000), resampled)  # one block == many blocks


def test_without_resampling_the_kernel_is_the_plain_one_bit_for_bit() -> None:
    image = discs((97, 83), 4.0, 10, 1)
    bp = BlockPredictor(blob_detector, 1, NormalizationConfig(mode="zscore"), 64, 0.5, 4)
    block = Block(0, 64, 0, 83)
    expected = logits_to_outputs(bp.logits(image, IDENTITY, bp.grid((97, 83)), block), 1)
    probs, labels = block_outputs(bp, image, IDENTITY, block, None)
    assert np.array_equal(probs, expected[0]) and np.array_equal(labels, expected[1])


# --- end to end on a volume -----------------------------------------------------------------------------------


def _volume_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    v = rng.random((6, 40, 44))
    for axis in range(3):
        v = (v + np.roll(v, 1, axis) + np.roll(v, 2, axis)) / 3
    (root / "images").mkdir(parents=True)
    save_nifti(root / "images" / "ct.nii.gz", (v * 2000 - 500).astype(np.int16), AFFINE)  # 2.5 x 0.8 x 0.75 mm
    report = ingest_folder(IngestConfig(images=str(root / "images"), output=str(root / "ds"), val_fraction=0.0))
    assert not report.failed
    return root / "ds"


def _model(path: Path, task: dict[str, Any] | None) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(base_channels=4, depth=2, spatial_dims=3))
    extra = {"normalization": NormalizationConfig(mode="zscore").model_dump()}
    return save_model(path, model.eval(), {**extra, **({"task": task} if task else {})})


def test_predict_resamples_a_volume_to_the_models_spacing_and_back_onto_its_own_grid(tmp_path: Path) -> None:
    dataset = _volume_dataset(tmp_path)
    coarse = TaskSignature(1, 1, 3, (2.5, 1.6, 1.5), ("background", "tumour"), "millimeter").to_dict()
    same = TaskSignature(1, 1, 3, (2.5, 0.8, 0.75), None, "millimeter").to_dict()
    models = {"coarse": _model(tmp_path / "coarse", coarse), "same": _model(tmp_path / "same", same),
              "none": _model(tmp_path / "none", None)}  # same weights, three recorded tasks
    with dask_cluster(None, 1, 1) as cluster:
        for name, model in models.items():
            cfg = InferConfig(dataset=str(dataset), output=str(tmp_path / name), model=str(model), tile=16,
                              block_size=64, threads_per_worker=1, save_probabilities=True, skip_empty=False)
            predict_dataset(cfg, cluster)
    src = omezarr.open_root(mf.store_path(dataset, "ct"))
    out = {n: zarr.open_group(store=str(tmp_path / n / "ct.ome.zarr"), mode="r") for n in models}
    attrs = omezarr.unet_attrs(out["coarse"])
    assert attrs["resampling"]["model_shape"] == [6, 20, 22] and attrs["class_names"] == ["background", "tumour"]
    assert np.prod(attrs["block_shape"]) < 6 * 40 * 44  # several blocks, each predicting its model-grid box
    for group in out.values():  # the input's grid and placement, whatever the model's spacing
        assert group["labels/prediction/0"].shape == (6, 40, 44) and group["0"].shape == (1, 6, 40, 44)
        assert omezarr.geometry(group)["spacing"] == omezarr.geometry(src)["spacing"]
        assert omezarr.geometry(group)["affine"] == omezarr.geometry(src)["affine"]
    # the same spacing is the plain path, bit for bit (no resampling work)
    assert omezarr.unet_attrs(out["same"])["resampling"] is None
    assert np.array_equal(out["same"]["0"][:], out["none"]["0"][:])
    # the resampled prediction is the model's on the volume resampled in-plane, brought back: oracle in-process
    model, config = load_model(models["coarse"])
    bp = BlockPredictor.from_model(model, config, torch.device("cpu"), tile=16, overlap=0.5, batch_size=4)
    image = omezarr.image_array(src)
    r, _ = resampling_for((6, 40, 44), omezarr.geometry(src)["spacing"], "millimeter", (2.5, 1.6, 1.5), "millimeter")
    [entry] = mf.entries(mf.require(dataset))
    probs, _ = block_outputs(bp, image, entry["stats"], Block.covering((6, 40, 44)), r)
    np.testing.assert_allclose(out["coarse"]["0"][:], probs, atol=2e-3)  # float16 store, folded batch norms
    assert not np.array_equal(out["coarse"]["0"][:], out["none"]["0"][:])
