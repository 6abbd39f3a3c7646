"""Predicting volumes end to end: tiled == whole-volume sliding window, block-wise == one block, the input's axes,
spacing and geometry kept, 3-D instances across block faces, resume after a kill, NIfTI out with the source's
affine, TIFF stacks and the three-slice preview, 2-D models slice by slice, and a 3-D model refused on images.

Tiny NIfTI volumes (tens of voxels a side, anisotropic spacing) are ingested and predicted by tiny random-init
UNets on a shared two-worker local cluster; the oracles run in this process.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner
from volume_data import AFFINE, ramp, save_nifti, write_ct_series

from app.cli import app
from unetcore.cluster import Cluster, dask_cluster
from unetcore.config import InferConfig, IngestConfig, ModelConfig, NormalizationConfig
from unetcore.errors import ConfigError
from unetcore.inference import (
    BlockPredictor,
    check_predictable,
    orthogonal_mid_slices,
    plan_blocks,
    postprocess_whole,
    predict_dataset,
    sliding_window,
    torch_predictor,
)
from unetcore.ingest import ingest_folder
from unetcore.model import build_model, load_model, save_model
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.store.stats import normalize

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


# --- helpers ---------------------------------------------------------------------------------------------


def smooth_volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """int16 noise smoothed along every axis, so a net's predictions form 3-D blobs."""
    v = np.random.default_rng(seed).random(shape)
    for axis in range(3):
        v = (v + np.roll(v, 1, axis) + np.roll(v, 2, axis)) / 3
    return (v * 2000 - 500).astype(np.int16)


def nifti_dataset(root: Path, volume: np.ndarray, affine: np.ndarray = AFFINE, name: str = "ct", **kw: Any) -> Path:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    save_nifti(images / f"{name}.nii.gz", volume, affine)
    dataset = root / "ds"
    report = ingest_folder(IngestConfig(images=str(images), output=str(dataset), val_fraction=0.0, **kw))
    assert not report.failed, report.failed
    return dataset


def make_model(path: Path, spatial_dims: int = 3, classes: int = 1, seed: int = 0, **kw: Any) -> Path:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(base_channels=4, depth=2, num_classes=classes, spatial_dims=spatial_dims, **kw))
    return save_model(path, model.eval(), {"normalization": NormalizationConfig(mode="zscore").model_dump()})


def config(dataset: Path, out: Path, model: Path, **kw: Any) -> InferConfig:
    base = dict(dataset=str(dataset), output=str(out), model=str(model), tile=16, block_size=64, threads_per_worker=1,
                export="none", probability_dtype="float32")
    return InferConfig(**{**base, **kw})


def normalised(dataset: Path, model_dir: Path) -> np.ndarray:
    [entry] = mf.entries(mf.require(dataset))
    image = omezarr.image_array(omezarr.open_root(mf.store_path(dataset, entry["id"])))[:]
    _, config_json = load_model(model_dir)
    return normalize(image, entry["stats"], NormalizationConfig(**config_json["normalization"]))


def oracle_probabilities(dataset: Path, model_dir: Path, cfg: InferConfig) -> np.ndarray:
    """Whole-volume sliding window (K, D, H, W) with the engine's predictor, in this process, with the options the
    engine uses (a 3-D model's own tile and dense overlap where ``cfg`` leaves them unset)."""
    from unetcore.inference import with_model_tile
    from unetcore.tracking import PinnedModel

    cfg = with_model_tile(cfg, PinnedModel(uri=str(model_dir), directory=model_dir))
    model, config_json = load_model(model_dir)
    bp = BlockPredictor.from_model(model, config_json, torch.device("cpu"), tile=cfg.tile, overlap=cfg.overlap,
                                   batch_size=cfg.batch_size, skip_empty=cfg.skip_empty)
    x = normalised(dataset, model_dir)
    logits = torch.from_numpy(sliding_window(x, bp.predictor, bp.grid(x.shape[1:]).tile, cfg.overlap, cfg.batch_size))
    return (torch.sigmoid(logits) if bp.num_classes == 1 else torch.softmax(logits, 0)).numpy()


