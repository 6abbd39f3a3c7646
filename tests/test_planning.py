"""Planning from the data: the fingerprint ingestion measures, the plan's rules (pure), the plan of real tiny
datasets (2-D grey, RGB, 3 classes, a CT-like volume), `unet plan` and `unet train` with no option, overrides, the
plan in MLflow and with the model, the task signature at the champion gate and at prediction, and a length of
training in steps that gives the same model on an idle and a loaded machine.

Trainings use the plan's own choices (channels, classes, patch, depth, batch, sampling...) with only the number of
steps cut by explicit options (``--epochs 1 --steps-per-epoch 1``), so each takes seconds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner
from volume_data import save_nifti

from app.cli import app
from unetcore import planning, training
from unetcore.config import IngestConfig, ModelConfig, TrainConfig
from unetcore.data.synthetic import generate_image, instances_to_semantic
from unetcore.errors import ConfigError, InputError
from unetcore.ingest import ingest_folder
from unetcore.model import build_model, save_model
from unetcore.planning import (
    Plan,
    TaskSignature,
    deepest,
    fingerprint,
    modality_hint,
    model_classes,
    plan_batch,
    plan_dataset,
    plan_patch,
    plan_pooling,
    plan_sampling,
    plan_steps,
    planned_config,
    pooled_percentile,
    target_spacing,
    training_bytes,
)
from unetcore.store import manifest as mf
from unetcore.tracking import mlflow as tracking

runner = CliRunner()


# --- datasets -----------------------------------------------------------------------------------------------


def _write(root: Path, n: int, shape: tuple[int, int], *, rgb: bool = False, semantic: str | None = None) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, instances = generate_image(shape, seed=10 + i)
        if rgb:  # colour nuclei: red and green carry the signal, blue is noise
            noise = np.random.default_rng(i).integers(0, 60, shape, dtype=np.uint8)
            image = np.stack([image, (image * 0.6).astype(np.uint8), noise], -1)
        mask = instances_to_semantic(instances, semantic) if semantic else ((instances > 0) * 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"img_{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"img_{i}.png")


def _ingest(root: Path, **options) -> Path:
    report = ingest_folder(IngestConfig(images=str(root / "images"), masks=str(root / "masks"),
                                        output=str(root / "ds"), **options))
    assert report.status == "ok", report.failed
    return root / "ds"


@pytest.fixture(scope="module")
def grey_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five 128 x 256 grey images with 0/255 masks."""
    root = tmp_path_factory.mktemp("grey")
    _write(root, 5, (128, 256))
    return _ingest(root)


@pytest.fixture(scope="module")
def rgb_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 96 x 112 RGB PNGs."""
    root = tmp_path_factory.mktemp("rgb")
    _write(root, 4, (96, 112), rgb=True)
    return _ingest(root)


@pytest.fixture(scope="module")
def three_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 96² images with background / nucleus / boundary masks (classes 0, 1, 2)."""
    root = tmp_path_factory.mktemp("three")
    _write(root, 4, (96, 96), semantic="boundary")
    return _ingest(root, num_classes=3)


