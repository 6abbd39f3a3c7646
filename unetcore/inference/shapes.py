"""Instances as shapes: a GeoJSON FeatureCollection of the instance outlines, and the object table beside it.

The instance labels of a finished prediction (``labels/instances``, one id per object across block borders, see
:mod:`unetcore.inference.components`) are read block by block, never whole. Each block is polygonised with exact
pixel-edge outlines (``rasterio.features.shapes``, 4-connected like the instances, holes kept as interior
rings). An object that lies inside one block is written at once; the pieces of an object that touches an inner
block face are kept until the end and joined into one polygon (``shapely.union_all``: the pieces meet along
whole pixel edges, so the union is exact). Memory is one block plus the objects that cross block faces.

Coordinates are level-0 pixel coordinates, ``(x, y)`` = (column, row) of pixel corners, origin at the image's
top-left corner (QuPath's convention; a slide read at a coarser level, ``attributes.unet.level0.downsample``, is
scaled back to level 0); for a store with georeferencing (``attributes.unet.georef``: a rasterio
``Affine`` pixel → map transform, the CRS as EPSG and/or WKT), map coordinates, with the CRS named in the
collection. Each feature is a QuPath detection (``properties.objectType``) with its class as QuPath's
``classification`` and its id, class, area and centroid as plain properties and QuPath measurements.

The object table ``<id>_objects.csv`` (and ``<id>_objects.parquet`` when pyarrow is installed) has one row per
object, in the GeoJSON's order: id, class, area in pixels and in physical units (the store's level-0 scale and
axis unit, or the georeferenced pixel size), bounding box and centroid in the store's pixels, and the centroid
in the GeoJSON's coordinates. A volume has no GeoJSON export (2-D only).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from unetcore.atomic import replacing
from unetcore.inference.layout import INSTANCES_NAME, LABELS_NAME
from unetcore.inference.windows import Block, plan_blocks
from unetcore.store import omezarr

SHAPES_BLOCK = 2048
"""Edge (pixels) of the blocks read while polygonising, rounded up to whole chunks of the store."""

OBJECT_COLUMNS = ("id", "class", "class_name", "area_pixels", "area", "area_unit", "bbox_x0", "bbox_y0", "bbox_x1",
                  "bbox_y1", "centroid_x", "centroid_y", "centroid_out_x", "centroid_out_y")
"""Columns of the object table: bbox (pixel edges, x1/y1 exclusive) and centroid in the store's pixels; the
centroid again in the GeoJSON's coordinates (``_out``: level-0 pixels, or map coordinates)."""

_FEATURE_NAMESPACE = uuid.UUID("8a1c6f7e-5b8e-4f39-9d0c-2f1f3c6b9e41")
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Placement:
    """Where pixel coordinates land: the pixel → output transform, the CRS, and one pixel's physical area.

    ``transform`` is ``(a, b, c, d, e, f)`` in rasterio's ``Affine`` order (``x = a*col + b*row + c``,
    ``y = d*col + e*row + f``); None keeps the store's pixel coordinates. ``frame`` names the output
    coordinates: ``level-0 pixels`` (the store's, or a slide read at a coarser level scaled back to level 0) or
    ``map`` (a GeoTIFF's CRS).
    """

    transform: tuple[float, ...] | None
    epsg: int | None
    crs_wkt: str | None
    pixel_area: float
    area_unit: str
    frame: str = "level-0 pixels"

    @property
    def georeferenced(self) -> bool:
        return self.frame == "map"

    def apply(self, x: float, y: float) -> tuple[float, float]:
        """A point in pixel coordinates, in output coordinates."""
        if self.transform is None:
            return x, y
        a, b, c, d, e, f = self.transform
        return a * x + b * y + c, d * x + e * y + f