def outputs(out_dir: Path, image_id: str = "ct") -> zarr.Group:
    return zarr.open_group(store=str(out_dir / f"{image_id}.ome.zarr"), mode="r")


def decided(probs: np.ndarray) -> np.ndarray:
    """Voxels whose label is not a float-rounding tie."""
    if probs.shape[0] == 1:
        return np.abs(probs[0] - 0.5) > 1e-4
    top2 = np.sort(probs, axis=0)[-2:]
    return top2[1] - top2[0] > 1e-4


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    with dask_cluster(None, 2, 1) as c:
        yield c


# --- tiled == whole volume, block-wise == one block ------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "classes", "pool"),
    [
        ((10, 37, 45), 2, None),  # odd sizes, depth below the tile (padded), softmax
        ((13, 29, 35), 1, [[1, 2, 2], [2, 2, 2]]),  # anisotropic pooling, as planned for 2.5 mm slices
    ],
)
def test_tiled_volume_equals_whole_volume_sliding_window(tmp_path: Path, cluster: Cluster, shape: tuple[int, ...],
                                                         classes: int, pool: list[list[int]] | None) -> None:
    dataset = nifti_dataset(tmp_path, smooth_volume(shape))
    model = make_model(tmp_path / "model", classes=classes, pool=pool)
    cfg = config(dataset, tmp_path / "out", model)
    [result] = predict_dataset(cfg, cluster=cluster)

    assert result.blocks > 4 and len(result.block_shape) == 3 and math.prod(result.block_shape) <= 64**2
    assert result.pixels == math.prod(shape) and result.tile_evaluations >= result.grid_tiles
    probs = oracle_probabilities(dataset, model, cfg)
    out = outputs(tmp_path / "out")
    np.testing.assert_allclose(out["0"][:], probs, atol=1e-5, rtol=0)
    labels = out["labels/prediction/0"][:]
    expected = (probs[0] > 0.5) if classes == 1 else probs.argmax(0)
    assert labels.shape == shape
    np.testing.assert_array_equal(labels[decided(probs)], expected[decided(probs)])
    assert len(list((tmp_path / "out" / "ct.blocks").glob("z*_y*_x*.json"))) == result.blocks

    [one] = predict_dataset(config(dataset, tmp_path / "one", model, block_size=16384), cluster=cluster)
    assert one.blocks == 1
    np.testing.assert_allclose(outputs(tmp_path / "one")["0"][:], out["0"][:], atol=1e-5, rtol=0)