def _ct(shape: tuple[int, int, int], z_mm: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (air -1024 HU, body ~40 HU, an organ ~120 HU) and its organ mask."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    cy, cx = shape[1] / 2, shape[2] / 2
    body = (y - cy) ** 2 + (x - cx) ** 2 < (0.4 * shape[1]) ** 2
    organ = (y - cy) ** 2 + (x - cx - 8) ** 2 < (0.15 * shape[1]) ** 2
    data = np.where(body, 40, -1024) + np.where(organ, 80, 0) + rng.normal(0, 10, shape)
    return data.astype(np.int16), organ.astype(np.uint8)


@pytest.fixture(scope="module")
def ct_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three thick-slice CT-like NIfTI volumes (z 5, 5 and 4 mm; 0.8 mm in plane) with organ masks."""
    root = tmp_path_factory.mktemp("ct")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i, z_mm in enumerate((5.0, 5.0, 4.0)):
        data, mask = _ct((12, 96, 96), z_mm, i)
        affine = np.diag([0.8, 0.8, z_mm, 1.0])
        save_nifti(root / "images" / f"ct{i}.nii.gz", data, affine)
        save_nifti(root / "masks" / f"ct{i}.nii.gz", mask, affine)
    return _ingest(root, chunk_size=64)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


# --- what ingestion measures for the fingerprint -------------------------------------------------------------


def test_ingestion_measures_foreground_intensities_and_class_pixels(three_ds: Path) -> None:
    for entry in mf.entries(mf.require(three_ds)):
        image = np.asarray(Image.open(Path(entry["source"])))
        labels = np.asarray(Image.open(Path(entry["mask"])))
        counts = np.bincount(labels.ravel(), minlength=3)
        assert entry["class_pixels"] == {str(c): int(counts[c]) for c in entry["classes"]}
        inside = image[labels > 0].astype(np.float64)
        fg = entry["foreground_stats"]
        assert fg["pixels"] == inside.size
        assert fg["channels"][0]["mean"] == pytest.approx(inside.mean())
        assert fg["channels"][0]["std"] == pytest.approx(inside.std())
        assert fg["channels"][0]["percentiles"]["50.0"] == np.percentile(inside, 50, method="inverted_cdf")
        assert fg["channels"][0]["mean"] > entry["stats"]["channels"][0]["mean"]  # nuclei are brighter


def test_an_image_without_a_mask_has_no_foreground_statistics(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    np.save(tmp_path / "img" / "a.npy", np.arange(64 * 80, dtype=np.float32).reshape(64, 80))
    ingest_folder(IngestConfig(images=str(tmp_path / "img"), output=str(tmp_path / "ds")))
    [entry] = mf.entries(mf.require(tmp_path / "ds"))
    assert entry["foreground_stats"] is None and entry["class_pixels"] is None


def test_a_volume_measures_its_foreground_too(ct_ds: Path) -> None:
    entry = mf.load(ct_ds)["images"]["ct0"]
    data, mask = _ct((12, 96, 96), 5.0, 0)
    assert entry["class_pixels"] == {"0": int((mask == 0).sum()), "1": int(mask.sum())}
    assert entry["foreground_stats"]["channels"][0]["mean"] == pytest.approx(data[mask > 0].mean())


# --- the pure rules -----------------------------------------------------------------------------------------


def test_pooled_percentiles_of_images_are_the_percentiles_of_their_union() -> None:
    a = {str(p): float(np.percentile(np.arange(100), p)) for p in (0, 25, 50, 75, 100)}
    b = {str(p): v + 100 for p, v in a.items()}
    assert pooled_percentile([(100, a)], 50) == pytest.approx(a["50"])
    assert pooled_percentile([(100, a), (100, a)], 75) == pytest.approx(a["75"])
    assert pooled_percentile([(100, a), (100, b)], 50) == pytest.approx(99.5, abs=0.6)
    assert pooled_percentile([(300, a), (100, b)], 50) < pooled_percentile([(100, a), (300, b)], 50)


@pytest.mark.parametrize(("dtype", "low", "high", "expected"), [
    ("int16", -1024, 2000, "ct"), ("float32", -1000, 1500, "ct"), ("uint16", 0, 4000, "other"),
    ("int16", 0, 255, "other"), ("uint8", 0, 255, "other"),
])
def test_modality_hint_is_ct_only_for_hounsfield_like_intensities(dtype: str, low: float, high: float,
                                                                   expected: str) -> None:
    stats = [{"channels": [{"min": low, "max": high}]}] * 3
    modality, why = modality_hint(dtype, 1, stats)
    assert modality == expected and dtype in why


@pytest.mark.parametrize(("classes", "declared", "expected"), [
    ([0, 1], 1, 1), ([0], 1, 1), ([1], 1, 1), ([0, 1, 2], 3, 3), ([0, 1], 4, 4), ([0, 2, 5], 1, 6),
])
def test_classes_of_the_model_come_from_the_mask_values(classes: list[int], declared: int, expected: int) -> None:
    assert model_classes(classes, declared) == expected


def test_pooling_is_isotropic_for_pixels_and_waits_on_a_coarse_axis() -> None:
    square = plan_pooling((1.0, 1.0), (128, 128), 5)
    assert square.pool == [[2, 2]] * 5 and square.kernels == [[3, 3]] * 6 and square.is_default
    assert deepest((1.0, 1.0), (128, 128), 6) == 5  # 128 / 2**5 = 4, the smallest feature map
    thick = plan_pooling((4.0, 1.0, 1.0), (16, 128, 128), 4)
    # z (4 mm) waits until y and x have doubled twice to 4 mm; its kernel stays 1 until then
    assert thick.pool == [[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert thick.kernels == [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert thick.multiple == (4, 16, 16) and not thick.is_default
    with pytest.raises(ValueError, match="too small"):
        plan_pooling((1.0, 1.0), (16, 16), 3)


def test_the_plan_pools_as_the_model_package_plans() -> None:
    """One pooling rule: the planner uses unetcore.model's (a wrong kernel rule there fails the table above)."""
    import unetcore.planning

    assert unetcore.planning.plan_pooling is unetcore.model.plan_pooling


def test_target_spacing_is_the_median_unless_one_axis_is_anisotropic() -> None:
    spacing, why = target_spacing([(1.0, 0.8, 0.8), (1.2, 0.7, 0.7), (1.0, 0.9, 0.9)], [(100, 200, 200)] * 3)
    assert spacing == pytest.approx((1.0, 0.8, 0.8)) and why.startswith("median")
    thick = [(5.0, 0.8, 0.8), (5.0, 0.7, 0.7), (4.0, 0.8, 0.8), (3.0, 0.8, 0.8)]
    spacing, why = target_spacing(thick, [(20, 512, 512)] * 4)
    assert spacing == pytest.approx((float(np.percentile([5.0, 5.0, 4.0, 3.0], 10)), 0.8, 0.8))
    assert "anisotropic" in why
    # coarse spacing but as many voxels along z as in plane: not anisotropic by nnU-Net's rule
    assert target_spacing(thick, [(512, 512, 512)] * 4)[0] == pytest.approx((4.5, 0.8, 0.8))
    # the 10th percentile never goes below the in-plane spacing
    spacing, _ = target_spacing([(5.0, 1.5, 1.5)] * 6 + [(0.5, 1.5, 1.5)] * 4, [(10, 100, 100)] * 10)
    assert spacing[0] == pytest.approx(1.5, abs=1e-4)


def test_a_2d_patch_is_the_largest_square_no_larger_than_the_median_image() -> None:
    plan = plan_patch((128.0, 256.0), (1.0, 1.0), square=True)
    assert plan.patch == (128, 128) and plan.depth == 5 and "limited by the median image" in plan.why
    plan = plan_patch((1000.0, 1500.0), (1.0, 1.0), square=True, budget=8 << 30)
    assert plan.patch == (992, 992) and plan.depth == 5
    for budget in (planning.MEMORY_BUDGET_BYTES, 256 << 20):
        small = plan_patch((1000.0, 1500.0), (1.0, 1.0), square=True, budget=budget)
        assert small.patch[0] < 992 and small.patch[0] % 2**small.depth == 0 and "memory budget" in small.why
        assert training_bytes(small.patch, 2, 16, small.pooling.pool) <= budget
        assert training_bytes((small.patch[0] + 32,) * 2, 2, 16, small.pooling.pool) > budget  # the largest
    with pytest.raises(ValueError, match="too small"):
        plan_patch((12.0, 300.0), (1.0, 1.0), square=True)


def test_a_3d_patch_is_shaped_like_the_median_volume_and_fits_the_budget() -> None:
    median, spacing = (40.0, 200.0, 180.0), (3.0, 0.8, 0.8)
    plan = plan_patch(median, spacing, square=False)
    assert all(p <= m for p, m in zip(plan.patch, median))
    assert all(p % m == 0 for p, m in zip(plan.patch, plan.pooling.multiple))
    assert plan.pooling.pool[0] == [1, 2, 2] and plan.pooling.kernels[0] == [1, 3, 3]
    assert training_bytes(plan.patch, 2, 16, plan.pooling.pool) <= planning.MEMORY_BUDGET_BYTES
    ratios = [p / m for p, m in zip(plan.patch, median)]
    assert max(ratios) - min(ratios) < 0.35  # shrunk evenly: still shaped like the median volume


def test_batch_size_is_bounded_by_memory_data_and_the_cpu_cap() -> None:
    pool = [[2, 2]] * 5
    assert plan_batch((128, 128), pool, 128 * 256 * 5, 2) == (2, "the minimum, 2 (5% of the training pixels per "
                                                                  "batch would allow 0)")
    batch, why = plan_batch((128, 128), pool, 1e9, 2)
    assert batch == 8 and "at most 8" in why
    batch, why = plan_batch((512, 512), pool, 1e9, 2, budget=3 * training_bytes((512, 512), 1, 16, pool))
    assert batch == 3 and "memory" in why


def test_the_length_of_training_is_a_fixed_amount_of_work_in_steps() -> None:
    epochs, per_epoch, why = plan_steps((128, 128), 2, 2)
    assert (epochs, per_epoch) == (10, 134) and "optimiser steps" in why and "not wall time" in why
    assert plan_steps((128, 128), 2, 2) == (epochs, per_epoch, why)  # a pure function of the plan
    assert plan_steps((256, 256), 8, 2)[1] < per_epoch  # more work per step: fewer steps
    # a large 3-D patch (the MNI volume's plan) gets the 3-D floor, a large 2-D one the 2-D floor, and say so
    epochs3, per_epoch3, why3 = plan_steps((128, 64, 80), 2, 3)
    assert epochs3 * per_epoch3 == 400 and "the fewest a 3-D UNet is given" in why3 and "make 33" in why3
    assert math.prod(plan_steps((2048, 2048), 8, 2)[:2]) == 100


def test_sampling_is_class_balanced_only_for_imbalanced_foreground_classes() -> None:
    assert plan_sampling(2, {0: 0.8, 1: 0.2})[0] == "foreground"
    assert plan_sampling(3, {0: 0.7, 1: 0.2, 2: 0.1})[0] == "foreground"
    sampling, why = plan_sampling(3, {0: 0.75, 1: 0.23, 2: 0.02})
    assert sampling == "class_balanced" and "class 2" in why
    assert plan_sampling(3, None)[0] == "class_balanced"


def test_task_signature_tags_round_trip_and_name_their_differences() -> None:
    binary = TaskSignature(1, 1, 2, (1.0, 1.0))
    three = TaskSignature(1, 3, 2, (0.5, 0.5), ("background", "nucleus", "border"))
    assert TaskSignature.from_tags(three.tags()) == three
    assert TaskSignature.from_dict(three.to_dict()) == three
    assert binary.differences(three.tags()) == [("num_classes", "3", "1")]  # spacing is recorded, not compared
    assert binary.differences({"num_classes": "1", "in_channels": "1"}) == []  # an older version: what it has
    assert three.describe() == "3 classes (background, nucleus, border), 1 channel, 2-D"
    assert TaskSignature.of_model({"model": ModelConfig(in_channels=3).model_dump()}) == TaskSignature(3, 1, 2)


# --- the plan of a dataset -----------------------------------------------------------------------------------


def test_plan_of_grey_128x256_images(grey_ds: Path) -> None:
    plan = plan_dataset(grey_ds)
    assert (plan["model.in_channels"], plan["model.num_classes"], plan["model.spatial_dims"]) == (1, 1, 2)
    assert (plan["patch_size"], plan["model.depth"], plan["batch_size"]) == (128, 5, 2)
    assert plan["normalization_scheme"] == "per_image" and plan["sampling"] == "foreground"
    assert plan["steps"] == plan["epochs"] * plan["steps_per_epoch"] and plan["time_budget_s"] == 0.0
    assert all(why for _, _, why in plan.rows())
    cfg = plan.train_config(output="out")
    assert (cfg.patch_size, cfg.model.depth, cfg.model.in_channels, cfg.val_tile) == (128, 5, 1, 128)
    assert cfg.dataset == str(grey_ds) and cfg.output == "out"


def test_plan_of_rgb_pngs_and_of_three_classes(rgb_ds: Path, three_ds: Path) -> None:
    rgb = plan_dataset(rgb_ds)
    assert rgb["model.in_channels"] == 3 and "3 channels" in rgb.choice("model.in_channels").why
    assert rgb["patch_size"] == 96 and rgb["model.depth"] == 4  # a 5th pooling would leave 3 px
    three = plan_dataset(three_ds)
    assert three["model.num_classes"] == 3 and "mask values 0, 1, 2" in three.choice("model.num_classes").why
    assert three["sampling"] == "class_balanced"  # boundaries are much rarer than nuclei
    fp = fingerprint(three_ds)
    assert set(fp.class_frequencies) == {0, 1, 2} and sum(fp.class_frequencies.values()) == pytest.approx(1.0)
    assert fp.foreground is not None and fp.foreground_measured == len(fp.images)


def test_plan_of_a_thick_slice_ct_volume(ct_ds: Path) -> None:
    fp = fingerprint(ct_ds)
    assert fp.modality == "ct" and "Hounsfield" in fp.modality_why and fp.spatial_dims == 3
    plan = plan_dataset(ct_ds)
    assert plan["model.spatial_dims"] == 3
    spacing = plan["target_spacing"]
    assert spacing == pytest.approx([float(np.percentile([5.0, 5.0, 4.0], 10)), 0.8, 0.8])
    assert "anisotropic" in plan.choice("target_spacing").why
    patch = plan["patch_size"]
    assert isinstance(patch, list) and len(patch) == 3
    assert patch[1] == patch[2] <= 96 and patch[0] <= 12 * 5.0 / spacing[0]
    assert plan["model.pool"][0] == [1, 2, 2] and plan["model.kernels"][0] == [1, 3, 3]
    scheme = plan.choice("normalization_scheme")
    assert scheme.value == "ct" and scheme.details["source"] == "foreground"
    low, high = scheme.details["clip"]
    assert 80 < low < high < 200 and 100 < scheme.details["mean"] < 140  # the organ (~120 HU), not the air
    assert plan["batch_size"] == 2
    if "spatial_dims" in ModelConfig.model_fields:  # the N-D model is in this build
        cfg = plan.train_config()
        assert cfg.model.spatial_dims == 3 and cfg.model.pool == plan["model.pool"] and cfg.patch_size == patch
    else:
        with pytest.raises(ConfigError, match="3-D"):
            plan.train_config()


def test_dims_2_on_volumes_plans_the_2d_configuration_on_slices(ct_ds: Path, grey_ds: Path) -> None:
    """nnU-Net's "2d" configuration: a square patch no larger than the median slice (96 x 96), pooled 2 x 2, a 2-D
    batch over every slice's pixels, 2-D validation tiles; the same CT normalisation as the 3-D plan."""
    volume, flat = plan_dataset(ct_ds), plan_dataset(ct_ds, spatial_dims=2)
    assert flat["model.spatial_dims"] == 2 and "z-slices" in flat.choice("model.spatial_dims").why
    assert isinstance(flat["patch_size"], int) and 16 <= flat["patch_size"] <= 96
    assert flat["model.pool"] is None and flat["val_tile"] == flat["patch_size"]
    assert "training pixels" in flat.choice("batch_size").why  # 5 % of all slices' pixels (2 here)
    assert flat.choice("normalization_scheme").details == volume.choice("normalization_scheme").details
    cfg, plan = planned_config(ct_ds, {"model.spatial_dims": 2}, output="o")
    assert cfg.model.spatial_dims == 2 and cfg.patch_size == flat["patch_size"] and cfg.normalization.mode == "ct"
    assert "2 (option; planned 3)" in plan.table() and plan.overridden == ["model.spatial_dims"]
    with pytest.raises(ConfigError, match="--dims 3 on 2-D data"):
        planned_config(grey_ds, {"model.spatial_dims": 3})
    with pytest.raises(ConfigError, match="must be one of 2, 3"):
        plan_dataset(ct_ds, spatial_dims=1)
    result = runner.invoke(app, ["plan", str(ct_ds), "--dims", "2"])
    assert result.exit_code == 0 and "z-slices" in result.output, result.output
    assert json.loads((ct_ds / "plan.json").read_text())["choices"] == flat.to_dict()["choices"]
    refused = runner.invoke(app, ["plan", str(grey_ds), "--dims", "3"])
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert refused.exit_code == 2 and len(lines) == 1 and "--dims 3 on 2-D data" in lines[0], refused.output


def test_overrides_set_exactly_their_field_and_are_marked(grey_ds: Path) -> None:
    cfg, plan = planned_config(grey_ds, {"patch_size": 64, "lr": 1e-3, "model.base_channels": 8}, output="o")
    planned = plan_dataset(grey_ds)
    assert (cfg.patch_size, cfg.lr, cfg.model.base_channels) == (64, 1e-3, 8)
    assert plan.overridden == ["patch_size"]  # lr and base_channels are not the plan's choices
    for field, value in planned.train_values().items():
        if field != "patch_size":
            node = cfg
            for part in field.split("."):
                node = getattr(node, part)
            assert node == value, field
    assert dict((f, v) for f, v, _ in plan.rows())["patch_size"] == "64 (option; planned 128)"
    params = plan.params()
    assert params["plan.patch_size"] == "128" and params["plan.overridden"] == "patch_size"
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(ConfigError, match="batch_size"):
        planned_config(grey_ds, {"batch_size": 0})


def test_datasets_that_cannot_be_planned_are_one_line(tmp_path: Path, grey_ds: Path) -> None:
    with pytest.raises(InputError, match="no manifest.json"):
        plan_dataset(tmp_path)
    (tmp_path / "img").mkdir()
    np.save(tmp_path / "img" / "a.npy", np.zeros((64, 64), np.uint8))
    ingest_folder(IngestConfig(images=str(tmp_path / "img"), output=str(tmp_path / "ds")))
    with pytest.raises(InputError, match="no image in the dataset has a mask"):
        plan_dataset(tmp_path / "ds")
    manifest = mf.load(grey_ds)
    first = next(iter(manifest["images"].values()))
    manifest["images"]["odd"] = {**first, "id": "odd", "channels": 3}
    with pytest.raises(InputError, match="1 and 3 channel counts"):
        fingerprint(grey_ds, manifest)


def test_unet_plan_prints_each_choice_and_why_and_writes_plan_json(three_ds: Path) -> None:
    result = runner.invoke(app, ["plan", str(three_ds)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["field", "value", "why"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    for field in ("model.in_channels", "model.num_classes", "patch_size", "model.depth", "batch_size",
                  "normalization.mode", "sampling", "loss", "steps", "target_spacing"):
        assert field in rows and len(rows[field].split()) > 2, field  # a value and a why
    assert "class_balanced" in rows["sampling"] and "class 2" in rows["sampling"]
    written = json.loads((three_ds / planning.PLAN_FILE).read_text())
    assert written["choices"] == plan_dataset(three_ds).to_dict()["choices"]
    assert written["fingerprint"]["num_classes"] == 3
    assert "plan.json" in lines[-1]


def test_unet_plan_of_no_dataset_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", str(tmp_path)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "manifest.json" in result.output


# --- `unet train DATASET` with no recipe option ---------------------------------------------------------------


def _train_cli(dataset: Path, uri: str, out: Path, *options: str):
    return runner.invoke(app, ["train", str(dataset), "--no-prefect", "--tracking-uri", uri, "--output", str(out),
                               "--epochs", "1", "--steps-per-epoch", "1", *options])


@pytest.mark.parametrize(("fixture", "name", "channels", "classes"), [
    ("grey_ds", "grey", 1, 1), ("rgb_ds", "rgb", 3, 1), ("three_ds", "three", 1, 3),
])
def test_unet_train_with_no_recipe_option_trains_the_plan(request: pytest.FixtureRequest, tracking_uri: str,
                                                          tmp_path: Path, fixture: str, name: str, channels: int,
                                                          classes: int) -> None:
    dataset = request.getfixturevalue(fixture)
    result = _train_cli(dataset, tracking_uri, tmp_path / "out", "--registered-model", name)
    assert result.exit_code == 0, result.output
    assert "overridden by options: epochs, steps_per_epoch" in result.output
    assert "(option; planned 10)" in result.output
    plan = plan_dataset(dataset)
    config = json.loads((tmp_path / "out" / "best" / "config.json").read_text())
    assert (config["model"]["in_channels"], config["model"]["num_classes"]) == (channels, classes)
    assert config["model"]["depth"] == plan["model.depth"] and config["tile"] == plan["val_tile"]
    assert config["task"] == TaskSignature(channels, classes, 2, (1.0, 1.0)).to_dict()
    assert config["plan"]["overridden"] == ["epochs", "steps_per_epoch"]
    client = MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias(name, tracking.CHAMPION)
    run = client.get_run(version.run_id)
    params = run.data.params
    assert params["patch_size"] == str(plan["patch_size"]) and params["batch_size"] == str(plan["batch_size"])
    assert params["sampling"] == plan["sampling"] and params["plan.overridden"] == "epochs,steps_per_epoch"
    assert params["plan.epochs"] == "10" and params["epochs"] == "1"
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "plan.json", str(tmp_path))).read_text())
    assert logged == config["plan"]
    assert (version.tags["num_classes"], version.tags["in_channels"], version.tags["spatial_dims"]) == (
        str(classes), str(channels), "2")


def test_a_three_class_model_never_displaces_a_binary_champion(grey_ds: Path, three_ds: Path, tracking_uri: str,
                                                               tmp_path: Path) -> None:
    assert _train_cli(grey_ds, tracking_uri, tmp_path / "binary", "--registered-model", "shared").exit_code == 0
    client = MlflowClient(tracking_uri)
    champion = client.get_model_version_by_alias("shared", tracking.CHAMPION).version
    result = _train_cli(three_ds, tracking_uri, tmp_path / "three", "--registered-model", "shared")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: option --registered-model:"), result.output
    assert "binary, 1 channel, 2-D" in lines[0] and "3 classes" in lines[0]
    assert f"--registered-model shared-{three_ds.name}" in lines[0]  # the fix
    assert not (tmp_path / "three").exists()  # refused before any work
    assert [v.version for v in client.search_model_versions("name='shared'")] == [champion]
    # the gate itself (a library caller registering anyway): never compared, the champion stays
    run_id = client.get_model_version("shared", champion).run_id
    mlflow.set_tracking_uri(tracking_uri)
    reg = tracking.register("shared", run_id, client.get_model_version("shared", champion).source, 0.99, "any",
                            task=TaskSignature(1, 3, 2))
    assert reg["alias"] == tracking.CHALLENGER and "not comparable" in reg["gate"]
    assert client.get_model_version_by_alias("shared", tracking.CHAMPION).version == champion


def test_predicting_with_a_model_of_another_task_is_one_line(grey_ds: Path, three_ds: Path, tmp_path: Path) -> None:
    binary = save_model(tmp_path / "binary", build_model(ModelConfig(base_channels=4, depth=2)),
                        {"task": TaskSignature(1, 1, 2).to_dict()})

    def predict(dataset: Path, model: Path):
        return runner.invoke(app, ["predict", str(dataset), "-o", str(tmp_path / "out"), "--model", str(model),
                                   "--no-prefect"])

    result = predict(three_ds, binary)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: option --model:") and "classes 0, 1, 2" in lines[0] and "binary" in lines[0]
    volume = save_model(tmp_path / "volume", build_model(ModelConfig(base_channels=4, depth=2)),
                        {"task": TaskSignature(1, 1, 3).to_dict()})
    result = predict(grey_ds, volume)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "trained on 3-D data" in lines[0], result.output
    assert not (tmp_path / "out").exists()  # refused before any work


# --- the same model on an idle and a loaded machine ---------------------------------------------------------


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "weights.pt", weights_only=True)


