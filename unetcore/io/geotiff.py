"""GeoTIFF georeferencing: read it at ingestion, write it back into a predicted mask that overlays its source.

A GeoTIFF places its pixels on a map with TIFF tags 33550 (ModelPixelScale), 33922 (ModelTiepoint) or 34264
(ModelTransformation), and names the map's CRS in the GeoKey directory (34735) with its double and ASCII
parameters (34736, 34737); GDAL keeps a nodata value in tag 42113. :func:`read_georef` reads these raw tags with
tifffile (to write them back unchanged) and lets rasterio (GDAL) interpret them: the affine transform of level 0's
pixel corners, the CRS as WKT and EPSG code. What a store keeps (``attributes.unet.georef``, the contract other
writers use, e.g. GeoJSON in map coordinates)::

    {"transform": [a, b, c, d, e, f],   # pixel (col, row) -> map (x, y), rasterio.Affine order, pixel corners
     "crs_wkt": str | None, "epsg": int | None,
     "nodata": float | None,            # the source's GDAL_NODATA (NaN included)
     "tags": {"33550": [...], ...}}     # the raw georeferencing tags, written back as they came

:func:`write_geotiff` writes a label mask as a tiled GeoTIFF with those tags on level 0 and internal overviews
(reduced-resolution pages, as COGs have), so QGIS and rasterio place it exactly on the source. The mask gets no
nodata tag: background (0) is a class, and the source's nodata pixels are predicted as background
(:func:`nodata_pixels`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unetcore.atomic import replacing
from unetcore.errors import reading
from unetcore.io.writers import label_tiles

__all__ = ["GEO_TAGS", "nodata_pixels", "read_georef", "same_placement", "write_geotiff"]

GEO_TAGS: dict[int, tuple[str, int]] = {
    33550: ("ModelPixelScale", 12), 33922: ("ModelTiepoint", 12), 34264: ("ModelTransformation", 12),
    34735: ("GeoKeyDirectory", 3), 34736: ("GeoDoubleParams", 12), 34737: ("GeoAsciiParams", 2),
}
"""The georeferencing tags kept and written back: code -> (name, TIFF data type)."""
_PLACEMENT = ("33550", "33922", "34264")
_CRS_TAGS = ("34735", "34736", "34737")
_NODATA_TAG = 42113
_EPSG_KEYS = {2048: "GeographicTypeGeoKey", 3072: "ProjectedCSTypeGeoKey"}
_USER_DEFINED = (0, 32767)


def _plain(value: Any) -> Any:
    """A tag value as JSON data: tuples become lists, numpy scalars Python numbers."""
    if isinstance(value, (tuple, list, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return value


def _nodata(text: Any) -> float | None:
    """GDAL_NODATA's text as a number (``nan`` included: Zarr attributes and the manifest keep it as ``NaN``)."""
    try:
        return float(str(text).strip().strip("\0"))
    except ValueError:
        return None


@contextlib.contextmanager
def _gdal_messages() -> Iterator[list[str]]:
    """Collect the warnings GDAL logs through rasterio while the block runs."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("rasterio._env")
    handler, propagate = _Collect(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # ours to report, once, as one line
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _declared_epsg(keys: Sequence[int]) -> list[tuple[str, int]]:
    """The EPSG codes a GeoKey directory declares for its geographic or projected CRS (user-defined ones aside)."""
    found = []
    for i in range(4, 4 + 4 * int(keys[3]), 4):
        key, location, _, value = (int(v) for v in keys[i:i + 4])
        if key in _EPSG_KEYS and location == 0 and value not in _USER_DEFINED:
            found.append((_EPSG_KEYS[key], value))
    return found


def _crs_problem(tags: dict[str, Any], crs: Any, messages: list[str]) -> str | None:
    """Why the CRS of the GeoKey directory cannot be used, or None when it can (or when there is none)."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    keys = tags.get("34735")
    if keys is None:
        return None
    try:
        declared = _declared_epsg(keys)
    except (IndexError, TypeError, ValueError):
        return "its GeoKey directory is malformed"
    for name, code in declared:
        try:
            with rasterio.Env(), _gdal_messages():  # PROJ's complaint goes to us, not to stderr
                CRS.from_epsg(code)
        except CRSError:
            return f"its {name} EPSG:{code} is not a known CRS"
    if crs is None:
        return "its GeoKey directory gives no CRS" + (f" ({messages[0]})" if messages else "")
    return None


