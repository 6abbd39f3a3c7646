"""`unet train` on volumes end to end: NIfTI in, the plan's 3-D model trained, a NIfTI mask out on the scan's affine."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner
from volume_data import save_nifti

from app.cli import app
from unetcore.config import InferConfig, NormalizationConfig, validated
from unetcore.inference import sliding_window, torch_predictor, with_model_tile
from unetcore.model import load_model
from unetcore.planning import plan_dataset
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.store.stats import normalize
from unetcore.tracking import PinnedModel
from unetcore.training import Validation

runner = CliRunner()
SHAPE = (24, 32, 32)


def blob_ct(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (air -1000 HU, body ~40 HU, a ~150 HU ellipsoid at a random place) and its mask."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(SHAPE)
    body = (y - 16) ** 2 + (x - 16) ** 2 < 14**2
    cz, cy, cx = rng.integers(8, 16), rng.integers(11, 21), rng.integers(11, 21)
    organ = ((z - cz) / 5.0) ** 2 + ((y - cy) / 5.0) ** 2 + ((x - cx) / 5.0) ** 2 < 1
    data = np.where(body, 40, -1000) + np.where(organ, 110, 0) + rng.normal(0, 10, SHAPE)
    return data.astype(np.int16), organ.astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.logical_and(a, b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scans")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(6):
        image, mask = blob_ct(i)
        save_nifti(root / "images" / f"ct{i}.nii.gz", image)
        save_nifti(root / "masks" / f"ct{i}.nii.gz", mask)
    return root


def test_ingest_train_predict_a_nifti_dataset_with_the_plans_3d_model(scans: Path, tmp_path: Path) -> None:
    dataset, uri = tmp_path / "ds", f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = runner.invoke(app, ["ingest", str(scans / "images"), "--masks", str(scans / "masks"), "-o", str(dataset),
                                 "--chunk-size", "64", "--no-prefect"])
    assert result.exit_code == 0, result.output
    plan = plan_dataset(dataset)
    assert plan["model.spatial_dims"] == 3 and plan["normalization.mode"] == "ct"
    assert len(plan["patch_size"]) == 3 and plan["model.pool"][0][0] == 1  # z (2.5 mm) is not pooled first

    result = runner.invoke(app, ["train", str(dataset), "--no-prefect", "--tracking-uri", uri, "--output",
                                 str(tmp_path / "run"), "--epochs", "3", "--steps-per-epoch", "12",
                                 "--registered-model", "vol"])
    assert result.exit_code == 0, result.output
    model_dir = tmp_path / "run" / "best"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model"]["spatial_dims"] == 3 and config["tile"] == plan["patch_size"]
    fitted = config["normalization"]
    assert fitted["mode"] == "ct" and 100 < fitted["foreground"][0]["mean"] < 200  # the organ's HU, fitted

    pinned, target = PinnedModel(str(model_dir), model_dir), dict(dataset=str(dataset), output=str(tmp_path / "p"))
    assert with_model_tile(validated(InferConfig, **target), pinned).tile == plan["patch_size"]  # no --tile: its own
    assert with_model_tile(validated(InferConfig, tile=16, **target), pinned).tile == 16
    result = runner.invoke(app, ["predict", str(dataset), "-o", str(tmp_path / "pred"), "--model", str(model_dir),
                                 "--export", "nifti", "--no-prefect"])
    assert result.exit_code == 0, result.output
    scores, constant = [], []
    for i in range(6):
        source = nib.load(scans / "images" / f"ct{i}.nii.gz")
        written = nib.load(tmp_path / "pred" / f"ct{i}_mask.nii.gz")
        assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
        truth = np.asarray(nib.load(scans / "masks" / f"ct{i}.nii.gz").dataobj) > 0
        pred = np.asarray(written.dataobj) > 0
        scores.append(dice(pred, truth))
        constant.append(dice(np.ones_like(truth), truth))
    assert np.mean(scores) > max(0.6, 2 * np.mean(constant)), (scores, constant)


def test_dims_2_trains_a_2d_model_on_slices_validates_in_3d_and_predicts_slice_by_slice(scans: Path,
                                                                                         tmp_path: Path) -> None:
    """nnU-Net's "2d" configuration on volumes: `--dims 2` trains a 2-D model on z-slices; its validation Dice is
    the 3-D Dice of its stacked slice predictions over the validation volumes; `unet predict` gives, per slice,
    exactly the model's 2-D sliding window of that slice (the oracle), and the NIfTI mask on the scan's affine."""
    dataset, uri = tmp_path / "ds", f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert runner.invoke(app, ["ingest", str(scans / "images"), "--masks", str(scans / "masks"), "-o", str(dataset),
                               "--chunk-size", "64", "--no-prefect"]).exit_code == 0
    result = runner.invoke(app, ["train", str(dataset), "--no-prefect", "--dims", "2", "--tracking-uri", uri,
                                 "--output", str(tmp_path / "run"), "--epochs", "2", "--steps-per-epoch", "10",
                                 "--registered-model", "vol2d"])
    assert result.exit_code == 0, result.output
    assert "2 (option; planned 3)" in result.output
    model_dir = tmp_path / "run" / "best"
    net, config = load_model(model_dir)
    assert config["model"]["spatial_dims"] == 2 and config["task"]["spatial_dims"] == 3
    tile = config["tile"]
    assert isinstance(tile, int) and tile <= SHAPE[1]  # planned for the 32 x 32 slices
    recipe = NormalizationConfig(**config["normalization"])
    assert recipe.mode == "ct"
    plain = torch_predictor(net, torch.device("cpu"))
    manifest = mf.load(dataset)

    @functools.cache
    def stacked(image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(sigmoid probabilities (D, H, W), truth) of one volume: the 2-D model on each slice, stacked."""
        entry = manifest["images"][image_id]
        root = omezarr.open_root(mf.store_path(dataset, entry["id"]))
        x = normalize(omezarr.image_array(root)[:], entry["stats"], recipe)
        logits = np.stack([sliding_window(x[:, z], plain, (tile, tile), 0.5, 4)[0] for z in range(x.shape[1])])
        return 1 / (1 + np.exp(-logits.astype(np.float64))), omezarr.label_array(root)[:] > 0

    tp = fp = fn = 0
    for entry in mf.entries(manifest, "val"):
        probs, truth = stacked(entry["id"])
        pred = probs > 0.5
        tp, fp, fn = tp + int((pred & truth).sum()), fp + int((pred & ~truth).sum()), fn + int((~pred & truth).sum())
    assert config["val_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-3)  # 3-D Dice, pooled voxels

    result = runner.invoke(app, ["predict", str(dataset), "-o", str(tmp_path / "pred"), "--model", str(model_dir),
                                 "--export", "nifti", "--no-prefect", "--no-skip-empty"])
    assert result.exit_code == 0, result.output
    for entry in mf.entries(manifest):
        probs, _ = stacked(entry["id"])
        store = zarr.open_group(store=str(tmp_path / "pred" / f"{entry['id']}.ome.zarr"), mode="r")
        np.testing.assert_allclose(store["0"][0], probs, atol=2.5e-4, rtol=0)  # float16 storage: half an ulp at 0.5-1
        written = nib.load(tmp_path / "pred" / f"{entry['id']}_mask.nii.gz")
        source = nib.load(scans / "images" / f"{entry['id']}.nii.gz")
        assert np.array_equal(written.affine, source.affine)
        decided = np.abs(probs - 0.5) > 1e-4
        mask_zyx = np.swapaxes(np.asarray(written.dataobj), 0, 2) > 0
        np.testing.assert_array_equal(mask_zyx[decided], (probs > 0.5)[decided])


def test_a_champion_of_the_other_configuration_is_scored_with_its_own_tile() -> None:
    """The champion gate scores a 2-D champion on a 3-D challenger's validation (and the reverse): each model
    keeps tiles of its own axes."""
    flat = {"model": {"spatial_dims": 2, "num_classes": 1, "in_channels": 1}, "tile": 32}
    deep = {"model": {"spatial_dims": 3, "num_classes": 1, "in_channels": 1}, "tile": [8, 16, 16]}
    net2, net3 = torch.nn.Conv2d(1, 1, 1), torch.nn.Conv3d(1, 1, 1)
    three_d = Validation(Path("ds"), [], torch.device("cpu"), (8, 16, 16), 2)
    assert three_d.predictor(net2, flat).tile == 32
    assert three_d.predictor(net3, deep).tile == (8, 16, 16)
    assert Validation(Path("ds"), [], torch.device("cpu"), 32, 2).predictor(net3, deep).tile == (8, 16, 16)
