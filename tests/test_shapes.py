"""GeoJSON outlines of instances and the object table: the polygons give back exactly the mask.

The oracles are other libraries: the label image is made with scikit-image's ``measure.label``, the GeoJSON is
rasterised back with ``rasterio.features.rasterize`` (pixel-centre rule), and the table is compared with
``measure.regionprops``. The stores are read in small blocks so that objects cross block faces.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio.features
import shapely
import zarr
from affine import Affine
from shapely.geometry import shape
from skimage import measure

from unetcore.inference import instance_shapes, placement, plan_blocks, write_shapes
from unetcore.store import omezarr


def labelled(shape_hw: tuple[int, int], seed: int, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(class labels uint8, instance ids uint32) of blobs with holes, several classes, diagonal touches."""
    rng = np.random.default_rng(seed)
    field = rng.random(shape_hw)
    for axis in (0, 1):
        field = (field + np.roll(field, 1, axis) + np.roll(field, 2, axis)) / 3
    fg = field > np.quantile(field, 0.5)
    sem = np.where(fg, rng.integers(1, classes + 1), 0).astype(np.uint8)
    sem[fg] = (np.floor(field[fg] * 97) % classes + 1).astype(np.uint8)  # touching objects of other classes
    sem[10:40, 10:70] = 1  # a ring with a hole, crossing the block face at x = 32
    sem[18:32, 20:50] = 0
    sem[24:27, 30:33] = 2  # an island of another class inside the hole
    # one instance per 4-connected region of one class, as the pipeline's instances are
    return sem, measure.label(sem, background=0, connectivity=1).astype(np.uint32)


def prediction_store(path: Path, sem: np.ndarray, inst: np.ndarray, chunk: int = 32) -> zarr.Group:
    root = omezarr.create_image(path, (1, *sem.shape), "float16", chunk, n_levels=1)
    omezarr.create_labels(root, "prediction", sem.shape, np.uint8, chunk, n_levels=1)
    omezarr.create_labels(root, "instances", sem.shape, np.uint32, chunk, n_levels=1)
    root["labels/prediction/0"][:] = sem
    root["labels/instances/0"][:] = inst
    return root


def rasterised(features: list[dict], key: str, out_shape: tuple[int, int], transform: Affine | None = None
               ) -> np.ndarray:
    shapes = [(f["geometry"], f["properties"][key]) for f in features]
    return rasterio.features.rasterize(shapes, out_shape=out_shape, dtype=np.uint32,
                                       transform=transform or Affine.identity())


@pytest.mark.parametrize(("size", "edge", "seed"), [((97, 131), 32, 0), ((150, 70), 64, 1), ((64, 64), 2048, 2)])
def test_geojson_rasterises_back_to_exactly_the_mask_ids_and_classes(tmp_path: Path, size: tuple[int, int],
                                                                    edge: int, seed: int) -> None:
    sem, inst = labelled(size, seed)
    root = prediction_store(tmp_path / "p.ome.zarr", sem, inst)
    geojson, table = write_shapes(root, tmp_path / "img_mask.geojson", "img", edge=edge)
    fc = json.loads(geojson.read_text())
    assert fc["type"] == "FeatureCollection"
    ids = [f["properties"]["id"] for f in fc["features"]]
    assert sorted(ids) == list(range(1, int(inst.max()) + 1))  # one feature per instance, crossing or not
    np.testing.assert_array_equal(rasterised(fc["features"], "id", size), inst)
    np.testing.assert_array_equal(rasterised(fc["features"], "class", size), sem)
    assert all(shape(f["geometry"]).is_valid and f["geometry"]["type"] == "Polygon" for f in fc["features"])
    blocks = plan_blocks(size, (32, 32) if edge == 32 else (edge, edge))
    spans = {i: sum(bool((inst[b.slices] == i).any()) for b in blocks) for i in ids}
    if edge < max(size):
        assert max(spans.values()) >= 2  # objects do cross block faces, and still come as one feature


