"""Nightly inference of new images only (library level, no Prefect): idempotence, new and changed images,
champion moves, failures that stay local, globs, and the one-line errors a user can cause.

A tiny untrained UNet (base 4, depth 2) is registered in a temporary sqlite MLflow store; predictions run on one
in-process Dask worker shared by the module, so each night takes well under a second per 128² image.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from unetcore import nightly
from unetcore.config import InferOptions, IngestOptions, ModelConfig, NightlyConfig
from unetcore.data.synthetic import write_sample
from unetcore.errors import InputError
from unetcore.locks import exclusive
from unetcore.model import build_model, save_model
from unetcore.tracking import mlflow as tracking


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 128² images (sample_000..003) with masks."""
    root = tmp_path_factory.mktemp("nightly-sample")
    write_sample(root, n_images=4, size=128, large_size=0, seed=11)
    return root


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    """A sqlite MLflow store and a function registering a tiny model version with a given validation Dice."""
    root = tmp_path_factory.mktemp("nightly-mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment = tracking.configure(uri, "nightly-tests")

    def register(name: str, val_dice: float, seed: int, spatial_dims: int = 2) -> int:
        torch.manual_seed(seed)
        model = build_model(ModelConfig(base_channels=4, depth=2, spatial_dims=spatial_dims))
        folder = save_model(root / f"{name}-{seed}", model)
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_artifacts(str(folder), tracking.MODEL_ARTIFACT)
            artifact_uri = mlflow.get_artifact_uri(tracking.MODEL_ARTIFACT)
        return tracking.register(name, run.info.run_id, artifact_uri, val_dice, "nightly-test-set")["version"]

    return uri, register


@pytest.fixture(scope="module")
def scheduler() -> str:
    """One in-process Dask worker for every night of the module (no cluster start-up per night)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def make_config(tmp_path: Path, uri: str, scheduler: str, name: str, **overrides) -> NightlyConfig:
    values = dict(images=str(tmp_path / "inbox"), dataset=str(tmp_path / "dataset"), output=str(tmp_path / "pred"),
                  model_name=name, tracking_uri=uri, ingest=IngestOptions(chunk_size=128, val_fraction=0.0),
                  predict=InferOptions(tile=64, overlap=0.25, block_size=128, export="none",
                                       scheduler_address=scheduler))
    return NightlyConfig(**{**values, **overrides})


def inbox_with(tmp_path: Path, sample: Path, *stems: str) -> Path:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    for stem in stems:
        shutil.copy2(sample / "images" / f"{stem}.png", inbox / f"{stem}.png")
    return inbox


def predicted(report: dict) -> list[str]:
    return sorted(r["id"] for r in report["images"] if r["status"] == "predicted")


def test_second_night_does_nothing_and_a_new_image_is_the_only_work(tmp_path, sample, registry, scheduler) -> None:
    uri, register = registry
    version = register("idem", 0.5, seed=0)
    inbox = inbox_with(tmp_path, sample, "sample_000", "sample_001")
    cfg = make_config(tmp_path, uri, scheduler, "idem")

    first = nightly.run_nightly(cfg)
    assert first["status"] == "ok" and predicted(first) == ["sample_000", "sample_001"], first["images"]
    assert first["model"]["version"] == version and first["model"]["uri"] == f"models:/idem/{version}"
    state = nightly.load_state(Path(cfg.output))["images"]
    assert {k: v["model_version"] for k, v in state.items()} == {"sample_000": version, "sample_001": version}
    state_file = Path(cfg.output) / nightly.STATE
    stamp = state_file.stat().st_mtime_ns

    second = nightly.run_nightly(cfg)
    assert second["status"] == "nothing-new" and second["images"] == []
    assert second["ingest"]["ingested"] == [] and sorted(second["ingest"]["unchanged"]) == ["sample_000", "sample_001"]
    assert sorted(second["skipped"]) == ["sample_000", "sample_001"]
    assert state_file.stat().st_mtime_ns == stamp  # not even rewritten

    shutil.copy2(sample / "images" / "sample_002.png", inbox / "sample_002.png")
    third = nightly.run_nightly(cfg)
    assert third["ingest"]["ingested"] == ["sample_002"] and predicted(third) == ["sample_002"]
    assert (Path(cfg.output) / "sample_002.ome.zarr").is_dir()


def test_changed_content_is_reingested_and_repredicted(tmp_path, sample, registry, scheduler) -> None:
    uri, register = registry
    register("changed", 0.5, seed=0)
    inbox = inbox_with(tmp_path, sample, "sample_000", "sample_001")
    cfg = make_config(tmp_path, uri, scheduler, "changed")
    nightly.run_nightly(cfg)
    old_hash = nightly.load_state(Path(cfg.output))["images"]["sample_000"]["source_hash"]

    shutil.copy(sample / "images" / "sample_003.png", inbox / "sample_000.png")  # same name, other pixels
    report = nightly.run_nightly(cfg)
    assert report["ingest"]["ingested"] == ["sample_000"] and predicted(report) == ["sample_000"]
    assert nightly.load_state(Path(cfg.output))["images"]["sample_000"]["source_hash"] != old_hash


def test_new_champion_repredicts_unless_told_not_to(tmp_path, sample, registry, scheduler) -> None:
    uri, register = registry
    v1 = register("moves", 0.5, seed=0)
    inbox_with(tmp_path, sample, "sample_000", "sample_001")
    cfg = make_config(tmp_path, uri, scheduler, "moves")
    nightly.run_nightly(cfg)
    v2 = register("moves", 0.9, seed=1)  # better validation Dice: the gate moves the champion
    assert v2 == v1 + 1

    keep = nightly.run_nightly(cfg.model_copy(update={"repredict_on_new_champion": False}))
    assert keep["model"]["version"] == v2 and keep["images"] == [] and len(keep["skipped"]) == 2

    redo = nightly.run_nightly(cfg)
    assert predicted(redo) == ["sample_000", "sample_001"]
    assert {r["model_version"] for r in nightly.load_state(Path(cfg.output))["images"].values()} == {v2}
    assert nightly.run_nightly(cfg)["images"] == []


def test_bad_files_fail_alone_and_are_retried_next_night(tmp_path, sample, registry, scheduler) -> None:
    uri, register = registry
    register("robust", 0.5, seed=0)
    inbox = inbox_with(tmp_path, sample, "sample_000")
    (inbox / "broken.png").write_bytes(b"not a png at all")
    rgb = np.stack([np.asarray(Image.open(sample / "images" / "sample_001.png"))] * 3, axis=-1)
    Image.fromarray(rgb).save(inbox / "colour.png")  # ingests fine, but the model takes 1 channel, not 3
    cfg = make_config(tmp_path, uri, scheduler, "robust", masks=str(sample / "masks"))

    report = nightly.run_nightly(cfg)
    assert report["status"] == "partial"
    assert predicted(report) == ["sample_000"]
    [good] = [r for r in report["images"] if r["id"] == "sample_000"]
    assert good["dice"] is not None and 0.0 <= good["dice"] <= 1.0  # ground truth found in masks/
    [ingest_failure] = report["ingest"]["failed"]
    assert ingest_failure["id"] == "broken" and "broken.png" in ingest_failure["error"]
    [predict_failure] = [r for r in report["images"] if r["status"] == "failed"]
    assert predict_failure["id"] == "colour" and "channels" in predict_failure["error"]
    assert set(nightly.load_state(Path(cfg.output))["images"]) == {"sample_000"}

    again = nightly.run_nightly(cfg)
    assert [f["id"] for f in again["ingest"]["failed"]] == ["broken"]
    assert [r["id"] for r in again["images"]] == ["colour"] and again["skipped"] == ["sample_000"]


def test_glob_inbox_refuses_two_files_with_one_id(tmp_path, sample, registry, scheduler) -> None:
    uri, register = registry
    register("globbed", 0.5, seed=0)
    for sub, stem in (("a", "sample_000"), ("b", "sample_000"), ("b", "sample_001")):
        (tmp_path / "drop" / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy2(sample / "images" / f"{stem}.png", tmp_path / "drop" / sub / f"{stem}.png")
    (tmp_path / "drop" / "b" / "notes.txt").write_text("not an image")
    cfg = make_config(tmp_path, uri, scheduler, "globbed", images=str(tmp_path / "drop" / "**" / "*.*"))

    report = nightly.run_nightly(cfg)
    assert predicted(report) == ["sample_000", "sample_001"]
    [dup] = report["ingest"]["failed"]
    assert dup["file"].endswith("b/sample_000.png") and "same image id 'sample_000'" in dup["error"]


def test_empty_inbox_is_a_quiet_night_and_a_missing_one_an_error(tmp_path, registry, scheduler) -> None:
    uri, register = registry
    register("quiet", 0.5, seed=0)
    (tmp_path / "inbox").mkdir()
    cfg = make_config(tmp_path, uri, scheduler, "quiet")
    assert nightly.run_nightly(cfg)["status"] == "nothing-new"

    with pytest.raises(InputError, match=r"nowhere: inbox folder does not exist"):
        nightly.ingest_new(cfg.model_copy(update={"images": str(tmp_path / "nowhere")}))


def test_unknown_alias_is_one_line_naming_the_uri(tmp_path, registry) -> None:
    uri, register = registry
    register("aliased", 0.5, seed=0)
    with pytest.raises(InputError, match=r"^models:/aliased@nope: model URI does not resolve") as err:
        nightly.resolve_model("aliased", "nope", uri, tmp_path / ".models")
    assert "\n" not in str(err.value)


def test_corrupt_state_file_is_named(tmp_path) -> None:
    (tmp_path / nightly.STATE).write_text("{not json")
    with pytest.raises(InputError, match="nightly_state.json: unreadable nightly state"):
        nightly.load_state(tmp_path)


def test_changed_ingestion_options_reingest_the_inbox(tmp_path, sample, registry, scheduler) -> None:
    """Nightly uses ingestion's own change test: a new chunk size re-ingests every image, like `unet ingest`."""
    uri, register = registry
    register("rechunk", 0.5, seed=0)
    inbox_with(tmp_path, sample, "sample_000", "sample_001")
    cfg = make_config(tmp_path, uri, scheduler, "rechunk")
    nightly.run_nightly(cfg)
    assert nightly.run_nightly(cfg)["ingest"]["ingested"] == []

    rechunked = cfg.model_copy(update={"ingest": IngestOptions(chunk_size=64, val_fraction=0.0)})
    report = nightly.run_nightly(rechunked)
    assert sorted(report["ingest"]["ingested"]) == ["sample_000", "sample_001"]
    from unetcore.store import manifest as mf

    assert {e["chunk"] for e in mf.entries(mf.load(Path(cfg.dataset)))} == {64}


def test_nightly_takes_the_output_lock_of_unet_predict(tmp_path, sample, registry, scheduler) -> None:
    """While another run holds the predictions folder, the night writes nothing there and says why."""
    uri, register = registry
    register("locked", 0.5, seed=0)
    inbox_with(tmp_path, sample, "sample_000")
    cfg = make_config(tmp_path, uri, scheduler, "locked")
    with exclusive(Path(cfg.output), "predict"):  # what `unet predict` holds while it writes there
        report = nightly.run_nightly(cfg)
    assert report["status"] == "failed"
    assert [r["status"] for r in report["images"]] == ["failed"]
    assert "another run is writing here" in report["images"][0]["error"]
    assert not (Path(cfg.output) / "sample_000.ome.zarr").exists()
    assert nightly.load_state(Path(cfg.output))["images"] == {}

    again = nightly.run_nightly(cfg)  # the lock is gone: the image is tried again and predicted
    assert predicted(again) == ["sample_000"]


def test_an_inbox_of_nifti_volumes_is_ingested_predicted_and_exported_with_its_affine(tmp_path, registry,
                                                                                       scheduler) -> None:
    import nibabel as nib
    from volume_data import ramp, save_nifti

    uri, register = registry
    version = register("volumes", 0.5, seed=0, spatial_dims=3)
    (tmp_path / "inbox").mkdir()
    for i, shape in enumerate([(6, 20, 22), (9, 17, 25)]):
        save_nifti(tmp_path / "inbox" / f"case{i}.nii.gz", ramp(shape, seed=i))
    predict = InferOptions(tile=16, block_size=64, export="nifti", scheduler_address=scheduler)
    cfg = make_config(tmp_path, uri, scheduler, "volumes", predict=predict)

    first = nightly.run_nightly(cfg)
    assert first["status"] == "ok" and predicted(first) == ["case0", "case1"], first["images"]
    for row in first["images"]:
        source = nib.load(tmp_path / "inbox" / f"{row['id']}.nii.gz")
        mask = nib.load(row["export"])
        assert row["export"].endswith(f"{row['id']}_mask.nii.gz") and row["model_version"] == version
        assert mask.shape == source.shape and np.array_equal(mask.affine, source.affine)
        assert row["pixels"] == int(np.prod(source.shape))
    second = nightly.run_nightly(cfg)
    assert second["status"] == "nothing-new" and sorted(second["skipped"]) == ["case0", "case1"]


def test_unset_predict_options_stay_unset_so_a_3d_model_keeps_its_tile() -> None:
    """The night's InferConfig leaves `tile` unset unless given, so `with_model_tile` can apply a 3-D model's own."""
    assert "tile" not in NightlyConfig().infer_config("models:/m/1", []).model_fields_set
    given = NightlyConfig(predict=InferOptions(tile=64)).infer_config("models:/m/1", [])
    assert "tile" in given.model_fields_set and given.tile == 64
