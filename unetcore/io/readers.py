"""Open image and mask files lazily, as region-readable sources in (Z)YXC order, refusing bad input early.

:func:`open_image` reads only a file's header (TIFF tags, the ``.npy`` header, Zarr metadata, the PNG/JPEG
header, the NIfTI header, the headers of a DICOM series' slices) to learn its shape, dtype and channel layout,
and checks them before any pixel is read: a missing, corrupt or truncated file, an empty image, a declared shape
above ``max_pixels`` (decompression bombs), an unsupported dtype, more than 64 channels or axes that are neither
an image nor a volume each raise one :class:`InputError` naming the file. The returned :class:`ImageSource` has
two spatial axes (Y, X) or three (Z, Y, X, a volume), then channels, and reads regions on demand:

* TIFF (BigTIFF, OME-TIFF, ImageJ, tiled or striped, pyramids through SubIFDs or reduced pages, z-stacks):
  tifffile's Zarr store over series 0, level 0 (pyramids keep their full-resolution level): a region read
  decodes only the tiles (or strips) it touches, a z-stack only the pages of its z-slab;
  :attr:`ImageSource.decode_unit` tells callers that unit. An uncompressed TIFF whose pixels are contiguous is
  read through a memory map instead (its single strip would otherwise be one whole-image chunk);
* ``.npy``: a read-only memory map, created per read so that resident memory stays at one region;
* Zarr: the array itself, or level ``0`` of an OME-Zarr multiscale group (axes from its metadata);
* PNG/JPEG: decoded whole by Pillow on first use and cached (these formats cannot be read by region);
* NIfTI (``.nii`` by memory map, ``.nii.gz`` decompressed forward by z-slab) and DICOM series (a folder of
  slices, read slice by slice): see :mod:`unetcore.io.volumes`.

Which arrays are volumes: NIfTI and DICOM always; TIFF and OME-Zarr when their axes name a Z of more than one
entry (with ``channel_axis="auto"``); ``.npy`` and unnamed arrays only with ``channel_axis`` ``zyx``, ``zyxc`` or
``czyx`` (``auto`` keeps today's 2-D rules for them). Each source carries its :class:`Geometry` (spacing,
unit, and for NIfTI/DICOM the affine).

An :class:`ImageSource` pickles as its path and metadata, so it can be sent to Dask workers; each process opens
the file again on its first read and keeps the handle. It is also array-like (``shape``, ``dtype``, ``ndim``,
``source[y0:y1, x0:x1]`` or ``source[z0:z1, y0:y1, x0:x1]``), which ``dask.array.from_array`` accepts.

:func:`open_mask` opens a label mask for an image and checks it band by band (never whole) against the image and
the declared number of classes: at open, or (``scan=False``) while the caller streams it.
"""

from __future__ import annotations

import glob
import re
import threading
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile
import zarr
from PIL import Image

from unetcore.errors import InputError, first_line, reading
from unetcore.io import volumes
from unetcore.io.volumes import Geometry
from unetcore.modes import ChannelAxis, check_mode

__all__ = [
    "IMAGE_DTYPES",
    "MASK_DTYPES",
    "SUPPORTED_SUFFIXES",
    "VOLUME_SUFFIXES",
    "Geometry",
    "ImageSource",
    "MaskSource",
    "check_finite",
    "dropped_resolution",
    "find_mask",
    "ignored_inputs",
    "image_stem",
    "is_supported",
    "iter_row_bands",
    "list_images",
    "open_image",
    "open_mask",
    "pyramid_level_count",
]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".svs", ".png", ".jpg", ".jpeg", ".npy", ".zarr")
# volumes only (besides TIFF, Zarr and .npy z-stacks); a DICOM series is a folder of slices
VOLUME_SUFFIXES: tuple[str, ...] = volumes.NIFTI_SUFFIXES
IMAGE_DTYPES: tuple[str, ...] = ("uint8", "uint16", "int16", "float32")
# Masks may also come as labels from numpy/scikit-image (int32/int64/uint32), bool, or float64.
MASK_DTYPES: tuple[str, ...] = IMAGE_DTYPES + ("bool", "uint32", "int32", "int64", "float64")
MAX_CHANNELS = 64
DEFAULT_MAX_PIXELS = 50_000_000_000
BAND_PIXELS = 1 << 24  # pixels per band when a whole file is checked band by band (16 Mi)
_FORMATS = {
    ".tif": "tiff", ".tiff": "tiff", ".svs": "tiff", ".png": "pil", ".jpg": "pil", ".jpeg": "pil", ".npy": "npy",
    ".zarr": "zarr",
}
_SPATIAL = "ZYX"
_AXIS_WORDS = {"Z": "slice", "Y": "row", "X": "column"}
# Pillow mode -> (dtype, channels, mode to convert to before use; "" keeps it)
_PIL_MODES: dict[str, tuple[str, int, str]] = {
    "1": ("bool", 1, ""),
    "L": ("uint8", 1, ""),
    "LA": ("uint8", 2, ""),
    "RGB": ("uint8", 3, ""),
    "RGBA": ("uint8", 4, ""),
    "CMYK": ("uint8", 3, "RGB"),
    "YCbCr": ("uint8", 3, "RGB"),
    "I;16": ("uint16", 1, ""),
    "I;16L": ("uint16", 1, ""),
    "I;16B": ("uint16", 1, ""),
    "I;16N": ("uint16", 1, ""),
    "I": ("int32", 1, ""),
    "F": ("float32", 1, ""),
}
_MASK_SUFFIXES = tuple(
    variant
    for suffix in SUPPORTED_SUFFIXES + (".ome.tif", ".ome.tiff", ".ome.zarr") + VOLUME_SUFFIXES
    for variant in dict.fromkeys((suffix, suffix.upper()))
)
_UNITS = {"µm": "micrometer", "um": "micrometer", "micron": "micrometer", "microns": "micrometer",
          "micrometer": "micrometer", "\\u00B5m": "micrometer", "nm": "nanometer", "nanometer": "nanometer",
          "mm": "millimeter", "millimeter": "millimeter", "cm": "centimeter", "centimeter": "centimeter",
          "m": "meter", "meter": "meter"}
_SVS_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")  # Aperio: "...|MPP = 0.2520|..."
_PIL_LOCK = threading.Lock()  # Pillow's bomb limit is a module global: change it under a lock


@dataclass(frozen=True)
class _Storage:
    """How to get (Z)YXC pixels out of the file.

    ``axes`` names each stored axis: ``Z``, ``Y``, ``X``, ``C``, or ``1`` for a singleton axis that is indexed
    away (e.g. OME-Zarr ``t`` of size 1). ``key`` is the array's path inside a Zarr group; ``convert`` a Pillow
    mode to convert to after decoding (e.g. a palette image to RGB; palette masks keep their indices).
    ``decode_unit`` is the smallest unit the file decodes per spatial axis (a TIFF tile or strip, a Zarr chunk, a
    NIfTI.gz or DICOM slice), all 1 when any region is cheap (memory maps, decoded PNG/JPEG). ``raw`` locates
    uncompressed contiguous pixels (``.npy``, uncompressed TIFF or NIfTI), which are read through a short-lived
    memory map instead of a decoder. ``rescale`` (slope, intercept) and ``cast`` (a dtype name) turn stored
    values into what reads give (NIfTI ``scl_slope``/``scl_inter``, float64 to float32). ``volume``: the
    NIfTI/DICOM layout (:mod:`unetcore.io.volumes`).
    """

    fmt: Literal["tiff", "pil", "npy", "zarr", "nifti", "dicom"]
    axes: str
    key: str = ""
    convert: str = ""
    decode_unit: tuple[int, ...] = (1, 1)
    raw: _Raw | None = None
    rescale: tuple[float, float] | None = None
    cast: str = ""
    volume: volumes.NiftiLayout | volumes.DicomSeries | None = None
    sequential: bool = False  # reads in z order are much cheaper than in any order (a gzip stream)
    level: int = 0  # the pyramid level of a TIFF's series 0 that reads come from


