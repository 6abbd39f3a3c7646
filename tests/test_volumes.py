"""Volumes: NIfTI, DICOM series, TIFF z-stacks, OME-Zarr and .npy read lazily in ZYXC order with their geometry;
the N-D store (chunks, anisotropic pyramid); NIfTI and TIFF-stack writers that give the geometry back."""

from __future__ import annotations

import gzip
import json
import pickle
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr
from volume_data import AFFINE, ct_affine, ramp, save_nifti, write_ct_series

from unetcore.errors import InputError
from unetcore.io import (
    find_mask,
    image_stem,
    list_images,
    open_image,
    open_mask,
    write_nifti,
    write_tiff_stack,
)
from unetcore.io import writers as writers_module
from unetcore.store import manifest as mf
from unetcore.store import omezarr

ZS, YS, XS = slice(1, 5), slice(3, 17), slice(2, 19)


def zyxc(data: np.ndarray) -> np.ndarray:
    return data[..., None] if data.ndim == 3 else data


# --- NIfTI --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32"])
def test_nifti_reads_by_region_in_zyx_order_with_its_geometry(tmp_path: Path, suffix: str, dtype: str) -> None:
    data = ramp((7, 20, 23), dtype)
    path = save_nifti(tmp_path / f"ct{suffix}", data)
    source = open_image(path)
    assert source.spatial_shape == (7, 20, 23) and source.channels == 1 and source.dtype == np.dtype(dtype)
    assert source.shape == (7, 20, 23, 1) and source.ndim == 4 and source.spatial_dims == 3
    np.testing.assert_array_equal(source.read(ZS, YS, XS), zyxc(data)[ZS, YS, XS])
    np.testing.assert_array_equal(source[2, 5:9, -3:, 0], data[2, 5:9, -3:])
    geometry = source.geometry
    assert np.array_equal(np.asarray(geometry.affine), nib.load(path).affine)  # exactly nibabel's
    assert geometry.spacing == pytest.approx((2.5, 0.8, 0.75)) and geometry.unit == "millimeter"
    assert geometry.nifti["qform_code"] == 1 and geometry.nifti["sform_code"] == 2
    # a gzip stream is read in whole slices, forward; an uncompressed file by memory map, any region
    assert (source.decode_unit, source.sequential) == (((1, 20, 23), True) if suffix == ".nii.gz"
                                                       else ((1, 1, 1), False))
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone.read(ZS, YS, XS), source.read(ZS, YS, XS))
    source.close()


def test_gzipped_nifti_reads_correctly_in_any_order(tmp_path: Path) -> None:
    data = ramp((9, 12, 10, 2), "float32")
    source = open_image(save_nifti(tmp_path / "mr.nii.gz", data))
    for z0 in (6, 0, 3, 8, 1):  # backwards reads reopen the stream
        np.testing.assert_array_equal(source.read(slice(z0, z0 + 1), slice(0, 12), slice(2, 7)),
                                      data[z0 : z0 + 1, :, 2:7])


def test_a_4d_nifti_has_channels_and_an_rgb_one_three(tmp_path: Path) -> None:
    mr = ramp((5, 8, 9, 3), "float32")
    source = open_image(save_nifti(tmp_path / "mr.nii.gz", mr))
    assert (source.spatial_shape, source.channels) == ((5, 8, 9), 3)
    np.testing.assert_array_equal(np.asarray(source), mr)
    rgb = np.zeros((5, 8, 9), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"], rgb["G"], rgb["B"] = 10, np.arange(8)[None, :, None], np.arange(5)[:, None, None]
    for name in ("rgb.nii", "rgb.nii.gz"):
        source = open_image(save_nifti(tmp_path / name, rgb))
        assert (source.spatial_shape, source.channels, source.dtype) == ((5, 8, 9), 3, np.dtype("uint8"))
        np.testing.assert_array_equal(np.asarray(source), np.stack([rgb["R"], rgb["G"], rgb["B"]], -1))


def test_a_nifti_with_two_extra_axes_is_refused(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2, 3), np.float32), np.eye(4)), str(tmp_path / "odd.nii"))
    with pytest.raises(InputError, match=r"odd\.nii: NIfTI has more than one non-spatial axis"):
        open_image(tmp_path / "odd.nii")


