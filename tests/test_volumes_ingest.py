"""Ingesting volumes: NIfTI, DICOM series and z-stacks into OME-Zarr (c, z, y, x) with their geometry, statistics
streamed by leaf, the manifest's spatial keys; NIfTI in -> store -> NIfTI out keeps the affine; bad volumes are one
report line each while the rest of the batch ingests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr
from volume_data import AFFINE, ramp, save_nifti, write_ct_series

from unetcore.config import IngestConfig
from unetcore.ingest import ingest_folder
from unetcore.io import ImageSource, open_image, write_nifti, write_tiff_stack
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.store.stats import StreamingStats


def cfg(images: Path, output: Path, **kw: object) -> IngestConfig:
    return IngestConfig(images=str(images), output=str(output), chunk_size=kw.pop("chunk_size", 64), **kw)


def store(dataset: Path, entry_id: str) -> zarr.Group:
    return omezarr.open_root(mf.store_path(dataset, entry_id))


def test_a_nifti_volume_and_its_mask_ingest_with_their_geometry(tmp_path: Path) -> None:
    images, masks = tmp_path / "img", tmp_path / "msk"
    images.mkdir()
    masks.mkdir()
    data = ramp((37, 45, 50), "int16")  # odd sizes: leaves of two chunks cut through the edges
    labels = (ramp((37, 45, 50), "uint8", seed=1) % 3).astype(np.uint8)
    save_nifti(images / "ct.nii.gz", data)
    save_nifti(masks / "ct.nii.gz", labels)
    ds = tmp_path / "ds"
    report = ingest_folder(cfg(images, ds, masks=str(masks), num_classes=3))
    assert report.added == ["ct"] and report.status == "ok" and report.pixels == 37 * 45 * 50
    root = store(ds, "ct")
    np.testing.assert_array_equal(omezarr.image_array(root)[:], data[None])
    np.testing.assert_array_equal(omezarr.label_array(root)[:], labels)
    # 64**2 voxels per chunk, a physical cube of 20 x 12.8 x 24 mm at (2.5, 0.8, 0.75) mm
    assert root["0"].chunks == (1, 8, 16, 32) and omezarr.label_array(root).chunks == (8, 16, 32)
    meta = root.attrs["ome"]["multiscales"][0]
    assert [(a["name"], a.get("unit")) for a in meta["axes"]] == [("c", None), ("z", "millimeter"),
                                                                  ("y", "millimeter"), ("x", "millimeter")]
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == pytest.approx([1.0, 2.5, 0.8, 0.75])
    label_meta = root["labels/mask"].attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in label_meta["axes"]] == ["z", "y", "x"]
    source_affine = nib.load(images / "ct.nii.gz").affine
    geometry = omezarr.geometry(root)
    assert np.array_equal(np.asarray(geometry["affine"]), source_affine) and geometry["unit"] == "millimeter"
    entry = mf.load(ds)["images"]["ct"]
    assert (entry["shape"], entry["channels"], entry["dtype"], entry["spatial_dims"]) == ([37, 45, 50], 1, "int16", 3)
    assert entry["spacing"] == pytest.approx([2.5, 0.8, 0.75]) and entry["unit"] == "millimeter"
    assert np.array_equal(np.asarray(entry["affine"]), source_affine) and entry["classes"] == [0, 1, 2]
    whole = StreamingStats(1, np.dtype("int16"))
    whole.update(data[..., None])
    assert entry["stats"] == json.loads(json.dumps(whole.result()))  # streamed by leaf == the whole volume
    assert omezarr.unet_attrs(root)["stats"] == entry["stats"]


def test_volumes_are_read_in_leaves_never_whole_and_gzip_in_z_order(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "gz").mkdir()
    save_nifti(tmp_path / "raw" / "a.nii", ramp((40, 48, 50)), np.eye(4))  # isotropic: 16**3 chunks
    save_nifti(tmp_path / "gz" / "a.nii.gz", ramp((40, 48, 50)), np.eye(4))
    regions: list[tuple[tuple[int, int], ...]] = []
    original = ImageSource.read

    def spy(self: ImageSource, *region: slice) -> np.ndarray:
        regions.append(tuple((r.start, r.stop) for r in region))
        return original(self, *region)

    monkeypatch.setattr(ImageSource, "read", spy)
    ingest_folder(cfg(tmp_path / "raw", tmp_path / "ds1", threads=3))
    assert len(regions) == 2 * 2 * 2 and max(b - a for (a, b), *_ in regions) == 32  # 32-voxel cubes
    regions.clear()
    ingest_folder(cfg(tmp_path / "gz", tmp_path / "ds2", threads=3))
    assert regions == [((0, 32), (0, 48), (0, 50)), ((32, 40), (0, 48), (0, 50))]  # whole slices, in z order
    np.testing.assert_array_equal(omezarr.image_array(store(tmp_path / "ds2", "a"))[:],
                                  omezarr.image_array(store(tmp_path / "ds1", "a"))[:])


def test_an_anisotropic_volume_gets_the_store_pyramid_of_its_spacing(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Level 1 written from leaves equals the store's own pyramid; slices 2.5 mm thick are not halved at first."""
    monkeypatch.setattr(omezarr, "PYRAMID_MIN_SIZE", 8)
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    data = ramp((9, 45, 50), "uint16")
    labels = (ramp((9, 45, 50), "uint8", seed=2) % 2).astype(np.uint8)
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    save_nifti(tmp_path / "img" / "a.nii.gz", data, affine)
    save_nifti(tmp_path / "msk" / "a.nii.gz", labels, affine)
    ds = tmp_path / "ds"
    ingest_folder(cfg(tmp_path / "img", ds, masks=str(tmp_path / "msk")))
    root = store(ds, "a")
    shapes = [root[str(n)].shape[1:] for n in range(omezarr.n_levels_for((9, 45, 50), spacing=(2.5, 1.0, 1.0)))]
    assert shapes == [(9, 45, 50), (9, 22, 25), (4, 11, 12), (2, 5, 6)]
    reference = omezarr.create_image(tmp_path / "ref.zarr", (1, 9, 45, 50), np.uint16, root["0"].chunks[1:],
                                     spacing=(2.5, 1.0, 1.0))
    reference["0"][:] = data[None]
    omezarr.build_pyramid(reference, "image")
    ref_labels = omezarr.create_labels(reference, "mask", (9, 45, 50), np.uint8, root["0"].chunks[1:],
                                       spacing=(2.5, 1.0, 1.0))
    ref_labels["0"][:] = labels
    omezarr.build_pyramid(ref_labels, "label")
    for n in range(len(shapes)):
        np.testing.assert_array_equal(root[str(n)][:], reference[str(n)][:])
        np.testing.assert_array_equal(omezarr.label_array(root, "mask", n)[:], ref_labels[str(n)][:])


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_in_store_nifti_out_keeps_the_affine_bit_for_bit(tmp_path: Path, suffix: str) -> None:
    (tmp_path / "img").mkdir()
    oblique = AFFINE.copy()
    oblique[:3, :3] = oblique[:3, :3] @ np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])
    source = save_nifti(tmp_path / "img" / f"mr{suffix}", ramp((6, 11, 13), "float32"), oblique, qform_code=1,
                        sform_code=1)
    ds = tmp_path / "ds"
    ingest_folder(cfg(tmp_path / "img", ds))
    root = store(ds, "mr")
    geometry = omezarr.geometry(root)
    labels = (omezarr.image_array(root)[0] > 100).astype(np.uint8)
    out = write_nifti(labels, geometry["affine"], tmp_path / f"mask{suffix}", header_source=geometry["nifti"])
    written, original = nib.load(out), nib.load(source)
    assert np.array_equal(written.affine, original.affine)
    assert np.array_equal(written.header.get_qform(), original.header.get_qform())
    assert np.array_equal(written.header.get_sform(), original.header.get_sform())
    assert [int(written.header[k]) for k in ("qform_code", "sform_code")] == [1, 1]
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.swapaxes(labels, 0, 2))


