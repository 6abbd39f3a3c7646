"""Open image and mask files lazily, as region-readable sources in YXC order, refusing bad input early.

:func:`open_image` reads only a file's header (TIFF tags, the ``.npy`` header, Zarr metadata, the PNG/JPEG
header) to learn its shape, dtype and channel layout, and checks them before any pixel is read: a missing,
corrupt or truncated file, an empty image, a declared shape above ``max_pixels`` (decompression bombs), an
unsupported dtype, more than 64 channels or more than three axes each raise one :class:`InputError` naming the
file. The returned :class:`ImageSource` reads regions on demand:

* TIFF (BigTIFF, OME-TIFF, tiled or striped, pyramids through SubIFDs or reduced pages): tifffile's Zarr store
  over series 0, level 0 (pyramids keep their full-resolution level): a region read decodes only the tiles (or
  strips) it touches; :attr:`ImageSource.chunks_yx` tells callers that unit. An uncompressed TIFF whose pixels are
  contiguous is read through a memory map instead (its single strip would otherwise be one whole-image chunk);
* ``.npy``: a read-only memory map, created per read so that resident memory stays at one region;
* Zarr: the array itself, or level ``0`` of an OME-Zarr multiscale group (axes from its metadata);
* PNG/JPEG: decoded whole by Pillow on first use and cached (these formats cannot be read by region).

An :class:`ImageSource` pickles as its path and metadata, so it can be sent to Dask workers; each process opens
the file again on its first read and keeps the handle. It is also array-like (``shape``, ``dtype``, ``ndim``,
``source[y0:y1, x0:x1]``), which ``dask.array.from_array`` accepts.

:func:`open_mask` opens a label mask for an image and checks it band by band (never whole) against the image and
the declared number of classes: at open, or (``scan=False``) while the caller streams it.
"""

from __future__ import annotations

import glob
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile
import zarr
from PIL import Image

from unetcore.errors import InputError
from unetcore.modes import ChannelAxis, check_mode

__all__ = [
    "IMAGE_DTYPES",
    "MASK_DTYPES",
    "SUPPORTED_SUFFIXES",
    "ImageSource",
    "MaskSource",
    "check_finite",
    "find_mask",
    "ignored_inputs",
    "image_stem",
    "is_supported",
    "iter_row_bands",
    "list_images",
    "open_image",
    "open_mask",
]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy", ".zarr")
IMAGE_DTYPES: tuple[str, ...] = ("uint8", "uint16", "int16", "float32")
# Masks may also come as labels from numpy/scikit-image (int32/int64/uint32), bool, or float64.
MASK_DTYPES: tuple[str, ...] = IMAGE_DTYPES + ("bool", "uint32", "int32", "int64", "float64")
MAX_CHANNELS = 64
DEFAULT_MAX_PIXELS = 50_000_000_000
BAND_PIXELS = 1 << 24  # pixels per band when a whole file is checked band by band (16 Mi)
_FORMATS = {
    ".tif": "tiff", ".tiff": "tiff", ".png": "pil", ".jpg": "pil", ".jpeg": "pil", ".npy": "npy", ".zarr": "zarr"
}
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
    for suffix in SUPPORTED_SUFFIXES + (".ome.tif", ".ome.tiff", ".ome.zarr")
    for variant in dict.fromkeys((suffix, suffix.upper()))
)
_PIL_LOCK = threading.Lock()  # Pillow's bomb limit is a module global: change it under a lock