def read_georef(path: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """The georeferencing of a GeoTIFF (see the module docstring), and a warning line about what was dropped.

    Returns ``(None, None)`` for a TIFF without placement tags. A GeoTIFF whose CRS cannot be parsed (an unknown
    EPSG code, a malformed GeoKey directory) keeps its transform without a CRS (``crs_wkt`` and ``epsg`` None,
    no GeoKey tags) and the warning says so, naming the file; one that GDAL cannot open at all gives
    ``(None, warning)``.
    """
    import rasterio
    import tifffile
    from rasterio.errors import RasterioError

    path = Path(path)
    with reading(path, "not a readable TIFF file"), tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tags = {str(code): _plain(page.tags[code].value) for code in GEO_TAGS if code in page.tags}
        nodata_tag = page.tags.get(_NODATA_TAG)
        nodata = _nodata(nodata_tag.value) if nodata_tag is not None else None
    if not any(code in tags for code in _PLACEMENT):
        return None, None
    try:
        with _gdal_messages() as messages, rasterio.open(path) as dataset:
            transform, crs = [float(v) for v in tuple(dataset.transform)[:6]], dataset.crs
    except RasterioError as exc:
        return None, f"{path}: GeoTIFF georeferencing unreadable ({type(exc).__name__}: {exc}); ingested without it"
    problem = _crs_problem(tags, crs, messages)
    if problem is not None:
        kept = {code: value for code, value in tags.items() if code not in _CRS_TAGS}
        georef = {"transform": transform, "crs_wkt": None, "epsg": None, "nodata": nodata, "tags": kept}
        return georef, f"{path}: GeoTIFF CRS cannot be parsed ({problem}); ingested without it (transform kept)"
    wkt = crs.to_wkt() if crs is not None else None
    epsg = crs.to_epsg() if crs is not None else None
    return {"transform": transform, "crs_wkt": wkt, "epsg": epsg, "nodata": nodata, "tags": tags}, None


def same_placement(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two georeferencings put pixels at the same map positions in the same CRS (to 1e-9 of a pixel)."""
    ta, tb = np.asarray(a["transform"], float), np.asarray(b["transform"], float)
    size = max(abs(ta[0]), abs(ta[1]), abs(ta[3]), abs(ta[4]), 1e-12)
    return bool(np.allclose(ta, tb, rtol=0, atol=1e-9 * size)) and a.get("crs_wkt") == b.get("crs_wkt")


def nodata_pixels(pixels: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """Where ``pixels`` ``(C, *spatial)`` are nodata on every band (as GDAL's dataset mask); None without nodata."""
    if nodata is None:
        return None
    if math.isnan(nodata):
        return np.isnan(pixels).all(axis=0) if pixels.dtype.kind == "f" else np.zeros(pixels.shape[1:], bool)
    return (pixels == np.asarray(nodata).astype(pixels.dtype)).all(axis=0)


def _extratags(georef: dict[str, Any]) -> list[tuple[int, int, int, Any, bool]]:
    """The stored raw tags as tifffile ``extratags`` (code, type, count, value, write once)."""
    out = []
    for code, value in sorted(georef.get("tags", {}).items(), key=lambda item: int(item[0])):
        kind = GEO_TAGS[int(code)][1]
        if kind == 2:
            out.append((int(code), kind, 0, str(value), True))
        else:
            values = tuple(value) if isinstance(value, list) else (value,)
            out.append((int(code), kind, len(values), values, True))
    return out


def _coarser(level: Any) -> np.ndarray:
    """The next overview of a (small) label level: every second pixel (labels are never averaged)."""
    return np.asarray(level[:])[::2, ::2]


def write_geotiff(levels: Sequence[Any], path: str | Path, georef: dict[str, Any], *, tile: int = 256,
                  compression: str = "zlib") -> Path:
    """Write a uint8 label mask as a tiled GeoTIFF with ``georef``'s tags and internal overviews.

    Args:
        levels: the mask's pyramid, level 0 first (``(H, W)`` array-likes, e.g. a prediction store's label
            levels); each is streamed by bands of ``tile`` rows. Overviews continue, halving, until one tile
            holds the coarsest level (COG-style).
        path: the file to write (replaced if it exists).
        georef: as :func:`read_georef` gives it; its raw tags go on level 0 (overviews inherit them).

    Returns:
        ``path``.
    """
    import tifffile

    path = Path(path)
    pages = list(levels)
    while max(pages[-1].shape) > tile and min(pages[-1].shape) > 1:
        pages.append(_coarser(pages[-1]))
    h, w = pages[0].shape
    bigtiff = h * w * 4 // 3 > 2**31  # uncompressed size with overviews: classic TIFF reads everywhere
    with replacing(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as writer:
        for index, level in enumerate(pages):
            writer.write(label_tiles(level, tile), shape=tuple(level.shape), dtype=np.uint8, tile=(tile, tile),
                         compression=compression, photometric="minisblack", subfiletype=1 if index else 0,
                         extratags=_extratags(georef) if index == 0 else (), metadata=None)
    return path
