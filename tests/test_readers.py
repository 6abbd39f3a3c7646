"""Readers: every format reads regions lazily in YXC order; every bad input is one InputError naming the file."""

from __future__ import annotations

import pickle
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from unetcore.errors import InputError
from unetcore.io import readers
from unetcore.io.readers import (
    SUPPORTED_SUFFIXES,
    ImageSource,
    check_finite,
    find_mask,
    iter_row_bands,
    list_images,
    open_image,
    open_mask,
)

YS, XS = slice(5, 21), slice(3, 30)


def ramp(shape: tuple[int, ...], dtype: str = "uint8") -> np.ndarray:
    """Distinct-ish values everywhere, so that a misplaced region or a swapped axis shows."""
    return (np.arange(int(np.prod(shape))) % 251).reshape(shape).astype(dtype)


def yxc(array: np.ndarray, layout: str) -> np.ndarray:
    """The canonical (H, W, C) view of ``array`` stored as ``layout``."""
    if layout == "yx":
        return array[..., None]
    return array if layout == "yxc" else np.moveaxis(array, 0, -1)


# --- formats ------------------------------------------------------------------------------------------------


def _write_zarr_array(path: Path, data: np.ndarray) -> None:
    arr = zarr.create_array(store=str(path), shape=data.shape, chunks=(16,) * data.ndim, dtype=data.dtype)
    arr[...] = data


def _write_zarr_group0(path: Path, data: np.ndarray) -> None:
    group = zarr.open_group(str(path), mode="w")
    group.create_array("0", shape=data.shape, chunks=(16,) * data.ndim, dtype=data.dtype)[...] = data


def _write_ome_zarr(path: Path, data: np.ndarray, axes: list[str], version: str) -> None:
    group = zarr.open_group(str(path), mode="w")
    group.create_array("s0", shape=data.shape, chunks=data.shape, dtype=data.dtype)[...] = data
    kinds = {"c": "channel", "t": "time", "z": "space", "y": "space", "x": "space"}
    multiscales = [{"axes": [{"name": a, "type": kinds[a]} for a in axes], "datasets": [{"path": "s0"}]}]
    if version == "0.5":
        group.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}
    else:
        group.attrs["multiscales"] = multiscales


WRITERS = {
    "tif": lambda p, a: tifffile.imwrite(p, a),
    "tiled.tif": lambda p, a: tifffile.imwrite(p, a, tile=(16, 16), compression="zlib"),
    "png": lambda p, a: Image.fromarray(a).save(p),
    "npy": lambda p, a: np.save(p, a),
    "zarr": _write_zarr_array,
    "group.zarr": _write_zarr_group0,
}


@pytest.mark.parametrize(
    ("suffix", "shape", "dtype", "layout"),
    [
        ("tif", (40, 50), "uint16", "yx"),
        ("tiled.tif", (40, 50), "float32", "yx"),
        ("tif", (40, 50, 3), "uint8", "yxc"),
        ("tif", (2, 40, 50), "int16", "cyx"),
        ("png", (40, 50), "uint8", "yx"),
        ("png", (40, 50), "uint16", "yx"),
        ("png", (40, 50, 3), "uint8", "yxc"),
        ("png", (40, 50, 4), "uint8", "yxc"),
        ("npy", (40, 50), "float32", "yx"),
        ("npy", (40, 50, 5), "uint16", "yxc"),
        ("npy", (6, 40, 50), "uint8", "cyx"),
        ("zarr", (40, 50), "uint16", "yx"),
        ("zarr", (3, 40, 50), "uint8", "cyx"),
        ("group.zarr", (40, 50, 2), "float32", "yxc"),
    ],
)
def test_region_read_round_trips(tmp_path: Path, suffix: str, shape: tuple, dtype: str, layout: str) -> None:
    data = ramp(shape, dtype)
    path = tmp_path / f"img.{suffix}"
    WRITERS[suffix](path, data)
    source = open_image(path)
    expected = yxc(data, layout)
    assert source.shape_yxc == expected.shape
    assert source.dtype == np.dtype(dtype)
    region = source.read(YS, XS)
    assert region.shape == (16, 27, expected.shape[2]) and region.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(region, expected[YS, XS])