def _crs_unit(epsg: int | None, wkt: str | None) -> str | None:
    """The linear unit of a CRS (``metre``, ``degree``...), None when rasterio cannot tell."""
    try:
        from rasterio.crs import CRS

        crs = CRS.from_epsg(epsg) if epsg is not None else CRS.from_wkt(wkt) if wkt else None
        return crs.linear_units if crs is not None else None
    except Exception:  # an unparsable CRS still places the shapes; only the area's unit is unknown
        return None


def placement(source: zarr.Group | None) -> Placement:
    """The placement of a store's pixels: its georeferencing if it has one (map coordinates), else level-0 pixels.

    ``source`` is the ingested image's store (None: its own pixels, area unit ``pixel^2``). A slide ingested at a
    coarser level (``attributes.unet.level0``, ``{"downsample": [fy, fx], ...}``) is scaled back to level-0
    pixels. The pixel area comes from the store's level-0 scale and axis unit (or its ``mpp``, micrometres).
    """
    if source is None:
        return Placement(None, None, None, 1.0, "pixel^2")
    attrs = omezarr.unet_attrs(source)
    georef = attrs.get("georef")
    if georef and georef.get("transform"):
        a, b, c, d, e, f = (float(v) for v in georef["transform"][:6])
        epsg, wkt = georef.get("epsg"), georef.get("crs_wkt")
        unit = _crs_unit(epsg, wkt) or "map unit"
        return Placement((a, b, c, d, e, f), epsg, wkt, abs(a * e - b * d), f"{unit}^2", "map")
    geometry = omezarr.geometry(source)
    sy, sx = (float(s) for s in geometry["spacing"][-2:])
    unit = geometry.get("unit")
    if unit is None and attrs.get("mpp"):
        (sy, sx), unit = (float(v) for v in attrs["mpp"][-2:]), "micrometer"
    level0 = (attrs.get("level0") or {}).get("downsample")
    transform = None
    if level0 and any(float(v) != 1.0 for v in level0):
        fy, fx = (float(v) for v in level0[-2:])
        transform = (fx, 0.0, 0.0, 0.0, fy, 0.0)
    return Placement(transform, None, None, sy * sx if unit else 1.0, f"{unit}^2" if unit else "pixel^2")


def _blocks(labels: zarr.Array, edge: int) -> list[Block]:
    """Blocks of whole chunks, about ``edge`` on a side."""
    block = tuple(max(c, math.ceil(edge / c) * c) for c in labels.chunks)
    return plan_blocks(tuple(int(n) for n in labels.shape), block)


def _inner_face_ids(ids: np.ndarray, block: Block, shape: tuple[int, ...]) -> set[int]:
    """Ids on the block's faces that have a neighbouring block (not the image's border)."""
    (y0, x0), (y1, x1) = block.start, block.stop
    faces = []
    if y0 > 0:
        faces.append(ids[0])
    if y1 < shape[0]:
        faces.append(ids[-1])
    if x0 > 0:
        faces.append(ids[:, 0])
    if x1 < shape[1]:
        faces.append(ids[:, -1])
    if not faces:
        return set()
    found = np.unique(np.concatenate(faces))
    return {int(v) for v in found[found > 0]}


@dataclass
class ObjectStats:
    """Pixel statistics of one object, summed over the blocks it lies in (coordinates of pixel corners)."""

    pixels: int
    sum_x: float  # sum of the pixels' column indices
    sum_y: float  # sum of the pixels' row indices
    x0: int
    y0: int
    x1: int  # exclusive
    y1: int  # exclusive

    def add(self, other: ObjectStats) -> None:
        """Merge the statistics of another piece of the same object."""
        self.pixels += other.pixels
        self.sum_x += other.sum_x
        self.sum_y += other.sum_y
        self.x0, self.y0 = min(self.x0, other.x0), min(self.y0, other.y0)
        self.x1, self.y1 = max(self.x1, other.x1), max(self.y1, other.y1)

    @property
    def centroid(self) -> tuple[float, float]:
        """Mean of the pixel centres (pixel ``(col, row)`` covers ``[col, col + 1) x [row, row + 1)``)."""
        return self.sum_x / self.pixels + 0.5, self.sum_y / self.pixels + 0.5