def test_the_same_training_gives_the_same_model_on_an_idle_and_a_loaded_machine(
    three_ds: Path, tracking_uri: str, tmp_path: Path
) -> None:
    def run(out: Path) -> training.TrainResult:
        cfg, plan = planned_config(three_ds, {"epochs": 2, "steps_per_epoch": 3, "patch_size": 64,
                                              "model.base_channels": 4, "model.depth": 3, "val_tile": 64},
                                   output=str(out), tracking_uri=tracking_uri, experiment="determinism",
                                   registered_model="determinism")
        return training.train(cfg, plan=plan)

    idle = run(tmp_path / "idle")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # one core busy with other work
    try:
        loaded = run(tmp_path / "loaded")
    finally:
        hog.kill()
        hog.wait()
    assert loaded.best_val_dice == idle.best_val_dice and loaded.best_epoch == idle.best_epoch
    assert loaded.stop_reason == idle.stop_reason == "completed" and loaded.epochs_run == idle.epochs_run == 2
    a, b = _weights(tmp_path / "idle" / "best"), _weights(tmp_path / "loaded" / "best")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_time_budget_stays_an_upper_bound_a_user_sets(grey_ds: Path) -> None:
    cfg, plan = planned_config(grey_ds, {"time_budget_s": 60.0})
    assert cfg.time_budget_s == 60.0 and plan.overridden == ["time_budget_s"]
    assert planned_config(grey_ds)[0].time_budget_s == 0.0