def test_jpeg_round_trips_against_pillow(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpeg"
    Image.fromarray(ramp((40, 50, 3))).save(path, quality=95)
    source = open_image(path)
    assert source.shape_yxc == (40, 50, 3)
    np.testing.assert_array_equal(source.read(YS, XS), np.asarray(Image.open(path))[YS, XS])


@pytest.mark.parametrize(
    ("version", "axes", "shape"),
    [("0.5", "cyx", (2, 40, 50)), ("0.4", "tczyx", (1, 3, 1, 40, 50)), ("0.5", "yx", (40, 50))],
)
def test_ome_zarr_axes_come_from_metadata(tmp_path: Path, version: str, axes: str, shape: tuple) -> None:
    data = ramp(shape, "uint16")
    _write_ome_zarr(tmp_path / "img.ome.zarr", data, list(axes), version)
    source = open_image(tmp_path / "img.ome.zarr")
    canonical = data.reshape((-1, 40, 50) if "c" in axes else (40, 50))
    expected = yxc(canonical, "cyx" if "c" in axes else "yx")
    assert source.shape_yxc == expected.shape
    np.testing.assert_array_equal(source.read(YS, XS), expected[YS, XS])


def test_ome_zarr_with_a_z_stack_is_refused_as_a_2d_image(tmp_path: Path) -> None:
    """Volumes (issue 12): ``auto`` reads the z-stack as a volume; a 2-D layout asked for is refused."""
    _write_ome_zarr(tmp_path / "stack.ome.zarr", ramp((4, 40, 50)), ["z", "y", "x"], "0.5")
    with pytest.raises(InputError, match=r"stack\.ome\.zarr.*axis 'z' has 4"):
        open_image(tmp_path / "stack.ome.zarr", channel_axis="cyx")
    assert open_image(tmp_path / "stack.ome.zarr").spatial_shape == (4, 40, 50)


def test_tiff_pyramid_uses_full_resolution(tmp_path: Path) -> None:
    data = ramp((128, 96))
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(data, tile=(32, 32), subifds=1)
        tif.write(data[::2, ::2], tile=(32, 32), subfiletype=1)
    source = open_image(path)
    assert source.shape_yxc == (128, 96, 1)
    np.testing.assert_array_equal(source.read(YS, XS)[..., 0], data[YS, XS])


def test_tiled_tiff_region_read_touches_only_its_tiles(tmp_path: Path) -> None:
    """Corrupt every tile but the four under the region: the region still reads, the whole image cannot."""
    size, tile = 4096, 256
    yy, xx = np.mgrid[:size, :size]
    data = ((yy * 7 + xx * 3) % 256).astype(np.uint8)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, data, tile=(tile, tile), compression="zlib")
    ys, xs = slice(1000, 1064), slice(2000, 2064)  # tiles rows 3-4, cols 7-8
    keep = {(r, c) for r in (3, 4) for c in (7, 8)}
    with tifffile.TiffFile(path) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    per_row = size // tile
    with open(path, "r+b") as fh:
        for i, (offset, count) in enumerate(zip(offsets, counts)):
            if divmod(i, per_row) not in keep:
                fh.seek(offset)
                fh.write(b"\xff" * count)

    source = open_image(path)
    np.testing.assert_array_equal(source.read(ys, xs)[..., 0], data[ys, xs])
    with pytest.raises(InputError, match=r"big\.tif.*cannot read region"):
        source.read(slice(0, size), slice(0, size))


def test_source_pickles_without_its_handle_and_reads_after(tmp_path: Path) -> None:
    data = ramp((64, 64))
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, data, tile=(16, 16))
    source = open_image(path)
    source.read(YS, XS)  # opens the (unpicklable) Zarr store
    clone = pickle.loads(pickle.dumps(source))
    assert clone._handle is None and clone == source
    np.testing.assert_array_equal(clone.read(YS, XS)[..., 0], data[YS, XS])
    source.close()