def test_holes_are_interior_rings_and_stay_uncovered(tmp_path: Path) -> None:
    sem, inst = labelled((97, 131), 0)
    root = prediction_store(tmp_path / "p.ome.zarr", sem, inst)
    geojson, _ = write_shapes(root, tmp_path / "img_mask.geojson", "img", edge=32)
    ring_id = int(inst[12, 12])
    [ring] = [f for f in json.loads(geojson.read_text())["features"] if f["properties"]["id"] == ring_id]
    polygon = shape(ring["geometry"])
    assert len(polygon.interiors) >= 1
    assert not polygon.contains(shapely.Point(25.5, 19.5))  # a pixel centre in the hole
    assert polygon.area == (inst == ring_id).sum()


def test_object_table_matches_regionprops_in_physical_units(tmp_path: Path) -> None:
    sem, inst = labelled((97, 131), 3)
    root = prediction_store(tmp_path / "p.ome.zarr", sem, inst)
    source = omezarr.create_image(tmp_path / "src.ome.zarr", (1, 97, 131), "uint8", 32, n_levels=1,
                                  spacing=(0.5, 0.25), unit="micrometer")
    _, table = write_shapes(root, tmp_path / "img_mask.geojson", "img", source=source, edge=32,
                            provenance={"input": {"source_hash": "abc"}}, class_names=["background", "a", "b", "c"])
    rows = {int(r["id"]): r for r in csv.DictReader(table.open())}
    props = measure.regionprops(inst)
    assert len(rows) == len(props)
    for p in props:
        r = rows[p.label]
        assert int(r["area_pixels"]) == p.area
        assert float(r["area"]) == pytest.approx(p.area * 0.125) and r["area_unit"] == "micrometer^2"
        assert (int(r["bbox_y0"]), int(r["bbox_x0"]), int(r["bbox_y1"]), int(r["bbox_x1"])) == p.bbox
        assert float(r["centroid_y"]) == pytest.approx(p.centroid[0] + 0.5)  # pixel centres at +0.5
        assert float(r["centroid_x"]) == pytest.approx(p.centroid[1] + 0.5)
        assert int(r["class"]) == sem[tuple(p.coords[0])] and r["class_name"] == "abc"[int(r["class"]) - 1]
    parquet = pq.read_table(table.with_suffix(".parquet"))
    assert parquet.num_rows == len(rows)
    assert json.loads(parquet.schema.metadata[b"unet.provenance"])["input"]["source_hash"] == "abc"


def test_features_are_qupath_detections_with_classification_and_measurements(tmp_path: Path) -> None:
    sem, inst = labelled((64, 64), 4)
    root = prediction_store(tmp_path / "p.ome.zarr", sem, inst)
    provenance = {"model": {"uri": "models:/unet/3"}, "input": {"source_hash": "f00"}}
    geojson, _ = write_shapes(root, tmp_path / "img_mask.geojson", "img", provenance=provenance,
                              class_names=["background", "nucleus", "stroma", "tumour"])
    fc = json.loads(geojson.read_text())
    assert fc["properties"]["provenance"] == provenance and fc["properties"]["coordinates"] == "level-0 pixels"
    assert "crs" not in fc
    for f in fc["features"]:
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == ["nucleus", "stroma", "tumour"][props["class"] - 1]
        assert len(props["classification"]["color"]) == 3
        assert props["measurements"]["Area px"] == props["area_pixels"] == (inst == props["id"]).sum()
        assert len(f["id"]) == 36  # a UUID string, which QuPath keeps as the object's id
    again, _ = write_shapes(root, tmp_path / "again_mask.geojson", "img", provenance=provenance,
                            class_names=["background", "nucleus", "stroma", "tumour"])
    assert again.read_bytes() == geojson.read_bytes()  # ids and order are stable


