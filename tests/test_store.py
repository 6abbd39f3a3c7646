"""OME-Zarr layout, pyramids, atomic stores, manifest and streaming statistics."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from unetcore.config import NormalizationConfig
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.store.stats import (
    StreamingStats,
    clip_range,
    mixture_percentile,
    normalize,
    percentile,
    pooled_mean_std,
    scale_and_offset,
)


@pytest.mark.parametrize(("shape", "levels"), [((512, 512), 1), ((1024, 1000), 1), ((1025, 10), 2), ((5000, 3000), 4)])
def test_pyramid_levels_stop_at_1024(shape: tuple[int, int], levels: int) -> None:
    assert omezarr.n_levels_for(shape) == levels


def test_image_and_labels_pyramid_follow_ome_05(tmp_path: Path) -> None:
    img = np.arange(3 * 2100 * 1300, dtype=np.uint32).reshape(3, 2100, 1300) % 251
    root = omezarr.create_image(tmp_path / "a.ome.zarr", img.shape, np.uint8, 512)
    root["0"][:] = img.astype(np.uint8)
    labels = omezarr.create_labels(root, "mask", img.shape[1:], np.uint8, 512)
    lab = (np.indices(img.shape[1:]).sum(0) % 3).astype(np.uint8)
    labels["0"][:] = lab
    omezarr.build_pyramid(root, "image")
    omezarr.build_pyramid(labels, "label")

    meta = json.loads((tmp_path / "a.ome.zarr" / "zarr.json").read_text())["attributes"]["ome"]
    assert meta["version"] == "0.5"
    ms = meta["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    assert ms["datasets"][2]["coordinateTransformations"][0]["scale"] == [1.0, 4.0, 4.0]
    assert root["2"].shape == (3, 525, 325)
    # level 1 is the 2x2 mean of level 0 (rounded), labels are the nearest (top-left) sample
    expect = img[:, :2100, :1300].astype(np.float32).reshape(3, 1050, 2, 650, 2).mean((2, 4))
    np.testing.assert_array_equal(root["1"][:], np.round(expect).astype(np.uint8))
    np.testing.assert_array_equal(labels["1"][:], lab[::2, ::2])
    lmeta = zarr.open_group(str(tmp_path / "a.ome.zarr" / "labels"), mode="r").attrs["ome"]
    assert lmeta["labels"] == ["mask"]
    assert "image-label" in labels.attrs["ome"]
    assert len(labels.attrs["ome"]["multiscales"][0]["datasets"]) == 3


def test_atomic_store_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "x.ome.zarr"
    with pytest.raises(RuntimeError), omezarr.atomic_store(final) as tmp:
        omezarr.create_image(tmp, (1, 10, 10), np.uint8, 64)
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_atomic_store_replaces_existing(tmp_path: Path) -> None:
    final = tmp_path / "x.ome.zarr"
    for value in (1, 2):
        with omezarr.atomic_store(final) as tmp:
            root = omezarr.create_image(tmp, (1, 4, 4), np.uint8, 64)
            root["0"][:] = value
    assert int(omezarr.open_root(final)["0"][0, 0, 0]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["x.ome.zarr"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a.png", "a"), ("../../etc/passwd", "passwd"), ("my image (1).tif", "my_image_1"),
     ("slide.ome.tiff", "slide"), ("..", "image"), ("x/../../y.png", "y")],
)
def test_image_ids_are_safe_file_names(name: str, expected: str) -> None:
    assert mf.image_id(Path(name)) == expected


def test_split_is_deterministic_and_follows_fractions() -> None:
    hashes = [f"{i * 2654435761 % 2**32:08x}" + "0" * 24 for i in range(2000)]
    splits = [mf.split_for(h, 0.2, 0.1) for h in hashes]
    assert splits == [mf.split_for(h, 0.2, 0.1) for h in hashes]
    assert abs(splits.count("val") / 2000 - 0.2) < 0.03
    assert abs(splits.count("test") / 2000 - 0.1) < 0.03


def test_manifest_put_entry_is_atomic_and_merges(tmp_path: Path) -> None:
    mf.put_entry(tmp_path, {"id": "a", "split": "train"})
    mf.put_entry(tmp_path, {"id": "b", "split": "val"})
    data = mf.load(tmp_path)
    assert sorted(data["images"]) == ["a", "b"]
    assert [e["id"] for e in mf.entries(data, "val")] == ["b"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".manifest")]


def test_integer_stats_are_exact_and_streaming() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4000, size=(300, 200, 2)).astype(np.uint16)
    acc = StreamingStats(2, np.uint16)
    for y in range(0, 300, 64):
        acc.update(img[y : y + 64])
    res = acc.result()
    for c in range(2):
        ch = res["channels"][c]
        assert ch["mean"] == pytest.approx(img[..., c].mean())
        assert ch["std"] == pytest.approx(img[..., c].std(), rel=1e-6)
        assert ch["min"] == img[..., c].min() and ch["max"] == img[..., c].max()
        assert percentile(ch, 99.0) == pytest.approx(np.percentile(img[..., c], 99.0), abs=1.0)


def test_normalize_percentile_and_zscore() -> None:
    img = np.linspace(0, 100, 101, dtype=np.float32).reshape(1, 1, 101)
    acc = StreamingStats(1, np.float32)
    acc.update(img.reshape(1, 101, 1))
    stats = acc.result()
    out = normalize(img, stats, NormalizationConfig(mode="percentile", low_percentile=10, high_percentile=90))
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[0, 0, 50] == pytest.approx(0.5, abs=1e-3)
    z = normalize(img, stats, NormalizationConfig(mode="zscore"))
    assert z.mean() == pytest.approx(0.0, abs=1e-5) and z.std() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("mode", ["percentile", "zscore"])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_normalize_in_place_steps_give_the_formula_and_leave_the_input(mode: str, dtype: type) -> None:
    """The steps run in place on one float32 copy: the input is untouched (even a float32 one) and the numbers
    are those of the out-of-place formula, bit for bit."""
    block = np.random.default_rng(2).integers(0, 3000, size=(2, 6, 8)).astype(dtype)
    kept = block.copy()
    acc = StreamingStats(2, np.dtype(dtype))
    acc.update(np.moveaxis(block, 0, -1))
    stats, recipe = acc.result(), NormalizationConfig(mode=mode)
    out = normalize(block, stats, recipe)
    np.testing.assert_array_equal(block, kept)
    assert not np.shares_memory(out, block)
    scale, offset = scale_and_offset(stats, recipe)
    values = block.astype(np.float32)
    bounds = clip_range(stats, recipe)
    if bounds is not None:
        values = np.clip(values, bounds[0].reshape(-1, 1, 1), bounds[1].reshape(-1, 1, 1))
    expected = (values - offset.reshape(-1, 1, 1)) * scale.reshape(-1, 1, 1)
    if mode == "percentile":
        expected = np.clip(expected, 0.0, 1.0)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("mode", ["percentile", "zscore"])
def test_normalize_a_volume_as_its_slices(mode: str) -> None:
    """Per-image modes on a (C, D, H, W) block: each z slice normalised as a (C, H, W) block, the same numbers."""
    vol = np.random.default_rng(1).integers(0, 3000, size=(2, 5, 7, 9)).astype(np.uint16)
    acc = StreamingStats(2, np.uint16)
    acc.update(np.moveaxis(vol, 0, -1))
    stats, recipe = acc.result(), NormalizationConfig(mode=mode)
    out = normalize(vol, stats, recipe)
    assert out.shape == vol.shape and out.dtype == np.float32
    for z in range(5):
        np.testing.assert_array_equal(out[:, z], normalize(vol[:, z], stats, recipe))


def test_pooled_mean_std_and_mixture_percentile_of_two_images() -> None:
    a, b = np.arange(100.0), np.arange(100.0, 400.0)  # 100 and 300 pixels
    channels = [{"mean": a.mean(), "std": a.std(), "percentiles": {"0": 0.0, "50": 49.5, "100": 99.0}},
                {"mean": b.mean(), "std": b.std(), "percentiles": {"0": 100.0, "50": 249.5, "100": 399.0}}]
    mean, std = pooled_mean_std(channels, [100, 300])
    pooled = np.concatenate([a, b])
    assert mean == pytest.approx(pooled.mean()) and std == pytest.approx(pooled.std())
    # the mixed CDF: a holds the first quarter, b the rest; 25 % is a's maximum, 62.5 % b's median
    assert mixture_percentile(channels, [100, 300], 25.0) == 99.0
    assert mixture_percentile(channels, [100, 300], 62.5) == 249.5
    assert mixture_percentile(channels, [100, 300], 0.0) == 0.0
    assert mixture_percentile(channels, [100, 300], 100.0) == 399.0
    assert mixture_percentile(channels, [100, 300], 12.5) == pytest.approx(49.5)
    assert mixture_percentile(channels[:1], [100], 50.0) == 49.5  # one image: its own stored percentile


@pytest.mark.parametrize(("kind", "dtype", "spatial", "spacing"), [
    ("image", np.float16, (300, 212), None),
    ("label", np.uint8, (300, 212), None),
    ("image", np.float16, (20, 72, 88), (4.0, 1.0, 1.0)),  # a volume whose coarse z is not halved
])
def test_level_one_written_block_by_block_equals_the_driver_pyramid(tmp_path: Path, kind: str, dtype: type,
                                                                   spatial: tuple[int, ...],
                                                                   spacing: tuple[float, ...] | None) -> None:
    rng = np.random.default_rng(5)
    values = (rng.random((2, *spatial)) if kind == "image" else rng.integers(0, 4, (1, *spatial))).astype(dtype)

    def store(name: str) -> zarr.Group:
        root = omezarr.create_image(tmp_path / f"{name}.ome.zarr", values.shape, dtype, 32, n_levels=3,
                                    spacing=spacing)
        return root if kind == "image" else omezarr.create_labels(root, "m", spatial, dtype, 32, n_levels=3,
                                                                   spacing=spacing)

    whole, blocked = store("whole"), store("blocked")
    data = values if kind == "image" else values[0]
    whole["0"][:] = data
    omezarr.build_pyramid(whole, kind)
    edges = [range(0, n, 64) for n in spatial]  # blocks of two 32-chunks per axis: whole level-1 chunks
    for origin in itertools.product(*edges):
        box = tuple(slice(o, min(o + 64, n)) for o, n in zip(origin, spatial))
        part = data[(Ellipsis, *box)]
        blocked["0"][(Ellipsis, *box)] = part
        assert omezarr.write_halved(blocked, kind, box, part)
    omezarr.build_pyramid(blocked, kind, first=2)
    for level in ("0", "1", "2"):
        assert blocked[level][:].tobytes() == whole[level][:].tobytes(), level
    # a block that covers half a level-1 chunk would share it with a neighbour: nothing written
    box = tuple(slice(0, 32) for _ in spatial)
    assert not omezarr.write_halved(blocked, kind, box, data[(Ellipsis, *box)])


@pytest.mark.parametrize("kind", ["image", "label"])
def test_a_pyramid_built_chunk_by_chunk_is_each_whole_level_halved(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(9)
    spatial = (37, 300, 212)  # odd sizes: the last chunks and the far edges are partial
    values = (rng.random((2, *spatial)) if kind == "image" else rng.integers(0, 4, (1, *spatial))).astype(
        np.float16 if kind == "image" else np.uint8)
    data = values if kind == "image" else values[0]
    root = omezarr.create_image(tmp_path / "p.ome.zarr", values.shape, data.dtype, 64, n_levels=3)
    group = root if kind == "image" else omezarr.create_labels(root, "m", spatial, data.dtype, 64, n_levels=3)
    group["0"][:] = data
    omezarr.build_pyramid(group, kind)
    level1 = omezarr.halve(data, kind, (2, 2, 2))
    assert group["1"][:].tobytes() == level1.tobytes()
    assert group["2"][:].tobytes() == omezarr.halve(level1, kind, (2, 2, 2)).tobytes()


def test_the_pyramid_writes_empty_chunks_instead_of_testing_each_against_the_fill_value(tmp_path: Path) -> None:
    root = omezarr.create_image(tmp_path / "z.ome.zarr", (1, 256, 256), np.uint8, 64, n_levels=3)
    labels = omezarr.create_labels(root, "m", (256, 256), np.uint8, 64, n_levels=3)
    labels["0"][:] = 0  # all background: zarr would skip each chunk after comparing it with the fill value
    omezarr.build_pyramid(labels, "label")
    assert labels["2"][:].tobytes() == bytes(64 * 64)
    written = [p for p in (tmp_path / "z.ome.zarr" / "labels" / "m" / "2").rglob("*") if p.is_file()]
    assert len(written) == 2, written  # zarr.json and the level's one chunk


def test_pyramid_pieces_lie_in_one_chunk_start_on_the_factor_and_tile_the_region(tmp_path: Path) -> None:
    """Odd chunk sizes (5 and 9 along halved axes) take two chunks per piece; the level is still the whole one
    halved, and a region's pieces cover exactly its 2x-sized source."""
    rng = np.random.default_rng(4)
    root = zarr.open_group(str(tmp_path / "odd.zarr"), mode="w")
    values = rng.integers(0, 255, (1, 37, 45, 51)).astype(np.uint16)
    src = root.create_array("0", shape=values.shape, chunks=(1, 5, 8, 9), dtype="uint16")
    dst = root.create_array("1", shape=(1, 18, 22, 25), chunks=(1, 4, 8, 6), dtype="uint16")
    src[:] = values
    omezarr.build_pyramid(root, "image")
    np.testing.assert_array_equal(dst[:], omezarr.halve(values, "image", (2, 2, 2)))
    region = (slice(4, 8), slice(16, 22), slice(18, 24))
    pieces = omezarr.source_pieces(src, region, (2, 2, 2))
    covered = np.zeros(values.shape[1:], np.int32)
    for piece in pieces:
        covered[piece] += 1
        for p, chunk in zip(piece, (10, 8, 18)):  # a piece lies inside one (doubled odd) chunk per axis
            assert p.start % 2 == 0 and p.start // chunk == (p.stop - 1) // chunk
    inside = (slice(8, 16), slice(32, 44), slice(36, 48))
    assert covered[inside].min() == 1 and covered.sum() == covered[inside].size