def block_stats(ids: np.ndarray, classes: np.ndarray, block: Block) -> dict[int, tuple[int, ObjectStats]]:
    """``{id: (class, stats)}`` of each id > 0 of a block (image coordinates), vectorised over the block."""
    from scipy import ndimage

    found, first, compact = np.unique(ids.ravel(), return_index=True, return_inverse=True)
    offset = 0 if found[0] == 0 else 1  # compact labels with background 0
    labels = (compact.reshape(ids.shape) + offset).astype(np.int32)
    n = len(found) + offset
    rows, cols = np.indices(ids.shape, dtype=np.int64)
    counts = np.bincount(labels.ravel(), minlength=n)
    sum_y = np.bincount(labels.ravel(), weights=rows.ravel(), minlength=n)
    sum_x = np.bincount(labels.ravel(), weights=cols.ravel(), minlength=n)
    boxes = ndimage.find_objects(labels)
    y0, x0 = block.start
    labs = np.nonzero(found > 0)[0] + offset  # the compact label of each id > 0
    n_pix = counts[labs]
    columns = zip(found[found > 0].tolist(), classes.ravel()[first][found > 0].tolist(), n_pix.tolist(),
                  (sum_x[labs] + x0 * n_pix).tolist(), (sum_y[labs] + y0 * n_pix).tolist(), labs.tolist())
    out: dict[int, tuple[int, ObjectStats]] = {}
    for i, c, pixels, sx, sy, lab in columns:
        ys, xs = boxes[lab - 1]
        out[i] = (c, ObjectStats(pixels, sx, sy, xs.start + x0, ys.start + y0, xs.stop + x0, ys.stop + y0))
    return out


def block_shapes(ids: np.ndarray, block: Block) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(id, GeoJSON geometry)`` for each 4-connected piece of each id > 0 of a block (pixel coordinates).

    Exact pixel-edge outlines in image coordinates (the block's origin added), holes as interior rings.
    """
    import rasterio.features
    from affine import Affine

    top = int(ids.max()) if ids.size else 0
    values = ids.astype(np.int32) if top <= _INT32_MAX else ids.astype(np.float64)
    y0, x0 = block.start
    for geometry, value in rasterio.features.shapes(values, mask=ids > 0, connectivity=4,
                                                    transform=Affine.translation(x0, y0)):
        yield int(value), geometry


def _joined(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One geometry of an object's pieces from several blocks: their union (exact: they share whole edges)."""
    import shapely
    from shapely.geometry import mapping, shape

    union = shapely.union_all([shapely.make_valid(shape(p)) for p in parts])
    return dict(mapping(union))


def instance_shapes(instances: zarr.Array, classes: zarr.Array, edge: int = SHAPES_BLOCK
                    ) -> Iterator[tuple[int, int, dict[str, Any], ObjectStats]]:
    """``(id, class, geometry, stats)`` of every instance of a 2-D label store, one geometry per id, block by block.

    Objects inside one block come as their block is read; objects that cross block faces at the end, their
    pieces joined. Geometries are GeoJSON-like dicts in pixel coordinates (pixel corners).
    """
    shape = tuple(int(n) for n in instances.shape)
    pending: dict[int, tuple[int, ObjectStats, list[dict[str, Any]]]] = {}
    for block in _blocks(instances, edge):
        ids = np.asarray(instances[block.slices])
        if not ids.any():
            continue
        stats = block_stats(ids, np.asarray(classes[block.slices]), block)
        crossing = _inner_face_ids(ids, block, shape)
        pieces: dict[int, list[dict[str, Any]]] = {}
        for i, geometry in block_shapes(ids, block):
            pieces.setdefault(i, []).append(geometry)
        for i, parts in pieces.items():
            cls, st = stats[i]
            if i in crossing or i in pending:
                if i in pending:
                    pending[i][1].add(st)
                    pending[i][2].extend(parts)
                else:
                    pending[i] = (cls, st, list(parts))
            else:  # inside this block: one 4-connected piece
                yield i, cls, parts[0] if len(parts) == 1 else _joined(parts), st
    for i in sorted(pending):
        cls, st, parts = pending.pop(i)
        yield i, cls, parts[0] if len(parts) == 1 else _joined(parts), st


# ---------------------------------------------------------------- GeoJSON and the object table


def _ring_area2(ring: np.ndarray) -> float:
    """Twice the signed area of a closed ring (positive: counter-clockwise with y up)."""
    x, y = ring[:, 0], ring[:, 1]
    return float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _polygon_out(rings: list[Any], place: Placement) -> list[Any]:
    """One polygon's rings in output coordinates: pixel corners as ints, or map coordinates through the
    georeferencing with RFC 7946's winding (exterior counter-clockwise, holes clockwise)."""
    if place.transform is None:
        return [[[int(x), int(y)] for x, y in ring] for ring in rings]
    a, b, c, d, e, f = place.transform
    out = []
    for k, ring in enumerate(rings):
        xy = np.asarray(ring, dtype=np.float64)
        moved = np.stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f], axis=1)
        if (_ring_area2(moved) > 0) != (k == 0):
            moved = moved[::-1]
        out.append(moved.tolist())
    return out


