"""What a finished prediction gives besides its store: the mask export, the preview, the Dice from the records.

An image's mask is exported as a palette PNG, a tiled BigTIFF with its pixel size, a GeoTIFF (read from a GeoTIFF) or (with instances) GeoJSON outlines and an object
table (:mod:`unetcore.inference.shapes`); a volume's as NIfTI with the source's affine and qform/sform (from the
geometry its store keeps) or as an ImageJ TIFF stack with its voxel spacing (``png``, which a volume cannot be,
falls back to the TIFF stack). A volume's preview shows its three orthogonal mid-slices.

Every export carries the store's provenance (:mod:`unetcore.inference.provenance`): the PNG in its text chunks
(``Description``, ``Software``), the BigTIFF in its Software tag and ImageDescription (tifffile's JSON metadata,
``{"shape": ..., "unet": {"provenance": ...}}``), the ImageJ stack in its
``Info``, the NIfTI in a comment extension (and a short ``descrip``), the GeoJSON in its top-level properties.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from unetcore.atomic import replacing
from unetcore.errors import ConfigError
from unetcore.inference.layout import INSTANCES_NAME, LABELS_NAME, record_path
from unetcore.inference.provenance import provenance_json, software_name, stored_provenance
from unetcore.inference.windows import Block
from unetcore.io import OME_UNITS, write_geotiff, write_tiff_image
from unetcore.metrics import dice_from_counts
from unetcore.modes import ExportKind
from unetcore.store import omezarr

EXPORT_MAX_PIXELS = 64_000_000
"""Largest label mask exported as PNG; larger ones become tiled BigTIFF."""


def dice_from_records(records: Path, blocks: list[Block], num_classes: int, kind: str = "") -> float:
    """Mean foreground Dice of the whole image from the per-block confusion counts (``kind``: which records)."""
    total = None
    for b in blocks:
        counts = np.asarray(json.loads(record_path(records, b, kind).read_text())["counts"], np.int64)
        total = counts if total is None else total + counts
    dice = dice_from_counts(*total)
    fg = dice[1:]
    return float(np.nanmean(fg)) if np.isfinite(fg).any() else float("nan")


LABEL_COLOURS = [(0, 0, 0), (255, 255, 255), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25),
                 (145, 30, 180), (70, 240, 240), (240, 50, 230), (245, 130, 48)]
"""Palette of exported label PNGs: background black, class 1 white, then distinct colours (repeating)."""


def png_text(provenance: dict[str, Any] | None) -> Any:
    """PNG text chunks naming the writing software and the provenance (PIL ``PngInfo``; None without one)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", software_name(provenance))
    if provenance is not None:
        info.add_text("Description", provenance_json(provenance), zip=True)
    return info


def label_png(labels: np.ndarray) -> Any:
    """A palette PNG image of class ids: the pixel values stay the ids (0, 1, ...), viewers show colours."""
    from PIL import Image

    image = Image.fromarray(labels.astype(np.uint8))  # mode L; putpalette makes it P, the values unchanged
    cycle = LABEL_COLOURS[1:]
    palette = [LABEL_COLOURS[0]] + [cycle[(i - 1) % len(cycle)] for i in range(1, 256)]
    image.putpalette([c for colour in palette for c in colour])
    return image


def export_shapes(root: zarr.Group, out_dir: Path, image_id: str, source: Path | None = None,
                  reuse: bool = False) -> str:
    """Export an image's instances as ``<id>_mask.geojson`` and ``<id>_objects.csv`` (see
    :func:`unetcore.inference.shapes.write_shapes`), placed by the source store's georeferencing or pixel size.

    Raises:
        ConfigError: the prediction has no instance labels, or is a volume.
    """
    from unetcore.inference.shapes import objects_table_path, write_shapes

    if INSTANCES_NAME not in root.get("labels", {}):
        raise ConfigError("export", f"geojson needs instance labels; prediction '{image_id}' has none: re-run with "
                                    "--instances")
    if root[f"labels/{INSTANCES_NAME}/0"].ndim != 2:
        raise ConfigError("export", f"geojson is 2-D only; image '{image_id}' is a volume: use --export tiff")
    dst = Path(out_dir) / f"{image_id}_mask.geojson"
    if reuse and dst.exists() and objects_table_path(dst).exists():
        return str(dst)
    src = omezarr.open_root(source) if source is not None else None
    names = omezarr.unet_attrs(root).get("class_names")
    write_shapes(root, dst, image_id, src, stored_provenance(root), names)
    return str(dst)


