"""The OME-Zarr 0.5 layout: images (c, y, x) or volumes (c, z, y, x) as multiscale pyramids, masks under
``labels/``.

Nothing else in the code base knows the layout's paths. A store is written under a temporary name and
renamed into place when complete (:func:`atomic_store`), so a store that exists under its final name is whole.

Layout of ``<id>.ome.zarr`` (Zarr v3)::

    zarr.json               attributes.ome.multiscales (axes c, [z,] y, x; levels 0..n), attributes.unet (stats,
                            for a volume its geometry: spacing, unit, the source's affine and NIfTI header; for a
                            GeoTIFF its georef: transform, CRS, nodata, raw tags, see unetcore.io.geotiff)
    0, 1, …                 image levels, dtype of the source, chunks (C, chunk...)
    labels/zarr.json        attributes.ome.labels = ["mask"]
    labels/mask/0, 1, …     integer labels ([z,] y, x), attributes.ome.image-label

A 2-D image whose file states its pixel size with a unit (OME-TIFF ``PhysicalSizeX/Y``, ImageJ calibration, a TIFF
resolution in centimetres) has that size as level 0's scale and the unit on its spatial axes; one that does not is
scaled in pixels (scale 1, no unit), as before. A volume's level 0 is scaled by its voxel spacing, with the spatial
axes' unit (millimeter for NIfTI/DICOM, micrometer for microscopy when the file says so). Each level's scale is
level 0's times the factors the pyramid halved by. Its chunks hold ``chunk**2`` voxels (>= 1 MB at the default 1024), shaped from the spacing
into a physical cube (:func:`chunk_shape`); its pyramid halves only the axes that are not already coarse
(:func:`halving`: never an axis more than 2x coarser than the finest one, as nnU-Net pools), so 5 mm slices are
not halved while the 0.7 mm plane is.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from unetcore.elementwise import to_float16, to_float32
from unetcore.errors import InputError

OME_VERSION = "0.5"
LABELS_GROUP = "labels"
PYRAMID_MIN_SIZE = 1024
_SPATIAL_NAMES = ("z", "y", "x")


Codec = Literal["zstd", "lz4"]


def compressor(codec: Codec = "zstd") -> BloscCodec:
    """An array's codec. ``zstd`` (level 3, bit-shuffle): ingested images, masks and labels, compact;
    ``lz4`` (level 5, byte-shuffle): predicted float probabilities, which are written once per block on the hot
    path: about 2x faster to write and to read than zstd for a few % more bytes (BENCHMARKS.md)."""
    if codec == "lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)
    return BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)


def halving(shape: Sequence[int], scale: Sequence[float]) -> tuple[int, ...]:
    """Per spatial axis, 2 if the next pyramid level halves it, else 1.

    An axis is halved while it has at least 2 entries and its voxel size (``scale``) is less than twice the finest
    one among such axes (nnU-Net's pooling rule); isotropic axes are all halved together.
    """
    open_axes = [i for i, n in enumerate(shape) if n >= 2]
    if not open_axes:
        return (1,) * len(shape)
    finest = min(float(scale[i]) for i in open_axes)
    return tuple(2 if (i in open_axes and float(scale[i]) < 2 * finest) else 1 for i in range(len(shape)))


def pyramid(shape: Sequence[int], n_levels: int, spacing: Sequence[float] | None = None
            ) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    """``(shape, scale)`` of each level: level 0 is ``shape`` at ``spacing`` (1 per axis by default), each next
    level halves the axes :func:`halving` picks (rounding down, never below 1) and doubles their scale."""
    scale = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * len(shape)
    levels = [(tuple(int(n) for n in shape), scale)]
    for _ in range(1, n_levels):
        current, current_scale = levels[-1]
        factors = halving(current, current_scale)
        levels.append((tuple(max(1, n // f) for n, f in zip(current, factors)),
                       tuple(s * f for s, f in zip(current_scale, factors))))
    return levels


def n_levels_for(shape: Sequence[int], min_size: int | None = None, spacing: Sequence[float] | None = None) -> int:
    """Number of pyramid levels: halve (as :func:`pyramid` does) until the largest side is at most ``min_size``
    (default :data:`PYRAMID_MIN_SIZE`), judged on the unrounded sides."""
    limit = PYRAMID_MIN_SIZE if min_size is None else min_size
    scale = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * len(shape)
    current, extent, levels = tuple(int(n) for n in shape), [float(n) for n in shape], 1
    while max(extent) > limit:
        factors = halving(current, scale)
        if all(f == 1 for f in factors):
            break
        current = tuple(max(1, n // f) for n, f in zip(current, factors))
        extent = [e / f for e, f in zip(extent, factors)]
        scale = tuple(s * f for s, f in zip(scale, factors))
        levels += 1
    return levels


def level_shape(shape: Sequence[int], level: int, spacing: Sequence[float] | None = None) -> tuple[int, ...]:
    """Shape of pyramid level ``level`` (see :func:`pyramid`)."""
    return pyramid(shape, level + 1, spacing)[level][0]


def chunk_shape(shape: Sequence[int], chunk: int, spacing: Sequence[float] | None = None) -> tuple[int, ...]:
    """Chunk shape of level 0: about ``chunk**2`` pixels (or voxels), no side above ``chunk`` or the image.

    Sides double, one at a time, on the axis whose chunk is physically shortest (the last on ties), until the
    chunk holds ``chunk**2`` values: a 2-D image gets ``(chunk, chunk)`` (clipped to the image), an isotropic
    volume ``(chunk**(2/3), ...)`` rounded to powers of two (64 x 128 x 128 for 1024), an anisotropic one a
    physical cube (fewer 5 mm slices than 0.7 mm rows).
    """
    n = len(shape)
    scale = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * n
    caps = [max(1, min(int(chunk), int(size))) for size in shape]
    edges = [1] * n
    while math.prod(edges) < chunk * chunk:
        growable = [i for i in range(n) if edges[i] < caps[i]]
        if not growable:
            break
        i = min(growable, key=lambda a: (edges[a] * scale[a], -a))
        edges[i] = min(caps[i], edges[i] * 2)
    return tuple(edges)


def _axes(with_channel: bool, spatial_dims: int = 2, unit: str | None = None) -> list[dict[str, str]]:
    space = []
    for name in _SPATIAL_NAMES[-spatial_dims:]:
        axis = {"name": name, "type": "space"}
        if unit:
            axis["unit"] = unit
        space.append(axis)
    return ([{"name": "c", "type": "channel"}] if with_channel else []) + space


def _multiscales(name: str, levels: list[tuple[tuple[int, ...], tuple[float, ...]]], with_channel: bool,
                 unit: str | None) -> list[dict[str, Any]]:
    datasets = []
    for level, (_, scale) in enumerate(levels):
        values = ([1.0] if with_channel else []) + list(scale)
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": values}]})
    spatial_dims = len(levels[0][0])
    return [{"name": name, "axes": _axes(with_channel, spatial_dims, unit), "datasets": datasets}]


def _chunks(chunk: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    return (int(chunk),) * spatial_dims if isinstance(chunk, (int, np.integer)) else tuple(int(c) for c in chunk)


@contextlib.contextmanager
def atomic_store(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it to ``final`` (replacing it), else delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def create_image(
    path: Path,
    shape_c_spatial: Sequence[int],
    dtype: np.dtype | str,
    chunk: int | Sequence[int],
    *,
    name: str = "image",
    pixel_size: float = 1.0,
    n_levels: int | None = None,
    spacing: Sequence[float] | None = None,
    unit: str | None = None,
    codec: Codec = "zstd",
) -> zarr.Group:
    """Create an empty OME-Zarr image group with all pyramid levels allocated (filled later).

    Args:
        shape_c_spatial: ``(C, H, W)`` or ``(C, D, H, W)``.
        chunk: the chunk side (every spatial axis) or the chunk shape of level 0; clipped to each level's shape.
        pixel_size: level 0's scale on every axis when ``spacing`` is not given.
        spacing: level 0's voxel size per spatial axis (it also steers which axes the pyramid halves).
        unit: the spatial axes' unit (``millimeter``, ``micrometer``, …), if known.
        codec: every level's codec (:func:`compressor`).
    """
    channels, *spatial = (int(n) for n in shape_c_spatial)
    scale = tuple(spacing) if spacing is not None else (float(pixel_size),) * len(spatial)
    count = n_levels if n_levels is not None else n_levels_for(spatial, spacing=scale)
    levels = pyramid(spatial, count, scale)
    chunks = _chunks(chunk, len(spatial))
    axis_names = ["c", *_SPATIAL_NAMES[-len(spatial):]]
    root = zarr.open_group(store=str(path), mode="w", zarr_format=3)
    for level, (level_dims, _) in enumerate(levels):
        root.create_array(
            str(level),
            shape=(channels, *level_dims),
            dtype=dtype,
            chunks=(channels, *(min(c, n) for c, n in zip(chunks, level_dims))),
            compressors=compressor(codec),
            fill_value=0,
            dimension_names=axis_names,
        )
    root.attrs["ome"] = {"version": OME_VERSION, "multiscales": _multiscales(name, levels, True, unit)}
    return root


def create_labels(
    root: zarr.Group,
    name: str,
    shape_spatial: Sequence[int],
    dtype: np.dtype | str,
    chunk: int | Sequence[int],
    *,
    n_levels: int | None = None,
    pixel_size: float = 1.0,
    properties: list[dict[str, Any]] | None = None,
    spacing: Sequence[float] | None = None,
    unit: str | None = None,
) -> zarr.Group:
    """Create ``labels/<name>`` (``(H, W)`` or ``(D, H, W)``) with the image's levels and ``image-label``
    metadata; pass the image's ``spacing`` and ``unit`` so that both pyramids agree."""
    spatial = [int(n) for n in shape_spatial]
    scale = tuple(spacing) if spacing is not None else (float(pixel_size),) * len(spatial)
    count = n_levels if n_levels is not None else n_levels_for(spatial, spacing=scale)
    levels = pyramid(spatial, count, scale)
    chunks = _chunks(chunk, len(spatial))
    labels = root.require_group(LABELS_GROUP)
    existing = list(labels.attrs.get("ome", {}).get("labels", []))
    if name not in existing:
        existing.append(name)
    labels.attrs["ome"] = {"version": OME_VERSION, "labels": existing}
    group = labels.create_group(name, overwrite=True)
    for level, (level_dims, _) in enumerate(levels):
        group.create_array(
            str(level),
            shape=level_dims,
            dtype=dtype,
            chunks=tuple(min(c, n) for c, n in zip(chunks, level_dims)),
            compressors=compressor(),
            fill_value=0,
            dimension_names=list(_SPATIAL_NAMES[-len(spatial):]),
        )
    image_label: dict[str, Any] = {"source": {"image": "../../"}}
    if properties:
        image_label["properties"] = properties
    group.attrs["ome"] = {
        "version": OME_VERSION,
        "image-label": image_label,
        "multiscales": _multiscales(name, levels, False, unit),
    }
    return group


HALVE_SLAB_BYTES = 4 * 1024 * 1024
"""A float16 block is halved this many bytes of its float32 copy at a time."""


def _float_mean(values: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """The mean of each cell of ``values`` as float32: the cell's values summed in float32, one strided pass each
    (no reshaped copy)."""
    pick = [(Ellipsis, *(slice(d, None, f) for d, f in zip(offset, factors)))
            for offset in itertools.product(*(range(f) for f in factors))]
    total = values[pick[0]].astype(np.float32)
    for index in pick[1:]:
        total += values[index]
    total *= np.float32(1.0 / math.prod(factors))
    return total


def halve(block: np.ndarray, kind: Literal["image", "label"], factors: Sequence[int] = (2, 2)) -> np.ndarray:
    """Next pyramid level of a block: its last ``len(factors)`` axes divided by ``factors`` (2 or 1 each), same
    dtype; ``(..., h, w) -> (..., h // 2, w // 2)`` by default.

    Images: the mean over each 2x2 (or 2x2x2, 1x2x2, …) cell (integers rounded half to even, computed as a
    wide-integer sum: exact and ~10x faster than a float mean; floats as a float32 sum of strided views, float16
    cast to float32 and back on onnxruntime's kernels, :mod:`unetcore.elementwise`, a slab at a time); labels:
    the first sample of each cell (never a class that is not there).
    """
    factors = tuple(int(f) for f in factors)
    dims = block.shape[-len(factors):]
    lead = block.shape[: block.ndim - len(factors)]
    out = tuple(d // f for d, f in zip(dims, factors))
    even = block[(Ellipsis, *(slice(0, o * f) for o, f in zip(out, factors)))]
    if kind == "label":
        return even[(Ellipsis, *(slice(None, None, f) for f in factors))]
    cell = math.prod(factors)
    if cell == 1:
        return even.copy()
    if block.dtype.kind in "ui" and block.dtype.itemsize <= 2:
        offsets = itertools.product(*(range(f) for f in factors))
        wide = np.int32 if block.dtype.kind == "i" else np.uint32
        pick = [(Ellipsis, *(slice(d, None, f) for d, f in zip(offset, factors))) for offset in offsets]
        total = even[pick[0]].astype(wide)
        for index in pick[1:]:
            total += even[index]
        shift, half = cell.bit_length() - 1, cell // 2
        quotient, rest = total >> shift, total & (cell - 1)
        quotient += (rest > half) | ((rest == half) & ((quotient & 1) == 1))
        return quotient.astype(block.dtype)
    if block.dtype.kind == "f" and block.dtype != np.float16:
        return _float_mean(even, factors).astype(block.dtype)
    if block.dtype == np.float16:  # slab by slab of the first halved axis: the float32 copy stays small
        axis, first = len(lead), factors[0]
        row_bytes = 4 * math.prod(even.shape) // max(1, even.shape[axis])
        rows = max(first, HALVE_SLAB_BYTES // max(1, row_bytes) // first * first)
        halved = np.empty((*lead, *out), np.float16)
        slab: np.ndarray | None = None  # one float32 slab for all (faulted in once a block, not once a slab)
        for a in range(0, even.shape[axis], rows):
            part = even[(*(slice(None),) * axis, slice(a, a + rows))]
            if slab is None or slab.shape != part.shape:
                slab = np.empty(part.shape, np.float32)
            halved[(*(slice(None),) * axis, slice(a // first, (a + rows) // first))] = to_float16(
                _float_mean(to_float32(part, slab), factors))  # exact casts on onnxruntime: numpy's are scalar loops
        return halved
    cells = [n for o, f in zip(out, factors) for n in (o, f)]
    axes = tuple(len(lead) + 2 * i + 1 - len(lead) - 2 * len(factors) for i in range(len(factors)))
    mean = even.astype(np.float32).reshape(*lead, *cells).mean(axis=axes)
    return (np.round(mean) if np.issubdtype(block.dtype, np.integer) else mean).astype(block.dtype)


def level_factors(src: zarr.Array, dst: zarr.Array, spatial_dims: int) -> tuple[int, ...]:
    """Per spatial axis, 2 where level ``dst`` halves level ``src``, else 1 (read from their shapes)."""
    return tuple(2 if d < s else 1 for s, d in zip(src.shape[-spatial_dims:], dst.shape[-spatial_dims:]))


def write_halved(group: zarr.Group, kind: Literal["image", "label"], box: Sequence[slice], values: np.ndarray) -> bool:
    """Write ``values``, level 0 of ``group`` at the spatial ``box``, halved (:func:`halve`) into level 1, when every
    level-1 chunk that the halved box touches lies inside it (one writer per chunk: a block of whole chunks of both
    levels). Returns whether it wrote; nothing is written when it cannot, or when ``group`` has one level.

    Bytes as :func:`build_pyramid` writes them (the same function of the same values), so a block task can build its
    part of level 1 while other blocks run, and the driver starts at level 2.
    """
    if "1" not in group:
        return False
    return write_halved_level(group["0"], group["1"], kind, box, values)


def write_halved_level(src: zarr.Array, dst: zarr.Array, kind: Literal["image", "label"], box: Sequence[slice],
                       values: np.ndarray) -> bool:
    """:func:`write_halved` on the two levels themselves (``src`` level 0, ``dst`` level 1), already open."""
    dims = len(box)
    factors = level_factors(src, dst, dims)
    region = []
    for cut, f, c, n in zip(box, factors, dst.chunks[-dims:], dst.shape[-dims:]):
        start, stop = int(cut.start) // f, min(int(cut.stop) // f, n)
        if int(cut.start) % f or start % c or (stop % c and stop != n):
            return False
        region.append(slice(start, stop))
    dst[(Ellipsis, *region)] = halve(np.asarray(values), kind, factors)
    return True


def source_pieces(src: zarr.Array, region: Sequence[slice], factors: Sequence[int]) -> list[tuple[slice, ...]]:
    """The parts of level ``src`` that halving (by ``factors``) reads for the spatial ``region`` of the next level,
    cut on ``src``'s chunk grid: each part lies in one chunk per axis (two where a chunk's size is odd along a
    halved axis), starts on a multiple of its axis' factor and has an even size except at the level's end, so
    halving the parts one by one gives the bytes of halving their union. A job then holds one decoded chunk at a
    time instead of the 2x-sized union (8 chunks of a volume) and decodes each once."""
    dims = len(region)
    cuts = []
    for r, f, c, n in zip(region, factors, src.chunks[-dims:], src.shape[-dims:]):
        lo, hi = r.start * f, min(r.stop * f, n)
        step = c if c % f == 0 else c * f
        edges = [lo, *range((lo // step + 1) * step, hi, step), hi]
        cuts.append([slice(a, b) for a, b in zip(edges, edges[1:]) if a < b])
    return list(itertools.product(*cuts))


def build_pyramid(
    group: zarr.Group, kind: Literal["image", "label"], threads: int = 0, *, first: int = 1,
    pool: ThreadPoolExecutor | None = None,
) -> None:
    """Fill levels ``first``..n from the level above, one output chunk per job (one writer per chunk).

    Each level is computed from the one above, reading the 2x-sized region (along the halved axes) of each output
    chunk one source chunk at a time (:func:`source_pieces`), so memory is two chunks per thread whatever the image
    size. ``pool`` reuses the caller's threads.
    """
    levels = sorted(int(k) for k in group.array_keys() if k.isdigit())
    own = None if pool is not None else ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1))
    workers = pool or own
    try:
        for level in (lv for lv in levels if lv >= max(1, first)):
            # every chunk written: zarr's test of each against the fill value took 6 ms of a 1 MiB label chunk's 10
            src, dst = group[str(level - 1)], group[str(level)].with_config({"write_empty_chunks": True})
            spatial_dims = dst.ndim - 1 if kind == "image" else dst.ndim
            factors = level_factors(src, dst, spatial_dims)
            steps = dst.chunks[-spatial_dims:]
            sizes = dst.shape[-spatial_dims:]

            def job(origin: tuple[int, ...], src: zarr.Array = src, dst: zarr.Array = dst,
                    factors: tuple[int, ...] = factors, steps: tuple[int, ...] = steps,
                    sizes: tuple[int, ...] = sizes) -> None:
                region = tuple(slice(o, min(o + c, n)) for o, c, n in zip(origin, steps, sizes))
                lead = dst.shape[: dst.ndim - len(region)]
                out = np.empty((*lead, *(r.stop - r.start for r in region)), dtype=dst.dtype)
                for piece in source_pieces(src, region, factors):  # each source chunk decoded once, one at a time
                    at = tuple(slice((p.start - r.start * f) // f, (p.stop - r.start * f) // f)
                               for p, r, f in zip(piece, region, factors))
                    out[(Ellipsis, *at)] = halve(np.asarray(src[(Ellipsis, *piece)]), kind, factors)
                dst[(Ellipsis, *region)] = out

            origins = itertools.product(*(range(0, n, c) for n, c in zip(sizes, steps)))
            list(workers.map(job, list(origins)))
    finally:
        if own is not None:
            own.shutdown()


def open_root(path: Path, mode: Literal["r", "r+"] = "r") -> zarr.Group:
    """Open an OME-Zarr store written by this package, or raise :class:`InputError` naming it."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such store", "run `unet ingest` first")
    try:
        root = zarr.open_group(store=str(path), mode=mode)
    except Exception as exc:  # zarr raises several types for a non-store
        raise InputError(path, f"not a Zarr store ({type(exc).__name__})", "point to an <id>.ome.zarr") from None
    if "ome" not in root.attrs or "0" not in root:
        raise InputError(path, "not an OME-Zarr image (no multiscales)", "point to an <id>.ome.zarr from ingest")
    return root


def image_array(root: zarr.Group, level: int = 0) -> zarr.Array:
    """The image array (C, H, W) or (C, D, H, W) at ``level``."""
    return root[str(level)]


def label_array(root: zarr.Group, name: str = "mask", level: int = 0) -> zarr.Array | None:
    """The label array (H, W) or (D, H, W) ``labels/<name>/<level>``, or None when the image has no such labels."""
    key = f"{LABELS_GROUP}/{name}/{level}"
    try:
        return root[key]
    except KeyError:
        return None


def unet_attrs(root: zarr.Group) -> dict[str, Any]:
    """This package's own metadata (statistics, source) stored beside the OME metadata."""
    return dict(root.attrs.get("unet", {}))


def set_unet_attrs(root: zarr.Group, values: dict[str, Any]) -> None:
    """Merge ``values`` into this package's metadata."""
    current = unet_attrs(root)
    current.update(values)
    root.attrs["unet"] = current


def geometry(root: zarr.Group) -> dict[str, Any]:
    """Where the store's voxels lie: ``{"spatial_dims", "spacing", "unit", "affine", "nifti"}``.

    A volume's is what ingestion kept from its source (the affine as nibabel gave it, the NIfTI header's geometry
    fields, for :func:`unetcore.io.writers.write_nifti`); a 2-D image's (or a store not written by ingest) is
    read from the multiscales metadata (spacing = level 0's scale, no affine).
    """
    kept = unet_attrs(root).get("geometry")
    if kept:
        return dict(kept)
    multiscale = root.attrs["ome"]["multiscales"][0]
    spatial = [a for a in multiscale["axes"] if a.get("type") == "space"]
    scale = multiscale["datasets"][0]["coordinateTransformations"][0]["scale"][-len(spatial):]
    unit = next((a["unit"] for a in spatial if a.get("unit")), None)
    return {"spatial_dims": len(spatial), "spacing": [float(s) for s in scale], "unit": unit, "affine": None,
            "nifti": None}