def test_source_indexes_like_an_array(tmp_path: Path) -> None:
    data = ramp((30, 40, 3))
    np.save(tmp_path / "img.npy", data)
    source = open_image(tmp_path / "img.npy")
    assert source.shape == (30, 40, 3) and source.ndim == 3
    np.testing.assert_array_equal(source[2:9:3, -5:], data[2:9:3, -5:])
    np.testing.assert_array_equal(source[4, 1:3, 2], data[4, 1:3, 2])
    np.testing.assert_array_equal(np.asarray(source), data)


# --- channel layouts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "channel_axis", "expected"),
    [
        ((20, 30), "auto", (20, 30, 1)),
        ((20, 30, 3), "auto", (20, 30, 3)),
        ((20, 30, 4), "auto", (20, 30, 4)),
        ((20, 30, 7), "auto", (20, 30, 7)),
        ((7, 20, 30), "auto", (20, 30, 7)),
        ((1, 20, 30), "auto", (20, 30, 1)),
        ((1, 1, 20, 30), "auto", (20, 30, 1)),  # leading singletons carry nothing
        ((20, 30, 12), "yxc", (20, 30, 12)),
        ((12, 20, 30), "cyx", (20, 30, 12)),
        ((20, 30), "yxc", (20, 30, 1)),
        ((20, 30), "yx", (20, 30, 1)),
    ],
)
def test_channel_layouts(tmp_path: Path, shape: tuple, channel_axis: str, expected: tuple) -> None:
    data = ramp(shape)
    np.save(tmp_path / "img.npy", data)
    source = open_image(tmp_path / "img.npy", channel_axis=channel_axis)  # type: ignore[arg-type]
    assert source.shape_yxc == expected
    canonical = data.reshape(data.shape[-3:]) if data.ndim == 4 else data
    layout = "yx" if canonical.ndim == 2 else ("cyx" if source.storage.axes.replace("1", "")[0] == "C" else "yxc")
    np.testing.assert_array_equal(source.read(slice(None), slice(None)), yxc(canonical, layout))


@pytest.mark.parametrize(
    ("shape", "channel_axis", "reason"),
    [
        ((20, 30, 12), "auto", "cannot tell which axis holds channels"),
        ((20, 30, 3), "yx", "needs a 2-D image"),
        ((70, 20, 30), "cyx", "more than 64"),
        ((2, 3, 20, 30), "auto", "more than three axes"),
        ((50,), "auto", "fewer than two axes"),
    ],
)
def test_bad_layouts_are_refused(tmp_path: Path, shape: tuple, channel_axis: str, reason: str) -> None:
    np.save(tmp_path / "odd.npy", ramp(shape))
    with pytest.raises(InputError, match=rf"odd\.npy.*{reason}"):
        open_image(tmp_path / "odd.npy", channel_axis=channel_axis)  # type: ignore[arg-type]


# --- bad inputs ---------------------------------------------------------------------------------------------