@pytest.mark.parametrize(("slope", "inter", "dtype"), [(1.0, -1024.0, "float32"), (0.5, 10.0, "float32")])
def test_nifti_scaling_is_applied(tmp_path: Path, slope: float, inter: float, dtype: str) -> None:
    stored = ramp((4, 6, 7), "int16")
    source = open_image(save_nifti(tmp_path / "s.nii.gz", stored, slope=slope, inter=inter))
    assert source.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(source)[..., 0], (stored * np.float64(slope) + inter).astype(dtype))


def test_nifti_scaling_that_fits_int16_stays_integer(tmp_path: Path) -> None:
    stored = (ramp((4, 6, 7), "uint8")).astype(np.uint8)
    source = open_image(save_nifti(tmp_path / "s.nii", stored, slope=1.0, inter=-100.0))
    assert source.dtype == np.dtype("int16")
    np.testing.assert_array_equal(np.asarray(source)[..., 0], stored.astype(np.int16) - 100)


def test_an_absurd_nifti_header_is_refused_before_reading(tmp_path: Path) -> None:
    """A header declaring a million slices (its data never written) is refused by max_pixels at once."""
    header = nib.Nifti2Header()
    header.set_data_shape((512, 512, 1_000_000))
    header.set_data_dtype(np.int16)
    header.set_data_offset(544)
    with open(tmp_path / "huge.nii", "wb") as fh:
        header.write_to(fh)
    with pytest.raises(InputError, match=r"huge\.nii: image has 1000000x512x512 = .* voxels, more than max_pixels"):
        open_image(tmp_path / "huge.nii")


def test_a_truncated_uncompressed_nifti_is_refused_at_open(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "cut.nii", ramp((6, 10, 10)))
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(InputError, match=r"cut\.nii: NIfTI file is truncated"):
        open_image(path)


