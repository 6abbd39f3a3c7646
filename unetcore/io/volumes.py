"""Medical volumes: NIfTI files (nibabel) and DICOM series given as a folder (pydicom), read lazily by z-slab.

Each reader checks a file's header (or, for DICOM, every slice's header) and returns a :class:`VolumeHeader`:
the stored shape and axes, the dtype the voxels are read as, the rescale to apply and the :class:`Geometry`
(voxel spacing, unit, affine). Nothing here reads voxels at open; :class:`GzipVolume` and :class:`DicomVolume`
read them on demand. The generic checks (size, dtype, channels) are :mod:`unetcore.io.readers`'s.

Conventions:

* Voxels come out in ``(z, y, x)`` order, i.e. NIfTI's ``(i, j, k)`` reversed; the affine is kept as nibabel
  gives it (voxel ``(i, j, k) = (x, y, z)`` index to RAS+ millimetres), so an export can give it back unchanged.
* A NIfTI file's 4th axis (or 5th, with a singleton 4th) holds channels (e.g. multi-sequence MRI); an RGB24 or
  RGBA32 NIfTI has 3 or 4 channels. ``scl_slope``/``scl_inter`` are applied.
* A DICOM series is ordered by ImagePositionPatient along the slice normal; RescaleSlope/RescaleIntercept are
  applied per slice, so CT comes out in Hounsfield units (int16 when the rescale is integral and fits).
  A folder mixing series, slices that disagree (size, spacing, orientation), a missing slice (a gap in the
  positions) or an uneven spacing are refused in one line naming the folder.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetcore.errors import InputError, first_line, reading

__all__ = [
    "NIFTI_SUFFIXES",
    "DicomSeries",
    "DicomVolume",
    "Geometry",
    "GzipVolume",
    "NiftiLayout",
    "VolumeHeader",
    "dicom_slice_shape",
    "is_dicom_folder",
    "is_nifti",
    "nifti_geometry_fields",
    "read_dicom_header",
    "read_nifti_header",
    "verify_dicom",
    "verify_nifti",
]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
# the header fields that place a NIfTI volume in space; an export copies them to give back the same geometry
_NIFTI_GEOMETRY = ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                   "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim", "xyzt_units", "dim_info")
_NIFTI_UNITS = {1: "meter", 2: "millimeter", 3: "micrometer"}  # NIfTI xyzt_units & 7; 0 (unknown) is read as mm
_DICOM_PROBE = 16  # files looked at to tell whether a folder holds DICOM slices
_IMAGE_CAST = {"int8": "int16", "int32": "float32", "uint32": "float32", "int64": "float32", "uint64": "float32",
               "float16": "float32", "float64": "float32"}
_MASK_CAST = {"int8": "int16", "uint64": "int64", "float16": "float32"}


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels lie in space.

    ``spacing``: the voxel size per spatial axis in storage order (``(z, y, x)``, or ``(y, x)``), None if the file
    does not say. ``unit``: the unit of ``spacing`` as OME-Zarr names it (``millimeter``, ``micrometer``, …).
    ``affine``: 4x4 voxel ``(x, y, z)`` index to world (RAS+) matrix, as nibabel gives it (volumes only).
    ``nifti``: the source NIfTI header's geometry fields (qform/sform codes and parameters), for exports.
    """

    spacing: tuple[float, ...] | None = None
    unit: str | None = None
    affine: tuple[tuple[float, ...], ...] | None = None
    nifti: Mapping[str, Any] | None = None

    def to_dict(self, spatial_dims: int) -> dict[str, Any]:
        """Plain JSON data (store attributes, manifest): spacing defaults to 1 per axis when unknown."""
        return {
            "spatial_dims": spatial_dims,
            "spacing": list(self.spacing) if self.spacing else [1.0] * spatial_dims,
            "unit": self.unit,
            "affine": [list(row) for row in self.affine] if self.affine else None,
            "nifti": dict(self.nifti) if self.nifti else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Geometry:
        """The inverse of :meth:`to_dict`."""
        affine = data.get("affine")
        return cls(spacing=tuple(float(s) for s in data["spacing"]) if data.get("spacing") else None,
                   unit=data.get("unit"), affine=tuple(tuple(float(v) for v in row) for row in affine) if affine
                   else None, nifti=data.get("nifti"))


@dataclass(frozen=True)
class NiftiLayout:
    """Where a NIfTI file keeps its voxels: ``offset``, Fortran-order ``shape`` of ``dtype``, gzip or not."""

    offset: int
    shape: tuple[int, ...]
    dtype: str
    compressed: bool


@dataclass(frozen=True)
class DicomSeries:
    """The slices of a DICOM series in position order, with what reading them needs."""

    folder: str
    files: tuple[str, ...]
    rows: int
    columns: int
    samples: int
    stored_dtype: str
    dtype: str  # after the rescale
    slopes: tuple[float, ...]
    intercepts: tuple[float, ...]


@dataclass(frozen=True)
class VolumeHeader:
    """What a volume declares before any voxel is read.

    ``shape`` and ``axes`` (letters ``X``, ``Y``, ``Z``, ``C``, ``1``) describe the stored array, ``stored_dtype``
    its elements, ``dtype`` what reads give (after ``rescale = (slope, intercept)``, None when there is none).
    ``layout``: a :class:`NiftiLayout` or a :class:`DicomSeries`.
    """

    shape: tuple[int, ...]
    axes: str
    stored_dtype: np.dtype
    dtype: np.dtype
    rescale: tuple[float, float] | None
    geometry: Geometry
    layout: NiftiLayout | DicomSeries


# --- NIfTI --------------------------------------------------------------------------------------------------


def is_nifti(path: Path) -> bool:
    """A ``.nii`` or ``.nii.gz`` name (any case)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def nifti_geometry_fields(header: Any) -> dict[str, Any]:
    """The geometry fields of a nibabel NIfTI header as plain JSON data (exact: float32 values fit a float)."""
    return {key: np.asarray(header[key]).tolist() for key in _NIFTI_GEOMETRY}


def read_nifti_header(path: Path, role: str) -> VolumeHeader:
    """Read a NIfTI header (nibabel) without reading voxels.

    Raises:
        InputError: not a readable NIfTI file, more than one non-spatial axis, or an RGB file with several volumes.
    """
    import nibabel as nib

    with reading(path, "not a readable NIfTI file"):
        image = nib.load(str(path))
        if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
            raise InputError(path, f"not a NIfTI image ({type(image).__name__})")
        header = image.header
        shape = tuple(int(n) for n in header.get_data_shape())
        stored = np.dtype(header.get_data_dtype())
        # nibabel moves scl_slope/scl_inter from the header into the data proxy (the header then says nan)
        slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
        affine = np.asarray(image.affine, dtype=np.float64)
        zooms = [abs(float(z)) for z in header.get_zooms()[:3]]
        units = int(header["xyzt_units"]) & 7
        offset = int(image.dataobj.offset)
        fields = nifti_geometry_fields(header)
    shape = shape + (1,) * (3 - len(shape))  # a 2-D NIfTI is a volume of one slice
    zooms = zooms + [1.0] * (3 - len(zooms))
    axes = "XYZ" + _extra_axes(path, shape[3:])
    if stored.fields:  # RGB24 / RGBA32: interleaved components, each a uint8
        if "C" in axes:
            raise InputError(path, f"RGB NIfTI holds several volumes (shape {shape})", "save one volume per file")
        components = len(stored.fields)
        stored = np.dtype(stored.fields[stored.names[0]][0]).newbyteorder(stored.byteorder)
        axes, shape = "C" + axes, (components,) + shape
    rescale = (slope, inter) if slope != 1.0 or inter != 0.0 else None
    value_range = _rescaled_range(*_dtype_range(stored), *rescale) if rescale else _dtype_range(stored)
    dtype = _output_dtype(stored, rescale, role, value_range)
    spacing = (zooms[2], zooms[1], zooms[0])
    geometry = Geometry(spacing=spacing, unit=_NIFTI_UNITS.get(units, "millimeter"),
                        affine=tuple(tuple(float(v) for v in row) for row in affine), nifti=fields)
    layout = NiftiLayout(offset=offset, shape=shape, dtype=stored.str, compressed=path.name.lower().endswith(".gz"))
    return VolumeHeader(shape=shape, axes=axes, stored_dtype=stored, dtype=dtype, rescale=rescale,
                        geometry=geometry, layout=layout)


def _extra_axes(path: Path, extra: tuple[int, ...]) -> str:
    """Letters for the axes after x, y, z: the first one with more than one entry holds channels."""
    letters = ""
    for n in extra:
        if n == 1:
            letters += "1"
        elif "C" in letters:
            raise InputError(path, f"NIfTI has more than one non-spatial axis (dims {extra})",
                             "save one 3-D or 4-D (channels last) volume per file")
        else:
            letters += "C"
    return letters


class GzipVolume:
    """Region reads of a gzipped NIfTI's voxels, decompressing forward by z-slab.

    A gzip stream cannot seek back cheaply, so each channel has its own stream that only moves forward while
    slabs are read in z order (a read behind a stream's position reopens it). Reads hold a lock.
    """

    def __init__(self, path: Path, layout: NiftiLayout, axes: str) -> None:
        self.path, self.layout, self.axes = path, layout, axes
        self._z = axes.index("Z")
        self._lock = threading.Lock()
        self._streams: dict[int, Any] = {}

    def __getitem__(self, index: tuple[Any, ...]) -> np.ndarray:
        shape, z = self.layout.shape, self._z
        zs = index[z]
        z0, z1 = (zs.start or 0, shape[z] if zs.stop is None else zs.stop) if isinstance(zs, slice) else (zs, zs + 1)
        slab = self._read(z0, max(z0, z1))
        local = list(index)
        local[z] = slice(None) if isinstance(zs, slice) else 0
        return slab[tuple(local)]

    def _read(self, z0: int, z1: int) -> np.ndarray:
        shape, z = self.layout.shape, self._z
        dtype = np.dtype(self.layout.dtype)
        plane = int(np.prod(shape[:z], dtype=np.int64))
        outer = shape[z + 1 :]
        out = np.empty(shape[:z] + (z1 - z0,) + outer, dtype=dtype, order="F")
        with self._lock:
            for lin, combo in enumerate(np.ndindex(*outer[::-1]) if outer else [()]):
                combo = tuple(reversed(combo))  # Fortran order: the first outer axis varies fastest
                start = self.layout.offset + (lin * shape[z] + z0) * plane * dtype.itemsize
                data = self._bytes(lin, start, (z1 - z0) * plane * dtype.itemsize)
                out[(Ellipsis, *combo)] = np.frombuffer(data, dtype=dtype).reshape(shape[:z] + (z1 - z0,), order="F")
        return out

    def _bytes(self, stream: int, start: int, count: int) -> bytes:
        fh = self._streams.get(stream)
        try:
            if fh is None or fh.tell() > start:
                if fh is not None:
                    fh.close()
                fh = self._streams[stream] = gzip.open(self.path, "rb")
            fh.seek(start)
            data = fh.read(count)
        except (EOFError, OSError, gzip.BadGzipFile) as exc:
            self._streams.pop(stream, None)
            raise InputError(self.path, f"NIfTI data is truncated or corrupt ({type(exc).__name__}: {exc})",
                             "copy or download the file again") from None
        if len(data) < count:
            raise InputError(self.path, f"NIfTI data is truncated: the header promises {start + count:,} bytes, "
                             f"the file holds {start + len(data):,}", "copy or download the file again")
        return data

    def close(self) -> None:
        """Close the open gzip streams."""
        with self._lock:
            for fh in self._streams.values():
                fh.close()
            self._streams.clear()


def verify_nifti(path: Path, layout: NiftiLayout) -> None:
    """An uncompressed NIfTI must hold the bytes its header promises (a gzipped one is checked while read)."""
    if layout.compressed:
        return
    expected = layout.offset + int(np.prod(layout.shape, dtype=np.int64)) * np.dtype(layout.dtype).itemsize
    size = path.stat().st_size
    if size < expected:
        raise InputError(path, f"NIfTI file is truncated: header promises {expected:,} bytes, file has {size:,}",
                         "copy or download the file again")


# --- DICOM --------------------------------------------------------------------------------------------------


def is_dicom_folder(path: Path) -> bool:
    """A visible folder (not a ``.zarr``) holding DICOM files (``.dcm``, or the ``DICM`` marker at byte 128)."""
    path = Path(path)
    if path.name.startswith(".") or path.suffix.lower() == ".zarr" or not path.is_dir():
        return False
    for i, child in enumerate(p for p in sorted(path.iterdir()) if not p.name.startswith(".")):
        if i >= _DICOM_PROBE:
            break
        if child.is_file() and (child.suffix.lower() == ".dcm" or _has_dicm_marker(child)):
            return True
    return False


def _has_dicm_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_dicom_header(folder: Path, role: str) -> VolumeHeader:
    """Read every slice's header of the DICOM series in ``folder`` (no pixel data) and check they form a volume.

    Raises:
        InputError: naming the folder: no slices, several series, multi-frame files, slices that differ in size,
            spacing, orientation or pixel format, duplicate positions, a missing slice, uneven spacing, or an
            unsupported photometric interpretation.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    slices = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            continue  # not a DICOM file (a README beside the slices)
        except Exception as exc:
            raise InputError(folder, f"slice {path.name} is not a readable DICOM file ({type(exc).__name__}: "
                             f"{first_line(exc)})") from None
        slices.append((path, ds))
    if not slices:
        raise InputError(folder, "folder holds no DICOM slices")
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in slices})
    if len(series) > 1:
        shown = ", ".join(s[-12:] or "(none)" for s in series[:3]) + (", ..." if len(series) > 3 else "")
        raise InputError(folder, f"folder mixes {len(series)} DICOM series (SeriesInstanceUID ...{shown})",
                         "put each series in its own folder")
    for path, ds in slices:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(folder, f"slice {path.name} is a multi-frame DICOM (enhanced or SEG)",
                             "convert the series to NIfTI (e.g. with dcm2niix) first")
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if ds.get(tag) is None:
                raise InputError(folder, f"slice {path.name} has no {tag}", "is this an image series?")
    first = slices[0][1]
    for tag in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "PixelRepresentation",
                "PhotometricInterpretation"):
        values = {str(ds.get(tag)) for _, ds in slices}
        if len(values) > 1:
            raise InputError(folder, f"slices differ in {tag} ({', '.join(sorted(values)[:3])})",
                             "a series must be one volume")
    for tag in ("PixelSpacing", "ImageOrientationPatient"):
        ref = np.asarray(first.get(tag), np.float64)
        for path, ds in slices:
            if not np.allclose(np.asarray(ds.get(tag), np.float64), ref, rtol=0, atol=1e-4):
                raise InputError(folder, f"slices differ in {tag} ({path.name}: {list(ds.get(tag))} vs "
                                 f"{[float(v) for v in ref]})", "a series must be one volume")
    photometric = str(first.get("PhotometricInterpretation", "MONOCHROME2"))
    samples = int(first.get("SamplesPerPixel", 1))
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB"):
        raise InputError(folder, f"unsupported photometric interpretation {photometric}",
                         "grayscale (MONOCHROME1/2) or RGB series are supported")
    orientation = np.asarray(first.ImageOrientationPatient, np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.asarray([np.asarray(ds.ImagePositionPatient, np.float64) for _, ds in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    dy, dx = (float(v) for v in first.PixelSpacing)
    step, slice_vector = _slice_step(folder, positions, normal, first)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, 0] = lps_to_ras @ (row_dir * dx)
    affine[:3, 1] = lps_to_ras @ (col_dir * dy)
    affine[:3, 2] = lps_to_ras @ slice_vector
    affine[:3, 3] = lps_to_ras @ positions[0]
    bits = int(first.get("BitsAllocated", 16))
    signed = int(first.get("PixelRepresentation", 0)) == 1
    if bits not in (8, 16, 32):
        raise InputError(folder, f"unsupported BitsAllocated {bits}", "8, 16 or 32 bits per sample are supported")
    stored = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    stored_bits = int(first.get("BitsStored", bits) or bits)
    low, high = (-(2 ** (stored_bits - 1)), 2 ** (stored_bits - 1) - 1) if signed else (0, 2**stored_bits - 1)
    slopes = tuple(float(ds.get("RescaleSlope", 1) or 1) for _, ds in slices)
    intercepts = tuple(float(ds.get("RescaleIntercept", 0) or 0) for _, ds in slices)
    rescaled = any(s != 1.0 for s in slopes) or any(i != 0.0 for i in intercepts)
    candidates = [_rescaled_range(low, high, s, i) for s, i in zip(slopes, intercepts)] if rescaled else [(low, high)]
    value_range = (min(lo for lo, _ in candidates), max(hi for _, hi in candidates))
    integral = all(float(s).is_integer() and float(i).is_integer() for s, i in zip(slopes, intercepts))
    dtype = _output_dtype(stored, (slopes[0], intercepts[0]) if rescaled else None, role, value_range,
                          integral=integral)
    n = len(slices)
    shape = (n, int(first.Rows), int(first.Columns)) + ((samples,) if samples > 1 else ())
    layout = DicomSeries(folder=str(folder), files=tuple(str(p) for p, _ in slices), rows=int(first.Rows),
                         columns=int(first.Columns), samples=samples, stored_dtype=stored.str, dtype=dtype.str,
                         slopes=slopes, intercepts=intercepts)
    geometry = Geometry(spacing=(step, dy, dx), unit="millimeter",
                        affine=tuple(tuple(float(v) for v in row) for row in affine))
    return VolumeHeader(shape=shape, axes="ZYX" + ("C" if samples > 1 else ""), stored_dtype=stored, dtype=dtype,
                        rescale=None, geometry=geometry, layout=layout)


def _slice_step(folder: Path, positions: np.ndarray, normal: np.ndarray, first: Any) -> tuple[float, np.ndarray]:
    """The slice spacing along the normal and the step vector between slices; refuse gaps and uneven spacing."""
    if len(positions) == 1:
        thickness = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
        return thickness, normal * thickness
    distances = positions @ normal
    gaps = np.diff(distances)
    if (gaps < 1e-4).any():
        at = float(distances[1:][gaps < 1e-4][0])
        raise InputError(folder, f"two slices at position {at:g} mm along the normal",
                         "several acquisitions or echoes in one folder? keep one per folder")
    step = float(np.median(gaps))
    tolerance = max(1e-3, 1e-2 * step)
    for k, gap in enumerate(gaps):
        if gap > 1.5 * step:
            raise InputError(folder, f"missing slice(s): a gap of {gap:g} mm between positions {distances[k]:g} "
                             f"and {distances[k + 1]:g} mm (spacing {step:g} mm)",
                             "copy the whole series, every slice")
        if abs(gap - step) > tolerance:
            raise InputError(folder, f"inconsistent slice spacing: {float(gaps.min()):g} to {float(gaps.max()):g} mm",
                             "resample the series to an even spacing first")
    vector = (positions[-1] - positions[0]) / (len(positions) - 1)
    off_line = np.linalg.norm(positions - (positions[0] + np.outer(np.arange(len(positions)), vector)), axis=1)
    if off_line.max() > tolerance:
        raise InputError(folder, f"slice positions do not lie on one line (off by up to {off_line.max():g} mm)",
                         "a series must be one volume")
    return step, vector


class DicomVolume:
    """Region reads of a DICOM series: the slices a region needs, each decoded and rescaled."""

    def __init__(self, series: DicomSeries) -> None:
        self.series = series

    def __getitem__(self, index: tuple[Any, ...]) -> np.ndarray:
        import pydicom

        zs, rest = index[0], index[1:]
        picked = range(len(self.series.files))[zs] if isinstance(zs, slice) else [int(zs)]
        out_dtype = np.dtype(self.series.dtype)
        planes = []
        for k in picked:
            path = Path(self.series.files[k])
            try:
                pixels = pydicom.dcmread(path).pixel_array
            except Exception as exc:
                raise InputError(self.series.folder, f"cannot read slice {path.name} ({type(exc).__name__}: "
                                 f"{first_line(exc)})", "is a decoder for its transfer syntax installed?") from None
            expected = dicom_slice_shape(self.series)
            if pixels.shape != expected:
                raise InputError(self.series.folder, f"slice {path.name} has pixel shape {pixels.shape}, "
                                 f"not {expected}")
            slope, intercept = self.series.slopes[k], self.series.intercepts[k]
            if slope != 1.0 or intercept != 0.0:
                pixels = pixels.astype(np.float64) * slope + intercept
            planes.append(pixels[rest].astype(out_dtype, copy=False))
        if not planes:
            return np.empty((0,) + np.empty(dicom_slice_shape(self.series))[rest].shape, out_dtype)
        stacked = np.stack(planes)
        return stacked if isinstance(zs, slice) else stacked[0]


def dicom_slice_shape(series: DicomSeries) -> tuple[int, ...]:
    """The shape of one decoded slice of ``series``."""
    return (series.rows, series.columns) + ((series.samples,) if series.samples > 1 else ())


def verify_dicom(series: DicomSeries) -> None:
    """Decode the first slice now, so that a missing decoder or a corrupt file fails at open."""
    DicomVolume(series)[slice(0, 1), slice(None), slice(None)]


# --- dtypes -------------------------------------------------------------------------------------------------


def _dtype_range(dtype: np.dtype) -> tuple[float, float]:
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return -np.inf, np.inf


def _rescaled_range(low: float, high: float, slope: float, intercept: float) -> tuple[float, float]:
    a, b = low * slope + intercept, high * slope + intercept
    return min(a, b), max(a, b)


def _output_dtype(stored: np.dtype, rescale: tuple[float, float] | None, role: str,
                  value_range: tuple[float, float], *, integral: bool | None = None) -> np.dtype:
    """The dtype voxels are read as.

    With a rescale: int16 when the stored values are integers, the rescale is integral (``integral``, default: the
    slope and intercept are whole) and the rescaled ``value_range`` fits (CT in HU), else float32. Without one:
    the stored dtype, or the nearest supported one (int8 -> int16; wide integers and float64 -> float32 for
    images; masks keep their integers).
    """
    if rescale is not None:
        whole = all(float(v).is_integer() for v in rescale) if integral is None else integral
        lo, hi = value_range
        if stored.kind in "ui" and whole and -32768 <= lo and hi <= 32767:
            return np.dtype("int16")
        return np.dtype("float32")
    name = stored.newbyteorder("=").name
    casts = _MASK_CAST if role == "mask" else _IMAGE_CAST
    return np.dtype(casts.get(name, name))


# --- small helpers ------------------------------------------------------------------------------------------





