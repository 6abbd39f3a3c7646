"""Physical placement from input to mask: a 2-D image's pixel size and unit, a GeoTIFF's georeferencing.

Oracles are files written by other libraries (tifffile's OME-TIFF writer, rasterio's GeoTIFF writer) and read back
by them: the pixel size of an OME-TIFF goes into the store's level-0 scale and axis units, the prediction store and
the exported TIFF bit for bit; a GeoTIFF's tags come out unchanged in the mask's GeoTIFF, which rasterio places with
the same transform and CRS; nodata pixels are background whatever the model says. Bad inputs are one line each.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import tifffile
import torch
import zarr
from PIL import Image
from rasterio.transform import Affine, from_origin
from typer.testing import CliRunner

from app.cli import app
from unetcore.cluster import Cluster, dask_cluster
from unetcore.config import InferConfig, IngestConfig, ModelConfig, NormalizationConfig
from unetcore.errors import ConfigError, InputError
from unetcore.inference import check_predictable, predict_dataset
from unetcore.ingest import ingest_folder, ingest_image, read_report
from unetcore.io import GEO_TAGS, read_georef, write_geotiff
from unetcore.model import build_model, save_model
from unetcore.store import manifest as mf
from unetcore.store import omezarr

SIZE = 0.325  # µm, as a 20x objective gives
runner = CliRunner()


# --- helpers ---------------------------------------------------------------------------------------------


def smooth(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).random(shape)
    for axis in (0, 1):
        v = (v + np.roll(v, 1, axis) + np.roll(v, 2, axis)) / 3
    return (v * 255).astype(np.uint8)


def write_ome(path: Path, image: np.ndarray, size_x: float = SIZE, size_y: float = SIZE, unit: str = "µm") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, image, ome=True, metadata={"axes": "YX", "PhysicalSizeX": size_x, "PhysicalSizeXUnit": unit,
                                                      "PhysicalSizeY": size_y, "PhysicalSizeYUnit": unit})
    return path


def ingest(images: Path, dataset: Path, **kw: Any):
    return ingest_folder(IngestConfig(images=str(images), output=str(dataset), val_fraction=0.0, **kw))


def make_model(path: Path, in_channels: int = 1, head_bias: float | None = None) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(in_channels=in_channels, num_classes=1, base_channels=4, depth=2)).eval()
    if head_bias is not None:  # every pixel foreground (or background), whatever the input
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.fill_(head_bias)
    return save_model(path, model, {"normalization": NormalizationConfig().model_dump()})


def predict(dataset: Path, out: Path, model: Path, cluster: Cluster, **kw: Any):
    cfg = InferConfig(**{"dataset": str(dataset), "output": str(out), "model": str(model), "tile": 32,
                         "block_size": 64, "threads_per_worker": 1, "export": "none", **kw})
    return predict_dataset(cfg, cluster=cluster)


def multiscale(group: zarr.Group) -> dict[str, Any]:
    return group.attrs["ome"]["multiscales"][0]


def scales(group: zarr.Group) -> list[list[float]]:
    return [d["coordinateTransformations"][0]["scale"] for d in multiscale(group)["datasets"]]


def units(group: zarr.Group) -> list[str | None]:
    return [a.get("unit") for a in multiscale(group)["axes"] if a["type"] == "space"]


def write_geotiff_rasterio(path: Path, image: np.ndarray, transform: Affine, crs: str | None = "EPSG:32633",
                           nodata: float | None = None) -> Path:
    """A GeoTIFF as GDAL writes it: (C, H, W) bands, tiled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bands = image if image.ndim == 3 else image[None]
    with rasterio.open(path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1], count=bands.shape[0],
                       dtype=bands.dtype, crs=crs, transform=transform, nodata=nodata, tiled=True, blockxsize=32,
                       blockysize=32) as dst:
        dst.write(bands)
    return path


def tiff_tags(path: Path) -> dict[str, Any]:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        return {str(c): page.tags[c].value for c in GEO_TAGS if c in page.tags}


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    with dask_cluster(None, 1, 1) as c:
        yield c


# --- pixel size: OME-TIFF -> OME-Zarr -> prediction -> exported TIFF ----------------------------------------