def test_a_dicom_series_ingests_in_hounsfield_units_with_a_nifti_mask(tmp_path: Path) -> None:
    images, masks = tmp_path / "img", tmp_path / "msk"
    raw = ramp((5, 20, 24), "uint16") % 4096
    series = write_ct_series(images / "1.2.840.7", raw)
    masks.mkdir()
    geometry = open_image(series).geometry
    labels = (raw > 2000).astype(np.uint8)
    save_nifti(masks / "1.2.840.7.nii.gz", labels, np.asarray(geometry.affine))
    ds = tmp_path / "ds"
    report = ingest_folder(cfg(images, ds, masks=str(masks)))
    assert report.added == ["1.2.840.7"] and report.status == "ok", report.failed
    root = store(ds, "1.2.840.7")
    np.testing.assert_array_equal(omezarr.image_array(root)[0], raw.astype(np.int16) - 1024)
    np.testing.assert_array_equal(omezarr.label_array(root)[:], labels)
    entry = mf.load(ds)["images"]["1.2.840.7"]
    assert entry["dtype"] == "int16" and entry["spacing"] == pytest.approx([2.5, 0.5, 0.7])
    assert entry["stats"]["channels"][0]["min"] == float(raw.min()) - 1024


def test_a_microscopy_stack_is_in_micrometres_and_2d_entries_say_two_dims(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    write_tiff_stack(ramp((6, 30, 40), "uint16"), tmp_path / "img" / "cells.tif", (2.0, 0.5, 0.5))
    np.save(tmp_path / "img" / "flat.npy", ramp((30, 40), "uint8"))
    ds = tmp_path / "ds"
    ingest_folder(cfg(tmp_path / "img", ds))
    axes = store(ds, "cells").attrs["ome"]["multiscales"][0]["axes"]
    assert [a.get("unit") for a in axes] == [None, "micrometer", "micrometer", "micrometer"]
    entries = mf.load(ds)["images"]
    assert (entries["cells"]["spatial_dims"], entries["cells"]["spacing"]) == (3, [2.0, 0.5, 0.5])
    flat = entries["flat"]
    assert (flat["spatial_dims"], flat["spacing"], flat["unit"], flat["affine"]) == (2, [1.0, 1.0], None, None)
    assert "geometry" not in omezarr.unet_attrs(store(ds, "flat"))  # a 2-D store's metadata is as before


def test_an_ingested_volume_store_ingests_again_with_its_geometry(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    save_nifti(tmp_path / "img" / "ct.nii.gz", ramp((6, 20, 22)))
    ingest_folder(cfg(tmp_path / "img", tmp_path / "ds1"))
    ingest_folder(cfg(tmp_path / "ds1", tmp_path / "ds2", chunk_size=128))
    first, second = (mf.load(tmp_path / d)["images"]["ct"] for d in ("ds1", "ds2"))
    assert second["affine"] == first["affine"] and second["spacing"] == first["spacing"]
    np.testing.assert_array_equal(omezarr.image_array(store(tmp_path / "ds2", "ct"))[:],
                                  omezarr.image_array(store(tmp_path / "ds1", "ct"))[:])


# --- bad input ----------------------------------------------------------------------------------------------


def _nifti_with_nan(images: Path) -> None:
    data = ramp((6, 10, 12), "float32")
    data[3, 4, 5] = np.nan
    save_nifti(images / "bad.nii.gz", data)


def _truncated_gz(images: Path) -> None:
    path = save_nifti(images / "bad.nii.gz", ramp((8, 30, 30), "float32"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def _absurd_header(images: Path) -> None:
    header = nib.Nifti2Header()
    header.set_data_shape((64, 64, 1_000_000))
    header.set_data_dtype(np.int16)
    header.set_data_offset(544)
    with open(images / "bad.nii", "wb") as fh:
        header.write_to(fh)


def _mixed_series(images: Path) -> None:
    write_ct_series(images / "bad_series", np.zeros((3, 6, 7), np.uint16))
    write_ct_series(images / "bad_series", np.zeros((3, 6, 7), np.uint16), prefix="b", origin=(0.0, 0.0, 90.0))


def _missing_slice(images: Path) -> None:
    write_ct_series(images / "bad_series", np.zeros((4, 6, 7), np.uint16), positions=[0.0, 2.5, 7.5, 10.0])


def _with_mask(mask: np.ndarray, affine: np.ndarray = AFFINE) -> object:
    def make(images: Path) -> None:
        save_nifti(images / "bad.nii.gz", ramp((6, 10, 12)))
        if mask.ndim == 2:
            np.save(images.parent / "msk" / "bad.npy", mask)
        else:
            save_nifti(images.parent / "msk" / "bad.nii.gz", mask, affine)

    return make


_SHIFTED = AFFINE.copy()
_SHIFTED[2, 3] += 2.5

BAD_VOLUMES = {
    "NaN": (_nifti_with_nan, r"bad\.nii\.gz: image contains NaN or Inf values \(e\.g\. at slice 3, row 4, column 5\)"),
    "truncated .nii.gz": (_truncated_gz, r"bad\.nii\.gz: (NIfTI data is truncated|not a readable NIfTI)"),
    "absurd header": (_absurd_header, r"bad\.nii: image has 1000000x64x64 = 4,096,000,000 voxels, more than "
                                      r"max_pixels"),
    "mixed series": (_mixed_series, r"bad_series: folder mixes 2 DICOM series"),
    "missing slice": (_missing_slice, r"bad_series: missing slice\(s\): a gap of 5 mm"),
    "2-D mask": (_with_mask(np.zeros((10, 12), np.uint8)),
                 r"msk/bad\.npy: mask shape 10x12 does not match image bad\.nii\.gz shape 6x10x12"),
    "mask with another affine": (_with_mask(np.zeros((6, 10, 12), np.uint8), _SHIFTED),
                                 r"msk/bad\.nii\.gz: mask affine differs from image bad\.nii\.gz's"),
}


@pytest.mark.parametrize("case", sorted(BAD_VOLUMES))
def test_a_bad_volume_is_one_report_line_and_the_rest_ingests(tmp_path: Path, case: str) -> None:
    make, reason = BAD_VOLUMES[case]
    images, masks = tmp_path / "img", tmp_path / "msk"
    images.mkdir()
    masks.mkdir()
    save_nifti(images / "good.nii.gz", ramp((4, 10, 12)))
    rgb = np.zeros((4, 10, 12), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["G"] = 7
    save_nifti(images / "rgb.nii", rgb)  # an RGB volume is ingested, its colours as 3 channels
    make(images)
    ds = tmp_path / "ds"
    report = ingest_folder(cfg(images, ds, masks=str(masks), max_pixels=10**9))
    assert report.status == "partial" and sorted(report.added) == ["good", "rgb"]
    [failure] = report.failed
    assert Path(failure["file"]).name.startswith("bad") and "\n" not in failure["error"]
    assert re.search(reason, failure["error"]), failure["error"]
    assert sorted(mf.load(ds)["images"]) == ["good", "rgb"]
    assert not [p for p in ds.iterdir() if p.name.startswith(("bad", ".bad"))]
    rgb_entry = mf.load(ds)["images"]["rgb"]
    assert (rgb_entry["channels"], rgb_entry["spatial_dims"]) == (3, 3)
    np.testing.assert_array_equal(omezarr.image_array(store(ds, "rgb"))[1], np.full((4, 10, 12), 7, np.uint8))


def test_a_tiff_z_stack_mask_for_a_tiff_stack(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    stack = ramp((5, 20, 30), "uint8")
    tifffile.imwrite(tmp_path / "img" / "s.tif", stack, metadata={"axes": "ZYX"}, compression="zlib",
                     rowsperstrip=4)
    np.save(tmp_path / "msk" / "s.npy", (stack > 128).astype(np.uint8))
    ds = tmp_path / "ds"
    assert ingest_folder(cfg(tmp_path / "img", ds, masks=str(tmp_path / "msk"))).added == ["s"]
    np.testing.assert_array_equal(omezarr.label_array(store(ds, "s"))[:], (stack > 128).astype(np.uint8))