def test_the_demo_runs_a_fixed_number_of_steps_not_a_wall_clock_budget(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    seen = {}
    monkeypatch.setattr("unetcore.data.synthetic.write_sample", lambda *a, **k: None)
    monkeypatch.setattr("app.cli._run_pipeline", lambda cfg: seen.setdefault("cfg", cfg) and 0)
    assert runner.invoke(app, ["demo", "--workdir", str(tmp_path)]).exit_code == 0
    train = seen["cfg"].train
    assert train.time_budget_s == 0.0 and train.epochs * train.steps_per_epoch == 12 * 40


def test_the_train_flow_reports_the_plan_as_a_table(grey_ds: Path) -> None:
    from flows.train import plan_markdown

    plan = plan_dataset(grey_ds).with_overrides({"epochs": 1})
    text = plan_markdown(plan)
    assert "| `patch_size` | 128 |" in text and "Overridden by options: `epochs`" in text
    assert text.count("\n| `") == len(plan.choices)


def test_train_config_keeps_the_library_defaults_when_no_plan_is_used() -> None:
    cfg = TrainConfig(dataset="d")
    assert (cfg.patch_size, cfg.epochs, cfg.time_budget_s) == (256, 10, 0.0)


def test_the_pipeline_trains_the_plan_with_exactly_its_given_options_on_top(grey_ds: Path, tmp_path: Path) -> None:
    from unetcore.config import PipelineConfig, TrainOptions
    from unetcore.planning import pipeline_training

    (tmp_path / "dataset").symlink_to(grey_ds)  # the pipeline's ingested dataset
    recipe = ("patch_size", "batch_size", "epochs", "steps_per_epoch", "sampling", "val_tile", "model", "time_budget_s")

    def pipeline(**train) -> tuple[TrainConfig, Plan]:
        return pipeline_training(PipelineConfig(images="i", masks="m", workdir=str(tmp_path),
                                                train=TrainOptions(**train)))

    cfg, plan = pipeline()
    train_cfg, _ = planned_config(grey_ds)  # what `unet train DATASET` trains
    assert plan.overridden == [] and cfg.patch_size == 128 != TrainConfig(dataset="d").patch_size
    assert {k: getattr(cfg, k) for k in recipe} == {k: getattr(train_cfg, k) for k in recipe}
    cfg, plan = pipeline(epochs=2, model=ModelConfig(depth=3))
    assert sorted(plan.overridden) == ["epochs", "model.depth"]
    assert (cfg.epochs, cfg.model.depth, cfg.patch_size) == (2, 3, 128)
    assert cfg.model.base_channels == train_cfg.model.base_channels  # the model's other fields: the plan's
    assert cfg.output == str(tmp_path / "train") and cfg.dataset == str(tmp_path / "dataset")


def test_class_names_given_at_ingestion_travel_with_the_model_and_its_predictions(tracking_uri: str,
                                                                                   tmp_path: Path) -> None:
    _write(tmp_path, 3, (64, 64), semantic="boundary")
    names = "background,nucleus,boundary"
    ingested = runner.invoke(app, ["ingest", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "-o",
                                   str(tmp_path / "ds"), "--class-names", names, "--no-prefect"])
    assert ingested.exit_code == 0, ingested.output  # three names imply --num-classes 3
    assert mf.require(tmp_path / "ds")["class_names"] == names.split(",")
    plan = plan_dataset(tmp_path / "ds")
    assert plan["class_names"] == names.split(",") and plan["model.num_classes"] == 3
    shown = runner.invoke(app, ["plan", str(tmp_path / "ds")]).output
    assert "class_names" in shown and "background, nucleus, boundary" in shown.replace('", "', ", ")
    result = _train_cli(tmp_path / "ds", tracking_uri, tmp_path / "out", "--registered-model", "named")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "best" / "config.json").read_text())
    assert config["task"]["class_names"] == names.split(",")
    client = MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias("named", tracking.CHAMPION)
    assert version.tags["class_names"] == names
    assert json.loads(client.get_run(version.run_id).data.params["plan.class_names"]) == names.split(",")
    predicted = runner.invoke(app, ["predict", str(tmp_path / "ds"), "-o", str(tmp_path / "pred"), "--model",
                                    str(tmp_path / "out" / "best"), "--no-prefect", "--workers", "1"])
    assert predicted.exit_code == 0, predicted.output
    store = next((tmp_path / "pred").glob("*.ome.zarr"))
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]["unet"]
    assert attrs["class_names"] == names.split(",") and attrs["resampling"] is None


