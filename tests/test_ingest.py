"""Ingestion: stores equal their sources at every level, statistics are exact, the manifest is incremental and
atomic, bad files are reported one line each while good ones still ingest."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image
from typer.testing import CliRunner

from app.cli import app
from unetcore import ingest
from unetcore.config import IngestConfig
from unetcore.errors import InputError
from unetcore.ingest import ingest_folder
from unetcore.io.readers import ImageSource, MaskSource
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.store import stats as stats_module
from unetcore.store.stats import StreamingStats

ROOT = Path(__file__).resolve().parents[1]


def ramp(shape: tuple[int, ...], dtype: str = "uint8", seed: int = 0) -> np.ndarray:
    """Noisy ramps: every region distinct, rounding cases of the 2x2 mean all present."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    if info is None:
        return rng.normal(100.0, 30.0, shape).astype(dtype)
    return rng.integers(int(info.min), int(info.max) + 1, shape, dtype=dtype)


def cfg(images: Path, output: Path, **kw: object) -> IngestConfig:
    return IngestConfig(images=str(images), output=str(output), chunk_size=kw.pop("chunk_size", 64), **kw)


def level(dataset: Path, entry_id: str, n: int = 0, labels: bool = False) -> np.ndarray:
    root = omezarr.open_root(mf.store_path(dataset, entry_id))
    return np.asarray(omezarr.label_array(root, "mask", n) if labels else omezarr.image_array(root, n))


def leftovers(dataset: Path) -> list[str]:
    return sorted(p.name for p in dataset.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- stores, levels, statistics -----------------------------------------------------------------------------


def test_levels_equal_the_store_pyramid_of_the_source(tmp_path: Path) -> None:
    """Odd sizes, leaves cut through the edges: level 0 is the source, levels 1.. equal the store's own pyramid."""
    data = ramp((1100, 2100))
    labels = (ramp((1100, 2100), seed=1) % 3).astype(np.uint8)
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    tifffile.imwrite(tmp_path / "img" / "a.tif", data, tile=(96, 80), compression="zlib")
    np.save(tmp_path / "msk" / "a.npy", labels)
    ds = tmp_path / "ds"
    report = ingest_folder(cfg(tmp_path / "img", ds, masks=str(tmp_path / "msk"), num_classes=3, chunk_size=128))
    assert report.added == ["a"] and report.status == "ok"

    reference = omezarr.create_image(tmp_path / "ref.zarr", (1, 1100, 2100), np.uint8, 128)
    reference["0"][:] = data[None]
    omezarr.build_pyramid(reference, "image")
    ref_labels = omezarr.create_labels(reference, "mask", (1100, 2100), np.uint8, 128)
    ref_labels["0"][:] = labels
    omezarr.build_pyramid(ref_labels, "label")
    assert omezarr.n_levels_for((1100, 2100)) == 3
    for n in range(3):
        np.testing.assert_array_equal(level(ds, "a", n), reference[str(n)][:])
        np.testing.assert_array_equal(level(ds, "a", n, labels=True), ref_labels[str(n)][:])
    entry = mf.load(ds)["images"]["a"]
    assert entry["classes"] == [0, 1, 2] and entry["has_mask"] and entry["shape"] == [1100, 2100]


@pytest.mark.parametrize(("dtype", "channels"), [("uint8", 1), ("uint8", 3), ("uint16", 2), ("int16", 1),
                                                 ("float32", 1)])
def test_leaf_stats_merged_in_order_equal_streaming_stats(dtype: str, channels: int) -> None:
    data = ramp((300, 500, channels), dtype)
    whole = StreamingStats(channels, np.dtype(dtype))
    whole.update(data)
    merged = StreamingStats(channels, np.dtype(dtype), 300 * 500)
    for ys in (slice(0, 128), slice(128, 256), slice(256, 300)):
        for xs in (slice(0, 256), slice(256, 500)):
            part = StreamingStats(channels, np.dtype(dtype), 300 * 500)
            part.update(data[ys, xs])
            merged.merge(part)
    got, want = merged.result(), whole.result()
    assert got["pixels"] == want["pixels"] == 300 * 500
    for g, w, c in zip(got["channels"], want["channels"], range(channels)):
        assert g["percentiles"] == w["percentiles"]  # exact histogram (ints) / every pixel sampled (small float)
        assert g["mean"] == pytest.approx(float(data[..., c].astype(np.float64).mean()), rel=1e-12)
        assert g["std"] == pytest.approx(float(data[..., c].astype(np.float64).std()), rel=1e-9)


def test_float_sample_stays_bounded_however_many_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats_module, "FLOAT_SAMPLE", 1000)
    stats = StreamingStats(1, np.dtype("float32"), 100 * 100)
    for _ in range(100):  # 100 leaves of 10 x 10
        stats.update(np.ones((10, 10, 1), np.float32))
    assert sum(s.shape[0] for s in stats._samples) == 1000


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
@pytest.mark.parametrize("shape", [(1, 8, 10), (3, 33, 63), (2, 7, 1)])
def test_halve_is_the_rounded_2x2_mean(dtype: str, shape: tuple[int, ...]) -> None:
    block = ramp(shape, dtype)
    h, w = shape[1] // 2, shape[2] // 2
    mean = block[:, : 2 * h, : 2 * w].astype(np.float64).reshape(shape[0], h, 2, w, 2).mean(axis=(2, 4))
    got = omezarr.halve(block, "image")
    assert got.dtype == np.dtype(dtype)
    if np.dtype(dtype).kind in "ui":  # integers: exact, rounded half to even
        np.testing.assert_array_equal(got, np.round(mean).astype(dtype))
    else:
        np.testing.assert_allclose(got, mean, rtol=1e-6)


