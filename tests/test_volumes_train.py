"""`unet train` on volumes end to end: NIfTI in, the plan's 3-D model trained, a NIfTI mask out on the scan's affine."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner
from volume_data import save_nifti

from app.cli import app
from unetcore.config import InferConfig, validated
from unetcore.inference import with_model_tile
from unetcore.planning import plan_dataset
from unetcore.tracking import PinnedModel

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


def test_dims_2_on_volumes_is_refused_in_one_line(scans: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "ds"
    assert runner.invoke(app, ["ingest", str(scans / "images"), "--masks", str(scans / "masks"), "-o", str(dataset),
                               "--no-prefect"]).exit_code == 0
    result = runner.invoke(app, ["train", str(dataset), "--no-prefect", "--dims", "2", "--tracking-uri",
                                 f"sqlite:///{tmp_path / 'mlflow.db'}", "--output", str(tmp_path / "run")])
    lines = [line for line in result.output.strip().splitlines() if line]
    assert result.exit_code == 2 and len(lines) == 1 and "--dims 2 on 3-D data" in lines[0], result.output
