"""What a finished prediction gives besides its store: the mask export, the preview, the Dice from the records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from unetcore.atomic import replacing
from unetcore.inference.layout import LABELS_NAME, record_path
from unetcore.inference.windows import Block
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


def label_png(labels: np.ndarray) -> Any:
    """A palette PNG image of class ids: the pixel values stay the ids (0, 1, ...), viewers show colours."""
    from PIL import Image

    image = Image.fromarray(labels.astype(np.uint8))  # mode L; putpalette makes it P, the values unchanged
    cycle = LABEL_COLOURS[1:]
    palette = [LABEL_COLOURS[0]] + [cycle[(i - 1) % len(cycle)] for i in range(1, 256)]
    image.putpalette([c for colour in palette for c in colour])
    return image


def export_mask(out_path: Path, out_dir: Path, image_id: str, kind: ExportKind, reuse: bool = False) -> str | None:
    """Export the label mask as PNG (small images) or tiled BigTIFF (any size, streamed by tiles).

    ``reuse`` keeps an export that already exists (the prediction was complete before this run).
    Returns the export's path, or None for ``kind="none"``.
    """
    if kind == "none":
        return None
    labels = zarr.open_group(store=str(out_path), mode="r")[f"labels/{LABELS_NAME}/0"]
    h, w = labels.shape
    png = kind == "png" and h * w <= EXPORT_MAX_PIXELS
    dst = out_dir / f"{image_id}_mask.{'png' if png else 'tif'}"
    if reuse and dst.exists():
        return str(dst)
    if png:
        with replacing(dst) as tmp:
            label_png(np.asarray(labels[:])).save(tmp, format="PNG")
        return str(dst)
    import tifffile

    tile = 256

    def tiles() -> Iterator[np.ndarray]:
        for y in range(0, h, tile):
            band = np.asarray(labels[y:y + tile, :])
            for x in range(0, w, tile):
                t = np.zeros((tile, tile), np.uint8)
                part = band[:, x:x + tile]
                t[: part.shape[0], : part.shape[1]] = part
                yield t

    with replacing(dst) as tmp:
        tifffile.imwrite(tmp, tiles(), shape=(h, w), dtype=np.uint8, tile=(tile, tile), bigtiff=True,
                         compression="zlib")
    return str(dst)


def write_preview(src_path: Path, out_path: Path, dst: Path, max_edge: int = 1024) -> str:
    """A down-sampled overlay PNG (prediction in magenta over the image) from the coarsest pyramid levels."""
    from PIL import Image
    from skimage.transform import resize

    from unetcore.tracking.mlflow import preview_strip

    src = omezarr.open_root(src_path)
    levels = sorted(int(k) for k in src.array_keys() if k.isdigit())
    image = np.asarray(src[str(levels[-1])][:])
    pred_group = zarr.open_group(store=str(out_path), mode="r")[f"labels/{LABELS_NAME}"]
    plevels = sorted(int(k) for k in pred_group.array_keys() if k.isdigit())
    pred = np.asarray(pred_group[str(plevels[-1])][:])
    scale = min(1.0, max_edge / max(image.shape[1:]))
    shape = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[2] * scale)))
    if shape != image.shape[1:]:
        image = np.stack([resize(ch.astype(np.float32), shape, preserve_range=True) for ch in image])
    if shape != pred.shape:
        pred = resize(pred, shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.uint8)
    strip = preview_strip(image, None, pred)[:, shape[1]:]  # the overlay panel only
    with replacing(dst) as tmp:
        Image.fromarray(strip).save(tmp, format="PNG", compress_level=1)  # a preview: speed over size
    return str(dst)
