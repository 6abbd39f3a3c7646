"""Whole-slide images at a resolution in microns per pixel (issue 14.3): level choice, area averaging, ingestion.

The slides are written by tifffile, not by us: an SVS-like file (tiled baseline with an Aperio ImageDescription,
a thumbnail, a reduced resolution, as Aperio lays them out, which tifffile parses as an SVS series) and a
pyramidal OME-TIFF with SubIFDs. The averaging oracle is scikit-image's ``downscale_local_mean`` (on a pixel-
repeated image when the factor is not an integer, which makes its box mean the exact area average).
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image
from skimage.transform import downscale_local_mean

from unetcore.config import IngestConfig
from unetcore.errors import InputError
from unetcore.ingest import ingest_folder
from unetcore.io import ResampledSource, choose_level, open_at_mpp, open_image
from unetcore.store import manifest as mf

REPO = Path(__file__).resolve().parents[1]
APERIO = "Aperio Image Library v12.0.15 \n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=70|AppMag = 40|MPP = 0.2520"


def texture(shape: tuple[int, ...], dtype: str = "uint8", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, shape).astype(dtype)


def write_svs(path: Path, data: np.ndarray) -> None:
    """Baseline (tiled, Aperio description with MPP 0.252), thumbnail (stripped), a 4x reduced level (tiled)."""
    h, w = data.shape[:2]
    with tifffile.TiffWriter(path) as tif:
        tif.write(data, tile=(64, 64), description=APERIO.format(w=w, h=h), metadata=None)
        tif.write(data[::16, ::16], description=f"Aperio Image Library v12.0.15 \n{w}x{h} -> thumbnail",
                  metadata=None)
        tif.write(data[::4, ::4], tile=(64, 64), description=f"Aperio Image Library v12.0.15 \n{w}x{h} -> 4x",
                  metadata=None)


def write_ome_pyramid(path: Path, data: np.ndarray, size_um: float = 0.25) -> None:
    """A pyramidal OME-TIFF: level 0 at ``size_um`` µm/px with two SubIFD levels (2x, 4x)."""
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(data, tile=(64, 64), subifds=2,
                  metadata={"axes": "YXS", "PhysicalSizeX": size_um, "PhysicalSizeY": size_um})
        tif.write(data[::2, ::2], tile=(64, 64), subfiletype=1)
        tif.write(data[::4, ::4], tile=(64, 64), subfiletype=1)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (0.25, (0, (1.0, 1.0))),  # level 0 exactly
        (0.53, (1, (1.0, 1.0))),  # within 10 % of level 1 (0.5)
        (0.6, (1, (1.2, 1.2))),  # 20 % off every level: averaged down from the nearest finer one
        (4.0, (2, (4.0, 4.0))),  # coarser than the coarsest level: built from it
        (0.24, (0, (1.0, 1.0))),  # finer than level 0, but within the tolerance
        (0.2, None),  # finer than level 0 beyond the tolerance: no level can give it
    ],
)
def test_choose_level(target: float, expected: tuple | None) -> None:
    levels = [(0.25, 0.25), (0.5, 0.5), (1.0, 1.0)]
    got = choose_level(levels, target)
    if expected is None:
        assert got is None
    else:
        assert got[0] == expected[0]
        np.testing.assert_allclose(got[1], expected[1])


def test_svs_mpp_is_read_from_the_aperio_description(tmp_path: Path) -> None:
    data = texture((512, 384, 3))
    write_svs(tmp_path / "s.svs", data)
    source = open_image(tmp_path / "s.svs")
    assert source.shape == (512, 384, 3)
    assert source.geometry.spacing == (0.252, 0.252) and source.geometry.unit == "micrometer"
    level1 = open_image(tmp_path / "s.svs", level=1)  # the reduced resolution, not the thumbnail
    assert level1.shape == (128, 96, 3)
    np.testing.assert_allclose(level1.geometry.spacing, (1.008, 1.008))
    np.testing.assert_array_equal(level1.read(slice(0, 128), slice(0, 96)), data[::4, ::4])


def test_a_level_within_the_tolerance_is_read_as_it_is(tmp_path: Path) -> None:
    data = texture((512, 384, 3))
    write_svs(tmp_path / "s.svs", data)
    source, placement = open_at_mpp(tmp_path / "s.svs", 1.0)  # level 1 is 1.008 µm/px: 0.8 % off
    assert placement.level == 1 and not placement.resampled
    assert placement.downsample == (4.0, 4.0) and placement.level0_mpp == (0.252, 0.252)
    np.testing.assert_allclose(placement.mpp, (1.008, 1.008))
    np.testing.assert_array_equal(source.read(slice(0, 128), slice(0, 96)), data[::4, ::4])


def test_an_integer_factor_is_the_box_mean_of_the_finer_level(tmp_path: Path) -> None:
    data = texture((512, 384, 3), "float32")
    write_ome_pyramid(tmp_path / "p.ome.tif", data)
    source, placement = open_at_mpp(tmp_path / "p.ome.tif", 2.0)  # level 2 (1 µm/px) averaged 2x2
    assert isinstance(source, ResampledSource) and placement.level == 2 and placement.resampled
    assert placement.downsample == (8.0, 8.0) and placement.mpp == (2.0, 2.0)
    expected = downscale_local_mean(data[::4, ::4], (2, 2, 1))
    np.testing.assert_allclose(source.read(slice(0, 64), slice(0, 48)), expected, rtol=1e-6)


def test_a_fractional_factor_is_the_exact_area_average_and_blocks_equal_the_whole(tmp_path: Path) -> None:
    data = texture((300, 210, 3), "float32")
    write_ome_pyramid(tmp_path / "p.ome.tif", data)
    source, placement = open_at_mpp(tmp_path / "p.ome.tif", 0.375)  # 1.5x level 0 (level 1 is 33 % off)
    assert placement.level == 0 and placement.downsample == (1.5, 1.5)
    assert source.spatial_shape == (200, 140)
    doubled = np.repeat(np.repeat(data, 2, axis=0), 2, axis=1)  # box of 3 doubled pixels = area of 1.5 pixels
    expected = downscale_local_mean(doubled, (3, 3, 1))
    whole = source.read(slice(0, 200), slice(0, 140))
    np.testing.assert_allclose(whole, expected, rtol=1e-5)
    pieces = np.concatenate([np.concatenate([source.read(slice(y, min(y + 37, 200)), slice(x, min(x + 29, 140)))
                                             for x in range(0, 140, 29)], axis=1) for y in range(0, 200, 37)])
    np.testing.assert_array_equal(pieces, whole)


def test_integer_images_are_rounded_half_to_even_and_keep_their_dtype(tmp_path: Path) -> None:
    cells = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [3, 3, 0, 0], [5, 5, 0, 0], [7, 0, 0, 0]],
                     np.uint8)  # 2x2 means 0.25, 0.5, 0.75, 1.5, 2.5, 1.75 -> 0, 0, 1, 2, 2, 2
    data = np.zeros((2, 12, 1), np.uint8)
    data[:, :, 0] = cells.reshape(6, 2, 2).transpose(1, 0, 2).reshape(2, 12)
    tifffile.imwrite(tmp_path / "one.ome.tif", data[..., 0], metadata={"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
    source, placement = open_at_mpp(tmp_path / "one.ome.tif", 0.5)
    assert placement.resampled and source.dtype == np.uint8
    got = source.read(slice(0, 1), slice(0, 6))[0, :, 0]
    np.testing.assert_array_equal(got, [0, 0, 1, 2, 2, 2])
    np.testing.assert_array_equal(got, np.rint(downscale_local_mean(data[..., 0], (2, 2)))[0])


def test_mpp_errors_name_the_file(tmp_path: Path) -> None:
    write_svs(tmp_path / "s.svs", texture((256, 256, 3)))
    with pytest.raises(InputError, match=r"s\.svs: has no level for 0\.1 µm/px: its finest \(level 0\) is 0\.252"):
        open_at_mpp(tmp_path / "s.svs", 0.1)
    Image.fromarray(texture((64, 64))).save(tmp_path / "plain.png")
    with pytest.raises(InputError, match=r"plain\.png: has no pixel size, so --mpp 0\.5"):
        open_at_mpp(tmp_path / "plain.png", 0.5)


def test_ingest_at_an_mpp_records_the_level_and_the_transform_to_level_0(tmp_path: Path) -> None:
    data = texture((512, 384, 3))
    (tmp_path / "in").mkdir()
    write_svs(tmp_path / "in" / "slide.svs", data)
    report = ingest_folder(IngestConfig(images=str(tmp_path / "in"), output=str(tmp_path / "ds"), mpp=1.0,
                                        chunk_size=64, val_fraction=0.0))
    assert not report.failed and report.added == ["slide"]
    root = zarr.open_group(store=str(mf.store_path(tmp_path / "ds", "slide")), mode="r")
    np.testing.assert_array_equal(root["0"][:], np.moveaxis(data[::4, ::4], -1, 0))  # level 1, bit for bit
    attrs = root.attrs["unet"]
    assert attrs["level0"] == {"downsample": [4.0, 4.0], "mpp": [0.252, 0.252], "level": 1, "resampled": False}
    np.testing.assert_allclose(attrs["mpp"], [1.008, 1.008])
    multiscale = root.attrs["ome"]["multiscales"][0]
    np.testing.assert_allclose(multiscale["datasets"][0]["coordinateTransformations"][0]["scale"], [1, 1.008, 1.008])
    assert {a.get("unit") for a in multiscale["axes"][1:]} == {"micrometer"}
    entry = mf.load(tmp_path / "ds")["images"]["slide"]
    assert entry["level0"] == attrs["level0"] and entry["options"]["mpp"] == 1.0 and entry["shape"] == [128, 96]


def test_cli_ingest_mpp_bad_inputs_are_one_line_each(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    write_svs(tmp_path / "in" / "slide.svs", texture((256, 256, 3)))
    Image.fromarray(texture((64, 64))).save(tmp_path / "in" / "photo.png")
    done = subprocess.run([sys.executable, "-m", "app.cli", "ingest", str(tmp_path / "in"), "-o",
                           str(tmp_path / "ds"), "--mpp", "0.1", "--no-prefect"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("skipped:")]
    assert len(lines) == 2, done.stderr
    assert any("slide.svs: has no level for 0.1 µm/px" in line for line in lines)
    assert any("photo.png: has no pixel size, so --mpp 0.1" in line for line in lines)
    assert "Traceback" not in done.stderr
    assert json.loads((tmp_path / "ds" / "ingest_report.json").read_text())["status"] == "failed"


def test_a_slide_prediction_and_its_export_carry_the_mpp_and_the_level0_transform(tmp_path: Path) -> None:
    from tests.test_engine import make_model
    from unetcore.config import InferConfig
    from unetcore.inference import predict_dataset

    (tmp_path / "in").mkdir()
    write_svs(tmp_path / "in" / "slide.svs", texture((512, 384, 3)))
    ingest_folder(IngestConfig(images=str(tmp_path / "in"), output=str(tmp_path / "ds"), mpp=1.0, chunk_size=64,
                               val_fraction=0.0))
    model = make_model(tmp_path / "model", in_channels=3)
    [result] = predict_dataset(InferConfig(dataset=str(tmp_path / "ds"), output=str(tmp_path / "out"),
                                           model=str(model), tile=64, block_size=128, n_workers=1,
                                           threads_per_worker=1, export="tiff"))
    out = zarr.open_group(store=result.output, mode="r")
    level0 = {"downsample": [4.0, 4.0], "mpp": [0.252, 0.252], "level": 1, "resampled": False}
    assert out.attrs["unet"]["level0"] == level0
    scale = out.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    np.testing.assert_allclose(scale[1:], [1.008, 1.008])
    exported = open_image(result.export)  # our reader: the pixel size comes back from the resolution tags
    assert exported.spatial_shape == (128, 96)
    np.testing.assert_allclose(exported.geometry.spacing, (1.008, 1.008), rtol=1e-6)
    with tifffile.TiffFile(result.export) as tif:  # and the OME Image's Description holds the transform to level 0
        description = next(e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Description"))
        meta = json.loads(description.text)
        assert meta["unet"]["level0"] == level0
        assert meta["unet"]["provenance"]["input"]["source_hash"]