def test_a_truncated_gzipped_nifti_fails_naming_the_file(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "cut.nii.gz", ramp((8, 30, 30), "float32"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(InputError, match=r"cut\.nii\.gz: (NIfTI data is truncated|not a readable NIfTI)"):
        np.asarray(open_image(path))


def test_a_2d_layout_is_refused_for_a_nifti(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "ct.nii.gz", ramp((3, 8, 9)))
    with pytest.raises(InputError, match=r"ct\.nii\.gz: axis 'z' has 3 entries"):
        open_image(path, channel_axis="yxc")


# --- DICOM --------------------------------------------------------------------------------------------------


def test_a_dicom_series_is_ordered_by_position_and_in_hounsfield_units(tmp_path: Path) -> None:
    raw = ramp((6, 10, 12), "uint16") % 4096
    folder = write_ct_series(tmp_path / "ct_series", raw)
    (folder / "README.txt").write_text("not a slice")
    source = open_image(folder)
    assert source.spatial_shape == (6, 10, 12) and source.dtype == np.dtype("int16")  # HU: -1024 .. 3071
    np.testing.assert_array_equal(np.asarray(source)[..., 0], raw.astype(np.int16) - 1024)
    np.testing.assert_array_equal(source.read(slice(2, 4), slice(1, 9), slice(0, 12))[..., 0],
                                  raw[2:4, 1:9].astype(np.int16) - 1024)
    assert source.geometry.spacing == pytest.approx((2.5, 0.5, 0.7)) and source.geometry.unit == "millimeter"
    np.testing.assert_allclose(np.asarray(source.geometry.affine), ct_affine(), atol=1e-9)
    assert source.decode_unit == (1, 10, 12)


def test_dicom_slices_written_top_down_are_sorted_along_the_normal(tmp_path: Path) -> None:
    raw = ramp((5, 6, 7), "uint16") % 4096
    folder = write_ct_series(tmp_path / "s", raw[::-1], positions=[40.0, 37.5, 35.0, 32.5, 30.0])
    source = open_image(folder)
    np.testing.assert_array_equal(np.asarray(source)[..., 0], raw.astype(np.int16) - 1024)
    assert source.geometry.affine[2][3] == pytest.approx(30.0)  # the first voxel is the lowest slice


def test_a_fractional_rescale_gives_float32(tmp_path: Path) -> None:
    raw = ramp((3, 4, 5), "uint16") % 4096
    source = open_image(write_ct_series(tmp_path / "pet", raw, slope=0.25, intercept=-3.0))
    assert source.dtype == np.dtype("float32")
    np.testing.assert_allclose(np.asarray(source)[..., 0], raw * 0.25 - 3.0)


def _mixed(folder: Path) -> None:
    write_ct_series(folder, np.zeros((3, 4, 5), np.uint16))
    write_ct_series(folder, np.zeros((3, 4, 5), np.uint16), prefix="other", origin=(-10.0, 20.0, 100.0))


BAD_SERIES = {
    "mixed": (_mixed, r"folder mixes 2 DICOM series"),
    "missing slice": (lambda f: write_ct_series(f, np.zeros((5, 4, 5), np.uint16),
                                                positions=[0.0, 2.5, 5.0, 10.0, 12.5]),
                      r"missing slice\(s\): a gap of 5 mm between positions 5 and 10 mm \(spacing 2.5 mm\)"),
    "uneven": (lambda f: write_ct_series(f, np.zeros((5, 4, 5), np.uint16), positions=[0.0, 2.5, 5.0, 7.0, 9.5]),
               r"inconsistent slice spacing: 2 to 2.5 mm"),
    "duplicate": (lambda f: write_ct_series(f, np.zeros((3, 4, 5), np.uint16), positions=[0.0, 2.5, 2.5]),
                  r"two slices at position 2.5 mm"),
    "empty": (lambda f: (f.mkdir(), (f / "notes.txt").write_text("x")), r"folder holds no DICOM slices"),
}


@pytest.mark.parametrize("case", sorted(BAD_SERIES))
def test_bad_dicom_series_are_refused_in_one_line_naming_the_folder(tmp_path: Path, case: str) -> None:
    make, reason = BAD_SERIES[case]
    folder = tmp_path / "series"
    make(folder)
    with pytest.raises(InputError) as info:
        open_image(folder)
    assert info.value.path == str(folder) and "\n" not in str(info.value)
    assert re.search(reason, str(info.value)), str(info.value)


# --- TIFF, OME-Zarr, .npy -----------------------------------------------------------------------------------


def test_an_imagej_stack_is_a_volume_with_its_spacing(tmp_path: Path) -> None:
    stack = ramp((6, 20, 30), "uint16")
    write_tiff_stack(stack, tmp_path / "cells.tif", (2.0, 0.5, 0.25))
    source = open_image(tmp_path / "cells.tif")
    assert source.spatial_shape == (6, 20, 30)
    assert source.geometry.spacing == pytest.approx((2.0, 0.5, 0.25)) and source.geometry.unit == "micrometer"
    np.testing.assert_array_equal(source.read(ZS, YS, XS)[..., 0], stack[ZS, YS, XS])


def test_an_ome_tiff_z_stack_reads_by_z_slab_with_physical_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    stack = ramp((5, 40, 48, 2), "uint16")
    tifffile.imwrite(tmp_path / "s.ome.tif", np.moveaxis(stack, -1, 1), tile=(16, 16), compression="zlib",
                     metadata={"axes": "ZCYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3, "PhysicalSizeZ": 1.5})
    source = open_image(tmp_path / "s.ome.tif")
    assert (source.spatial_shape, source.channels) == ((5, 40, 48), 2)
    assert source.geometry.spacing == pytest.approx((1.5, 0.3, 0.3)) and source.decode_unit == (1, 16, 16)
    np.testing.assert_array_equal(source.read(ZS, YS, XS), stack[ZS, YS, XS])


def test_tiff_axes_decide_2d_or_3d(tmp_path: Path) -> None:
    """Named Z: a volume; unnamed pages (tifffile's Q): today's 2-D channel rules; a 2-D TIFF keeps its
    resolution in micrometres when given per centimetre."""
    data = ramp((4, 20, 30), "uint8")
    tifffile.imwrite(tmp_path / "z.tif", data, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "q.tif", data)
    tifffile.imwrite(tmp_path / "flat.tif", data[0], resolution=(10000 / 0.65, 10000 / 0.65), resolutionunit=3)
    assert open_image(tmp_path / "z.tif").spatial_shape == (4, 20, 30)
    assert open_image(tmp_path / "q.tif").shape == (20, 30, 4)
    flat = open_image(tmp_path / "flat.tif").geometry
    assert flat.spacing == pytest.approx((0.65, 0.65)) and flat.unit == "micrometer"


def test_an_ome_zarr_volume_reads_with_its_scale(tmp_path: Path) -> None:
    data = ramp((2, 6, 20, 24), "uint16")
    root = omezarr.create_image(tmp_path / "v.ome.zarr", data.shape, data.dtype, (4, 8, 8),
                                spacing=(3.0, 0.5, 0.5), unit="micrometer")
    root["0"][:] = data
    source = open_image(tmp_path / "v.ome.zarr")
    assert (source.spatial_shape, source.channels, source.decode_unit) == ((6, 20, 24), 2, (4, 8, 8))
    assert source.geometry.spacing == (3.0, 0.5, 0.5) and source.geometry.unit == "micrometer"
    np.testing.assert_array_equal(source.read(ZS, YS, XS), np.moveaxis(data, 0, -1)[ZS, YS, XS])


@pytest.mark.parametrize(("shape", "channel_axis", "expected"), [
    ((6, 20, 30), "zyx", ((6, 20, 30), 1)),
    ((6, 20, 30, 3), "zyxc", ((6, 20, 30), 3)),
    ((2, 6, 20, 30), "czyx", ((6, 20, 30), 2)),
    ((6, 20, 30), "zyxc", ((6, 20, 30), 1)),
    ((1, 6, 20, 30), "zyx", ((6, 20, 30), 1)),
])
def test_npy_volumes_need_an_explicit_layout(tmp_path: Path, shape: tuple, channel_axis: str,
                                             expected: tuple) -> None:
    data = ramp(shape, "uint8")
    np.save(tmp_path / "v.npy", data)
    source = open_image(tmp_path / "v.npy", channel_axis=channel_axis)  # type: ignore[arg-type]
    assert (source.spatial_shape, source.channels) == expected
    canonical = {"czyx": lambda a: np.moveaxis(a, 0, -1)}.get(channel_axis, lambda a: a)(data.reshape(
        data.shape[1:]) if shape[0] == 1 else data)
    np.testing.assert_array_equal(np.asarray(source), zyxc(canonical))
    assert source.geometry.spacing is None


@pytest.mark.parametrize(("shape", "channel_axis", "reason"), [
    ((20, 30), "zyx", "channel_axis 'zyx' needs a 3-D array"),
    ((2, 6, 20, 30), "zyx", "channel_axis 'zyx' needs a 3-D array"),
    ((2, 3, 6, 20, 30), "czyx", "channel_axis 'czyx' needs a 3-D or 4-D array"),
])
def test_bad_volume_layouts_are_refused(tmp_path: Path, shape: tuple, channel_axis: str, reason: str) -> None:
    np.save(tmp_path / "odd.npy", np.zeros(shape, np.uint8))
    with pytest.raises(InputError, match=rf"odd\.npy: {reason}"):
        open_image(tmp_path / "odd.npy", channel_axis=channel_axis)  # type: ignore[arg-type]


# --- masks --------------------------------------------------------------------------------------------------


def test_a_volume_mask_in_any_format_matches_its_image(tmp_path: Path) -> None:
    image = open_image(save_nifti(tmp_path / "ct.nii.gz", ramp((5, 12, 14))))
    labels = (ramp((5, 12, 14), "uint8") % 3).astype(np.uint8)
    np.save(tmp_path / "m.npy", labels)  # no geometry: the shape decides
    save_nifti(tmp_path / "m.nii.gz", labels)
    tifffile.imwrite(tmp_path / "m.tif", labels, metadata={"axes": "ZYX"})
    for name in ("m.npy", "m.nii.gz", "m.tif"):
        mask = open_mask(tmp_path / name, image, num_classes=3)
        assert mask.classes == {0, 1, 2} and mask.spatial_shape == (5, 12, 14)
        np.testing.assert_array_equal(mask.read(ZS, YS, XS)[..., 0], labels[ZS, YS, XS])


def test_a_2d_mask_for_a_volume_is_refused_naming_both(tmp_path: Path) -> None:
    image = open_image(save_nifti(tmp_path / "ct.nii.gz", ramp((5, 12, 14))))
    np.save(tmp_path / "flat.npy", np.zeros((12, 14), np.uint8))
    with pytest.raises(InputError, match=r"flat\.npy: mask shape 12x14 does not match image ct\.nii\.gz shape 5x12x14"):
        open_mask(tmp_path / "flat.npy", image, num_classes=1)


def test_a_mask_with_another_affine_is_refused_naming_both(tmp_path: Path) -> None:
    image = open_image(save_nifti(tmp_path / "ct.nii.gz", ramp((5, 12, 14))))
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    save_nifti(tmp_path / "m.nii.gz", np.zeros((5, 12, 14), np.uint8), shifted)
    with pytest.raises(InputError, match=r"m\.nii\.gz: mask affine differs from image ct\.nii\.gz's"):
        open_mask(tmp_path / "m.nii.gz", image, num_classes=1)


def test_a_nifti_mask_of_a_dicom_series_matches_within_float32(tmp_path: Path) -> None:
    image = open_image(write_ct_series(tmp_path / "case01", np.zeros((4, 6, 8), np.uint16)))
    save_nifti(tmp_path / "case01.nii.gz", np.ones((4, 6, 8), np.uint8), np.asarray(image.geometry.affine))
    assert open_mask(tmp_path / "case01.nii.gz", image, num_classes=1).classes == {1}


def test_volumes_are_listed_and_find_their_masks(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_ct_series(images / "1.2.840.99", np.zeros((2, 4, 5), np.uint16))
    save_nifti(images / "brain.nii.gz", np.zeros((2, 4, 5), np.int16))
    (images / "empty_folder").mkdir()
    masks.mkdir()
    save_nifti(masks / "1.2.840.99.nii.gz", np.zeros((2, 4, 5), np.uint8))
    write_ct_series(masks / "brain_mask", np.zeros((2, 4, 5), np.uint16))
    assert [p.name for p in list_images(images)] == ["1.2.840.99", "brain.nii.gz"]
    assert list_images(images / "1.2.840.99") == [images / "1.2.840.99"]  # the series folder itself
    assert image_stem(images / "brain.nii.gz") == "brain" and image_stem(images / "1.2.840.99") == "1.2.840.99"
    assert mf.image_id(images / "brain.nii.gz") == "brain" and mf.image_id(images / "1.2.840.99") == "1.2.840.99"
    assert find_mask(masks, images / "1.2.840.99") == masks / "1.2.840.99.nii.gz"
    assert find_mask(masks, images / "brain.nii.gz") == masks / "brain_mask"


# --- store --------------------------------------------------------------------------------------------------


def test_the_pyramid_halves_only_axes_that_are_not_coarse() -> None:
    """5 mm slices in a 0.7 mm plane: the plane is halved until it is as coarse, then all axes together."""
    levels = omezarr.pyramid((40, 512, 512), 5, (5.0, 0.7, 0.7))
    assert [shape for shape, _ in levels] == [(40, 512, 512), (40, 256, 256), (40, 128, 128), (20, 64, 64),
                                              (10, 32, 32)]
    assert levels[3][1] == pytest.approx((10.0, 5.6, 5.6))
    assert omezarr.halving((8, 8, 8), (1.0, 1.0, 1.0)) == (2, 2, 2)
    assert omezarr.halving((1, 8, 8), (1.0, 1.0, 1.0)) == (1, 2, 2)  # never halve an axis of one entry
    assert omezarr.halving((8, 8, 8), (2.0, 1.0, 1.0)) == (1, 2, 2)  # exactly twice as coarse: not yet
    assert omezarr.n_levels_for((40, 512, 512), 100, (5.0, 0.7, 0.7)) == 4
    assert omezarr.n_levels_for((2049, 10)) == 3  # 2-D: unchanged rule (halve until the side is <= 1024)


@pytest.mark.parametrize(("shape", "spacing", "expected"), [
    ((5000, 3000), None, (1024, 1024)),
    ((300, 5000), None, (300, 1024)),
    ((512, 512, 512), None, (64, 128, 128)),
    ((30, 512, 512), (5.0, 0.7, 0.7), (30, 256, 256)),
    ((512, 512, 512), (5.0, 0.7, 0.7), (32, 128, 256)),  # about a physical cube: 160 x 90 x 179 mm
    ((20, 512, 512), None, (20, 256, 256)),
])
def test_chunks_hold_a_megavoxel_shaped_from_the_spacing(shape: tuple, spacing: tuple | None,
                                                         expected: tuple) -> None:
    chunks = omezarr.chunk_shape(shape, 1024, spacing)
    assert chunks == expected
    if len(shape) == 3:
        assert np.prod(chunks) >= 1 << 20  # >= 1 MB even for uint8


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (2, 1, 2)])
def test_halve_is_the_rounded_mean_over_the_cell(dtype: str, factors: tuple) -> None:
    block = ramp((2, 7, 9, 11), dtype)
    out = tuple(n // f for n, f in zip(block.shape[1:], factors))
    even = block[:, : out[0] * factors[0], : out[1] * factors[1], : out[2] * factors[2]].astype(np.float64)
    cells = even.reshape(2, out[0], factors[0], out[1], factors[1], out[2], factors[2])
    mean = cells.mean(axis=(2, 4, 6))
    got = omezarr.halve(block, "image", factors)
    assert got.dtype == np.dtype(dtype) and got.shape == (2, *out)
    if np.dtype(dtype).kind in "ui":
        np.testing.assert_array_equal(got, np.round(mean).astype(dtype))
    else:
        np.testing.assert_allclose(got, mean, rtol=1e-6)
    labels = omezarr.halve(block[0], "label", factors)
    np.testing.assert_array_equal(labels, block[0, :: factors[0], :: factors[1], :: factors[2]][: out[0], : out[1],
                                                                                                 : out[2]])


def test_a_volume_store_has_zyx_axes_units_and_an_anisotropic_pyramid(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(omezarr, "PYRAMID_MIN_SIZE", 8)
    data = ramp((1, 12, 40, 36), "uint16")
    root = omezarr.create_image(tmp_path / "v.ome.zarr", data.shape, data.dtype, (4, 8, 8), spacing=(3.0, 1.0, 1.0),
                                unit="millimeter")
    root["0"][:] = data
    omezarr.build_pyramid(root, "image")
    labels = omezarr.create_labels(root, "mask", data.shape[1:], np.uint8, (4, 8, 8), spacing=(3.0, 1.0, 1.0),
                                   unit="millimeter")
    labels["0"][:] = (data[0] % 3).astype(np.uint8)
    omezarr.build_pyramid(labels, "label")
    meta = json.loads((tmp_path / "v.ome.zarr" / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert [(a["name"], a["type"], a.get("unit")) for a in meta["axes"]] == [
        ("c", "channel", None), ("z", "space", "millimeter"), ("y", "space", "millimeter"),
        ("x", "space", "millimeter")]
    scales = [d["coordinateTransformations"][0]["scale"] for d in meta["datasets"]]
    assert scales == [[1.0, 3.0, 1.0, 1.0], [1.0, 3.0, 2.0, 2.0], [1.0, 6.0, 4.0, 4.0], [1.0, 12.0, 8.0, 8.0]]
    assert [root[str(n)].shape for n in range(4)] == [(1, 12, 40, 36), (1, 12, 20, 18), (1, 6, 10, 9), (1, 3, 5, 4)]
    np.testing.assert_array_equal(root["1"][:], omezarr.halve(data, "image", (1, 2, 2)))
    np.testing.assert_array_equal(root["2"][:], omezarr.halve(root["1"][:], "image", (2, 2, 2)))
    assert [labels[str(n)].shape for n in range(4)] == [s[1:] for s in (root[str(n)].shape for n in range(4))]
    assert labels.attrs["ome"]["multiscales"][0]["axes"][0]["name"] == "z"
    assert omezarr.geometry(root) == {"spatial_dims": 3, "spacing": [3.0, 1.0, 1.0], "unit": "millimeter",
                                      "affine": None, "nifti": None}


# --- writers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_write_nifti_streams_slabs_and_gives_the_source_geometry_back(tmp_path: Path, suffix: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    source_path = save_nifti(tmp_path / f"ct{suffix}", ramp((7, 12, 10)), qform_code=1, sform_code=4)
    source = open_image(source_path)
    labels = zarr.create_array(store=str(tmp_path / "labels.zarr"), shape=(7, 12, 10), chunks=(2, 12, 10),
                               dtype=np.uint8)
    labels[:] = (ramp((7, 12, 10), "uint8") % 4).astype(np.uint8)
    monkeypatch.setattr(writers_module, "SLAB_BYTES", 2 * 12 * 10)  # two slices per slab
    out = write_nifti(labels, source.geometry.affine, tmp_path / f"mask{suffix}", header_source=source.geometry.nifti)
    written, original = nib.load(out), nib.load(source_path)
    assert np.array_equal(written.affine, original.affine)  # bit for bit
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "srow_x", "srow_z"):
        assert np.array_equal(written.header[key], original.header[key]), key
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.swapaxes(labels[:], 0, 2))
    same = write_nifti(labels, source.geometry.affine, tmp_path / f"again{suffix}", header_source=source_path)
    assert np.array_equal(nib.load(same).affine, original.affine)


def test_write_nifti_without_a_header_sets_both_forms_from_the_affine(tmp_path: Path) -> None:
    affine = ct_affine()
    out = write_nifti(np.zeros((3, 4, 5), bool), affine, tmp_path / "m.nii.gz")
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 1)
    assert written.shape == (5, 4, 3) and written.get_data_dtype() == np.uint8
    with gzip.open(out) as fh:  # a valid single-file NIfTI-1: magic n+1, data at byte 352
        head = fh.read(352)
    assert head[344:348] == b"n+1\0" and np.frombuffer(head[108:112], "<f4")[0] == 352


def test_write_tiff_stack_is_an_imagej_hyperstack_with_its_spacing(tmp_path: Path) -> None:
    instances = (ramp((4, 10, 12), "int32") % 70000).astype(np.uint32)
    out = write_tiff_stack(instances, tmp_path / "labels.tif", (2.0, 0.5, 0.25))
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej and tif.series[0].axes == "ZYX" and tif.imagej_metadata["spacing"] == 2.0
        assert tif.imagej_metadata["unit"] == "um" and tif.series[0].dtype == np.float32
        np.testing.assert_array_equal(tif.asarray(), instances.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(open_image(out))[..., 0], instances.astype(np.float32))
    with pytest.raises(ValueError, match="more than float32 holds exactly"):
        write_tiff_stack(np.full((2, 3, 3), 1 << 25, np.uint32), tmp_path / "big.tif")
    assert not (tmp_path / "big.tif").exists()