@dataclass(frozen=True)
class _Raw:
    """Uncompressed pixels stored contiguously at ``offset`` as an array of ``shape`` (``order`` C or F)."""

    offset: int
    shape: tuple[int, ...]
    dtype: str
    order: Literal["C", "F"] = "C"


class _RawArray:
    """Region reads of raw pixels through a memory map created per read and dropped after it.

    A memory map kept open would count every page ever touched in the process's resident memory (RSS), so a
    streamed pass over a 10 GB ``.npy`` would look like a 10 GB process; mapping per read keeps RSS at one region.
    """

    def __init__(self, path: Path, raw: _Raw) -> None:
        self.path, self.raw = path, raw

    def __getitem__(self, index: Any) -> np.ndarray:
        mapped = np.memmap(self.path, dtype=np.dtype(self.raw.dtype), mode="r", offset=self.raw.offset,
                           shape=self.raw.shape, order=self.raw.order)
        try:
            return np.array(mapped[index])
        finally:
            del mapped


@dataclass
class ImageSource:
    """An image file opened lazily: its spatial shape (``(H, W)`` or ``(D, H, W)``), channels, dtype, geometry
    and region reads in canonical ``(..., C)`` order.

    Picklable: only the path and metadata travel; the opened handle is re-created per process on first use.
    """

    path: Path
    spatial_shape: tuple[int, ...]
    channels: int
    dtype: np.dtype
    storage: _Storage
    geometry: Geometry = field(default_factory=Geometry)
    _handle: Any = field(default=None, init=False, repr=False, compare=False)

    # -- array-like face --------------------------------------------------------------------------------------
    @property
    def spatial_dims(self) -> int:
        """2 for an image, 3 for a volume."""
        return len(self.spatial_shape)

    @property
    def shape_yxc(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of a 2-D image.

        Raises:
            ValueError: the source is a volume (use :attr:`spatial_shape` and :attr:`channels`).
        """
        if self.spatial_dims != 2:
            raise ValueError(f"{self.path} is a volume {self.spatial_shape}: it has no (H, W, C) shape")
        return (self.spatial_shape[0], self.spatial_shape[1], self.channels)

    @property
    def decode_unit(self) -> tuple[int, ...]:
        """Size per spatial axis of the file's decode unit (tile, strip, chunk, slice); all 1 if any region is
        cheap.

        Readers of big images should cut their regions along these: a region narrower than a strip still decodes
        the whole strip.
        """
        return self.storage.decode_unit

    @property
    def chunks_yx(self) -> tuple[int, int]:
        """Rows and columns of the decode unit (:attr:`decode_unit`'s last two entries)."""
        return (self.storage.decode_unit[-2], self.storage.decode_unit[-1])

    @property
    def sequential(self) -> bool:
        """True when regions are much cheaper read in z order (a gzipped NIfTI): readers should keep to it."""
        return self.storage.sequential

    @property
    def shape(self) -> tuple[int, ...]:
        """``(H, W, C)`` or ``(D, H, W, C)``."""
        return self.spatial_shape + (self.channels,)

    @property
    def ndim(self) -> int:
        """3 for an image (Y, X, C), 4 for a volume (Z, Y, X, C)."""
        return self.spatial_dims + 1

    def __getitem__(self, key: Any) -> np.ndarray:
        """``source[ys, xs]``, ``source[zs, ys, xs, cs]``, … with ints or slices (positive steps), as on
        :attr:`shape`."""
        key = key if isinstance(key, tuple) else (key,)
        n = self.spatial_dims
        if len(key) > n + 1:
            raise IndexError(f"too many indices for a {self.shape} source: {key}")
        key = key + (slice(None),) * (n + 1 - len(key))
        regions, picks = [], []
        for k, size in zip(key[:n], self.spatial_shape):
            if isinstance(k, (int, np.integer)):
                i = int(k) + size if k < 0 else int(k)
                if not 0 <= i < size:
                    raise IndexError(f"index {k} out of range for an axis of size {size}")
                regions.append(slice(i, i + 1))
                picks.append(0)
            elif isinstance(k, slice):
                start, stop, step = k.indices(size)
                if step < 1:
                    raise IndexError("negative steps are not supported")
                regions.append(slice(start, max(start, stop)))
                picks.append(slice(None, None, step))
            else:
                raise TypeError(f"unsupported index {k!r}: use ints or slices")
        return self.read(*regions)[tuple(picks)][..., key[n]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.read(*(slice(0, n) for n in self.spatial_shape))
        return out if dtype is None else out.astype(dtype)

    # -- reading ----------------------------------------------------------------------------------------------
    def read(self, *region: slice) -> np.ndarray:
        """Read a region, one slice per spatial axis (``read(ys, xs)``, ``read(zs, ys, xs)``; clipped to the
        image, step 1), as ``(..., C)`` of ``dtype``."""
        return self.read_stored(*region)

    def read_stored(self, *region: slice) -> np.ndarray:
        """The stored pixels of a region as ``(..., C_stored)``, after the header's rescale (native byte order)."""
        if len(region) != self.spatial_dims:
            raise ValueError(f"read() takes {self.spatial_dims} slices, one per spatial axis, got {len(region)}")
        bounds = []
        for s, n in zip(region, self.spatial_shape):
            start, stop, step = s.indices(n)
            if step != 1:
                raise ValueError("read() takes slices with step 1")
            bounds.append(slice(start, max(start, stop)))
        letters = _SPATIAL[-self.spatial_dims :]
        where = dict(zip(letters, bounds))
        index = tuple(where[a] if a in where else (slice(None) if a == "C" else 0) for a in self.storage.axes)
        try:
            block = np.asarray(self._array()[index])
        except InputError:
            raise
        except Exception as exc:  # a corrupt tile or strip, a vanished file: say which file and where
            place = ", ".join(f"{a.lower()}={b.start}:{b.stop}" for a, b in zip(letters, bounds))
            raise InputError(self.path, f"cannot read region {place} ({type(exc).__name__}: {first_line(exc)})"
                             ) from exc
        kept = self.storage.axes.replace("1", "")
        block = block.transpose([kept.index(a) for a in _SPATIAL + "C" if a in kept])
        if "C" not in kept:
            block = block[..., None]
        if self.storage.rescale is not None:
            slope, inter = self.storage.rescale
            block = block.astype(np.float64) * slope + inter
        if self.storage.cast:
            block = block.astype(self.storage.cast)
        if not block.dtype.isnative:
            block = block.astype(block.dtype.newbyteorder("="))
        return block

    def _array(self) -> Any:
        """The opened array (a Zarr array, a memory map or a decoded ndarray), opened once per process."""
        if self._handle is None:
            self._handle = _OPENERS[self.storage.fmt](self.path, self.storage)
        return self._handle[1] if isinstance(self._handle, tuple) else self._handle

    def close(self) -> None:
        """Release the open file handle, if any (it is reopened on the next read)."""
        handle, self._handle = self._handle, None
        if isinstance(handle, tuple):
            handle[0].close()
        elif isinstance(handle, volumes.GzipVolume):
            handle.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None  # tifffile's Zarr store, gzip streams and memory maps are not picklable
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass
class MaskSource(ImageSource):
    """A mask: reads give ``(..., 1)`` class indices in ``dtype`` (uint8 unless there are > 256 classes).

    Only the first stored channel is read (an RGB(A) mask was checked to have equal colour channels).
    ``stored_dtype``: the dtype in the file. ``map_255``: a binary mask saved as 0/255, whose 255 is read as 1.
    ``n_classes``: values must lie in ``[0, n_classes)``. ``classes``: the class indices found by the scan at
    open (None when opened with ``scan=False``; then read with :meth:`read_checked`).
    """

    stored_dtype: np.dtype = field(default_factory=lambda: np.dtype("uint8"))
    map_255: bool = False
    n_classes: int = 2
    classes: frozenset[int] | None = None

    def read(self, *region: slice) -> np.ndarray:
        """Read a region as ``(..., 1)`` class indices."""
        return self._to_classes(self.read_stored(*region))

    def read_checked(self, *region: slice) -> tuple[np.ndarray, set[int]]:
        """Read a region as ``(..., 1)`` class indices and check its stored values on the way.

        Returns the class indices and the stored values seen in the region; pass the union of those over the
        whole mask to :meth:`check_seen` at the end.

        Raises:
            InputError: the region has differing colour channels, non-integer or out-of-range values.
        """
        stored = self.read_stored(*region)
        start = region[0].indices(self.spatial_shape[0])[0]
        seen = _check_mask_band(self.path, stored, self.n_classes, start, _AXIS_WORDS[_SPATIAL[-self.spatial_dims]])
        return self._to_classes(stored), seen

    def check_seen(self, seen: set[int]) -> frozenset[int]:
        """Check the stored values seen over the whole mask; return the class indices they become.

        Raises:
            InputError: a binary mask uses both 1 and 255 (ambiguous).
        """
        if self.n_classes == 2 and {1, 255} <= seen:
            raise InputError(self.path, "mask mixes values 1 and 255", "a binary mask should use 0/1 or 0/255, not both")
        return frozenset(1 if (v == 255 and self.map_255) else v for v in seen)

    def _to_classes(self, stored: np.ndarray) -> np.ndarray:
        block = stored[..., :1]
        if self.map_255:
            block = np.where(block == 255, 1, block)
        return block.astype(self.dtype)


# --- public functions ---------------------------------------------------------------------------------------


def open_image(
    path: str | Path, channel_axis: ChannelAxis = "auto", max_pixels: int = DEFAULT_MAX_PIXELS, *, level: int = 0
) -> ImageSource:
    """Open an image or a volume lazily, after checking its header.

    Args:
        path: a ``.tif/.tiff/.png/.jpg/.jpeg/.npy/.nii/.nii.gz`` file, a ``.zarr`` folder, or a folder holding
            one DICOM series.
        channel_axis: how an array is laid out. ``"auto"`` trusts the file's own axis names (TIFF samples,
            channels or Z, OME-Zarr axes; NIfTI and DICOM are volumes) and otherwise reads a 3-D array as a 2-D
            image with channels, guessing which axis: the last axis is channels if it has 3 or 4 entries, or at
            most 8 and fewer than the first; the first axis is channels if it has at most 8 entries and fewer
            than the last; anything else is refused as ambiguous. ``"yx"`` demands a 2-D image; ``"yxc"`` and
            ``"cyx"`` read a 3-D array as an image with channels last or first; ``"zyx"``, ``"zyxc"`` and
            ``"czyx"`` read a 3-D array as a volume and a 4-D one as a volume with channels last or first.
        max_pixels: refuse images with more than this many pixels (H x W, or D x H x W voxels), judged from the
            header alone.
        level: the pyramid level of a TIFF to read (0 = full resolution; see :func:`pyramid_level_count`); its
            pixel size is level 0's scaled by the ratio of the two levels' shapes. Other formats have level 0 only.

    Returns:
        An :class:`ImageSource` (``spatial_shape`` ``(H, W)`` or ``(D, H, W)``; ``shape_yxc == (H, W, C)`` for
        a 2-D image).

    Raises:
        InputError: the file is missing, of an unsupported type, unreadable, corrupt or truncated, empty, too
            large, has an unsupported dtype, more than 64 channels or axes that are neither an image nor a volume.
    """
    return _open(Path(path), channel_axis, max_pixels, IMAGE_DTYPES, role="image", level=level)


def pyramid_level_count(path: str | Path) -> int:
    """How many pyramid levels a file offers to :func:`open_image` (``level=0 .. n-1``): a TIFF's series 0 levels
    (SVS resolutions, SubIFDs, reduced pages), 1 for every other format.

    Raises:
        InputError: the TIFF cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file does not exist")
    if _format(path) != "tiff":
        return 1
    with reading(path, "not a readable TIFF file"), tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise InputError(path, "TIFF file holds no image")
        return len(tif.series[0].levels)


def open_mask(
    path: str | Path,
    image: ImageSource,
    num_classes: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    scan: bool = True,
) -> MaskSource:
    """Open a mask for ``image`` and check it band by band.

    A mask has the image's spatial axes (or those and one channel; an RGB(A) mask whose colour channels are all
    equal is accepted and read as one channel), of an integer, bool or float dtype (floats must hold whole
    numbers), the same shape as its image (a volume's mask is a volume: NIfTI, DICOM, a TIFF or OME-Zarr z-stack,
    or a 3-D ``.npy`` read as ``zyx``), the same affine when both files have one, with values in
    ``[0, max(2, num_classes))``. Masks saved as 0/255 (usual for binary PNG masks) are accepted when the mask is
    binary (``num_classes <= 2``) and read with 255 as 1; a mask mixing 1 and 255 is refused as ambiguous.

    Args:
        scan: check every value now (one pass over the mask; ``classes`` holds what was found). With False only
            the header is checked (shape, dtype, channels) and a caller that streams the mask anyway checks it on
            the way with :meth:`MaskSource.read_checked` and :meth:`MaskSource.check_seen`: one pass, not two.

    Raises:
        InputError: any of the above does not hold; the message names the mask (and the image for shape and
            affine).
    """
    path = Path(path)
    raw = _open(path, "auto", max_pixels, MASK_DTYPES, role="mask", volume_hint=image.spatial_dims == 3)
    if raw.spatial_shape != image.spatial_shape:
        raise InputError(
            path,
            f"mask shape {'x'.join(map(str, raw.spatial_shape))} does not match image {image.path.name} shape "
            f"{'x'.join(map(str, image.spatial_shape))}",
            "masks must have the same height and width as their image" if image.spatial_dims == 2
            else "a volume's mask is a volume of the same depth, height and width",
        )
    _check_same_affine(path, raw.geometry, image)
    _check_same_spacing(path, raw.geometry, image)
    if raw.channels not in (1, 3, 4):
        raise InputError(path, f"mask has {raw.channels} channels", "save the mask as a single-channel label image")
    n_classes = max(2, int(num_classes))
    mask = MaskSource(
        path=path,
        spatial_shape=raw.spatial_shape,
        channels=1,
        dtype=np.dtype("uint8" if n_classes <= 256 else "int32"),
        storage=raw.storage,
        geometry=raw.geometry,
        stored_dtype=raw.dtype,
        map_255=n_classes == 2,  # until a scan says there is no 255; 1 and 255 together are refused
        n_classes=n_classes,
    )
    if scan:
        seen: set[int] = set()
        word = _AXIS_WORDS[_SPATIAL[-raw.spatial_dims]]
        for first, band in iter_row_bands(raw):
            seen |= _check_mask_band(path, band, n_classes, first.start, word)
        mask.map_255 = n_classes == 2 and 255 in seen
        mask.classes = mask.check_seen(seen)
    mask._handle = raw._handle  # keep what is already open (or decoded, for PNG)
    return mask


def _check_same_affine(path: Path, geometry: Geometry, image: ImageSource) -> None:
    """A mask and its image that both carry an affine must carry the same one (to a thousandth of a voxel)."""
    if geometry.affine is None or image.geometry.affine is None:
        return
    mine, theirs = np.asarray(geometry.affine), np.asarray(image.geometry.affine)
    spacing = image.geometry.spacing or (1.0,)
    tolerance = 1e-3 * max(min(abs(s) for s in spacing), 1e-6)
    if not np.allclose(mine, theirs, rtol=0, atol=tolerance):
        worst = float(np.abs(mine - theirs).max())
        raise InputError(path, f"mask affine differs from image {image.path.name}'s (by up to {worst:.4g}; "
                         f"mask origin {_origin(mine)}, image origin {_origin(theirs)})",
                         "the mask must lie on the image's voxel grid: resample it onto the image")


_METRES = {"nanometer": 1e-9, "micrometer": 1e-6, "millimeter": 1e-3, "centimeter": 1e-2, "meter": 1.0}


def _check_same_spacing(path: Path, geometry: Geometry, image: ImageSource) -> None:
    """A mask and its image that both state a pixel size with a unit must state the same one (to 1 ppm)."""
    mine, theirs = geometry, image.geometry
    if not (mine.spacing and theirs.spacing and mine.unit in _METRES and theirs.unit in _METRES):
        return
    a = np.asarray(mine.spacing, float) * _METRES[mine.unit]
    b = np.asarray(theirs.spacing, float) * _METRES[theirs.unit]
    if a.shape != b.shape or not np.allclose(a, b, rtol=1e-6, atol=0):
        raise InputError(path, f"mask pixel size {_size(mine)} differs from image {image.path.name}'s "
                         f"{_size(theirs)}", "save the mask with its image's pixel size (or none)")


def _size(geometry: Geometry) -> str:
    return " x ".join(f"{s:g}" for s in geometry.spacing or ()) + f" {geometry.unit}"


def dropped_resolution(path: str | Path) -> str | None:
    """A note when a TIFF states a resolution that is not taken as its pixel size, else None.

    A resolution in inches (``ResolutionUnit`` 2) is the DPI of a photo or a scan, not a microscope's pixel size,
    so the image stays in pixels; the note says so, naming the file (ingestion keeps it in the manifest and the
    report). A resolution of 1 per inch (a writer's default) says nothing and gets no note.
    """
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome or tif.is_imagej:
                return None
            page = tif.pages[0]
            unit, x_res = page.tags.get("ResolutionUnit"), page.tags.get("XResolution")
            if unit is None or int(unit.value) != 2 or x_res is None:
                return None
            numerator, denominator = x_res.value
            dpi = numerator / denominator if denominator else 0.0
    except (OSError, ValueError, TypeError, tifffile.TiffFileError):
        return None
    if dpi in (0.0, 1.0):
        return None
    return (f"{path}: TIFF resolution {dpi:g} dpi (ResolutionUnit inch) is not taken as a pixel size (the DPI of "
            "photos and scans); stored in pixels")


def _origin(affine: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in affine[:3, 3]) + ")"


def check_finite(source: ImageSource) -> None:
    """Raise :class:`InputError` if a float image holds NaN or Inf; checked band by band. No-op for integers."""
    if source.dtype.kind != "f":
        return
    word = _AXIS_WORDS[_SPATIAL[-source.spatial_dims]]
    for first, band in iter_row_bands(source):
        bad = ~np.isfinite(band)
        if bad.any():
            at = first.start + int(np.argwhere(bad)[0][0])
            raise InputError(source.path, f"image contains NaN or Inf values (first at {word} {at})",
                             "replace them (e.g. with 0) before ingesting")


def iter_row_bands(source: ImageSource, band_pixels: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield ``(range, pixels)`` for bands along the first spatial axis (rows of an image, z-slabs of a volume)
    covering the source, each about ``band_pixels`` values.

    The default band holds 16 Mi values (64 MiB of float32), so memory does not grow with the image.
    """
    first, *rest = source.spatial_shape
    per_step = int(np.prod(rest, dtype=np.int64)) * source.channels
    rows = max(1, (band_pixels or BAND_PIXELS) // max(1, per_step))
    if 256 <= rows < first:
        rows = rows // 256 * 256  # whole tiles for tiled TIFFs (256 is the common tile edge)
    whole = [slice(0, n) for n in rest]
    for start in range(0, first, rows):
        band = slice(start, min(start + rows, first))
        yield band, source.read(band, *whole)


GLOB_CHARS = frozenset("*?[")


def is_supported(path: Path) -> bool:
    """A visible file (or ``.zarr`` folder) with a supported suffix, a NIfTI file, or a folder of DICOM slices."""
    if path.name.startswith("."):
        return False
    if volumes.is_nifti(path):
        return path.is_file()
    suffix = path.suffix.lower()
    if suffix in SUPPORTED_SUFFIXES:
        return path.is_dir() if suffix == ".zarr" else path.is_file()
    return volumes.is_dicom_folder(path)


def _hint() -> str:
    return f"supported: {', '.join(SUPPORTED_SUFFIXES + VOLUME_SUFFIXES)}, or a folder of DICOM slices"


def list_images(location: str | Path, *, empty_ok: bool = False) -> list[Path]:
    """The supported images of ``location``, sorted by path; hidden files are ignored.

    ``location`` is a folder (not recursive; its sub-folders that hold DICOM slices are images), one image file,
    a folder that is one DICOM series, or a glob such as ``/data/*.tif`` (``**`` recurses).

    Raises:
        InputError: the folder or file does not exist, is of an unsupported type, or (unless ``empty_ok``)
            ``location`` holds no supported image.
    """
    text = str(location)
    if GLOB_CHARS & set(text):
        found = sorted(p for p in map(Path, glob.glob(text, recursive=True)) if is_supported(p))
    else:
        path = Path(text)
        if not path.exists():
            raise InputError(path, "folder does not exist" if not path.suffix else "file does not exist")
        if path.is_dir() and path.suffix.lower() != ".zarr":
            found = sorted(p for p in path.iterdir() if is_supported(p))
            if not found and volumes.is_dicom_folder(path):
                return [path]  # the folder is itself one series
        elif is_supported(path):
            return [path]
        else:
            raise InputError(path, "is not a supported image", _hint())
    if not found and not empty_ok:
        raise InputError(text, "no supported images found", _hint())
    return found


def ignored_inputs(location: str | Path) -> list[dict[str, str]]:
    """What :func:`list_images` leaves out of a folder, with why: ``[{"file", "reason"}]`` (hidden files aside).

    A glob, a single file or a folder that is one DICOM series gives ``[]``: what a user names that way is either
    an image or refused.
    """
    folder = Path(location)
    if GLOB_CHARS & set(str(location)) or not folder.is_dir() or folder.suffix.lower() == ".zarr":
        return []
    if list_images(folder, empty_ok=True) == [folder]:
        return []
    ignored = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or is_supported(path):
            continue
        suffix = path.suffix.lower()
        if suffix in SUPPORTED_SUFFIXES or volumes.is_nifti(path):
            reason = "a folder, not a file" if path.is_dir() else "not a folder (a .zarr input is a folder)"
        elif path.is_dir():
            reason = "a sub-folder (folders are not searched; give a glob such as 'dir/**/*.tif')"
        else:
            reason = f"unsupported type '{suffix or path.name}'"
        ignored.append({"file": str(path), "reason": reason})
    return ignored


def image_stem(path: str | Path) -> str:
    """The name of an image without its suffix, also dropping ``.ome`` (``a.ome.tif`` -> ``a``) and ``.nii``
    (``a.nii.gz`` -> ``a``); a DICOM folder's stem is its whole name."""
    name = Path(path).name
    if volumes.is_nifti(Path(name)):
        return name[: -len(".nii.gz")] if name.lower().endswith(".gz") else name[: -len(".nii")]
    if Path(name).suffix.lower() not in SUPPORTED_SUFFIXES and volumes.is_dicom_folder(Path(path)):
        return name
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix else name
    return stem[:-4] if stem.lower().endswith(".ome") else stem


def find_mask(masks_dir: str | Path, image_path: str | Path) -> Path | None:
    """The mask of ``image_path`` in ``masks_dir``: same stem (or stem + ``_mask``), any supported suffix, or a
    folder of DICOM slices of that name.

    An exact stem beats ``<stem>_mask``; suffixes match in lower or upper case. Returns None when there is none.

    Raises:
        InputError: ``masks_dir`` does not exist, or several files are equally good matches.
    """
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise InputError(masks_dir, "mask folder does not exist")
    stem = image_stem(image_path)
    if not stem or stem.startswith("."):
        return None
    try:  # images and masks may share a folder: the image is never its own mask
        image_info = Path(image_path).stat()
        image_id = (image_info.st_dev, image_info.st_ino)
    except OSError:
        image_id = None
    for wanted in (stem, f"{stem}_mask"):
        matches: dict[tuple[int, int], Path] = {}
        # probe names rather than list the folder: ingest calls this once per image
        for suffix in _MASK_SUFFIXES + ("",):
            candidate = masks_dir / f"{wanted}{suffix}"
            try:
                info = candidate.stat()
            except OSError:
                continue
            if suffix == "" and not volumes.is_dicom_folder(candidate):
                continue
            if (info.st_dev, info.st_ino) != image_id:
                matches.setdefault((info.st_dev, info.st_ino), candidate)  # one file, whatever case it matched
        if len(matches) > 1:
            names = ", ".join(sorted(p.name for p in matches.values()))
            raise InputError(masks_dir, f"several masks match {Path(image_path).name}: {names}", "keep only one")
        if matches:
            return next(iter(matches.values()))
    return None


# --- opening ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    """What a file declares about itself before any pixel is read.

    ``dtype`` is what reads give (after ``rescale`` and ``cast``); ``spacing`` maps the letters Z/Y/X the file
    gives a size for to it (in ``unit``); ``geometry`` is a volume's complete geometry (NIfTI, DICOM, our stores).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    axes: str | None  # letters Z, Y, X, C (or 1 for a singleton to drop) when the file names its axes
    key: str = ""
    convert: str = ""
    chunks: tuple[int, ...] | None = None  # decode unit per stored axis (None: any region is cheap)
    raw: _Raw | None = None
    rescale: tuple[float, float] | None = None
    cast: str = ""
    spacing: dict[str, float] | None = None
    unit: str | None = None
    geometry: Geometry | None = None
    volume: volumes.NiftiLayout | volumes.DicomSeries | None = None
    sequential: bool = False


def _format(path: Path) -> str:
    if volumes.is_nifti(path):
        return "nifti"
    suffix = path.suffix.lower()
    if suffix in _FORMATS:
        return _FORMATS[suffix]
    if path.is_dir():
        return "dicom"
    raise InputError(path, f"unsupported file type '{suffix or path.name}'", _hint())


def _open(
    path: Path, channel_axis: str, max_pixels: int, allowed: tuple[str, ...], role: str, volume_hint: bool = False,
    level: int = 0,
) -> ImageSource:
    check_mode(ChannelAxis, channel_axis, "channel_axis")
    if not path.exists():
        raise InputError(path, "file does not exist")
    fmt = _format(path)
    if level and fmt != "tiff":
        raise InputError(path, f"has no pyramid level {level} (only TIFF pyramids are read by level)")
    header = _tiff_header(path, max_pixels, role, level) if fmt == "tiff" else _HEADER_READERS[fmt](path, max_pixels,
                                                                                                     role)
    axes = _layout(path, header, channel_axis, volume_hint)
    kept = axes.replace("1", "")
    sizes = {a: n for a, n in zip(axes, header.shape) if a != "1"}
    letters = [a for a in _SPATIAL if a in sizes]
    spatial = tuple(sizes[a] for a in letters)
    channels = sizes.get("C", 1) if "C" in kept else 1
    total = int(np.prod(spatial, dtype=np.int64))
    if total * channels == 0:
        raise InputError(path, f"image is empty (shape {header.shape})")
    if total > max_pixels:
        what = "pixels" if len(spatial) == 2 else "voxels"
        raise InputError(path, f"image has {'x'.join(map(str, spatial))} = {total:,} {what}, more than max_pixels "
                         f"{max_pixels:,}", "raise max_pixels if the file is genuine")
    if header.dtype.name not in allowed:
        raise InputError(path, f"unsupported {role} dtype {header.dtype.name}", f"supported: {', '.join(allowed)}")
    if channels > MAX_CHANNELS:
        raise InputError(path, f"{role} has {channels} channels, more than {MAX_CHANNELS}",
                         "check channel_axis or the file's layout")
    decode_unit = (1,) * len(spatial)
    if header.chunks is not None:
        decode_unit = tuple(min(header.chunks[axes.index(a)], sizes[a]) for a in letters)
    storage = _Storage(fmt=fmt, axes=axes, key=header.key, convert=header.convert, decode_unit=decode_unit,
                       raw=header.raw, rescale=header.rescale, cast=header.cast, volume=header.volume,
                       sequential=header.sequential, level=level)
    source = ImageSource(path=path, spatial_shape=spatial, channels=channels,
                         dtype=header.dtype.newbyteorder("="), storage=storage,
                         geometry=_geometry(header, letters))
    _VERIFIERS[fmt](source)
    return source


def _geometry(header: _Header, letters: list[str]) -> Geometry:
    """The source's geometry: a volume's own, or the spacing the file gives for every spatial axis."""
    if header.geometry is not None and len(letters) == 3:
        return header.geometry
    if header.spacing and all(a in header.spacing for a in letters):
        return Geometry(spacing=tuple(float(header.spacing[a]) for a in letters), unit=header.unit)
    return Geometry()


def _layout(path: Path, header: _Header, channel_axis: str, volume_hint: bool = False) -> str:
    """Name each stored axis (``Z``, ``Y``, ``X``, ``C``, or ``1`` for a dropped singleton)."""
    shape = header.shape
    volume_mode = channel_axis in ("zyx", "zyxc", "czyx")
    if header.axes is not None:
        named = header.axes
    else:
        # leading singletons beyond three axes (four for a volume with channels) carry nothing: drop them
        limit = 4 if channel_axis in ("zyxc", "czyx") else 3
        lead = 0
        while len(shape) - lead > limit and shape[lead] == 1:
            lead += 1
        named = "1" * lead + "?" * (len(shape) - lead)
    core = [i for i, a in enumerate(named) if a != "1"]
    letters = "".join(named[i] for i in core)
    dims = [shape[i] for i in core]
    if channel_axis == "auto" and volume_hint and header.axes is None and len(core) in (3, 4):
        channel_axis, volume_mode = ("zyx" if len(core) == 3 else "zyxc"), True  # a volume's mask
    if "Z" in letters:
        if not volume_mode and channel_axis != "auto":
            n = dims[letters.index("Z")]
            raise InputError(path, f"axis 'z' has {n} entries (shape {shape})",
                             "a volume: use channel_axis 'auto', 'zyx', 'zyxc' or 'czyx'")
        if sorted(letters) not in (["X", "Y", "Z"], ["C", "X", "Y", "Z"]):
            raise InputError(path, f"cannot tell the layout of axes '{letters}' (shape {shape})",
                             "save the volume as ZYX, ZYXC or CZYX")
        return named
    if volume_mode:
        layout = _volume_layout(path, shape, len(core), channel_axis)
    else:
        layout = _image_layout(path, shape, letters, dims, channel_axis)
    out = list(named)
    for i, letter in zip(core, layout):
        out[i] = letter
    return "".join(out)


def _volume_layout(path: Path, shape: tuple[int, ...], n_core: int, channel_axis: str) -> str:
    """Letters for the core axes of an array read as a volume (``zyx``, ``zyxc``, ``czyx``), by position."""
    if n_core == 3:
        return "ZYX"
    if n_core == 4 and channel_axis != "zyx":
        return channel_axis.upper()
    wanted = "a 3-D" if channel_axis == "zyx" else "a 3-D or 4-D"
    raise InputError(path, f"channel_axis '{channel_axis}' needs {wanted} array, got shape {shape}",
                     "use 'zyxc' or 'czyx' for a volume with channels" if n_core == 4 else "check the file")


def _image_layout(path: Path, shape: tuple[int, ...], letters: str, dims: list[int], channel_axis: str) -> str:
    """Letters for the core axes of an array read as a 2-D image (today's rules)."""
    if len(dims) > 3 or len(dims) < 2:
        what = "more than three" if len(dims) > 3 else "fewer than two"
        raise InputError(path, f"array has {what} axes (shape {shape})",
                         "2-D images are YX, YXC or CYX; for a volume pass channel_axis 'zyx', 'zyxc' or 'czyx'")
    if channel_axis == "yx":
        if len(dims) != 2:
            raise InputError(
                path, f"channel_axis 'yx' needs a 2-D image, got shape {shape}", "use 'auto', 'yxc' or 'cyx'"
            )
        return "YX"
    if len(dims) == 2:
        return "YX"
    if channel_axis == "yxc":
        return "YXC"
    if channel_axis == "cyx":
        return "CYX"
    if "?" not in letters and sorted(letters) == ["C", "X", "Y"] and letters in ("YXC", "CYX"):
        return letters
    first, last = dims[0], dims[-1]
    if last in (3, 4) or (last <= 8 and first > last):
        return "YXC"
    if first <= 8 and last > first:
        return "CYX"
    raise InputError(path, f"cannot tell which axis holds channels in shape {shape}",
                     "pass channel_axis 'yxc' or 'cyx'")


def _tiff_header(path: Path, max_pixels: int, role: str, level: int = 0) -> _Header:
    with reading(path, "not a readable TIFF file"), tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise InputError(path, "TIFF file holds no image")
        levels = tif.series[0].levels
        if not 0 <= level < len(levels):
            raise InputError(path, f"has no pyramid level {level} (levels 0-{len(levels) - 1})")
        series = levels[level]
        shape, axes = tuple(int(n) for n in series.shape), series.axes
        dtype = np.dtype(series.dtype)
        raw = _tiff_raw(tif, series, shape)
        chunks = None if raw is not None else _tiff_chunks(series.keyframe, axes, shape)
        spacing, unit = _tiff_spacing(tif, levels[0].keyframe)
        if spacing and level:  # a level's pixels are level 0's times the ratio of their extents
            full = dict(zip(levels[0].axes, levels[0].shape))
            here = dict(zip(axes, shape))
            spacing = {a: s * full[a] / here[a] if a in full and a in here and here[a] else s
                       for a, s in spacing.items()}
    letters = []
    for axis, n in zip(axes, shape):
        if axis in "YX":
            letters.append(axis)
        elif axis in "SC":
            letters.append("C")
        elif n == 1:
            letters.append("1")
        elif axis == "Z":
            letters.append("Z")
        else:
            letters.append("?")  # pages of some kind (I, Q, T): judge from the shape
    named = "".join(letters)
    return _Header(shape=shape, dtype=dtype, axes=None if "?" in named else named, chunks=chunks, raw=raw,
                   spacing=spacing, unit=unit)


def _tiff_spacing(tif: tifffile.TiffFile, page: Any) -> tuple[dict[str, float] | None, str | None]:
    """Pixel size per axis letter and its unit: OME PhysicalSize*, else an Aperio SVS description's ``MPP``
    (microns per pixel, level 0), else ImageJ's resolution and ``spacing``, else a resolution in pixels per
    centimetre (inches, the DPI of photos and scans, are not taken for a pixel size)."""
    try:
        mpp = _svs_mpp(tif)
        if mpp is not None:
            return {"X": mpp, "Y": mpp}, "micrometer"
        if tif.is_ome and tif.ome_metadata:
            pixels = next(e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels"))
            sizes, unit = {}, None
            for axis in "XYZ":
                if f"PhysicalSize{axis}" in pixels.attrib:
                    sizes[axis] = float(pixels.attrib[f"PhysicalSize{axis}"])
                    unit = unit or _UNITS.get(pixels.attrib.get(f"PhysicalSize{axis}Unit", "µm"))
            return sizes or None, unit
        x_res, y_res = page.tags.get("XResolution"), page.tags.get("YResolution")
        resolution = None
        if x_res is not None and y_res is not None:
            (xn, xd), (yn, yd) = x_res.value, y_res.value
            resolution = (xd / xn if xn else None, yd / yn if yn else None)
        if tif.is_imagej:
            meta = tif.imagej_metadata or {}
            unit = _UNITS.get(str(meta.get("unit", "")).strip())
            sizes = {}
            if resolution is not None and None not in resolution:
                sizes = {"X": resolution[0], "Y": resolution[1]}
            if "spacing" in meta:
                sizes["Z"] = float(meta["spacing"])
            return (sizes or None), (unit if sizes else None)
        unit_tag = page.tags.get("ResolutionUnit")
        if resolution is not None and None not in resolution and unit_tag is not None and int(unit_tag.value) == 3:
            return {"X": resolution[0] * 1e4, "Y": resolution[1] * 1e4}, "micrometer"
    except (StopIteration, ET.ParseError, ValueError, TypeError, ZeroDivisionError):
        pass  # odd metadata: no spacing rather than no image
    return None, None


def _svs_mpp(tif: tifffile.TiffFile) -> float | None:
    """Level 0's microns per pixel from an Aperio ImageDescription (``...|MPP = 0.2520|...``), if it has one."""
    description = tif.pages.first.description or ""
    if not description.startswith("Aperio "):
        return None
    found = _SVS_MPP.search(description)
    value = float(found.group(1)) if found else float("nan")
    return value if np.isfinite(value) and value > 0 else None


def _tiff_raw(tif: tifffile.TiffFile, series: Any, shape: tuple[int, ...]) -> _Raw | None:
    """Where an uncompressed TIFF keeps its pixels contiguously (read by memory map), else None.

    tifffile's Zarr view of such a file has the whole strip as one chunk, often the whole image, so a region read
    would decode everything; a memory map reads only the region's rows.
    """
    offset = series.dataoffset
    if offset is None or not all(p is not None and p.is_memmappable for p in series.pages):
        return None
    return _Raw(offset=int(offset), shape=shape, dtype=np.dtype(series.dtype).newbyteorder(tif.byteorder).str)


def _tiff_chunks(page: Any, axes: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Decode unit per series axis: a tile, or a strip (rows x full width), of one page."""
    rows, cols = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, page.imagewidth)
    sizes = {"Y": int(rows) or 1, "X": int(cols) or 1}
    return tuple(sizes.get(axis, 1 if axis not in "SC" else n) for axis, n in zip(axes, shape))


def _verify_tiff(source: ImageSource) -> None:
    """Every strip/tile of level 0 must lie inside the file: a truncated download fails here, not mid-run."""
    size = source.path.stat().st_size
    with reading(source.path, "not a readable TIFF file"), tifffile.TiffFile(source.path) as tif:
        for page in tif.series[0].levels[source.storage.level].pages:
            if page is None:
                continue
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            if offsets.size and int((offsets + counts).max()) > size:
                raise InputError(source.path, f"TIFF is truncated: pixel data ends at byte "
                                 f"{int((offsets + counts).max()):,} but the file has {size:,} bytes",
                                 "copy or download the file again")


def _open_tiff(path: Path, storage: _Storage) -> Any:
    if storage.raw is not None:
        return _RawArray(path, storage.raw)
    with reading(path, "not a readable TIFF file"):
        store = tifffile.imread(path, aszarr=True, series=0, level=storage.level)
        return store, zarr.open(store, mode="r")


def _npy_header(path: Path, max_pixels: int, role: str) -> _Header:
    with reading(path, "not a valid .npy file"), open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(fh)
        offset = fh.tell()
    shape = tuple(int(n) for n in shape)
    raw = _Raw(offset=offset, shape=shape, dtype=np.dtype(dtype).str, order="F" if fortran else "C")
    return _Header(shape=shape, dtype=np.dtype(dtype), axes=None, raw=raw)


def _verify_npy(source: ImageSource) -> None:
    with reading(source.path, "not a valid .npy file"), open(source.path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(fh)
        offset = fh.tell()
    expected = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    size = source.path.stat().st_size
    if size < expected:
        raise InputError(source.path, f".npy file is truncated: header promises {expected:,} bytes, file has {size:,}",
                         "save the array again")


def _open_raw(path: Path, storage: _Storage) -> _RawArray:
    assert storage.raw is not None, "the header reader located the data"
    return _RawArray(path, storage.raw)


def _zarr_header(path: Path, max_pixels: int, role: str) -> _Header:
    spacing, unit, geometry = None, None, None
    with reading(path, "not a readable Zarr store"):
        node = zarr.open(str(path), mode="r")
        key, axes = "", None
        if isinstance(node, zarr.Group):
            attrs = dict(node.attrs)
            multiscales = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
            if multiscales:
                key = multiscales[0]["datasets"][0]["path"]
                axes = multiscales[0].get("axes")
                spacing, unit = _ome_spacing(multiscales[0])
            elif "0" in node:
                key = "0"
            else:
                raise InputError(path, "Zarr group holds neither OME-Zarr multiscales nor an array '0'")
            stored = (attrs.get("unet") or {}).get("geometry")  # a store written by ingest keeps its affine
            if stored and stored.get("spatial_dims") == 3:
                geometry = Geometry.from_dict(stored)
            array = node[key]
        else:
            array = node
            axes = getattr(array.metadata, "dimension_names", None)
        if not isinstance(array, zarr.Array):
            raise InputError(path, f"Zarr node '{key}' is not an array")
        shape, dtype = tuple(int(n) for n in array.shape), np.dtype(str(array.dtype))
        chunks = tuple(int(n) for n in array.chunks)
    return _Header(shape=shape, dtype=dtype, axes=_zarr_axes(path, axes, shape), key=key, chunks=chunks,
                   spacing=spacing, unit=unit, geometry=geometry)


def _ome_spacing(multiscale: dict[str, Any]) -> tuple[dict[str, float] | None, str | None]:
    """Level 0's scale per spatial axis letter and the axes' unit, from OME-Zarr multiscales metadata."""
    try:
        axes = multiscale.get("axes") or []
        transforms = multiscale["datasets"][0].get("coordinateTransformations") or []
        scale = next((t["scale"] for t in transforms if t.get("type") == "scale"), None)
        if scale is None or len(scale) != len(axes):
            return None, None
        sizes, unit = {}, None
        for axis, s in zip(axes, scale):
            name = str(axis.get("name") if isinstance(axis, dict) else axis).lower()
            if name in ("z", "y", "x"):
                sizes[name.upper()] = float(s)
                if isinstance(axis, dict) and axis.get("unit"):
                    unit = unit or _UNITS.get(str(axis["unit"]), str(axis["unit"]))
        return sizes or None, unit
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None, None


def _zarr_axes(path: Path, axes: Any, shape: tuple[int, ...]) -> str | None:
    """Turn OME-Zarr axes (dicts or names) into Z/Y/X/C/1 letters; None if absent or unnamed."""
    if not axes or len(axes) != len(shape):
        return None
    letters = []
    for axis, n in zip(axes, shape):
        name = (axis.get("name") if isinstance(axis, dict) else axis) or ""
        kind = axis.get("type", "") if isinstance(axis, dict) else ""
        name = str(name).lower()
        if name in ("y", "x"):
            letters.append(name.upper())
        elif name == "c" or kind == "channel":
            letters.append("C")
        elif n == 1:
            letters.append("1")
        elif name == "z":
            letters.append("Z")
        else:
            raise InputError(path, f"axis '{name}' has {n} entries (shape {shape})",
                             "images (YX, YXC, CYX) and volumes (ZYX, with channels) are supported, one time "
                             "point per file")
    named = "".join(letters)
    return named if {"Y", "X"} <= set(named) else None


def _verify_nothing(source: ImageSource) -> None:
    """Zarr chunks and gzipped NIfTI data are checked as they are read."""


def _open_zarr(path: Path, storage: _Storage) -> Any:
    with reading(path, "not a readable Zarr store"):
        node = zarr.open(str(path), mode="r")
        return node[storage.key] if storage.key else node


def _nifti_header(path: Path, max_pixels: int, role: str) -> _Header:
    header = volumes.read_nifti_header(path, role)
    layout = header.layout
    assert isinstance(layout, volumes.NiftiLayout)
    raw = None if layout.compressed else _Raw(offset=layout.offset, shape=layout.shape, dtype=layout.dtype, order="F")
    # gzip decodes forward: the unit is a whole slice (x, y and every channel) and slabs go in z order
    chunks = tuple(1 if a == "Z" else n for a, n in zip(header.axes, header.shape)) if layout.compressed else None
    stored = header.stored_dtype.newbyteorder("=")
    cast = header.dtype.name if header.rescale is not None or header.dtype != stored else ""
    return _Header(shape=header.shape, dtype=header.dtype, axes=header.axes, chunks=chunks, raw=raw,
                   rescale=header.rescale, cast=cast, geometry=header.geometry, volume=layout,
                   sequential=layout.compressed)


def _verify_nifti(source: ImageSource) -> None:
    assert isinstance(source.storage.volume, volumes.NiftiLayout)
    volumes.verify_nifti(source.path, source.storage.volume)


def _open_nifti(path: Path, storage: _Storage) -> Any:
    if storage.raw is not None:
        return _RawArray(path, storage.raw)
    assert isinstance(storage.volume, volumes.NiftiLayout)
    return volumes.GzipVolume(path, storage.volume, storage.axes)


def _dicom_header(path: Path, max_pixels: int, role: str) -> _Header:
    header = volumes.read_dicom_header(path, role)
    chunks = tuple(1 if a == "Z" else n for a, n in zip(header.axes, header.shape))  # one file per slice
    return _Header(shape=header.shape, dtype=header.dtype, axes=header.axes, chunks=chunks,
                   geometry=header.geometry, volume=header.layout)


def _verify_dicom(source: ImageSource) -> None:
    assert isinstance(source.storage.volume, volumes.DicomSeries)
    volumes.verify_dicom(source.storage.volume)


def _open_dicom(path: Path, storage: _Storage) -> Any:
    assert isinstance(storage.volume, volumes.DicomSeries)
    return volumes.DicomVolume(storage.volume)


def _pil_header(path: Path, max_pixels: int, role: str) -> _Header:
    try:
        return _pil_header_unguarded(path, max_pixels, role)
    except InputError as err:
        if isinstance(err.__cause__, Image.DecompressionBombError):  # Pillow refused at twice max_pixels
            raise InputError(path, f"image declares more pixels than max_pixels {max_pixels:,}",
                             "raise max_pixels if the file is genuine") from None
        raise


def _pil_header_unguarded(path: Path, max_pixels: int, role: str) -> _Header:
    with _pil_limit(max_pixels), reading(path, "not a readable PNG/JPEG image"), Image.open(path) as img:
        mode, (width, height) = img.mode, img.size
        if mode == "P" and role == "mask":  # a palette mask keeps its indices: they are the classes
            entry = ("uint8", 1, "")
        elif mode == "P":  # a palette image gets its colours
            entry = ("uint8", 4, "RGBA") if "transparency" in img.info else ("uint8", 3, "RGB")
        elif mode in _PIL_MODES:
            entry = _PIL_MODES[mode]
        else:
            raise InputError(path, f"unsupported image mode '{mode}'", "save as grayscale, RGB or RGBA")
    dtype, channels, convert = entry
    shape = (height, width) if channels == 1 else (height, width, channels)
    return _Header(shape=shape, dtype=np.dtype(dtype), axes="YX" if channels == 1 else "YXC", convert=convert)


def _verify_pil(source: ImageSource) -> None:
    """PNG/JPEG are decoded whole anyway: decode now, so that a truncated file fails at open, and keep it."""
    source._array()


def _open_pil(path: Path, storage: _Storage) -> np.ndarray:
    with _pil_limit(DEFAULT_MAX_PIXELS), reading(path, "not a readable PNG/JPEG image"), Image.open(path) as img:
        img.load()
        if storage.convert:
            img = img.convert(storage.convert)
        return np.asarray(img)


_HEADER_READERS = {"tiff": _tiff_header, "npy": _npy_header, "zarr": _zarr_header, "pil": _pil_header,
                   "nifti": _nifti_header, "dicom": _dicom_header}
_VERIFIERS = {"tiff": _verify_tiff, "npy": _verify_npy, "zarr": _verify_nothing, "pil": _verify_pil,
              "nifti": _verify_nifti, "dicom": _verify_dicom}
_OPENERS = {"tiff": _open_tiff, "npy": _open_raw, "zarr": _open_zarr, "pil": _open_pil, "nifti": _open_nifti,
            "dicom": _open_dicom}


# --- mask checking ------------------------------------------------------------------------------------------


def _check_mask_band(path: Path, band: np.ndarray, n_classes: int, row0: int, word: str = "row") -> set[int]:
    """Check a band ``(..., C)`` of stored mask values starting at ``row0`` (a ``word``); return the values seen.

    Values must be whole numbers in ``[0, n_classes)``, or 255 in a binary mask; colour channels must be equal.
    """
    channels = band.shape[-1]
    if channels > 1:
        colour = band[..., :3]
        if not (colour == colour[..., :1]).all():
            raise InputError(path, f"mask has {channels} channels that differ ({word}s {row0}-{row0 + band.shape[0]})",
                             "save the mask as a single-channel label image")
    band = band[..., 0]
    if band.dtype.kind == "f":
        whole = np.isfinite(band) & (band == np.floor(band))
        if not whole.all():
            example = band[~whole].flat[0]
            raise InputError(path, f"float mask holds non-integer values (e.g. {example:g})",
                             "masks must hold whole class indices")
    values = _band_values(band)
    bad = [v for v in values if not (0 <= v < n_classes or (n_classes == 2 and v == 255))]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise InputError(path, f"mask values {shown} outside [0, {n_classes})",
                         "set num_classes to the number of classes, or fix the mask")
    return {int(v) for v in values}


def _band_values(band: np.ndarray) -> list[float]:
    """Sorted distinct values of a band; bincount for small unsigned types (much faster than unique)."""
    if band.dtype == np.bool_ or band.dtype == np.uint8:
        counts = np.bincount(band.ravel().view(np.uint8), minlength=2)
        return [float(v) for v in np.flatnonzero(counts)]
    return [float(v) for v in np.unique(band)]


# --- small helpers ------------------------------------------------------------------------------------------




@contextmanager
def _pil_limit(max_pixels: int) -> Iterator[None]:
    """Set Pillow's decompression-bomb limit to ``max_pixels`` while a file is opened, then restore it.

    Pillow warns above ``MAX_IMAGE_PIXELS`` and refuses above twice that. Our own check (against the same
    ``max_pixels``) runs on the header, so the warning is silenced and the refusal becomes an InputError.
    """
    with _PIL_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