def test_an_ome_tiffs_pixel_size_goes_through_store_prediction_and_tiff_export_bit_for_bit(
        tmp_path: Path, cluster: Cluster) -> None:
    size_y = 0.1 + 0.2  # 0.30000000000000004: no decimal string short of repr survives this
    write_ome(tmp_path / "images" / "cells.ome.tif", smooth((300, 2100)), size_x=SIZE, size_y=size_y)
    dataset = tmp_path / "ds"
    assert not ingest(tmp_path / "images", dataset, chunk_size=256).failed
    [entry] = mf.entries(mf.require(dataset))
    assert entry["spacing"] == [size_y, SIZE] and entry["unit"] == "micrometer"
    root = omezarr.open_root(mf.store_path(dataset, "cells"))
    assert len(scales(root)) >= 3
    for level, scale in enumerate(scales(root)):  # each level's scale follows level 0's
        assert scale == [1.0, size_y * 2**level, SIZE * 2**level]
    assert units(root) == ["micrometer", "micrometer"]

    [result] = predict(dataset, tmp_path / "out", make_model(tmp_path / "m"), cluster, export="tiff",
                       save_probabilities=True, tile=128, block_size=256)
    out = zarr.open_group(store=result.output, mode="r")
    assert scales(out)[0] == [1.0, size_y, SIZE] and units(out) == ["micrometer", "micrometer"]
    labels = out["labels/prediction"]
    assert scales(labels) == [s[1:] for s in scales(out)] and units(labels) == ["micrometer", "micrometer"]

    with tifffile.TiffFile(result.export) as tif:  # the other library reads the export back
        assert tif.is_ome
        pixels = next(e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels"))
        assert float(pixels.attrib["PhysicalSizeX"]) == SIZE and float(pixels.attrib["PhysicalSizeY"]) == size_y
        assert pixels.attrib["PhysicalSizeXUnit"] == pixels.attrib["PhysicalSizeYUnit"] == "µm"
        page = tif.pages[0]
        assert page.tags["ResolutionUnit"].value == 3  # centimetre: ImageJ and GIS read the rational
        x_res, y_res = page.get_resolution()
        assert x_res == pytest.approx(1e4 / SIZE, rel=1e-6) and y_res == pytest.approx(1e4 / size_y, rel=1e-6)
        assert np.array_equal(tif.asarray(), labels["0"][:])


def test_a_png_export_carries_the_pixel_size_as_phys(tmp_path: Path, cluster: Cluster) -> None:
    write_ome(tmp_path / "images" / "cells.ome.tif", smooth((40, 50)))
    ingest(tmp_path / "images", tmp_path / "ds")
    [result] = predict(tmp_path / "ds", tmp_path / "out", make_model(tmp_path / "m"), cluster, export="png")
    with Image.open(result.export) as png:
        x_dpi, y_dpi = png.info["dpi"]  # Pillow reads pHYs (pixels per metre) back as DPI
    assert 0.0254 / x_dpi * 1e6 == pytest.approx(SIZE, rel=1e-6)


def test_an_image_without_a_pixel_size_stays_in_pixels_everywhere(tmp_path: Path, cluster: Cluster) -> None:
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "plain.tif", smooth((40, 50)))
    ingest(tmp_path / "images", tmp_path / "ds")
    root = omezarr.open_root(mf.store_path(tmp_path / "ds", "plain"))
    assert scales(root) == [[1.0, 1.0, 1.0]] and units(root) == [None, None]
    [result] = predict(tmp_path / "ds", tmp_path / "out", make_model(tmp_path / "m"), cluster, export="tiff")
    out = zarr.open_group(store=result.output, mode="r")
    assert scales(out)[0] == [1.0, 1.0, 1.0] and units(out) == [None, None]
    with tifffile.TiffFile(result.export) as tif:
        unit = tif.pages[0].tags.get("ResolutionUnit")
        assert not tif.is_ome and (unit is None or unit.value == 1)


def test_conflicting_pixel_sizes_of_image_and_mask_are_refused_naming_both(tmp_path: Path) -> None:
    image = write_ome(tmp_path / "images" / "cells.ome.tif", smooth((40, 50)))
    mask = write_ome(tmp_path / "masks" / "cells.ome.tif", (smooth((40, 50)) > 128).astype(np.uint8), 0.5, 0.5)
    with pytest.raises(InputError) as err:
        ingest_image(image, mask, tmp_path / "ds", IngestConfig(images=str(image), output=str(tmp_path / "ds")))
    line = str(err.value)
    assert "\n" not in line and str(mask) in line and "cells.ome.tif's" in line and "0.5" in line and "0.325" in line
    # the same size in another unit is the same size
    write_ome(mask, (smooth((40, 50)) > 128).astype(np.uint8), SIZE * 1000, SIZE * 1000, "nm")
    entry = ingest_image(image, mask, tmp_path / "ds", IngestConfig(images=str(image), output=str(tmp_path / "ds")))
    assert entry["has_mask"]