def test_the_output_has_the_inputs_axes_spacing_pyramid_and_geometry(tmp_path: Path, cluster: Cluster,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(omezarr, "PYRAMID_MIN_SIZE", 8)  # ingestion and the driver's output run in this process
    dataset = nifti_dataset(tmp_path, smooth_volume((9, 33, 38)))
    model = make_model(tmp_path / "model", classes=2)
    predict_dataset(config(dataset, tmp_path / "out", model, instances=True), cluster=cluster)
    src, out = omezarr.open_root(mf.store_path(dataset, "ct")), outputs(tmp_path / "out")

    def levels(group: zarr.Group) -> list[tuple[int, ...]]:
        return [group[k].shape[-3:] for k in sorted(group.array_keys(), key=int)]

    src_levels = levels(src)
    assert len(src_levels) >= 3 and src_levels[1][0] == 9  # 2.5 mm slices: not halved at first
    assert levels(out) == levels(out["labels/prediction"]) == levels(out["labels/instances"]) == src_levels
    src_meta = src.attrs["ome"]["multiscales"][0]
    for group in (out, out["labels/prediction"], out["labels/instances"]):
        meta = group.attrs["ome"]["multiscales"][0]
        spatial = [a for a in meta["axes"] if a["type"] == "space"]
        assert [(a["name"], a["unit"]) for a in spatial] == [(n, "millimeter") for n in "zyx"]
        scales = [d["coordinateTransformations"][0]["scale"][-3:] for d in meta["datasets"]]
        assert scales == [d["coordinateTransformations"][0]["scale"][-3:] for d in src_meta["datasets"]]
    assert [a["name"] for a in out.attrs["ome"]["multiscales"][0]["axes"]] == ["c", "z", "y", "x"]
    assert omezarr.geometry(out) == omezarr.geometry(src)
    assert np.array_equal(np.asarray(omezarr.geometry(out)["affine"]), nib.load(tmp_path / "images" / "ct.nii.gz").affine)


# --- 3-D components and post-processing --------------------------------------------------------------------


def _median_threshold(dataset: Path, model: Path, tmp_path: Path) -> float:
    return float(np.median(oracle_probabilities(dataset, model, config(dataset, tmp_path / "probe", model))[0]))


def test_instances_across_3d_block_faces_equal_scipy_labelling(tmp_path: Path, cluster: Cluster) -> None:
    dataset = nifti_dataset(tmp_path, smooth_volume((20, 30, 34), seed=3))
    model = make_model(tmp_path / "model", seed=1)
    threshold = _median_threshold(dataset, model, tmp_path)
    [result] = predict_dataset(config(dataset, tmp_path / "out", model, threshold=threshold, instances=True),
                               cluster=cluster)
    out = outputs(tmp_path / "out")
    semantic, inst = out["labels/prediction/0"][:], out["labels/instances/0"][:]
    ref, n = ndimage.label(semantic)  # 6-connectivity
    assert result.instances == inst.max() == n > 1
    assert ((inst > 0) == (ref > 0)).all()
    assert len(set(zip(inst.ravel().tolist(), ref.ravel().tolist()))) == len(np.unique(ref))  # same partition
    blocks = plan_blocks(semantic.shape, tuple(result.block_shape))
    z_starts = {b.z0 for b in blocks}
    assert len(z_starts) > 1
    crossing_z = [i for i in range(1, n + 1) if len({b.z0 for b in blocks if (inst[b.slices] == i).any()}) > 1]
    assert crossing_z  # objects cross the blocks' z faces, and keep one id


def test_small_objects_removed_on_a_volume_by_whole_volume_size(tmp_path: Path, cluster: Cluster) -> None:
    dataset = nifti_dataset(tmp_path, smooth_volume((16, 30, 30), seed=5))
    model = make_model(tmp_path / "model", seed=2)
    threshold = _median_threshold(dataset, model, tmp_path)
    predict_dataset(config(dataset, tmp_path / "raw", model, threshold=threshold), cluster=cluster)
    predict_dataset(config(dataset, tmp_path / "post", model, threshold=threshold, min_object_size=30),
                    cluster=cluster)
    raw = outputs(tmp_path / "raw")["labels/prediction/0"][:]
    post = outputs(tmp_path / "post")["labels/prediction/0"][:]
    assert (raw != post).any()
    np.testing.assert_array_equal(post, postprocess_whole(raw, 30))


# --- resume ----------------------------------------------------------------------------------------------


def _records(records: Path) -> list[Path]:
    return [p for p in records.glob("z*_y*_x*.json") if p.name.count(".") == 1]


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical_on_a_volume(tmp_path: Path, cluster: Cluster) -> None:
    import time

    dataset = nifti_dataset(tmp_path, smooth_volume((24, 64, 64), seed=7), np.eye(4))  # 16³ chunks: 32 blocks
    model = make_model(tmp_path / "model")
    args = ["--model", str(model), "--tile", "16", "--block-size", "64", "--workers", "2", "--threads-per-worker",
            "1", "--instances", "--min-object-size", "20", "--export", "nifti", "--no-prefect"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "predict", str(dataset), "-o", str(killed), *args],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if (killed / "ct.blocks").is_dir() and len(_records(killed / "ct.blocks")) >= 4:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)  # polling interval, not a timing assumption
    proc.wait(timeout=30)
    done_at_kill = len(_records(killed / "ct.blocks"))
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert outputs(killed).attrs["unet"]["complete"] is False

    cfg = dict(tile=16, block_size=64, n_workers=2, instances=True, min_object_size=20, export="nifti",
               probability_dtype="float16")
    [resumed] = predict_dataset(config(dataset, killed, model, **cfg), cluster=cluster)
    [whole] = predict_dataset(config(dataset, tmp_path / "whole", model, **cfg), cluster=cluster)
    assert 0 < done_at_kill <= resumed.blocks_skipped < resumed.blocks == whole.blocks
    a, b = outputs(killed), outputs(tmp_path / "whole")
    arrays_a = {k for k, v in a.members(max_depth=None) if isinstance(v, zarr.Array)}
    arrays_b = {k for k, v in b.members(max_depth=None) if isinstance(v, zarr.Array)}
    assert arrays_a == arrays_b
    assert {"0", "labels/prediction/0", "labels/instances/0"} <= arrays_b
    for key in sorted(arrays_b):
        assert a[key][:].tobytes() == b[key][:].tobytes(), key
    assert a.attrs["unet"]["complete"] is True
    assert np.array_equal(np.asarray(nib.load(resumed.export).dataobj), np.asarray(nib.load(whole.export).dataobj))