@dataclass(frozen=True)
class _Storage:
    """How to get YXC pixels out of the file.

    ``axes`` names each stored axis: ``Y``, ``X``, ``C``, or ``1`` for a singleton axis that is indexed away
    (e.g. OME-Zarr ``t``/``z`` of size 1). ``key`` is the array's path inside a Zarr group; ``convert`` a Pillow
    mode to convert to after decoding (e.g. a palette image to RGB; palette masks keep their indices).
    ``chunks_yx`` is the smallest unit the file decodes (a TIFF tile or strip, a Zarr chunk), ``(1, 1)`` when any
    region is cheap (memory maps, decoded PNG/JPEG). ``raw`` locates uncompressed contiguous pixels (``.npy``,
    uncompressed TIFF), which are read through a short-lived memory map instead of a decoder.
    """

    fmt: Literal["tiff", "pil", "npy", "zarr"]
    axes: str
    key: str = ""
    convert: str = ""
    chunks_yx: tuple[int, int] = (1, 1)
    raw: _Raw | None = None


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
    """An image file opened lazily: its shape in canonical ``(H, W, C)`` order, dtype, and region reads.

    Picklable: only the path and metadata travel; the opened handle is re-created per process on first use.
    """

    path: Path
    shape_yxc: tuple[int, int, int]
    dtype: np.dtype
    storage: _Storage
    _handle: Any = field(default=None, init=False, repr=False, compare=False)

    # -- array-like face --------------------------------------------------------------------------------------
    @property
    def chunks_yx(self) -> tuple[int, int]:
        """Rows and columns of the file's decode unit (tile, strip, chunk); ``(1, 1)`` if any region is cheap.

        Readers of big images should cut their regions along these: a region narrower than a strip still decodes
        the whole strip.
        """
        return self.storage.chunks_yx

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(H, W, C)``."""
        return self.shape_yxc

    @property
    def ndim(self) -> int:
        """Always 3 (Y, X, C)."""
        return 3

    def __getitem__(self, key: Any) -> np.ndarray:
        """``source[ys, xs]`` or ``source[ys, xs, cs]`` with ints or slices (positive steps), as on ``(H, W, C)``."""
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 3:
            raise IndexError(f"too many indices for a (H, W, C) source: {key}")
        key = key + (slice(None),) * (3 - len(key))
        regions, picks = [], []
        for k, n in zip(key[:2], self.shape_yxc[:2]):
            if isinstance(k, (int, np.integer)):
                i = int(k) + n if k < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} out of range for an axis of size {n}")
                regions.append(slice(i, i + 1))
                picks.append(0)
            elif isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 1:
                    raise IndexError("negative steps are not supported")
                regions.append(slice(start, max(start, stop)))
                picks.append(slice(None, None, step))
            else:
                raise TypeError(f"unsupported index {k!r}: use ints or slices")
        return self.read(regions[0], regions[1])[picks[0], picks[1]][..., key[2]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.read(slice(0, self.shape_yxc[0]), slice(0, self.shape_yxc[1]))
        return out if dtype is None else out.astype(dtype)

    # -- reading ----------------------------------------------------------------------------------------------
    def read(self, ys: slice, xs: slice) -> np.ndarray:
        """Read rows ``ys`` and columns ``xs`` (clipped to the image, step 1) as ``(h, w, C)`` of ``dtype``."""
        return self.read_stored(ys, xs)

    def read_stored(self, ys: slice, xs: slice) -> np.ndarray:
        """The stored pixels of a region as ``(h, w, C_stored)``, in the stored dtype (native byte order)."""
        (y0, y1, ystep), (x0, x1, xstep) = ys.indices(self.shape_yxc[0]), xs.indices(self.shape_yxc[1])
        if ystep != 1 or xstep != 1:
            raise ValueError("read() takes slices with step 1")
        y1, x1 = max(y0, y1), max(x0, x1)
        index = tuple(
            {"Y": slice(y0, y1), "X": slice(x0, x1), "C": slice(None), "1": 0}[axis] for axis in self.storage.axes
        )
        try:
            block = np.asarray(self._array()[index])
        except InputError:
            raise
        except Exception as exc:  # a corrupt tile or strip, a vanished file: say which file and where
            raise InputError(
                self.path, f"cannot read region y={y0}:{y1}, x={x0}:{x1} ({type(exc).__name__}: {_first_line(exc)})"
            ) from exc
        kept = self.storage.axes.replace("1", "")
        block = block.transpose([kept.index(a) for a in "YXC" if a in kept])
        if "C" not in kept:
            block = block[..., None]
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

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None  # tifffile's Zarr store and memory maps are not picklable
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass
class MaskSource(ImageSource):
    """A mask: reads give ``(h, w, 1)`` class indices in ``dtype`` (uint8 unless there are > 256 classes).

    Only the first stored channel is read (an RGB(A) mask was checked to have equal colour channels).
    ``stored_dtype``: the dtype in the file. ``map_255``: a binary mask saved as 0/255, whose 255 is read as 1.
    ``n_classes``: values must lie in ``[0, n_classes)``. ``classes``: the class indices found by the scan at
    open (None when opened with ``scan=False``; then read with :meth:`read_checked`).
    """

    stored_dtype: np.dtype = field(default_factory=lambda: np.dtype("uint8"))
    map_255: bool = False
    n_classes: int = 2
    classes: frozenset[int] | None = None

    def read(self, ys: slice, xs: slice) -> np.ndarray:
        """Read a region as ``(h, w, 1)`` class indices."""
        return self._to_classes(self.read_stored(ys, xs))

    def read_checked(self, ys: slice, xs: slice) -> tuple[np.ndarray, set[int]]:
        """Read a region as ``(h, w, 1)`` class indices and check its stored values on the way.

        Returns the class indices and the stored values seen in the region; pass the union of those over the
        whole mask to :meth:`check_seen` at the end.

        Raises:
            InputError: the region has differing colour channels, non-integer or out-of-range values.
        """
        stored = self.read_stored(ys, xs)
        seen = _check_mask_band(self.path, stored, self.n_classes, ys.indices(self.shape_yxc[0])[0])
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
    path: str | Path, channel_axis: ChannelAxis = "auto", max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageSource:
    """Open an image lazily, after checking its header.

    Args:
        path: a ``.tif/.tiff/.png/.jpg/.jpeg/.npy`` file or a ``.zarr`` folder.
        channel_axis: how a 3-D array is laid out. ``"auto"`` trusts the file's own axis names (TIFF samples or
            channels, OME-Zarr axes) and otherwise guesses: the last axis is channels if it has 3 or 4 entries,
            or at most 8 and fewer than the first; the first axis is channels if it has at most 8 entries and
            fewer than the last; anything else is refused as ambiguous. ``"yx"`` demands a 2-D image.
        max_pixels: refuse images with more than this many pixels (H x W), judged from the header alone.

    Returns:
        An :class:`ImageSource` with ``shape_yxc == (H, W, C)``.

    Raises:
        InputError: the file is missing, of an unsupported type, unreadable, corrupt or truncated, empty, too
            large, has an unsupported dtype, more than 64 channels or more than three axes.
    """
    return _open(Path(path), channel_axis, max_pixels, IMAGE_DTYPES, role="image")


def open_mask(
    path: str | Path,
    image: ImageSource,
    num_classes: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    scan: bool = True,
) -> MaskSource:
    """Open a mask for ``image`` and check it band by band.

    A mask is 2-D (or ``(H, W, 1)``; an RGB(A) mask whose colour channels are all equal is accepted and read as
    one channel), of an integer, bool or float dtype (floats must hold whole numbers), the same H and W as its
    image, with values in ``[0, max(2, num_classes))``. Masks saved as 0/255 (usual for binary PNG masks) are
    accepted when the mask is binary (``num_classes <= 2``) and read with 255 as 1; a mask mixing 1 and 255 is
    refused as ambiguous.

    Args:
        scan: check every value now (one pass over the mask; ``classes`` holds what was found). With False only
            the header is checked (shape, dtype, channels) and a caller that streams the mask anyway checks it on
            the way with :meth:`MaskSource.read_checked` and :meth:`MaskSource.check_seen`: one pass, not two.

    Raises:
        InputError: any of the above does not hold; the message names the mask (and the image for shape).
    """
    path = Path(path)
    raw = _open(path, "auto", max_pixels, MASK_DTYPES, role="mask")
    height, width, channels = raw.shape_yxc
    if (height, width) != image.shape_yxc[:2]:
        raise InputError(
            path,
            f"mask shape {height}x{width} does not match image {image.path.name} shape "
            f"{image.shape_yxc[0]}x{image.shape_yxc[1]}",
            "masks must have the same height and width as their image",
        )
    if channels not in (1, 3, 4):
        raise InputError(path, f"mask has {channels} channels", "save the mask as a single-channel label image")
    n_classes = max(2, int(num_classes))
    mask = MaskSource(
        path=path,
        shape_yxc=(height, width, 1),
        dtype=np.dtype("uint8" if n_classes <= 256 else "int32"),
        storage=raw.storage,
        stored_dtype=raw.dtype,
        map_255=n_classes == 2,  # until a scan says there is no 255; 1 and 255 together are refused
        n_classes=n_classes,
    )
    if scan:
        seen: set[int] = set()
        for ys, band in iter_row_bands(raw):
            seen |= _check_mask_band(path, band, n_classes, ys.start)
        mask.map_255 = n_classes == 2 and 255 in seen
        mask.classes = mask.check_seen(seen)
    mask._handle = raw._handle  # keep what is already open (or decoded, for PNG)
    return mask


def check_finite(source: ImageSource) -> None:
    """Raise :class:`InputError` if a float image holds NaN or Inf; checked band by band. No-op for integers."""
    if source.dtype.kind != "f":
        return
    for ys, band in iter_row_bands(source):
        bad = ~np.isfinite(band)
        if bad.any():
            row = ys.start + int(np.argwhere(bad)[0][0])
            raise InputError(source.path, f"image contains NaN or Inf values (first at row {row})",
                             "replace them (e.g. with 0) before ingesting")


def iter_row_bands(source: ImageSource, band_pixels: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield ``(rows, pixels)`` for horizontal bands covering the image, each about ``band_pixels`` values.

    The default band holds 16 Mi values (64 MiB of float32), so memory does not grow with the image.
    """
    height, width, channels = source.shape_yxc
    rows = max(1, (band_pixels or BAND_PIXELS) // max(1, width * channels))
    if 256 <= rows < height:
        rows = rows // 256 * 256  # whole tiles for tiled TIFFs (256 is the common tile edge)
    for y0 in range(0, height, rows):
        ys = slice(y0, min(y0 + rows, height))
        yield ys, source.read(ys, slice(0, width))


GLOB_CHARS = frozenset("*?[")


def is_supported(path: Path) -> bool:
    """A visible file (or ``.zarr`` folder) with a supported suffix."""
    suffix = path.suffix.lower()
    if path.name.startswith(".") or suffix not in SUPPORTED_SUFFIXES:
        return False
    return path.is_dir() if suffix == ".zarr" else path.is_file()


def list_images(location: str | Path, *, empty_ok: bool = False) -> list[Path]:
    """The supported images of ``location``, sorted by path; hidden files are ignored.

    ``location`` is a folder (not recursive), one image file, or a glob such as ``/data/*.tif`` (``**`` recurses).

    Raises:
        InputError: the folder or file does not exist, is of an unsupported type, or (unless ``empty_ok``)
            ``location`` holds no supported image.
    """
    text = str(location)
    hint = f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
    if GLOB_CHARS & set(text):
        found = sorted(p for p in map(Path, glob.glob(text, recursive=True)) if is_supported(p))
    else:
        path = Path(text)
        if not path.exists():
            raise InputError(path, "folder does not exist" if not path.suffix else "file does not exist")
        if path.is_dir() and path.suffix.lower() != ".zarr":
            found = sorted(p for p in path.iterdir() if is_supported(p))
        elif is_supported(path):
            return [path]
        else:
            raise InputError(path, "is not a supported image", hint)
    if not found and not empty_ok:
        raise InputError(text, "no supported images found", hint)
    return found


def ignored_inputs(location: str | Path) -> list[dict[str, str]]:
    """What :func:`list_images` leaves out of a folder, with why: ``[{"file", "reason"}]`` (hidden files aside).

    A glob or a single file gives ``[]``: what a user names that way is either an image or refused.
    """
    folder = Path(location)
    if GLOB_CHARS & set(str(location)) or not folder.is_dir() or folder.suffix.lower() == ".zarr":
        return []
    ignored = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or is_supported(path):
            continue
        suffix = path.suffix.lower()
        if suffix in SUPPORTED_SUFFIXES:
            reason = "a folder, not a file" if path.is_dir() else "not a folder (a .zarr input is a folder)"
        elif path.is_dir():
            reason = "a sub-folder (folders are not searched; give a glob such as 'dir/**/*.tif')"
        else:
            reason = f"unsupported type '{suffix or path.name}'"
        ignored.append({"file": str(path), "reason": reason})
    return ignored


def image_stem(path: str | Path) -> str:
    """The name of an image without its suffix, also dropping ``.ome`` (``a.ome.tif`` -> ``a``)."""
    name = Path(path).name
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix else name
    return stem[:-4] if stem.lower().endswith(".ome") else stem


def find_mask(masks_dir: str | Path, image_path: str | Path) -> Path | None:
    """The mask of ``image_path`` in ``masks_dir``: same stem (or stem + ``_mask``), any supported suffix.

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
        for suffix in _MASK_SUFFIXES:
            candidate = masks_dir / f"{wanted}{suffix}"
            try:
                info = candidate.stat()
            except OSError:
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
    """What a file declares about itself before any pixel is read."""

    shape: tuple[int, ...]
    dtype: np.dtype
    axes: str | None  # letters Y, X, C (or 1 for a singleton to drop) when the file names its axes
    key: str = ""
    convert: str = ""
    chunks: tuple[int, ...] | None = None  # decode unit per stored axis (None: any region is cheap)
    raw: _Raw | None = None


def _open(
    path: Path, channel_axis: str, max_pixels: int, allowed: tuple[str, ...], role: str
) -> ImageSource:
    check_mode(ChannelAxis, channel_axis, "channel_axis")
    if not path.exists():
        raise InputError(path, "file does not exist")
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise InputError(path, f"unsupported file type '{suffix or path.name}'",
                         f"supported: {', '.join(SUPPORTED_SUFFIXES)}")
    fmt = _FORMATS[suffix]
    header = _HEADER_READERS[fmt](path, max_pixels, role)
    axes = _layout(path, header, channel_axis)
    kept = axes.replace("1", "")
    sizes = dict(zip(axes, header.shape))
    height, width = sizes["Y"], sizes["X"]
    channels = sizes.get("C", 1) if "C" in kept else 1
    if height * width * channels == 0:
        raise InputError(path, f"image is empty (shape {header.shape})")
    if height * width > max_pixels:
        raise InputError(path, f"image has {height}x{width} = {height * width:,} pixels, more than max_pixels "
                         f"{max_pixels:,}", "raise max_pixels if the file is genuine")
    if header.dtype.name not in allowed:
        raise InputError(path, f"unsupported {role} dtype {header.dtype.name}", f"supported: {', '.join(allowed)}")
    if channels > MAX_CHANNELS:
        raise InputError(path, f"{role} has {channels} channels, more than {MAX_CHANNELS}",
                         "check channel_axis or the file's layout")
    chunks_yx = (1, 1)
    if header.chunks is not None:
        chunks_yx = (min(header.chunks[axes.index("Y")], height), min(header.chunks[axes.index("X")], width))
    storage = _Storage(fmt=fmt, axes=axes, key=header.key, convert=header.convert, chunks_yx=chunks_yx,
                       raw=header.raw)
    source = ImageSource(path=path, shape_yxc=(height, width, channels), dtype=header.dtype.newbyteorder("="),
                         storage=storage)
    _VERIFIERS[fmt](source)
    return source


def _layout(path: Path, header: _Header, channel_axis: str) -> str:
    """Name each stored axis (``Y``, ``X``, ``C``, or ``1`` for a dropped singleton)."""
    shape = header.shape
    if header.axes is not None:
        named = header.axes
    else:
        # leading singletons beyond three axes (e.g. (1, 1, H, W)) carry nothing: drop them
        lead = 0
        while len(shape) - lead > 3 and shape[lead] == 1:
            lead += 1
        named = "1" * lead + "?" * (len(shape) - lead)
    core = [i for i, a in enumerate(named) if a != "1"]
    if len(core) > 3 or len(core) < 2:
        what = "more than three" if len(core) > 3 else "fewer than two"
        raise InputError(
            path, f"array has {what} axes (shape {shape})", "only 2-D images (YX, YXC or CYX) are supported"
        )
    letters = "".join(named[i] for i in core)
    dims = [shape[i] for i in core]
    if channel_axis == "yx":
        if len(core) != 2:
            raise InputError(
                path, f"channel_axis 'yx' needs a 2-D image, got shape {shape}", "use 'auto', 'yxc' or 'cyx'"
            )
        layout = "YX"
    elif len(core) == 2:
        layout = "YX"
    elif channel_axis == "yxc":
        layout = "YXC"
    elif channel_axis == "cyx":
        layout = "CYX"
    elif "?" not in letters and sorted(letters) == ["C", "X", "Y"] and letters in ("YXC", "CYX"):
        layout = letters
    else:
        first, last = dims[0], dims[-1]
        if last in (3, 4) or (last <= 8 and first > last):
            layout = "YXC"
        elif first <= 8 and last > first:
            layout = "CYX"
        else:
            raise InputError(path, f"cannot tell which axis holds channels in shape {shape}",
                             "pass channel_axis 'yxc' or 'cyx'")
    out = list(named)
    for i, letter in zip(core, layout):
        out[i] = letter
    return "".join(out)


def _tiff_header(path: Path, max_pixels: int, role: str) -> _Header:
    with _wrap(path, "not a readable TIFF file"), tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise InputError(path, "TIFF file holds no image")
        series = tif.series[0].levels[0]
        shape, axes = tuple(int(n) for n in series.shape), series.axes
        dtype = np.dtype(series.dtype)
        raw = _tiff_raw(tif, series, shape)
        chunks = None if raw is not None else _tiff_chunks(series.keyframe, axes, shape)
    letters = []
    for axis, n in zip(axes, shape):
        if axis in "YX":
            letters.append(axis)
        elif axis in "SC":
            letters.append("C")
        elif n == 1:
            letters.append("1")
        else:
            letters.append("?")  # pages of some kind (I, Q, Z, T): judge from the shape
    named = "".join(letters)
    return _Header(shape=shape, dtype=dtype, axes=None if "?" in named else named, chunks=chunks, raw=raw)


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
    """Decode unit per series axis: a tile, or a strip (rows x full width)."""
    rows, cols = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, page.imagewidth)
    sizes = {"Y": int(rows) or 1, "X": int(cols) or 1}
    return tuple(sizes.get(axis, 1 if axis not in "SC" else n) for axis, n in zip(axes, shape))


def _verify_tiff(source: ImageSource) -> None:
    """Every strip/tile of level 0 must lie inside the file: a truncated download fails here, not mid-run."""
    size = source.path.stat().st_size
    with _wrap(source.path, "not a readable TIFF file"), tifffile.TiffFile(source.path) as tif:
        for page in tif.series[0].levels[0].pages:
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
    with _wrap(path, "not a readable TIFF file"):
        store = tifffile.imread(path, aszarr=True, series=0, level=0)
        return store, zarr.open(store, mode="r")


def _npy_header(path: Path, max_pixels: int, role: str) -> _Header:
    with _wrap(path, "not a valid .npy file"), open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(fh)
        offset = fh.tell()
    shape = tuple(int(n) for n in shape)
    raw = _Raw(offset=offset, shape=shape, dtype=np.dtype(dtype).str, order="F" if fortran else "C")
    return _Header(shape=shape, dtype=np.dtype(dtype), axes=None, raw=raw)


def _verify_npy(source: ImageSource) -> None:
    with _wrap(source.path, "not a valid .npy file"), open(source.path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(fh)
        offset = fh.tell()
    expected = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    size = source.path.stat().st_size
    if size < expected:
        raise InputError(source.path, f".npy file is truncated: header promises {expected:,} bytes, file has {size:,}",
                         "save the array again")


def _open_npy(path: Path, storage: _Storage) -> _RawArray:
    assert storage.raw is not None, "the .npy header reader always locates the data"
    return _RawArray(path, storage.raw)


def _zarr_header(path: Path, max_pixels: int, role: str) -> _Header:
    with _wrap(path, "not a readable Zarr store"):
        node = zarr.open(str(path), mode="r")
        key, axes = "", None
        if isinstance(node, zarr.Group):
            attrs = dict(node.attrs)
            multiscales = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
            if multiscales:
                key = multiscales[0]["datasets"][0]["path"]
                axes = multiscales[0].get("axes")
            elif "0" in node:
                key = "0"
            else:
                raise InputError(path, "Zarr group holds neither OME-Zarr multiscales nor an array '0'")
            array = node[key]
        else:
            array = node
            axes = getattr(array.metadata, "dimension_names", None)
        if not isinstance(array, zarr.Array):
            raise InputError(path, f"Zarr node '{key}' is not an array")
        shape, dtype = tuple(int(n) for n in array.shape), np.dtype(str(array.dtype))
        chunks = tuple(int(n) for n in array.chunks)
    return _Header(shape=shape, dtype=dtype, axes=_zarr_axes(path, axes, shape), key=key, chunks=chunks)


def _zarr_axes(path: Path, axes: Any, shape: tuple[int, ...]) -> str | None:
    """Turn OME-Zarr axes (dicts or names) into Y/X/C/1 letters; None if absent or unnamed."""
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
        else:
            raise InputError(path, f"axis '{name}' has {n} entries (shape {shape})",
                             "only 2-D images (YX, YXC or CYX) are supported")
    named = "".join(letters)
    return named if {"Y", "X"} <= set(named) else None


def _verify_nothing(source: ImageSource) -> None:
    """Zarr chunks are checked as they are read."""


def _open_zarr(path: Path, storage: _Storage) -> Any:
    with _wrap(path, "not a readable Zarr store"):
        node = zarr.open(str(path), mode="r")
        return node[storage.key] if storage.key else node


def _pil_header(path: Path, max_pixels: int, role: str) -> _Header:
    try:
        return _pil_header_unguarded(path, max_pixels, role)
    except InputError as err:
        if isinstance(err.__cause__, Image.DecompressionBombError):  # Pillow refused at twice max_pixels
            raise InputError(path, f"image declares more pixels than max_pixels {max_pixels:,}",
                             "raise max_pixels if the file is genuine") from None
        raise


def _pil_header_unguarded(path: Path, max_pixels: int, role: str) -> _Header:
    with _pil_limit(max_pixels), _wrap(path, "not a readable PNG/JPEG image"), Image.open(path) as img:
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
    with _pil_limit(DEFAULT_MAX_PIXELS), _wrap(path, "not a readable PNG/JPEG image"), Image.open(path) as img:
        img.load()
        if storage.convert:
            img = img.convert(storage.convert)
        return np.asarray(img)


_HEADER_READERS = {"tiff": _tiff_header, "npy": _npy_header, "zarr": _zarr_header, "pil": _pil_header}
_VERIFIERS = {"tiff": _verify_tiff, "npy": _verify_npy, "zarr": _verify_nothing, "pil": _verify_pil}
_OPENERS = {"tiff": _open_tiff, "npy": _open_npy, "zarr": _open_zarr, "pil": _open_pil}


# --- mask checking ------------------------------------------------------------------------------------------


def _check_mask_band(path: Path, band: np.ndarray, n_classes: int, row0: int) -> set[int]:
    """Check a band ``(h, w, C)`` of stored mask values; return the values seen.

    Values must be whole numbers in ``[0, n_classes)``, or 255 in a binary mask; colour channels must be equal.
    """
    channels = band.shape[-1]
    if channels > 1:
        colour = band[..., :3]
        if not (colour == colour[..., :1]).all():
            raise InputError(path, f"mask has {channels} channels that differ (rows {row0}-{row0 + band.shape[0]})",
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
def _wrap(path: Path, reason: str) -> Iterator[None]:
    """Turn a library's exception inside the block into one :class:`InputError` line naming the file."""
    try:
        yield
    except (InputError, MemoryError):
        raise
    except Exception as exc:
        raise InputError(path, f"{reason} ({type(exc).__name__}: {_first_line(exc)})") from exc


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no details"