def test_a_photos_dpi_is_not_a_pixel_size_and_the_report_says_so(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "photo.tif", smooth((40, 50)), resolution=(300, 300),
                     resolutionunit="INCH")
    report = ingest(tmp_path / "images", tmp_path / "ds")
    [entry] = mf.entries(mf.require(tmp_path / "ds"))
    assert entry["spacing"] == [1.0, 1.0] and entry["unit"] is None
    assert units(omezarr.open_root(mf.store_path(tmp_path / "ds", "photo"))) == [None, None]
    [note] = entry["notes"]
    assert "photo.tif" in note and "300 dpi" in note and "\n" not in note
    assert note in report.warnings() and note in read_report(tmp_path / "ds")["warnings"]


# --- GeoTIFF: rasterio in, rasterio and tifffile out ----------------------------------------------------------


def test_a_rasterio_geotiffs_georeferencing_is_read_into_the_store(tmp_path: Path) -> None:
    transform = from_origin(500000.0, 4600000.0, 10.0, 10.0)
    bands = np.stack([smooth((70, 90), seed) for seed in range(3)])
    source = write_geotiff_rasterio(tmp_path / "images" / "scene.tif", bands, transform, nodata=0)
    georef, warning = read_georef(source)
    assert warning is None
    assert georef["transform"] == list(transform)[:6] and georef["epsg"] == 32633 and georef["nodata"] == 0.0
    with rasterio.open(source) as ds:
        assert georef["crs_wkt"] == ds.crs.to_wkt()
    tags = tiff_tags(source)
    assert set(georef["tags"]) == set(tags) >= {"33550", "33922", "34735"}
    ingest(tmp_path / "images", tmp_path / "ds")
    stored = omezarr.unet_attrs(omezarr.open_root(mf.store_path(tmp_path / "ds", "scene")))["georef"]
    assert stored == json.loads(json.dumps(georef))
    [entry] = mf.entries(mf.require(tmp_path / "ds"))
    assert entry["georef"] == stored and entry["notes"] == []


def test_a_rotated_geotiffs_model_transformation_is_kept(tmp_path: Path) -> None:
    transform = Affine(2.0, 0.5, 1000.0, 0.25, -2.0, 5000.0)  # rasterio writes tag 34264 for a rotation
    source = write_geotiff_rasterio(tmp_path / "r.tif", smooth((30, 40)), transform, crs="EPSG:4326")
    georef, _ = read_georef(source)
    assert "34264" in georef["tags"] and georef["transform"] == list(transform)[:6] and georef["epsg"] == 4326


def test_the_predicted_geotiff_overlays_the_source_with_its_tags_and_overviews(tmp_path: Path,
                                                                               cluster: Cluster) -> None:
    transform = from_origin(500000.0, 4600000.0, 10.0, 10.0)
    image = np.maximum(smooth((300, 270)), 1)
    rows, cols = np.indices(image.shape)
    image[rows + cols < 120] = 0  # a nodata corner, as at a scene's edge (across tiles: no tile is all nodata)
    image[5::17, 7::13] = 0  # and single nodata pixels: holes that hole filling must not fill
    source = write_geotiff_rasterio(tmp_path / "images" / "scene.tif", image, transform, nodata=0)
    ingest(tmp_path / "images", tmp_path / "ds")
    model = make_model(tmp_path / "m", head_bias=20.0)  # foreground everywhere, nodata too, if let
    [result] = predict(tmp_path / "ds", tmp_path / "out", model, cluster, export="geotiff", save_probabilities=True,
                       min_object_size=5, skip_empty=False)
    with rasterio.open(result.export) as mask, rasterio.open(source) as src:
        assert mask.transform == src.transform and mask.crs == src.crs
        assert (mask.width, mask.height) == (src.width, src.height) and mask.block_shapes == [(256, 256)]
        assert mask.overviews(1) == [2]  # down to one 256-pixel tile
        labels = mask.read(1)
    assert tiff_tags(result.export) == tiff_tags(source)  # GeoTIFF tags in == tags out, bit for bit
    assert np.array_equal(labels, (image != 0).astype(np.uint8))  # nodata is exactly background
    out = zarr.open_group(store=result.output, mode="r")
    assert np.array_equal(out["labels/prediction/0"][:], labels)
    assert float(np.asarray(out["0"][0])[image == 0].max()) == 0.0  # probabilities too
    assert float(np.asarray(out["0"][0])[image != 0].min()) > 0.99
    assert omezarr.unet_attrs(out)["georef"] == omezarr.unet_attrs(
        omezarr.open_root(mf.store_path(tmp_path / "ds", "scene")))["georef"]