def export_mask(out_path: Path, out_dir: Path, image_id: str, kind: ExportKind, reuse: bool = False,
                source: Path | None = None) -> str | None:
    """Export the label mask: an image as PNG (small images), tiled BigTIFF (any size, streamed by tiles) or
    GeoJSON outlines of its instances (:func:`export_shapes`); a volume as NIfTI or a TIFF stack
    (:func:`export_volume_mask`).

    ``reuse`` keeps an export that already exists (the prediction was complete before this run); ``source`` is
    the ingested image's store (the GeoJSON's placement). Returns the export's path, or None for ``kind="none"``.

    Raises:
        ConfigError: ``nifti`` for an image that is not a volume with a source affine; ``geojson`` for a volume
            or a prediction without instances; ``geotiff`` for a volume or an image not read from a GeoTIFF.

    An image's TIFF carries its store's pixel size (OME PhysicalSizeX/Y and XResolution in pixels per cm), a PNG
    its pHYs; a GeoTIFF the source's georeferencing tags and overviews (:func:`unetcore.io.write_geotiff`).
    """
    if kind == "none":
        return None
    root = zarr.open_group(store=str(out_path), mode="r")
    labels = root[f"labels/{LABELS_NAME}/0"]
    if kind == "geojson":
        return export_shapes(root, out_dir, image_id, source, reuse)
    if kind == "geotiff":
        return _export_geotiff(root, out_dir, image_id, reuse)
    if labels.ndim == 3:
        return export_volume_mask(root, out_dir, image_id, kind, reuse)
    if kind == "nifti":
        raise ConfigError("export", f"nifti needs a volume read from NIfTI or DICOM; image '{image_id}' is 2-D")
    provenance = stored_provenance(root)
    h, w = labels.shape
    slide = slide_metadata(root)
    png = kind == "png" and h * w <= EXPORT_MAX_PIXELS
    dst = out_dir / f"{image_id}_mask.{'png' if png else 'tif'}"
    if reuse and dst.exists():
        return str(dst)
    geometry = omezarr.geometry(root)
    spacing, unit = (geometry["spacing"], geometry["unit"]) if geometry.get("unit") in OME_UNITS else (None, None)
    if png:
        info = png_text(provenance)
        if slide:
            info.add_text("unet", json.dumps(slide))
        extra = {"dpi": tuple(0.0254 / (s * _METRES[unit]) for s in spacing[::-1])} if spacing else {}
        with replacing(dst) as tmp:
            label_png(np.asarray(labels[:])).save(tmp, format="PNG", pnginfo=info, **extra)
        return str(dst)
    write_tiff_image(labels, dst, spacing, unit, metadata={"unet": {"provenance": provenance, **(slide or {})}},
                     software=software_name(provenance))
    return str(dst)


_METRES = {"nanometer": 1e-9, "micrometer": 1e-6, "millimeter": 1e-3, "centimeter": 1e-2, "meter": 1.0}


def _export_geotiff(root: zarr.Group, out_dir: Path, image_id: str, reuse: bool) -> str:
    """``<id>_mask.tif``: the label pyramid as a tiled GeoTIFF with the source's georeferencing."""
    georef = omezarr.unet_attrs(root).get("georef")
    if root[f"labels/{LABELS_NAME}/0"].ndim != 2 or not georef:
        raise ConfigError("export", f"geotiff needs a 2-D image read from a GeoTIFF; image '{image_id}' has no "
                                    "georeferencing (use --export tiff)")
    dst = Path(out_dir) / f"{image_id}_mask.tif"
    if not (reuse and dst.exists()):
        group = root[f"labels/{LABELS_NAME}"]
        levels = [group[str(i)] for i in sorted(int(k) for k in group.array_keys() if k.isdigit())]
        write_geotiff(levels, dst, georef)
    return str(dst)


def slide_metadata(root: zarr.Group) -> dict[str, Any] | None:
    """A slide prediction's ``{"mpp": [my, mx], "level0": {...}}`` (ingested with ``--mpp``), else None."""
    attrs = omezarr.unet_attrs(root)
    return {"mpp": attrs["mpp"], "level0": attrs["level0"]} if "mpp" in attrs and "level0" in attrs else None


def export_volume_mask(root: zarr.Group, out_dir: Path, image_id: str, kind: ExportKind, reuse: bool = False) -> str:
    """Export a volume's label mask, streamed by z-slab, from its prediction store ``root``.

    ``nifti``: ``<id>_mask.nii.gz`` with exactly the source's affine and qform/sform (the geometry the store kept,
    :func:`unetcore.io.writers.write_nifti`). ``tiff`` and ``png`` (no PNG holds a volume): ``<id>_mask.tif``, an
    ImageJ stack with the voxel spacing and unit when known (:func:`unetcore.io.writers.write_tiff_stack`).

    Raises:
        ConfigError: ``nifti`` for a volume without a source affine (a TIFF or Zarr z-stack).
    """
    from unetcore.io.writers import write_nifti, write_tiff_stack

    labels = root[f"labels/{LABELS_NAME}/0"]
    geometry = omezarr.geometry(root)
    provenance = stored_provenance(root)
    text, software = provenance_json(provenance), software_name(provenance)
    if kind == "nifti":
        if geometry.get("affine") is None:
            raise ConfigError("export", f"nifti needs a volume read from NIfTI or DICOM; image '{image_id}' has no "
                                        f"source affine (use --export tiff)")
        dst = Path(out_dir) / f"{image_id}_mask.nii.gz"
        if not (reuse and dst.exists()):
            model = (provenance or {}).get("model", {}).get("uri", "")
            write_nifti(labels, geometry["affine"], dst, header_source=geometry.get("nifti"), description=text,
                        descrip=f"{software} {model}".strip())
        return str(dst)
    dst = Path(out_dir) / f"{image_id}_mask.tif"
    if not (reuse and dst.exists()):
        unit = geometry.get("unit")
        write_tiff_stack(labels, dst, geometry["spacing"] if unit else None, unit or "micrometer", compression="zlib",
                         description=text, software=software)
    return str(dst)