# --- exports and preview -------------------------------------------------------------------------------------


def test_nifti_round_trip_keeps_the_affine_qform_and_sform_bit_for_bit(tmp_path: Path, cluster: Cluster) -> None:
    oblique = AFFINE.copy()
    oblique[:3, :3] = oblique[:3, :3] @ np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])
    dataset = nifti_dataset(tmp_path, smooth_volume((7, 19, 23)), oblique)  # qform code 1, sform code 2
    model = make_model(tmp_path / "model", classes=3)
    [result] = predict_dataset(config(dataset, tmp_path / "out", model, export="nifti"), cluster=cluster)
    assert result.export == str(tmp_path / "out" / "ct_mask.nii.gz")
    written, source = nib.load(result.export), nib.load(tmp_path / "images" / "ct.nii.gz")
    assert written.shape == source.shape == (23, 19, 7)
    assert np.array_equal(written.affine, source.affine)
    assert np.array_equal(written.header.get_qform(), source.header.get_qform())
    assert np.array_equal(written.header.get_sform(), source.header.get_sform())
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "pixdim"):
        assert np.array_equal(written.header[key], source.header[key]), key
    labels = outputs(tmp_path / "out")["labels/prediction/0"][:]
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.swapaxes(labels, 0, 2))
    assert written.get_data_dtype() == np.uint8


def test_a_dicom_series_prediction_exports_nifti_in_its_scanner_space(tmp_path: Path, cluster: Cluster) -> None:
    images = tmp_path / "images"
    series = write_ct_series(images / "1.2.840.9", (smooth_volume((6, 20, 24)) + 1500).astype(np.uint16))
    dataset = tmp_path / "ds"
    assert not ingest_folder(IngestConfig(images=str(images), output=str(dataset), val_fraction=0.0)).failed
    model = make_model(tmp_path / "model")
    [result] = predict_dataset(config(dataset, tmp_path / "out", model, export="nifti"), cluster=cluster)
    written = nib.load(result.export)
    stored = np.asarray(omezarr.geometry(omezarr.open_root(mf.store_path(dataset, series.name)))["affine"])
    assert written.shape == (24, 20, 6)
    np.testing.assert_allclose(written.affine, stored, atol=1e-6)  # NIfTI keeps the DICOM affine as float32


def test_a_volume_exports_tiff_stacks_and_a_three_slice_preview(tmp_path: Path, cluster: Cluster) -> None:
    dataset = nifti_dataset(tmp_path, smooth_volume((8, 21, 26)))
    model = make_model(tmp_path / "model", classes=2)
    [tif] = predict_dataset(config(dataset, tmp_path / "tif", model, export="tiff"), cluster=cluster)
    [png] = predict_dataset(config(dataset, tmp_path / "png", model, export="png"), cluster=cluster)
    labels = outputs(tmp_path / "tif")["labels/prediction/0"][:]
    assert png.export == str(tmp_path / "png" / "ct_mask.tif")  # no PNG holds a volume: the TIFF stack instead
    for path in (tif.export, png.export):
        with tifffile.TiffFile(path) as f:
            assert f.is_imagej and len(f.pages) == 8
            np.testing.assert_array_equal(f.asarray(), labels)
            assert f.imagej_metadata["spacing"] == pytest.approx(2.5) and f.imagej_metadata["unit"] == "mm"
            x_res = f.pages[0].tags["XResolution"].value
            assert x_res[1] / x_res[0] == pytest.approx(0.75)
    preview = np.asarray(Image.open(tif.preview))
    # mid-slices across z, y, x at the physical aspect (2.5 x 0.8 x 0.75 mm voxels, 0.75 mm per preview pixel)
    z, y, x = (round(n * s / 0.75) for n, s in zip((8, 21, 26), (2.5, 0.8, 0.75)))
    assert preview.shape == (max(y, z), x + x + y, 3)