def test_georeferenced_store_gives_map_coordinates_and_names_its_crs(tmp_path: Path) -> None:
    sem, inst = labelled((97, 131), 5)
    root = prediction_store(tmp_path / "p.ome.zarr", sem, inst)
    source = omezarr.create_image(tmp_path / "src.ome.zarr", (1, 97, 131), "uint8", 32, n_levels=1)
    transform = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_000_000.0)
    omezarr.set_unet_attrs(source, {"georef": {"transform": list(transform)[:6], "epsg": 32633, "crs_wkt": None,
                                               "nodata": None, "tags": {}}})
    geojson, table = write_shapes(root, tmp_path / "img_mask.geojson", "img", source=source, edge=32)
    fc = json.loads(geojson.read_text())
    assert fc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    np.testing.assert_array_equal(rasterised(fc["features"], "id", (97, 131), transform), inst)
    for f in fc["features"]:
        polygon = shape(f["geometry"])
        assert polygon.exterior.is_ccw and all(not r.is_ccw for r in polygon.interiors)  # RFC 7946 winding
        assert polygon.area == pytest.approx(f["properties"]["area_pixels"] * 100.0)
    rows = list(csv.DictReader(table.open()))
    assert {r["area_unit"] for r in rows} == {"metre^2"}
    r = rows[0]
    assert float(r["centroid_out_x"]) == pytest.approx(500_000 + 10 * float(r["centroid_x"]))
    assert float(r["centroid_out_y"]) == pytest.approx(4_000_000 - 10 * float(r["centroid_y"]))


def test_a_slide_read_at_a_coarser_level_is_scaled_back_to_level_0_pixels(tmp_path: Path) -> None:
    sem, inst = labelled((97, 131), 6)
    root = prediction_store(tmp_path / "p.ome.zarr", sem, inst)
    source = omezarr.create_image(tmp_path / "src.ome.zarr", (1, 97, 131), "uint8", 32, n_levels=1)
    omezarr.set_unet_attrs(source, {"mpp": [1.0, 1.0], "level0": {"downsample": [4.0, 4.0], "mpp": [0.25, 0.25],
                                                                  "level": 1, "resampled": False}})
    geojson, table = write_shapes(root, tmp_path / "img_mask.geojson", "img", source=source, edge=32)
    fc = json.loads(geojson.read_text())
    assert fc["properties"]["coordinates"] == "level-0 pixels" and "crs" not in fc
    np.testing.assert_array_equal(rasterised(fc["features"], "id", (97, 131), Affine.scale(4.0)), inst)
    rows = list(csv.DictReader(table.open()))
    assert {r["area_unit"] for r in rows} == {"micrometer^2"}  # the store's own pixels are 1 µm
    r = rows[0]
    assert float(r["area"]) == int(r["area_pixels"])
    assert float(r["centroid_out_x"]) == pytest.approx(4 * float(r["centroid_x"]))


def test_only_objects_on_inner_block_faces_wait_for_the_end(tmp_path: Path) -> None:
    """Streaming: an object inside a block comes out with its block, before blocks further down are read."""
    sem = np.zeros((128, 32), np.uint8)
    sem[5:10, 5:10] = 1  # inside the first block
    sem[30:40, 20:30] = 1  # crosses the face at y = 32
    sem[100:110, 5:10] = 1  # inside the last block
    inst = measure.label(sem, connectivity=1).astype(np.uint32)
    root = prediction_store(tmp_path / "p.ome.zarr", sem, inst)
    reads: list[int] = []

    class Watched:
        shape, chunks = root["labels/instances/0"].shape, root["labels/instances/0"].chunks

        def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
            reads.append(key[0].start)
            return root["labels/instances/0"][key]

    order = []
    for i, _, _, _ in instance_shapes(Watched(), root["labels/prediction/0"], edge=32):
        order.append((i, len(reads)))
    assert order == [(1, 1), (3, 4), (2, 4)]  # the crossing object (2) last, the others as soon as read


def test_a_store_without_placement_is_in_pixels() -> None:
    place = placement(None)
    assert place.transform is None and place.pixel_area == 1.0 and place.area_unit == "pixel^2"