def _coarsest(group: zarr.Group) -> zarr.Array:
    levels = sorted(int(k) for k in group.array_keys() if k.isdigit())
    return group[str(levels[-1])]


def orthogonal_mid_slices(volume: Any) -> list[np.ndarray]:
    """The mid-slices of ``(..., D, H, W)`` across z, y and x: ``(..., H, W)``, ``(..., D, W)``, ``(..., D, H)``.

    Only those planes are read (a Zarr array is sliced, never loaded whole).
    """
    *lead, d, h, w = volume.shape
    keep = (slice(None),) * len(lead)
    return [np.asarray(volume[(*keep, d // 2)]), np.asarray(volume[(*keep, slice(None), h // 2)]),
            np.asarray(volume[(*keep, slice(None), slice(None), w // 2)])]


def _resized(image: np.ndarray, pred: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (C, H, W) and labels ``pred`` (H, W) at ``size`` (rows, columns): Pillow's bilinear filter (it
    antialiases when shrinking) for the image, nearest for the labels (no class that is not there). Pillow, not
    scikit-image, keeps scipy out of a prediction's start-up."""
    from PIL import Image

    if tuple(image.shape[1:]) == size and tuple(pred.shape) == size:
        return image, pred
    columns_rows = (size[1], size[0])
    image = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(ch, dtype=np.float32))
                                 .resize(columns_rows, Image.Resampling.BILINEAR)) for ch in image])
    pred = np.asarray(Image.fromarray(np.ascontiguousarray(pred, dtype=np.uint8))
                      .resize(columns_rows, Image.Resampling.NEAREST))
    return image, pred


def _volume_preview(src: zarr.Group, pred_group: zarr.Group, spacing: Any, shape: tuple[int, ...],
                    max_edge: int) -> np.ndarray:
    """Three overlay panels (mid-slices across z, y, x) side by side, each at the volume's physical aspect."""
    from unetcore.tracking.strips import preview_strip

    extent = [n * float(s) for n, s in zip(shape, spacing)]  # physical size per axis (z, y, x)
    # at most level 0's finest resolution, and the largest side within max_edge
    scale = min(1.0 / min(float(s) for s in spacing), max_edge / max(extent))
    planes = [(1, 2), (0, 2), (0, 1)]  # the axes each mid-slice keeps
    images = orthogonal_mid_slices(_coarsest(src))
    preds = orthogonal_mid_slices(_coarsest(pred_group))
    panels = []
    for axes, image, pred in zip(planes, images, preds):
        size = (max(1, round(extent[axes[0]] * scale)), max(1, round(extent[axes[1]] * scale)))
        image, pred = _resized(image, pred, size)
        panels.append(preview_strip(image, None, pred)[:, size[1]:])  # the overlay panel only
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0))) for p in panels]
    return np.concatenate(padded, axis=1)


def write_preview(src_path: Path, out_path: Path, dst: Path, max_edge: int = 1024) -> str:
    """A down-sampled overlay PNG (prediction in magenta over the image) from the coarsest pyramid levels.

    A volume's preview is its three orthogonal mid-slices (across z, y and x, in that order, left to right), each
    at the volume's physical aspect ratio, the largest side at most ``max_edge // 2``.
    """
    from PIL import Image

    from unetcore.tracking.strips import preview_strip

    src = omezarr.open_root(src_path)
    pred_root = zarr.open_group(store=str(out_path), mode="r")
    pred_group, text = pred_root[f"labels/{LABELS_NAME}"], png_text(stored_provenance(pred_root))
    if omezarr.image_array(src).ndim == 4:
        geometry = omezarr.geometry(src)
        strip = _volume_preview(src, pred_group, geometry["spacing"], omezarr.image_array(src).shape[1:],
                                max_edge // 2)
        with replacing(dst) as tmp:
            Image.fromarray(strip).save(tmp, format="PNG", compress_level=1, pnginfo=text)
        return str(dst)
    image = np.asarray(_coarsest(src)[:])
    pred = np.asarray(_coarsest(pred_group)[:])
    scale = min(1.0, max_edge / max(image.shape[1:]))
    shape = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[2] * scale)))
    image, pred = _resized(image, pred, shape)
    strip = preview_strip(image, None, pred)[:, shape[1]:]  # the overlay panel only
    with replacing(dst) as tmp:
        Image.fromarray(strip).save(tmp, format="PNG", compress_level=1, pnginfo=text)  # a preview: speed over size
    return str(dst)
