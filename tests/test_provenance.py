"""Provenance in every output, and the GeoJSON export end to end through ``predict``.

Each export is read back with another library than the one that wrote it where one exists (PIL for PNG text
chunks, tifffile for TIFF tags, nibabel for the NIfTI extension, rasterio to rasterise the GeoJSON back), and
compared with the record the prediction store keeps, which names the model, the code, the input's hash from the
manifest and the options.
"""

from __future__ import annotations

import csv
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import rasterio.features
import tifffile
import torch
import zarr
from affine import Affine
from PIL import Image
from typer.testing import CliRunner
from volume_data import save_nifti

from app.cli import app
from unetcore.cluster import Cluster, dask_cluster
from unetcore.config import InferConfig, IngestConfig, ModelConfig, NormalizationConfig, validated
from unetcore.errors import ConfigError
from unetcore.inference import check_predictable, git_commit, predict_dataset, stored_provenance
from unetcore.ingest import ingest_folder
from unetcore.io import write_nifti, write_tiff_stack
from unetcore.model import build_model, save_model
from unetcore.store import manifest as mf

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def image_dataset(root: Path, shape: tuple[int, int] = (150, 170)) -> Path:
    rng = np.random.default_rng(0)
    field = rng.random(shape)
    for axis in (0, 1):
        field = (field + np.roll(field, 1, axis) + np.roll(field, 2, axis)) / 3
    (root / "images").mkdir(parents=True)
    tifffile.imwrite(root / "images" / "img.tif", (field * 255).astype(np.uint8))
    dataset = root / "ds"
    assert not ingest_folder(IngestConfig(images=str(root / "images"), output=str(dataset), chunk_size=64,
                                          val_fraction=0.0)).failed
    return dataset


def make_model(path: Path, spatial_dims: int = 2, classes: int = 1) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(base_channels=4, depth=2, num_classes=classes, spatial_dims=spatial_dims))
    return save_model(path, model.eval(), {"normalization": NormalizationConfig().model_dump()})


def config(dataset: Path, out: Path, model: Path, **kw: Any) -> InferConfig:
    base = dict(dataset=str(dataset), output=str(out), model=str(model), tile=64, block_size=64,
                threads_per_worker=1, threshold=0.5)
    return InferConfig(**{**base, **kw})


def stored(out: Path, image_id: str) -> dict[str, Any]:
    return stored_provenance(zarr.open_group(store=str(out / f"{image_id}.ome.zarr"), mode="r"))


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    with dask_cluster(None, 2, 1) as c:
        yield c


def test_the_store_names_model_code_input_hash_and_options(tmp_path: Path, cluster: Cluster) -> None:
    dataset = image_dataset(tmp_path)
    model = make_model(tmp_path / "model")
    predict_dataset(config(dataset, tmp_path / "out", model, export="none", tta=True, overlap=0.25), cluster=cluster)
    record = stored(tmp_path / "out", "img")
    [entry] = mf.entries(mf.require(dataset))
    assert record["input"] == {"id": "img", "source_hash": entry["source_hash"]}
    assert record["model"]["uri"] == str(model) and len(record["model"]["weights_hash"]) == 32
    assert record["model"]["run_id"] is None  # a local folder has no MLflow run
    options = record["options"]
    assert (options["tile"], options["overlap"], options["tta"], options["threshold"]) == (64, 0.25, True, 0.5)
    assert (options["device"], options["device_used"], options["compute_dtype"]) == ("auto", "cpu", "float32")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert record["code"]["git_commit"] == head.strip()
    assert record["code"]["version"] == metadata.version("unet-pipeline")