def _geometry_out(geometry: dict[str, Any], place: Placement) -> dict[str, Any]:
    """A pixel-coordinate Polygon or MultiPolygon in output coordinates (see :func:`_polygon_out`)."""
    coords = geometry["coordinates"]
    if geometry["type"] == "Polygon":
        return {"type": "Polygon", "coordinates": _polygon_out(coords, place)}
    return {"type": geometry["type"], "coordinates": [_polygon_out(p, place) for p in coords]}


def class_name(cls: int, class_names: list[str] | None) -> str:
    """The class's name: the model's (background first) when it has one, else ``class <n>``."""
    if class_names and 0 <= cls < len(class_names):
        return str(class_names[cls])
    return f"class {cls}"


def _colour(cls: int) -> list[int]:
    from unetcore.inference.outputs import LABEL_COLOURS

    cycle = LABEL_COLOURS[1:]
    return list(cycle[(cls - 1) % len(cycle)])


def _object_row(i: int, cls: int, st: ObjectStats, place: Placement, class_names: list[str] | None
                ) -> dict[str, Any]:
    """The object table's row of one instance."""
    cx, cy = st.centroid
    row: dict[str, Any] = {"id": i, "class": cls, "class_name": class_name(cls, class_names), "area_pixels": st.pixels,
                           "area": st.pixels * place.pixel_area, "area_unit": place.area_unit, "bbox_x0": st.x0,
                           "bbox_y0": st.y0, "bbox_x1": st.x1, "bbox_y1": st.y1, "centroid_x": cx, "centroid_y": cy,
                           "centroid_out_x": None, "centroid_out_y": None}
    row["centroid_out_x"], row["centroid_out_y"] = place.apply(cx, cy)
    return row


@functools.lru_cache(maxsize=64)
def _image_uuid_base(image_id: str) -> int:
    return uuid.uuid5(_FEATURE_NAMESPACE, image_id).int


def feature_id(image_id: str, instance: int) -> str:
    """A stable UUID per (image, instance): QuPath keeps UUID feature ids (the instance id in the low 48 bits)."""
    base = _image_uuid_base(image_id)
    return str(uuid.UUID(int=(base >> 48 << 48) | (int(instance) & 0xFFFF_FFFF_FFFF)))


def _feature(image_id: str, row: dict[str, Any], geometry: dict[str, Any], place: Placement) -> dict[str, Any]:
    """One GeoJSON feature as QuPath reads it (a detection with a classification and measurements)."""
    centroid = [row["centroid_out_x"], row["centroid_out_y"]]
    return {
        "type": "Feature",
        "id": feature_id(image_id, row["id"]),
        "geometry": _geometry_out(geometry, place),
        "properties": {
            "objectType": "detection",
            "classification": {"name": row["class_name"], "color": _colour(row["class"])},
            "id": row["id"], "class": row["class"], "area": row["area"], "area_unit": row["area_unit"],
            "area_pixels": row["area_pixels"], "centroid": centroid,
            "measurements": {"Instance id": row["id"], "Class": row["class"], "Area px": row["area_pixels"],
                             f"Area {row['area_unit']}": row["area"], "Centroid X px": row["centroid_x"],
                             "Centroid Y px": row["centroid_y"]},
        },
    }