@pytest.mark.parametrize(
    ("decode_unit", "leaf", "count"),
    [
        ((1, 1), (128, 128), 3 * 8),  # memory map or decoded PNG: 2 x chunk squares
        ((32, 32), (128, 128), 3 * 8),  # small tiles
        ((16, 1000), (128, 1000), 3),  # strips as wide as the image: full-width bands
        ((200, 200), (256, 256), 2 * 4),  # big chunks: whole ones per leaf, never decoded twice
    ],
)
def test_leaves_cover_whole_chunks_and_decode_units(decode_unit: tuple[int, int], leaf: tuple[int, int],
                                                    count: int) -> None:
    leaves = ingest.chunk_leaves((300, 1000), 64, decode_unit)
    assert len(leaves) == count
    assert (leaves[0][0].stop, leaves[0][1].stop) == leaf
    covered = np.zeros((300, 1000), np.int64)
    for ys, xs in leaves:
        covered[ys, xs] += 1
        assert ys.start % 128 == 0 and xs.start % 128 == 0
    assert (covered == 1).all()


def test_threads_shrink_when_leaves_are_huge() -> None:
    assert ingest.thread_count(4, 10 << 20) == 4
    assert ingest.thread_count(4, 200 << 20) == 1


def test_result_does_not_depend_on_the_thread_count(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    tifffile.imwrite(tmp_path / "img" / "a.tif", ramp((700, 900, 3), "uint16"), tile=(64, 64), photometric="rgb")
    entries = []
    for threads in (1, 3):
        ds = tmp_path / f"ds{threads}"
        ingest_folder(cfg(tmp_path / "img", ds, threads=threads))
        entries.append(mf.load(ds)["images"]["a"])
        np.testing.assert_array_equal(level(ds, "a"), np.moveaxis(tifffile.imread(tmp_path / "img" / "a.tif"), -1, 0))
    assert entries[0]["stats"] == entries[1]["stats"]


def test_stores_follow_ome_zarr_05_and_chunks_are_at_least_1_mb(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    np.save(tmp_path / "img" / "a.npy", ramp((2500, 1300)))
    ds = tmp_path / "ds"
    ingest_folder(IngestConfig(images=str(tmp_path / "img"), output=str(ds)))  # default chunk size
    root = zarr.open_group(str(mf.store_path(ds, "a")), mode="r")
    ome = root.attrs["ome"]
    assert ome["version"] == "0.5"
    multiscale = ome["multiscales"][0]
    assert [a["name"] for a in multiscale["axes"]] == ["c", "y", "x"]
    assert [d["coordinateTransformations"][0]["scale"] for d in multiscale["datasets"]] == [
        [1.0, 1.0, 1.0], [1.0, 2.0, 2.0], [1.0, 4.0, 4.0]]
    level0 = root["0"]
    assert level0.chunks == (1, 1024, 1024)
    assert np.prod(level0.chunks) * level0.dtype.itemsize >= 1 << 20
    assert level0.compressors and type(level0.compressors[0]).__name__ == "BloscCodec"
    assert root.attrs["unet"]["source_hash"] == mf.load(ds)["images"]["a"]["source_hash"]


# --- formats ------------------------------------------------------------------------------------------------


def _striped(path: Path, data: np.ndarray) -> None:
    tifffile.imwrite(path, data, rowsperstrip=7, compression="zlib")


def _single_strip(path: Path, data: np.ndarray) -> None:
    tifffile.imwrite(path, data)  # uncompressed: one strip holding the whole image


def _big_endian(path: Path, data: np.ndarray) -> None:
    tifffile.imwrite(path, data, byteorder=">")


def _ome_pyramid(path: Path, data: np.ndarray) -> None:
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(data, tile=(32, 32), subifds=2, metadata={"axes": "CYX"})
        tif.write(data[:, ::2, ::2], tile=(32, 32), subfiletype=1)
        tif.write(data[:, ::4, ::4], tile=(32, 32), subfiletype=1)


def _page_pyramid(path: Path, data: np.ndarray) -> None:
    with tifffile.TiffWriter(path) as tif:
        tif.write(data, tile=(32, 32))
        tif.write(data[::2, ::2], tile=(32, 32), subfiletype=1)


def _ome_zarr(path: Path, data: np.ndarray) -> None:
    root = omezarr.create_image(path, data.shape, data.dtype, 64)
    root["0"][:] = data
    omezarr.build_pyramid(root, "image")


FORMATS = {  # name -> (file name, writer, stored shape, dtype, canonical (C, H, W) from the stored array)
    "striped tiff": ("a.tif", _striped, (90, 130), "uint16", lambda d: d[None]),
    "single-strip tiff": ("a.tif", _single_strip, (90, 130, 3), "uint8", lambda d: np.moveaxis(d, -1, 0)),
    "big-endian tiff": ("a.tif", _big_endian, (90, 130), "int16", lambda d: d[None]),
    "ome-tiff pyramid": ("a.ome.tif", _ome_pyramid, (3, 90, 130), "uint16", lambda d: d),
    "page pyramid": ("a.tif", _page_pyramid, (90, 130), "float32", lambda d: d[None]),
    "png rgb": ("a.png", lambda p, d: Image.fromarray(d).save(p), (90, 130, 3), "uint8",
                lambda d: np.moveaxis(d, -1, 0)),
    "npy fortran": ("a.npy", lambda p, d: np.save(p, np.asfortranarray(d)), (90, 130, 5), "uint16",
                    lambda d: np.moveaxis(d, -1, 0)),
    "ome-zarr": ("a.ome.zarr", _ome_zarr, (2, 90, 130), "uint8", lambda d: d),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_ingests_to_its_pixels(tmp_path: Path, name: str) -> None:
    file_name, write, shape, dtype, canonical = FORMATS[name]
    data = ramp(shape, dtype)
    (tmp_path / "img").mkdir()
    write(tmp_path / "img" / file_name, data)
    ds = tmp_path / "ds"
    report = ingest_folder(cfg(tmp_path / "img", ds))
    assert report.added == ["a"], report.failed
    expected = canonical(data)
    np.testing.assert_array_equal(level(ds, "a"), expected)
    entry = mf.load(ds)["images"]["a"]
    assert (entry["channels"], entry["shape"], entry["dtype"]) == (expected.shape[0], list(expected.shape[1:]), dtype)


def test_an_ingested_dataset_can_be_ingested_again(tmp_path: Path) -> None:
    """An OME-Zarr written by ingest is itself a valid input (e.g. to re-chunk a dataset)."""
    (tmp_path / "img").mkdir()
    data = ramp((200, 300, 3))
    Image.fromarray(data).save(tmp_path / "img" / "a.png")
    ingest_folder(cfg(tmp_path / "img", tmp_path / "ds1"))
    ingest_folder(cfg(tmp_path / "ds1", tmp_path / "ds2", chunk_size=128))
    np.testing.assert_array_equal(level(tmp_path / "ds2", "a"), np.moveaxis(data, -1, 0))


def test_leaves_follow_tiles_and_strips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiled TIFF is read in 2x2-chunk leaves (memory independent of width); a striped one in full-width bands
    (a narrower read would decode every strip once per leaf)."""
    (tmp_path / "tiled").mkdir()
    (tmp_path / "striped").mkdir()
    tifffile.imwrite(tmp_path / "tiled" / "a.tif", ramp((300, 1000)), tile=(32, 32), compression="zlib")
    tifffile.imwrite(tmp_path / "striped" / "a.tif", ramp((300, 1000)), rowsperstrip=16, compression="zlib")
    regions: list[tuple[int, int]] = []
    original = ImageSource.read

    def spy(self: ImageSource, ys: slice, xs: slice) -> np.ndarray:
        out = original(self, ys, xs)
        regions.append(out.shape[:2])
        return out

    monkeypatch.setattr(ImageSource, "read", spy)
    ingest_folder(cfg(tmp_path / "tiled", tmp_path / "ds1"))
    assert max(h for h, _ in regions) == 128 and max(w for _, w in regions) == 128
    assert sum(h * w for h, w in regions) == 300 * 1000  # every pixel read once
    regions.clear()
    ingest_folder(cfg(tmp_path / "striped", tmp_path / "ds2"))
    assert {w for _, w in regions} == {1000} and sum(h for h, _ in regions) == 300


def test_the_mask_is_read_once_and_a_bad_one_fails_before_the_image_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    np.save(tmp_path / "img" / "a.npy", ramp((300, 200)))
    labels = np.zeros((300, 200), np.uint8)
    labels[100:200, 50:150] = 255
    np.save(tmp_path / "msk" / "a.npy", labels)
    reads = {"image": 0, "mask": 0}
    original = ImageSource.read_stored

    def spy(self: ImageSource, ys: slice, xs: slice) -> np.ndarray:
        out = original(self, ys, xs)
        reads["mask" if isinstance(self, MaskSource) else "image"] += out.shape[0] * out.shape[1]
        return out

    monkeypatch.setattr(ImageSource, "read_stored", spy)
    ingest_folder(cfg(tmp_path / "img", tmp_path / "ds", masks=str(tmp_path / "msk")))
    assert reads == {"image": 300 * 200, "mask": 300 * 200}
    np.testing.assert_array_equal(level(tmp_path / "ds", "a", labels=True), labels // 255)
    assert mf.load(tmp_path / "ds")["images"]["a"]["classes"] == [0, 1]

    labels[299, 199] = 7
    np.save(tmp_path / "msk" / "a.npy", labels)
    reads.update(image=0, mask=0)
    report = ingest_folder(cfg(tmp_path / "img", tmp_path / "ds", masks=str(tmp_path / "msk")))
    assert "values 7 outside" in report.failed[0]["error"] and reads["image"] == 0


# --- incremental manifest -----------------------------------------------------------------------------------


def _store_stamp(ds: Path, entry_id: str) -> int:
    return (mf.store_path(ds, entry_id) / "zarr.json").stat().st_mtime_ns


def test_incremental_ingestion(tmp_path: Path) -> None:
    images = tmp_path / "img"
    images.mkdir()
    for i, name in enumerate("abc"):
        np.save(images / f"{name}.npy", ramp((40, 50), seed=i))
    ds = tmp_path / "ds"
    first = ingest_folder(cfg(images, ds, val_fraction=0.3, test_fraction=0.3))
    assert first.added == ["a", "b", "c"] and first.status == "ok"
    manifest = mf.load(ds)["images"]
    for entry_id, entry in manifest.items():
        assert entry["source_hash"] == mf.file_hash(images / f"{entry_id}.npy")
        assert entry["split"] == mf.split_for(entry["source_hash"], 0.3, 0.3) or entry["split"] == "val"
    stamps = {i: _store_stamp(ds, i) for i in "abc"}

    again = ingest_folder(cfg(images, ds, val_fraction=0.3, test_fraction=0.3))
    assert (again.added, again.updated, again.skipped) == ([], [], ["a", "b", "c"])
    assert mf.load(ds)["images"] == manifest and {i: _store_stamp(ds, i) for i in "abc"} == stamps

    np.save(images / "d.npy", ramp((40, 50), seed=9))  # new
    np.save(images / "b.npy", ramp((40, 50), seed=10))  # changed content
    os.utime(images / "c.npy", ns=(1, 1))  # touched only: same bytes
    third = ingest_folder(cfg(images, ds, val_fraction=0.3, test_fraction=0.3))
    assert (third.added, third.updated, third.skipped) == (["d"], ["b"], ["a", "c"])
    after = mf.load(ds)["images"]
    assert after["a"] == manifest["a"] and after["c"] == manifest["c"]
    assert _store_stamp(ds, "a") == stamps["a"] and _store_stamp(ds, "c") == stamps["c"]
    assert after["b"]["split"] == manifest["b"]["split"]  # a changed image keeps its split
    np.testing.assert_array_equal(level(ds, "b")[0], ramp((40, 50), seed=10))

    forced = ingest_folder(cfg(images, ds, val_fraction=0.3, test_fraction=0.3, force=True))
    assert forced.updated == ["a", "b", "c", "d"] and not forced.skipped


def test_changed_options_and_new_masks_re_ingest(tmp_path: Path) -> None:
    images, masks = tmp_path / "img", tmp_path / "msk"
    images.mkdir()
    masks.mkdir()
    np.save(images / "a.npy", ramp((40, 50)))
    np.save(images / "b.npy", ramp((40, 50), seed=1))
    ds = tmp_path / "ds"
    ingest_folder(cfg(images, ds, masks=str(masks)))
    np.save(masks / "a.npy", np.ones((40, 50), np.uint8))
    report = ingest_folder(cfg(images, ds, masks=str(masks)))
    assert (report.updated, report.skipped) == (["a"], ["b"])
    assert mf.load(ds)["images"]["a"]["has_mask"]
    report = ingest_folder(cfg(images, ds, masks=str(masks), chunk_size=128))
    assert report.updated == ["a", "b"]


def test_a_store_replaced_behind_the_manifest_is_re_ingested(tmp_path: Path) -> None:
    """Killed between renaming a new store in and writing its entry: the entry no longer matches the store."""
    images = tmp_path / "img"
    images.mkdir()
    np.save(images / "a.npy", ramp((40, 50)))
    ds = tmp_path / "ds"
    ingest_folder(cfg(images, ds))
    omezarr.set_unet_attrs(omezarr.open_root(mf.store_path(ds, "a"), mode="r+"), {"source_hash": "other"})
    assert ingest_folder(cfg(images, ds)).updated == ["a"]


def test_two_files_with_one_id_are_reported(tmp_path: Path) -> None:
    images = tmp_path / "img"
    images.mkdir()
    np.save(images / "a.npy", ramp((40, 50)))
    Image.fromarray(ramp((40, 50))).save(images / "a.png")
    report = ingest_folder(cfg(images, tmp_path / "ds"))
    assert report.added == ["a"] and report.status == "partial"
    assert re.search(r"a\.png: same image id 'a' as a\.npy", report.failed[0]["error"])


def test_a_second_ingestion_of_one_dataset_is_refused(tmp_path: Path) -> None:
    images = tmp_path / "img"
    images.mkdir()
    np.save(images / "a.npy", ramp((40, 50)))
    ds = tmp_path / "ds"
    ds.mkdir()
    with open(ds / ingest.RUN_LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(InputError, match="another ingestion is writing to this dataset"):
            ingest_folder(cfg(images, ds))
    assert ingest_folder(cfg(images, ds)).added == ["a"]


# --- bad input ----------------------------------------------------------------------------------------------


def _truncated_tiff(folder: Path) -> None:
    tifffile.imwrite(folder / "bad.tif", ramp((256, 256)), tile=(64, 64))
    path = folder / "bad.tif"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_tiles(folder: Path) -> None:
    """Tags intact, deflate data garbled: fails while streaming, not at open."""
    path = folder / "bad.tif"
    tifffile.imwrite(path, ramp((256, 256)), tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[-1], tif.pages[0].databytecounts[-1]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * count)


def _bomb_tiff(folder: Path) -> None:
    tifffile.imwrite(folder / "bad.tif", np.zeros((256, 256), np.uint8), tile=(256, 256))
    with tifffile.TiffFile(folder / "bad.tif", mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(300_000)
        tif.pages[0].tags["ImageLength"].overwrite(300_000)


def _float_with(value: float) -> callable:
    def write(folder: Path) -> None:
        data = ramp((150, 100), "float32")
        data[149, 7] = value
        np.save(folder / "bad.npy", data)

    return write


def _mask(array: np.ndarray) -> callable:
    def write(folder: Path) -> None:
        np.save(folder / "bad.npy", ramp((40, 50)))
        np.save(folder.parent / "msk" / "bad.npy", array)

    return write


_OUTSIDE = np.zeros((40, 50), np.uint8)
_OUTSIDE[39, 49] = 5
_HALF = np.zeros((40, 50), np.float32)
_HALF[3, 3] = 0.5

BAD_INPUTS = {
    "truncated tiff": (_truncated_tiff, r"bad\.tif: (TIFF is truncated|not a readable TIFF)"),
    "corrupt tiles": (_corrupt_tiles, r"bad\.tif: cannot read region"),
    "text with an image extension": (lambda f: (f / "bad.png").write_text("not an image"),
                                     r"bad\.png: not a readable PNG/JPEG"),
    "empty file": (lambda f: (f / "bad.tif").write_bytes(b""), r"bad\.tif: not a readable TIFF"),
    "zero-sized image": (lambda f: np.save(f / "bad.npy", np.zeros((0, 50), np.uint8)), r"bad\.npy: image is empty"),
    "decompression bomb": (_bomb_tiff, r"bad\.tif: image has 300000x300000 .* more than max_pixels"),
    "NaN": (_float_with(np.nan), r"bad\.npy: image contains NaN or Inf values \(e\.g\. at row 149, column 7\)"),
    "Inf": (_float_with(np.inf), r"bad\.npy: image contains NaN or Inf"),
    "unsupported dtype": (lambda f: np.save(f / "bad.npy", np.zeros((8, 8), np.float64)),
                          r"bad\.npy: unsupported image dtype float64"),
    "too many channels": (lambda f: tifffile.imwrite(f / "bad.tif", np.zeros((16, 16, 70), np.uint8),
                                                     photometric="minisblack", planarconfig="contig"),
                          r"bad\.tif: image has 70 channels, more than 64"),
    "a volume": (lambda f: np.save(f / "bad.npy", np.zeros((2, 3, 8, 8), np.uint8)),
                 r"bad\.npy: array has more than three axes"),
    "mask of another shape": (_mask(np.zeros((40, 49), np.uint8)),
                              r"msk/bad\.npy: mask shape 40x49 does not match image bad\.npy shape 40x50"),
    "mask value outside the classes": (_mask(_OUTSIDE), r"msk/bad\.npy: mask values 5 outside \[0, 2\)"),
    "non-integer mask": (_mask(_HALF), r"msk/bad\.npy: float mask holds non-integer values \(e\.g\. 0\.5\)"),
    "mask with two channels": (_mask(np.zeros((40, 50, 2), np.uint8)), r"msk/bad\.npy: mask has 2 channels"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_a_bad_file_is_one_report_line_and_the_good_ones_still_ingest(tmp_path: Path, case: str) -> None:
    make, reason = BAD_INPUTS[case]
    images, masks = tmp_path / "img", tmp_path / "msk"
    images.mkdir()
    masks.mkdir()
    np.save(images / "good.npy", ramp((40, 50)))
    make(images)
    ds = tmp_path / "ds"
    report = ingest_folder(cfg(images, ds, masks=str(masks), max_pixels=10**9))
    assert report.status == "partial" and report.added == ["good"]
    [failure] = report.failed
    assert Path(failure["file"]).name.startswith("bad") and "\n" not in failure["error"]
    assert re.search(reason, failure["error"]), failure["error"]
    assert list(mf.load(ds)["images"]) == ["good"]
    assert not mf.store_path(ds, "bad").exists() and leftovers(ds) == []
    assert ingest.read_report(ds) == json.loads(json.dumps(report.to_dict()))


def test_cli_exits_3_on_a_partial_ingestion_and_names_the_file(tmp_path: Path) -> None:
    images = tmp_path / "img"
    images.mkdir()
    np.save(images / "good.npy", ramp((40, 50)))
    (images / "broken.tif").write_text("not a tiff")
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(images), "-o", str(tmp_path / "ds"), "--no-prefect"])
    assert result.exit_code == 3, result.output
    assert re.search(r"broken\.tif: not a readable TIFF", result.output)
    assert "ingest partial: 1 added" in result.output
    (images / "broken.tif").unlink()
    result = runner.invoke(app, ["ingest", str(images), "-o", str(tmp_path / "ds"), "--no-prefect"])
    assert result.exit_code == 0 and "ingest ok: 0 added, 0 updated, 1 unchanged" in result.output


# --- interruption and parallel ingestion --------------------------------------------------------------------

_KILLER = textwrap.dedent("""
    import os, signal, sys
    from unetcore import ingest
    from unetcore.config import IngestConfig
    from unetcore.store.stats import StreamingStats
    merges = []
    original = StreamingStats.merge
    def merge(self, other):
        original(self, other)
        merges.append(1)
        if len(merges) == int(sys.argv[3]):  # mid-way through the second image: no clean-up code runs
            os.kill(os.getpid(), signal.SIGKILL)
    StreamingStats.merge = merge
    ingest.ingest_folder(IngestConfig(images=sys.argv[1], output=sys.argv[2], chunk_size=64, threads=2))
""")


@pytest.mark.slow
def test_an_ingestion_killed_mid_image_leaves_no_complete_looking_entry_and_a_rerun_finishes(tmp_path: Path) -> None:
    images = tmp_path / "img"
    images.mkdir()
    np.save(images / "a.npy", ramp((100, 100)))  # one leaf: one merge
    data_b = ramp((700, 500), seed=1)  # 6 x 4 leaves of 128
    tifffile.imwrite(images / "b.tif", data_b, tile=(64, 64), compression="zlib")
    np.save(images / "c.npy", ramp((100, 100), seed=2))
    ds = tmp_path / "ds"
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(images), str(ds), "10"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    assert list(mf.load(ds)["images"]) == ["a"]
    assert not mf.store_path(ds, "b").exists() and not mf.store_path(ds, "c").exists()
    assert [name.split(".tmp-")[0] for name in leftovers(ds)] == [".b.ome.zarr"]

    report = ingest_folder(cfg(images, ds, threads=2))
    assert (report.added, report.skipped, report.status) == (["b", "c"], ["a"], "ok")
    assert [name.split(".tmp-")[0] for name in report.cleaned] == [".b.ome.zarr"] and leftovers(ds) == []
    manifest = mf.load(ds)["images"]
    assert sorted(manifest) == ["a", "b", "c"] and all(mf.store_path(ds, i).exists() for i in manifest)
    np.testing.assert_array_equal(level(ds, "b")[0], data_b)


@pytest.mark.slow
def test_images_on_dask_workers_give_the_same_dataset(tmp_path: Path) -> None:
    images = tmp_path / "img"
    images.mkdir()
    for i in range(3):
        np.save(images / f"im{i}.npy", ramp((120, 90, 3), "uint16", seed=i))
    (images / "zz_bad.png").write_text("not an image")
    serial = ingest_folder(cfg(images, tmp_path / "serial"))
    parallel = ingest_folder(cfg(images, tmp_path / "dask", n_workers=2))
    assert sorted(parallel.added) == serial.added == ["im0", "im1", "im2"]
    assert parallel.failed == serial.failed and parallel.status == "partial"
    assert mf.load(tmp_path / "dask")["images"] == mf.load(tmp_path / "serial")["images"]
    for i in range(3):
        np.testing.assert_array_equal(level(tmp_path / "dask", f"im{i}"), level(tmp_path / "serial", f"im{i}"))


def test_masks_matching_no_image_are_reported_and_exit_3(tmp_path: Path) -> None:
    """`mask_0.png` for `img_0.png`: ingestion says which images have no mask and which masks match no image."""
    from typer.testing import CliRunner

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 40), 50 * i, np.uint8)).save(tmp_path / "img" / f"img_{i}.png")
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "msk" / f"mask_{i}.png")
    report = ingest_folder(cfg(tmp_path / "img", tmp_path / "ds", masks=str(tmp_path / "msk")))
    assert report.status == "partial" and report.no_mask_matched
    assert sorted(report.without_mask) == ["img_0", "img_1"]
    assert sorted(Path(m).name for m in report.unmatched_masks) == ["mask_0.png", "mask_1.png"]

    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "img"), "-o", str(tmp_path / "ds2"),
                                      "--masks", str(tmp_path / "msk"), "--no-prefect"])
    assert result.exit_code == 3, result.output
    assert "2 image(s) have no mask" in result.output and "img_0" in result.output
    assert "2 mask file(s) match no image: mask_0.png, mask_1.png" in result.output


def test_files_of_another_type_are_listed_as_ignored(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "img" / "b.gif")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "img" / "c.bmp")
    (tmp_path / "img" / "x.png").mkdir()
    report = ingest_folder(cfg(tmp_path / "img", tmp_path / "ds"))
    assert report.added == ["a"]
    assert {Path(i["file"]).name: i["reason"] for i in report.ignored} == {
        "b.gif": "unsupported type '.gif'", "c.bmp": "unsupported type '.bmp'", "x.png": "a folder, not a file"}
    [line] = report.warnings()
    assert line.startswith("ignored 3 input(s) that are not images: b.gif, c.bmp, x.png")


def test_one_file_or_a_glob_can_be_ingested(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "img" / f"{name}.png")
    assert ingest_folder(cfg(tmp_path / "img" / "a.png", tmp_path / "one")).added == ["a"]
    assert sorted(ingest_folder(cfg(str(tmp_path / "img" / "*.png"), tmp_path / "glob")).added) == ["a", "b"]
