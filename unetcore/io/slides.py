"""Whole-slide images read at a resolution in microns per pixel, never decoded whole.

A pyramidal TIFF (Aperio SVS, a tiled TIFF with SubIFDs or reduced pages, an OME-TIFF pyramid) offers a few
levels; a model is trained for one physical resolution. :func:`open_at_mpp` picks the level whose microns per
pixel is within ``tolerance`` (10 %) of the asked one, as TIAToolbox's ``resolution=0.5, units="mpp"`` does, or
builds that resolution from the nearest finer level by area averaging (:class:`ResampledSource`: each output
pixel is the mean of the source pixels it covers, fractions weighted, so a region is computed from its own
source pixels only and a read by blocks equals a read of the whole). Levels are read by region (tifffile's Zarr
view decodes only the tiles a region touches).

The result carries its :class:`SlidePlacement`: which level was read, the store's pixel size and the transform
back to level 0 (``level-0 pixel = store pixel * downsample`` per axis), which ingestion keeps in the store's
``unet`` attributes (``"level0": {"downsample": [fy, fx], "mpp": [my, mx], "level": k}``, ``mpp`` being level
0's microns per pixel) so that masks and shapes predicted at 0.5 µm/px land on the level-0 slide in QuPath.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unetcore.errors import InputError
from unetcore.io import readers
from unetcore.io.volumes import Geometry
from unetcore.modes import ChannelAxis

if TYPE_CHECKING:
    from scipy import sparse

__all__ = ["MPP_TOLERANCE", "ResampledSource", "SlidePlacement", "area_weights", "choose_level", "open_at_mpp"]

MPP_TOLERANCE = 0.1
"""A level is used as it is when its microns per pixel is within this fraction of the asked value."""

_TO_MICRONS = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}


@dataclass(frozen=True)
class SlidePlacement:
    """Where a store's pixels lie on the slide's level 0.

    ``level``: the pyramid level read; ``level0_mpp``: level 0's (y, x) microns per pixel; ``downsample``: level-0
    pixels per store pixel (y, x); ``mpp``: the store's (y, x) microns per pixel (``level0_mpp * downsample``);
    ``resampled``: True when the level was averaged down to ``mpp`` (no level was close enough).
    """

    level: int
    level0_mpp: tuple[float, float]
    downsample: tuple[float, float]
    mpp: tuple[float, float]
    resampled: bool

    def to_dict(self) -> dict[str, Any]:
        """The ``level0`` attribute of a store: ``{"downsample", "mpp" (level 0's), "level", "resampled"}``."""
        return {"downsample": [round(v, 9) for v in self.downsample], "mpp": [round(v, 9) for v in self.level0_mpp],
                "level": self.level, "resampled": self.resampled}


def choose_level(level_mpps: list[tuple[float, float]], target: float, tolerance: float = MPP_TOLERANCE
                 ) -> tuple[int, tuple[float, float]] | None:
    """The level to read for ``target`` µm/px and the factors (y, x) to average it down by (1, 1: use as is).

    A level within ``tolerance`` of the target on both axes is used as it is (the closest if several); else the
    coarsest level finer than the target is averaged down. None when every level is coarser than the target
    beyond the tolerance (no level can give it without inventing pixels).
    """
    def error(mpp: tuple[float, float]) -> float:
        return max(abs(m / target - 1.0) for m in mpp)

    close = [k for k, mpp in enumerate(level_mpps) if error(mpp) <= tolerance]
    if close:
        return min(close, key=lambda k: (error(level_mpps[k]), k)), (1.0, 1.0)
    finer = [k for k, mpp in enumerate(level_mpps) if max(mpp) < target]
    if not finer:
        return None
    k = max(finer, key=lambda i: (min(level_mpps[i]), i))
    my, mx = level_mpps[k]
    return k, (target / my, target / mx)


def area_weights(n_in: int, factor: float, start: int, stop: int) -> tuple[sparse.csr_matrix, int]:
    """Area-averaging weights of output pixels ``[start, stop)`` along one axis, downsampling by ``factor`` >= 1.

    Output pixel ``j`` covers source ``[j * factor, (j + 1) * factor)``; each source pixel counts with the length
    of its overlap, divided by ``factor``. Returns the ``(stop - start, n)`` matrix and the first source index
    ``s0`` it applies to (columns are source pixels ``s0 .. s0 + n - 1``, all inside ``[0, n_in)``).
    """
    from scipy import sparse  # imported here: only --mpp resampling needs it (unet predict's start-up does not)

    lo = np.arange(start, stop, dtype=np.float64) * factor
    hi = lo + factor
    s0, s1 = int(math.floor(lo[0])), min(n_in, int(math.ceil(hi[-1])))
    rows, cols, vals = [], [], []
    for j, (a, b) in enumerate(zip(lo, hi)):
        first, last = int(math.floor(a)), min(n_in, int(math.ceil(b)))
        idx = np.arange(first, last)
        overlap = np.minimum(idx + 1, b) - np.maximum(idx, a)
        keep = overlap > 1e-12
        rows.append(np.full(int(keep.sum()), j))
        cols.append(idx[keep] - s0)
        vals.append(overlap[keep] / factor)
    matrix = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                               shape=(stop - start, s1 - s0))
    return matrix, s0


class ResampledSource:
    """A 2-D :class:`~unetcore.io.readers.ImageSource` averaged down by ``factors`` (y, x), read by region.

    Same face as the source for ingestion (``spatial_shape``, ``channels``, ``dtype``, ``decode_unit``,
    ``geometry``, ``read``); a region reads only the source pixels under it. Integer images are rounded half to
    even (as the store's pyramid is).
    """

    def __init__(self, source: readers.ImageSource, factors: tuple[float, float], geometry: Geometry) -> None:
        if source.spatial_dims != 2:
            raise InputError(source.path, "microns per pixel apply to 2-D slides, this is a volume")
        self.source, self.factors, self.geometry = source, factors, geometry
        self.path, self.channels, self.dtype = source.path, source.channels, source.dtype
        self.spatial_shape = tuple(max(1, int(math.floor(n / f + 1e-9))) for n, f in zip(source.spatial_shape,
                                                                                         factors))
        self.spatial_dims, self.sequential = 2, source.sequential
        self.decode_unit = tuple(max(1, int(math.ceil(u / f))) for u, f in zip(source.decode_unit, factors))

    @property
    def shape(self) -> tuple[int, ...]:
        """``(H, W, C)``."""
        return (*self.spatial_shape, self.channels)

    def read(self, ys: slice, xs: slice) -> np.ndarray:
        """Region ``(h, w, C)`` of the averaged image, in the source's dtype."""
        (y0, y1, _), (x0, x1, _) = ys.indices(self.spatial_shape[0]), xs.indices(self.spatial_shape[1])
        wy, sy = area_weights(self.source.spatial_shape[0], self.factors[0], y0, max(y0 + 1, y1))
        wx, sx = area_weights(self.source.spatial_shape[1], self.factors[1], x0, max(x0 + 1, x1))
        pixels = self.source.read(slice(sy, sy + wy.shape[1]), slice(sx, sx + wx.shape[1]))
        h, w, c = pixels.shape
        rows = wy @ pixels.reshape(h, w * c).astype(np.float32)  # (oh, w * C)
        cols = wx @ rows.reshape(-1, w, c).transpose(1, 0, 2).reshape(w, -1)  # (ow, oh * C)
        out = np.asarray(cols).reshape(wx.shape[0], wy.shape[0], c).transpose(1, 0, 2)
        out = out[: max(0, y1 - y0), : max(0, x1 - x0)]
        if self.dtype.kind in "ui":
            info = np.iinfo(self.dtype)
            return np.clip(np.rint(out), info.min, info.max).astype(self.dtype)
        return out.astype(self.dtype)

    def close(self) -> None:
        """Release the source's file handle."""
        self.source.close()


def _microns(geometry: Geometry, path: Path) -> tuple[float, float] | None:
    """(y, x) pixel size in micrometres, or None when the file gives none (or in a unit that is not a length)."""
    if geometry.spacing is None or len(geometry.spacing) != 2:
        return None
    scale = _TO_MICRONS.get(geometry.unit or "")
    if scale is None:
        return None
    return (float(geometry.spacing[0]) * scale, float(geometry.spacing[1]) * scale)


def open_at_mpp(path: str | Path, mpp: float, *, channel_axis: ChannelAxis = "auto",
                max_pixels: int = readers.DEFAULT_MAX_PIXELS, tolerance: float = MPP_TOLERANCE
                ) -> tuple[readers.ImageSource | ResampledSource, SlidePlacement]:
    """Open ``path`` at ``mpp`` microns per pixel: a pyramid level within ``tolerance``, else the nearest finer
    level averaged down (see :func:`choose_level`). Only headers are read here.

    Raises:
        InputError: the image has no pixel size (``--mpp`` needs one), is a volume, or has no level at least as
            fine as ``mpp`` (asking finer than level 0); each names the file and its finest resolution.
    """
    path = Path(path)
    base = readers.open_image(path, channel_axis=channel_axis, max_pixels=max_pixels)
    if base.spatial_dims != 2:
        raise InputError(path, f"is a volume {base.spatial_shape}; --mpp applies to 2-D slides",
                         "ingest volumes without --mpp")
    level0 = _microns(base.geometry, path)
    if level0 is None:
        raise InputError(path, f"has no pixel size, so --mpp {mpp:g} cannot choose a resolution",
                         "ingest it without --mpp, or write its pixel size into the file (OME PhysicalSizeX/Y, "
                         "SVS MPP, TIFF resolution in centimetres)")
    levels = [base] + [readers.open_image(path, channel_axis=channel_axis, max_pixels=max_pixels, level=k)
                       for k in range(1, readers.pyramid_level_count(path))]
    mpps = [(level0[0] * base.spatial_shape[0] / lv.spatial_shape[0],
             level0[1] * base.spatial_shape[1] / lv.spatial_shape[1]) for lv in levels]
    choice = choose_level(mpps, mpp, tolerance)
    if choice is None:
        finest = f"{mpps[0][1]:.4g} x {mpps[0][0]:.4g}"
        raise InputError(path, f"has no level for {mpp:g} µm/px: its finest (level 0) is {finest} µm/px",
                         f"ask for {min(mpps[0]):.4g} µm/px or coarser")
    k, factors = choice
    for i, lv in enumerate(levels):
        if i != k:
            lv.close()
    chosen = levels[k]
    resampled = factors != (1.0, 1.0)
    # store pixel j covers level-k pixels [j f, (j + 1) f), each level-k pixel d_k level-0 pixels
    downsample = (mpps[k][0] / level0[0] * factors[0], mpps[k][1] / level0[1] * factors[1])
    store_mpp = (level0[0] * downsample[0], level0[1] * downsample[1])
    geometry = Geometry(spacing=store_mpp, unit="micrometer")
    source: readers.ImageSource | ResampledSource
    if resampled:
        source = ResampledSource(chosen, factors, geometry)
    else:
        chosen.geometry = geometry
        source = chosen
    return source, SlidePlacement(level=k, level0_mpp=level0, downsample=downsample, mpp=store_mpp,
                                  resampled=resampled)