def test_our_geotiff_writer_keeps_a_nan_nodata_out_and_tags_as_given(tmp_path: Path) -> None:
    transform = from_origin(10.0, 20.0, 0.5, 0.5)
    source = write_geotiff_rasterio(tmp_path / "f.tif", np.full((1, 20, 30), np.nan, np.float32), transform,
                                    nodata=float("nan"))
    georef, _ = read_georef(source)
    assert np.isnan(georef["nodata"])
    write_geotiff([np.ones((20, 30), np.uint8)], tmp_path / "m.tif", georef, tile=16)
    with rasterio.open(tmp_path / "m.tif") as mask, rasterio.open(source) as src:
        assert mask.transform == src.transform and mask.crs == src.crs and mask.nodata is None
        assert mask.overviews(1) == [2]


def test_a_geotiff_with_an_unparseable_crs_is_ingested_without_it_with_one_warning(tmp_path: Path) -> None:
    keys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 9999)  # EPSG:9999 does not exist
    (tmp_path / "images").mkdir()
    path = tmp_path / "images" / "odd.tif"
    tifffile.imwrite(path, smooth((20, 30)), extratags=[(33550, 12, 3, (10.0, 10.0, 0.0), True),
                                                        (33922, 12, 6, (0, 0, 0, 500.0, 900.0, 0), True),
                                                        (34735, 3, len(keys), keys, True)])
    result = runner.invoke(app, ["ingest", str(tmp_path / "images"), "-o", str(tmp_path / "ds"), "--no-prefect"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "odd.tif" in line]
    assert len(lines) == 1 and "CRS cannot be parsed" in lines[0] and "EPSG:9999" in lines[0]
    assert lines[0].removeprefix("warning: ") in read_report(tmp_path / "ds")["warnings"]
    georef = omezarr.unet_attrs(omezarr.open_root(mf.store_path(tmp_path / "ds", "odd")))["georef"]
    assert georef["crs_wkt"] is None and georef["epsg"] is None and "34735" not in georef["tags"]
    assert georef["transform"] == [10.0, 0.0, 500.0, 0.0, -10.0, 900.0]


def test_a_geotiff_mask_placed_elsewhere_is_refused_naming_both(tmp_path: Path) -> None:
    image = write_geotiff_rasterio(tmp_path / "images" / "s.tif", smooth((30, 40)), from_origin(0, 300, 10, 10))
    mask = write_geotiff_rasterio(tmp_path / "masks" / "s.tif", np.zeros((30, 40), np.uint8),
                                  from_origin(10, 300, 10, 10))
    with pytest.raises(InputError) as err:
        ingest_image(image, mask, tmp_path / "ds", IngestConfig(images=str(image), output=str(tmp_path / "ds")))
    assert str(mask) in str(err.value) and "image s.tif's" in str(err.value) and "\n" not in str(err.value)


def test_a_geotiff_export_of_an_image_without_georeferencing_is_refused_before_work(tmp_path: Path) -> None:
    write_ome(tmp_path / "images" / "cells.ome.tif", smooth((40, 50)))
    ingest(tmp_path / "images", tmp_path / "ds")
    cfg = InferConfig(dataset=str(tmp_path / "ds"), output=str(tmp_path / "out"), model=str(make_model(tmp_path / "m")),
                      export="geotiff")
    with pytest.raises(ConfigError, match="geotiff needs a 2-D image read from a GeoTIFF; image 'cells'"):
        check_predictable(cfg)
    assert not (tmp_path / "out" / "cells.ome.zarr").exists()