def test_class_names_must_name_every_class_once() -> None:
    with pytest.raises(ValueError, match="3 class names for num_classes 4"):
        IngestConfig(images="i", output="o", num_classes=4, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="distinct"):
        IngestConfig(images="i", output="o", class_names=["a", "a"])
    assert IngestConfig(images="i", output="o", class_names=["background", "cell"]).num_classes == 1


def test_a_model_records_the_plans_target_spacing_and_its_unit(ct_ds: Path) -> None:
    fp = fingerprint(ct_ds)
    task = planning.training_task(ModelConfig(spatial_dims=3), fp)
    plan = plan_dataset(ct_ds)
    # the thick-slice volumes (5, 5, 4 mm) are trained and predicted at nnU-Net's target, not their median 5 mm
    assert task.spacing == pytest.approx(plan["target_spacing"]) and task.spacing[0] < 5.0
    assert task.unit == "millimeter"
    assert "resampled to it in training and in inference" in plan.choice("target_spacing").why
    assert TaskSignature.from_dict(task.to_dict()) == task and task.tags()["spacing_unit"] == "millimeter"


def test_a_train_run_from_the_ui_or_the_api_is_planned_with_its_given_fields_on_top(grey_ds: Path,
                                                                                   tmp_path: Path) -> None:
    from unetcore.planning import planned_training

    out = str(tmp_path / "run")
    # what Prefect validates from a run's parameters (the UI leaves out the values equal to a default)
    bare = TrainConfig.model_validate({"dataset": str(grey_ds), "output": out})
    cfg, plan = planned_training(bare)
    cli_cfg, _ = planned_config(grey_ds, {"output": out})  # what `unet train DATASET --output …` trains
    assert plan.overridden == [] and cfg == cli_cfg
    assert cfg.patch_size == 128 != TrainConfig(dataset="d").patch_size  # the plan's, not the library default
    given = TrainConfig.model_validate({"dataset": str(grey_ds), "output": out, "epochs": 2, "model": {"depth": 3}})
    cfg, plan = planned_training(given)
    assert sorted(plan.overridden) == ["epochs", "model.depth"]
    assert (cfg.epochs, cfg.model.depth, cfg.patch_size, cfg.output) == (2, 3, 128, out)