def _truncated_tiff(path: Path) -> None:
    tifffile.imwrite(path, ramp((256, 256)), tile=(64, 64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _huge_tiff(path: Path) -> None:
    """A 256-pixel-square tiled TIFF whose tags are then edited to declare 300000 x 300000 pixels."""
    tifffile.imwrite(path, np.zeros((256, 256), np.uint8), tile=(256, 256))
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(300_000)
        tif.pages[0].tags["ImageLength"].overwrite(300_000)


def _huge_npy(path: Path) -> None:
    """Only a .npy header, declaring 300000 x 300000 uint8 (90 GB): the data is never written."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": (300_000, 300_000)})


def _huge_png(path: Path) -> None:
    """A tiny PNG whose IHDR (with a fixed CRC) declares 100000 x 100000 pixels."""
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", 100_000, 100_000)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))


def _truncated_npy(path: Path) -> None:
    np.save(path, ramp((64, 64)))
    path.write_bytes(path.read_bytes()[:-100])


def _truncated_png(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-600])


BAD_FILES = {
    "missing.tif": (None, "does not exist"),
    "image.bmp": (lambda p: p.write_bytes(b"BM" + bytes(100)), r"unsupported file type '\.bmp'.*\.tif"),
    "truncated.tif": (_truncated_tiff, "truncated|not a readable TIFF"),
    "text.png": (lambda p: p.write_text("hello, not an image"), "not a readable PNG/JPEG"),
    "text.tif": (lambda p: p.write_text("hello, not an image"), "not a readable TIFF"),
    "text.npy": (lambda p: p.write_text("hello, not an array"), r"not a valid \.npy"),
    "text.zarr": (lambda p: p.mkdir(), "not a readable Zarr store"),
    "truncated.npy": (_truncated_npy, "truncated"),
    "truncated.png": (_truncated_png, "not a readable PNG/JPEG"),
    "empty.npy": (lambda p: np.save(p, np.zeros((0, 10), np.uint8)), "empty"),
    "huge.npy": (_huge_npy, "pixels, more than max_pixels"),
    "huge.tif": (_huge_tiff, "pixels, more than max_pixels"),
    "huge.png": (_huge_png, "more pixels than max_pixels"),
    "complex.npy": (lambda p: np.save(p, np.zeros((8, 8), np.complex64)), "unsupported image dtype complex64"),
    "double.npy": (lambda p: np.save(p, np.zeros((8, 8), np.float64)), "unsupported image dtype float64"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_raise_input_error_naming_the_file(tmp_path: Path, name: str) -> None:
    make, reason = BAD_FILES[name]
    path = tmp_path / name
    if make is not None:
        make(path)
    max_pixels = 10**9 if name.startswith("huge") else readers.DEFAULT_MAX_PIXELS
    with pytest.raises(InputError) as info:
        open_image(path, max_pixels=max_pixels)
    message = str(info.value)
    assert name in message and "\n" not in message
    assert info.value.path == str(path)
    assert re.search(reason, message), message


def test_max_pixels_applies_to_ordinary_files(tmp_path: Path) -> None:
    np.save(tmp_path / "img.npy", ramp((100, 100)))
    assert open_image(tmp_path / "img.npy", max_pixels=10_000).shape_yxc == (100, 100, 1)
    with pytest.raises(InputError, match="10,000 pixels"):
        open_image(tmp_path / "img.npy", max_pixels=9_999)


def test_pillow_global_limit_is_restored(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    Image.fromarray(ramp((8, 8))).save(tmp_path / "a.png")
    assert open_image(tmp_path / "a.png", max_pixels=64).shape_yxc == (8, 8, 1)
    assert Image.MAX_IMAGE_PIXELS == before
    with pytest.raises(InputError, match="a.png.*max_pixels"):
        open_image(tmp_path / "a.png", max_pixels=10)
    assert Image.MAX_IMAGE_PIXELS == before


def test_check_finite(tmp_path: Path) -> None:
    clean = np.ones((40, 30), np.float32)
    np.save(tmp_path / "clean.npy", clean)
    check_finite(open_image(tmp_path / "clean.npy"))
    for bad in (np.nan, np.inf):
        dirty = clean.copy()
        dirty[33, 7] = bad
        np.save(tmp_path / "dirty.npy", dirty)
        with pytest.raises(InputError, match=r"dirty\.npy.*NaN or Inf.*row 33"):
            check_finite(open_image(tmp_path / "dirty.npy"))


# --- masks --------------------------------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> ImageSource:
    np.save(tmp_path / "cells.npy", ramp((40, 50)))
    return open_image(tmp_path / "cells.npy")


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_mask_with_other_shape_names_both(tmp_path: Path, image: ImageSource) -> None:
    path = _png(tmp_path / "cells_mask.png", np.zeros((40, 49), np.uint8))
    expected = r"cells_mask\.png: mask shape 40x49 does not match image cells\.npy shape 40x50"
    with pytest.raises(InputError, match=expected):
        open_mask(path, image, num_classes=1)


@pytest.mark.parametrize(("num_classes", "ok"), [(1, False), (2, False), (3, False), (4, True)])
def test_mask_values_must_be_below_the_class_count(tmp_path: Path, image: ImageSource, num_classes: int,
                                                   ok: bool) -> None:
    labels = np.zeros((40, 50), np.uint8)
    labels[30:, :] = 3
    path = _png(tmp_path / "labels.png", labels)
    if ok:
        mask = open_mask(path, image, num_classes)
        np.testing.assert_array_equal(mask.read(slice(None), slice(None))[..., 0], labels)
    else:
        with pytest.raises(InputError, match=rf"labels\.png: mask values 3 outside \[0, {max(2, num_classes)}\)"):
            open_mask(path, image, num_classes)


def test_mask_0_255_is_read_as_binary(tmp_path: Path, image: ImageSource) -> None:
    binary = np.zeros((40, 50), np.uint8)
    binary[10:20, 5:25] = 255
    mask = open_mask(_png(tmp_path / "m.png", binary), image, num_classes=1)
    assert mask.map_255 and mask.dtype == np.uint8 and mask.shape_yxc == (40, 50, 1)
    np.testing.assert_array_equal(mask.read(slice(None), slice(None))[..., 0], binary // 255)
    clone = pickle.loads(pickle.dumps(mask))
    np.testing.assert_array_equal(clone.read(YS, XS), mask.read(YS, XS))


def test_mask_mixing_1_and_255_is_refused(tmp_path: Path, image: ImageSource) -> None:
    mixed = np.zeros((40, 50), np.uint8)
    mixed[0, 0], mixed[1, 1] = 1, 255
    with pytest.raises(InputError, match=r"mixed\.png.*mixes values 1 and 255"):
        open_mask(_png(tmp_path / "mixed.png", mixed), image, num_classes=2)


def test_255_is_out_of_range_for_multiclass(tmp_path: Path, image: ImageSource) -> None:
    with pytest.raises(InputError, match="255 outside"):
        open_mask(_png(tmp_path / "m.png", np.full((40, 50), 255, np.uint8)), image, num_classes=3)


def test_float_masks(tmp_path: Path, image: ImageSource) -> None:
    whole = np.zeros((40, 50), np.float64)
    whole[5:9] = 2.0
    np.save(tmp_path / "whole.npy", whole)
    mask = open_mask(tmp_path / "whole.npy", image, num_classes=3)
    np.testing.assert_array_equal(mask.read(slice(None), slice(None))[..., 0], whole.astype(np.uint8))
    half = whole.copy()
    half[39, 49] = 0.5
    np.save(tmp_path / "half.npy", half)
    with pytest.raises(InputError, match=r"half\.npy.*non-integer values \(e\.g\. 0\.5\)"):
        open_mask(tmp_path / "half.npy", image, num_classes=3)


@pytest.mark.parametrize("dtype", ["bool", "int32", "uint32", "int64", "uint16"])
def test_integer_and_bool_masks(tmp_path: Path, image: ImageSource, dtype: str) -> None:
    labels = (ramp((40, 50)) % 2).astype(dtype)
    np.save(tmp_path / "m.npy", labels)
    mask = open_mask(tmp_path / "m.npy", image, num_classes=1)
    np.testing.assert_array_equal(mask.read(YS, XS)[..., 0], labels[YS, XS].astype(np.uint8))


def test_rgb_mask_with_equal_channels_is_reduced(tmp_path: Path, image: ImageSource) -> None:
    grey = (ramp((40, 50)) % 3).astype(np.uint8)
    mask = open_mask(_png(tmp_path / "rgb.png", np.stack([grey] * 3, -1)), image, num_classes=3)
    assert mask.shape_yxc == (40, 50, 1)
    np.testing.assert_array_equal(mask.read(YS, XS)[..., 0], grey[YS, XS])
    colour = np.stack([grey, grey, 2 - grey], -1)
    with pytest.raises(InputError, match=r"colour\.png.*channels that differ"):
        open_mask(_png(tmp_path / "colour.png", colour), image, num_classes=3)


def test_negative_mask_values_are_refused(tmp_path: Path, image: ImageSource) -> None:
    np.save(tmp_path / "neg.npy", np.full((40, 50), -1, np.int32))
    with pytest.raises(InputError, match=r"neg\.npy: mask values -1 outside"):
        open_mask(tmp_path / "neg.npy", image, num_classes=2)


def test_mask_is_checked_band_by_band(tmp_path: Path, image: ImageSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """The value check never reads the whole mask at once, and still finds a bad value in the last band."""
    labels = np.zeros((40, 50), np.uint8)
    labels[39, 49] = 7
    np.save(tmp_path / "m.npy", labels)
    heights: list[int] = []
    original = ImageSource.read_stored

    def spy(self: ImageSource, ys: slice, xs: slice) -> np.ndarray:
        out = original(self, ys, xs)
        heights.append(out.shape[0])
        return out

    monkeypatch.setattr(readers, "BAND_PIXELS", 500)  # 10 rows of 50
    monkeypatch.setattr(ImageSource, "read_stored", spy)
    with pytest.raises(InputError, match="values 7 outside"):
        open_mask(tmp_path / "m.npy", image, num_classes=2)
    assert heights == [10, 10, 10, 10]


def test_iter_row_bands_cover_the_image_once(image: ImageSource) -> None:
    bands = list(iter_row_bands(image, band_pixels=7 * 50))
    assert [(ys.start, ys.stop) for ys, _ in bands] == [(0, 7), (7, 14), (14, 21), (21, 28), (28, 35), (35, 40)]
    np.testing.assert_array_equal(np.concatenate([b for _, b in bands]), np.asarray(image))


# --- folders ------------------------------------------------------------------------------------------------


def test_list_images_sorted_supported_not_hidden(tmp_path: Path) -> None:
    for name in ["b.png", "a.TIF", "c.npy", ".hidden.png", "notes.txt", "d.jpeg"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "e.ome.zarr").mkdir()
    (tmp_path / "sub").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.TIF", "b.png", "c.npy", "d.jpeg", "e.ome.zarr"]


def test_list_images_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nowhere: folder does not exist"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("")
    with pytest.raises(InputError, match=r"empty: no supported images found"):
        list_images(tmp_path / "empty")


def test_find_mask_by_stem(tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ["a.png", "b_mask.tif", "c.png", "c_mask.png", "d.ome.tiff", ".e.png", "f.txt"]:
        (masks / name).write_bytes(b"")
    assert find_mask(masks, tmp_path / "images" / "a.tif") == masks / "a.png"
    assert find_mask(masks, Path("b.png")) == masks / "b_mask.tif"
    assert find_mask(masks, Path("c.jpg")) == masks / "c.png"  # the exact stem wins over _mask
    assert find_mask(masks, Path("d.ome.tif")) == masks / "d.ome.tiff"
    assert find_mask(masks, Path("e.png")) is None
    assert find_mask(masks, Path("f.png")) is None
    (masks / "a.npy").write_bytes(b"")
    with pytest.raises(InputError, match="several masks match a.tif"):
        find_mask(masks, Path("a.tif"))
    with pytest.raises(InputError, match="does not exist"):
        find_mask(tmp_path / "nope", Path("a.tif"))


def test_find_mask_in_a_shared_folder_skips_the_image_itself(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"image")
    assert find_mask(tmp_path, tmp_path / "a.png") is None
    (tmp_path / "a_mask.png").write_bytes(b"mask")
    assert find_mask(tmp_path, tmp_path / "a.png") == tmp_path / "a_mask.png"


def test_supported_suffixes() -> None:
    assert SUPPORTED_SUFFIXES == (".tif", ".tiff", ".svs", ".png", ".jpg", ".jpeg", ".npy", ".zarr")


# --- decode units, raw pixels, streamed mask checks ---------------------------------------------------------


@pytest.mark.parametrize(
    ("writer", "chunks"),
    [
        (lambda p, a: tifffile.imwrite(p, a, tile=(32, 48), compression="zlib"), (32, 48)),
        (lambda p, a: tifffile.imwrite(p, a, rowsperstrip=10, compression="zlib"), (10, 130)),
        (lambda p, a: tifffile.imwrite(p, a), (1, 1)),  # uncompressed: memory-mapped, any region is cheap
        (lambda p, a: np.save(p.with_suffix(".npy"), a), (1, 1)),
        (lambda p, a: _write_zarr_array(p.with_suffix(".zarr"), a), (16, 16)),
    ],
)
def test_chunks_yx_is_the_decode_unit(tmp_path: Path, writer: object, chunks: tuple[int, int]) -> None:
    data = ramp((90, 130), "uint16")
    writer(tmp_path / "img.tif", data)  # type: ignore[operator]
    [path] = list(tmp_path.iterdir())
    source = open_image(path)
    assert source.chunks_yx == chunks
    np.testing.assert_array_equal(source.read(YS, XS)[..., 0], data[YS, XS])


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize(("shape", "kwargs"), [((60, 70), {}), ((60, 70, 3), {"photometric": "rgb"}),
                                                ((3, 60, 70), {"photometric": "rgb", "planarconfig": "separate"})])
def test_uncompressed_tiff_is_memory_mapped_not_decoded_whole(tmp_path: Path, byteorder: str, shape: tuple,
                                                              kwargs: dict) -> None:
    """An uncompressed TIFF is one strip (tifffile's Zarr chunk = whole image): it is read by memory map."""
    data = ramp(shape, "uint16")
    tifffile.imwrite(tmp_path / "raw.tif", data, byteorder=byteorder, **kwargs)
    source = open_image(tmp_path / "raw.tif")
    assert source.storage.raw is not None and source.dtype == np.dtype("uint16")
    expected = yxc(data, "cyx" if shape[0] == 3 else ("yxc" if len(shape) == 3 else "yx"))
    np.testing.assert_array_equal(source.read(YS, XS), expected[YS, XS])
    assert source.read(YS, XS).dtype.isnative


def test_fortran_order_npy_reads_like_c_order(tmp_path: Path) -> None:
    data = ramp((40, 50, 3))
    np.save(tmp_path / "f.npy", np.asfortranarray(data))
    np.testing.assert_array_equal(open_image(tmp_path / "f.npy").read(YS, XS), data[YS, XS])


def test_mask_opened_without_scan_is_checked_while_read(tmp_path: Path, image: ImageSource) -> None:
    labels = np.zeros((40, 50), np.uint8)
    labels[30:, 10:20] = 255
    mask = open_mask(_png(tmp_path / "m.png", labels), image, num_classes=1, scan=False)
    assert mask.classes is None
    top, seen_top = mask.read_checked(slice(0, 20), slice(0, 50))
    bottom, seen_bottom = mask.read_checked(slice(20, 40), slice(0, 50))
    assert (seen_top, seen_bottom) == ({0}, {0, 255})
    np.testing.assert_array_equal(np.concatenate([top, bottom])[..., 0], labels // 255)
    assert mask.check_seen(seen_top | seen_bottom) == {0, 1}
    with pytest.raises(InputError, match=r"m\.png.*mixes values 1 and 255"):
        mask.check_seen({0, 1, 255})
    labels[35, 5] = 9
    bad = open_mask(_png(tmp_path / "bad.png", labels), image, num_classes=3, scan=False)  # header is fine
    bad.read_checked(slice(0, 20), slice(0, 50))  # the top is fine too
    with pytest.raises(InputError, match=r"bad\.png: mask values 9, 255 outside \[0, 3\)"):
        bad.read_checked(slice(20, 40), slice(0, 50))


def test_scanned_mask_knows_its_classes(tmp_path: Path, image: ImageSource) -> None:
    labels = (ramp((40, 50)) % 3).astype(np.uint8)
    assert open_mask(_png(tmp_path / "m.png", labels), image, num_classes=3).classes == {0, 1, 2}
    binary = np.where(labels == 1, 255, 0).astype(np.uint8)
    assert open_mask(_png(tmp_path / "b.png", binary), image, num_classes=1).classes == {0, 1}