def test_orthogonal_mid_slices_read_the_three_planes() -> None:
    volume = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    across_z, across_y, across_x = orthogonal_mid_slices(volume)
    np.testing.assert_array_equal(across_z, volume[:, 1])
    np.testing.assert_array_equal(across_y, volume[:, :, 2])
    np.testing.assert_array_equal(across_x, volume[:, :, :, 2])


# --- 2-D models on volumes, 3-D models on images, exports that cannot be ----------------------------------------


def test_a_2d_model_predicts_a_volume_slice_by_slice(tmp_path: Path, cluster: Cluster) -> None:
    dataset = nifti_dataset(tmp_path, smooth_volume((5, 30, 35)))
    model = make_model(tmp_path / "model", spatial_dims=2, classes=2)
    cfg = config(dataset, tmp_path / "out", model, skip_empty=False, overlap=0.5, batch_size=4)  # the oracle's
    [result] = predict_dataset(cfg, cluster=cluster)
    net, _ = load_model(model)
    plain = torch_predictor(net, torch.device("cpu"))
    x = normalised(dataset, model)
    got = outputs(tmp_path / "out")["0"][:]
    for z in range(5):
        probs = torch.softmax(torch.from_numpy(sliding_window(x[:, z], plain, (16, 16), 0.5, 4)), 0).numpy()
        np.testing.assert_allclose(got[:, z], probs, atol=1e-5, rtol=0)
    assert result.grid_tiles == 5 * 3 * 4 and math.prod(result.block_shape) <= 64**2  # tiles one slice deep


def test_a_3d_model_on_a_2d_image_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "img.tif", ramp((40, 50), "uint8"))
    dataset = tmp_path / "ds"
    ingest_folder(IngestConfig(images=str(tmp_path / "images"), output=str(dataset), val_fraction=0.0))
    model = make_model(tmp_path / "model3d")
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(dataset), "-o", str(out), "--model", str(model), "--no-prefect"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    # the task check (planning) speaks first: the model's task is 3-D, the dataset's images are 2-D
    assert str(model) in lines[0] and "3-D" in lines[0] and "2-D images" in lines[0]
    assert not out.exists()


def test_a_nifti_export_is_refused_before_work_for_an_image_or_a_tiff_stack(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "flat.tif", ramp((40, 50), "uint8"))
    tifffile.imwrite(tmp_path / "images" / "stack.tif", ramp((6, 40, 50), "uint8"), metadata={"axes": "ZYX"})
    dataset = tmp_path / "ds"
    ingest_folder(IngestConfig(images=str(tmp_path / "images"), output=str(dataset), val_fraction=0.0))
    model = make_model(tmp_path / "model", spatial_dims=2)
    for image_id, what in (("flat", "is a 2-D image"), ("stack", "is a volume without a source affine")):
        with pytest.raises(ConfigError, match=f"image '{image_id}' {what}"):
            check_predictable(config(dataset, tmp_path / "out", model, export="nifti", images=[image_id]))
    assert not (tmp_path / "out").exists()


def test_normalize_broadcasts_per_channel_over_volumes() -> None:
    block = ramp((2, 3, 4, 5), "int16").astype(np.float32)
    stats = {"channels": [{"mean": 10.0, "std": 2.0}, {"mean": -5.0, "std": 4.0}]}
    recipe = NormalizationConfig(mode="zscore")
    per_slice = np.stack([normalize(block[:, z], stats, recipe) for z in range(3)], axis=1)
    np.testing.assert_array_equal(normalize(block, stats, recipe), per_slice)
    np.testing.assert_allclose(normalize(block, stats, recipe)[1], (block[1] + 5.0) / 4.0, rtol=1e-6)