def test_git_commit_is_none_outside_a_checkout_and_never_fails(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == (None, None)
    assert git_commit(REPO / "unetcore") == (None, None)  # inside a repository, but not the code's own top folder
    commit, dirty = git_commit(REPO)
    assert commit is not None and len(commit) == 40 and isinstance(dirty, bool)


def test_png_tiff_and_geojson_exports_carry_the_stores_provenance(tmp_path: Path, cluster: Cluster) -> None:
    dataset = image_dataset(tmp_path)
    model = make_model(tmp_path / "model")
    [png] = predict_dataset(config(dataset, tmp_path / "png", model, export="png"), cluster=cluster)
    [tif] = predict_dataset(config(dataset, tmp_path / "tif", model, export="tiff"), cluster=cluster)
    record = stored(tmp_path / "png", "img")
    for path in (png.export, png.preview):
        with Image.open(path) as im:
            assert json.loads(im.text["Description"]) == record and im.text["Software"].startswith("unet-pipeline")
    with tifffile.TiffFile(tif.export) as f:
        assert f.shaped_metadata[0]["unet"]["provenance"] == stored(tmp_path / "tif", "img")
        assert json.loads(f.pages[0].description)["unet"]["provenance"] == stored(tmp_path / "tif", "img")
        assert f.pages[0].tags["Software"].value.startswith("unet-pipeline 0.")
    assert png.provenance == record


def test_geojson_export_through_predict_covers_the_instances_exactly(tmp_path: Path, cluster: Cluster) -> None:
    dataset = image_dataset(tmp_path)
    model = make_model(tmp_path / "model")
    predict_dataset(config(dataset, tmp_path / "probe", model, export="none"), cluster=cluster)
    probs = zarr.open_group(store=str(tmp_path / "probe" / "img.ome.zarr"), mode="r")["0"][:]
    threshold = float(np.median(probs))  # random weights: the median makes blobs of foreground
    cfg = config(dataset, tmp_path / "out", model, export="geojson", instances=True, threshold=threshold)
    [result] = predict_dataset(cfg, cluster=cluster)
    out = zarr.open_group(store=str(tmp_path / "out" / "img.ome.zarr"), mode="r")
    instances, classes = out["labels/instances/0"][:], out["labels/prediction/0"][:]
    assert result.export == str(tmp_path / "out" / "img_mask.geojson") and instances.max() > 1
    fc = json.loads(Path(result.export).read_text())
    assert fc["properties"]["provenance"] == stored(tmp_path / "out", "img")
    assert len(fc["features"]) == result.instances == int(instances.max())
    for key, truth in (("id", instances), ("class", classes)):
        shapes = [(f["geometry"], f["properties"][key]) for f in fc["features"]]
        back = rasterio.features.rasterize(shapes, out_shape=truth.shape, dtype=np.uint32, transform=Affine.identity())
        np.testing.assert_array_equal(back, truth)
    rows = list(csv.DictReader(open(result.objects)))
    assert sorted(int(r["id"]) for r in rows) == list(range(1, int(instances.max()) + 1))
    assert {r["area_unit"] for r in rows} == {"pixel^2"}  # the ingested TIFF gave no pixel size


def test_geojson_needs_instances_and_a_2d_image(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="export.*add --instances"):
        validated(InferConfig, dataset="d", output="o", model="m", export="geojson")
    images = tmp_path / "images"
    images.mkdir()
    save_nifti(images / "ct.nii.gz", np.zeros((6, 20, 24), np.int16))
    dataset = tmp_path / "ds"
    assert not ingest_folder(IngestConfig(images=str(images), output=str(dataset), val_fraction=0.0)).failed
    model = make_model(tmp_path / "model")
    with pytest.raises(ConfigError, match="geojson is 2-D only; image 'ct' is a volume"):
        check_predictable(config(dataset, tmp_path / "out", model, export="geojson", instances=True))
    assert not (tmp_path / "out").exists()


def test_cli_geojson_without_instances_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["predict", str(tmp_path), "-o", str(tmp_path / "out"), "--no-prefect",
                                 "--model", str(tmp_path), "--export", "geojson"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--export" in lines[0] and "add --instances" in lines[0]


def test_predict_prints_the_provenance_block(tmp_path: Path) -> None:
    dataset = image_dataset(tmp_path, (80, 90))
    model = make_model(tmp_path / "model")
    result = runner.invoke(app, ["predict", str(dataset), "-o", str(tmp_path / "out"), "--no-prefect", "--model",
                                 str(model), "--tile", "64", "--workers", "1", "--instances", "--export", "geojson"])
    assert result.exit_code == 0, result.output
    [entry] = mf.entries(mf.require(dataset))
    assert "provenance" in result.output and f"model: {model}" in result.output
    assert "code: unet-pipeline" in result.output and "tile 64" in result.output
    assert f"input hash: {entry['source_hash']}" in result.output
    assert "objects: " in result.output and (tmp_path / "out" / "img_objects.csv").exists()


def test_volume_writers_keep_the_description(tmp_path: Path) -> None:
    labels = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6) % 3
    text = json.dumps({"model": {"uri": "models:/unet/3"}, "input": {"source_hash": "abc"}})
    nifti = write_nifti(labels, np.eye(4), tmp_path / "m.nii.gz", description=text, descrip="unet-pipeline 0.1.0 x")
    img = nib.load(nifti)
    [ext] = img.header.extensions
    assert ext.get_code() == 6 and json.loads(ext.get_content()) == json.loads(text)  # 6: NIfTI comment
    assert img.header["descrip"].tobytes().rstrip(b"\0") == b"unet-pipeline 0.1.0 x"
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.swapaxes(labels, 0, 2))  # data after the extension
    stack = write_tiff_stack(labels, tmp_path / "m.tif", (2.0, 0.5, 0.5), "micrometer", description=text,
                             software="unet-pipeline 0.1.0")
    with tifffile.TiffFile(stack) as f:
        assert json.loads(f.imagej_metadata["Info"]) == json.loads(text)
        assert f.pages[0].tags["Software"].value == "unet-pipeline 0.1.0"
        np.testing.assert_array_equal(f.asarray(), labels)