def _collection_head(image_id: str, place: Placement, provenance: dict[str, Any] | None) -> dict[str, Any]:
    """The FeatureCollection's members besides its features: CRS, placement and provenance."""
    head: dict[str, Any] = {"type": "FeatureCollection"}
    if place.epsg is not None:  # the 2008 GeoJSON CRS member, which GDAL (QGIS) reads
        head["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{int(place.epsg)}"}}
    head["properties"] = {"image": image_id,
                          "coordinates": place.frame,
                          "transform": list(place.transform) if place.transform else None,
                          "epsg": place.epsg, "crs_wkt": place.crs_wkt, "provenance": provenance}
    return head


def objects_table_path(geojson: Path) -> Path:
    """``<id>_objects.csv`` beside ``<id>_mask.geojson``."""
    return geojson.with_name(geojson.name.replace("_mask.geojson", "_objects.csv"))


def write_shapes(pred: zarr.Group, dst: Path, image_id: str, source: zarr.Group | None = None,
                 provenance: dict[str, Any] | None = None, class_names: list[str] | None = None,
                 edge: int = SHAPES_BLOCK) -> tuple[Path, Path]:
    """Write ``dst`` (GeoJSON) and the object table beside it from a prediction store ``pred`` with instances.

    Args:
        pred: the prediction store (``labels/instances`` and ``labels/prediction``, 2-D).
        dst: the GeoJSON to write (replaced if present); the table is :func:`objects_table_path` of it.
        source: the ingested image's store, for the georeferencing or the pixel size (None: pixels).
        provenance: the record put in the collection's top-level ``properties`` (and the Parquet's metadata).
        class_names: names per class, background first (None: ``class <n>``).
        edge: block edge read at a time (whole chunks).

    Returns:
        The GeoJSON's and the CSV table's paths.
    """
    instances = pred[f"labels/{INSTANCES_NAME}/0"]
    classes = pred[f"labels/{LABELS_NAME}/0"]
    place = placement(source)
    head = json.dumps(_collection_head(image_id, place, provenance), separators=(",", ":"))
    table = objects_table_path(dst)
    with replacing(dst) as tmp_json, replacing(table) as tmp_csv:
        with open(tmp_json, "w", encoding="utf-8") as out, open(tmp_csv, "w", newline="", encoding="utf-8") as rows:
            writer = csv.DictWriter(rows, fieldnames=OBJECT_COLUMNS)
            writer.writeheader()
            out.write(head[:-1] + ',"features":[')
            first = True
            for i, cls, geometry, stats in instance_shapes(instances, classes, edge):
                row = _object_row(i, cls, stats, place, class_names)
                writer.writerow(row)
                feature = _feature(image_id, row, geometry, place)
                out.write(("" if first else ",\n") + json.dumps(feature, separators=(",", ":")))
                first = False
            out.write("]}\n")
    _parquet_beside(table, provenance)
    return dst, table


def _parquet_beside(table: Path, provenance: dict[str, Any] | None) -> Path | None:
    """The CSV table as Parquet (with the provenance in its metadata) when pyarrow is installed."""
    try:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError:
        return None
    data = pacsv.read_csv(table)
    if provenance is not None:
        meta = dict(data.schema.metadata or {})
        meta[b"unet.provenance"] = json.dumps(provenance, sort_keys=True).encode()
        data = data.replace_schema_metadata(meta)
    dst = table.with_suffix(".parquet")
    with replacing(dst) as tmp:
        pq.write_table(data, tmp)
    return dst
