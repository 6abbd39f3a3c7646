"""Write label masks for other tools: NIfTI with the source's exact geometry, ImageJ TIFF stacks, tiled 2-D TIFFs
with their pixel size.

The writers stream: they read the input (a NumPy or Zarr array, any array-like with ``shape``, ``dtype`` and
slicing) one z-slab at a time, so memory is one slab whatever the volume's size, and write through a temporary
file renamed into place (:func:`unetcore.atomic.replacing`): a failed export leaves no half-written file.

Typical use, from a store written by ingestion::

    geometry = omezarr.geometry(root)
    write_nifti(omezarr.label_array(pred_root), geometry["affine"], "case.nii.gz", header_source=geometry["nifti"])
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unetcore.atomic import replacing

__all__ = ["OME_UNITS", "label_tiles", "write_nifti", "write_tiff_image", "write_tiff_stack"]

SLAB_BYTES = 64 << 20  # bytes of one z-slab read from the input
_NIFTI1_MAX_DIM = 32767  # NIfTI-1 stores dims as int16; bigger volumes are written as NIfTI-2
_FLOAT32_EXACT = 1 << 24
OME_UNITS = {"nanometer": "nm", "micrometer": "µm", "millimeter": "mm", "centimeter": "cm", "meter": "m"}
"""OME-Zarr unit names -> OME-XML ``PhysicalSize*Unit`` symbols (the units a TIFF's pixel size is written in)."""
_PER_CM = {"nanometer": 1e7, "micrometer": 1e4, "millimeter": 10.0, "centimeter": 1.0, "meter": 0.01}


def write_nifti(
    labels_zyx: Any,
    affine: Sequence[Sequence[float]] | np.ndarray,
    path: str | Path,
    header_source: str | Path | Mapping[str, Any] | Any | None = None,
    description: str | None = None,
    descrip: str | None = None,
) -> Path:
    """Write a ``(D, H, W)`` array as a NIfTI file (``.nii`` or ``.nii.gz``) that overlays on its source.

    The voxels are streamed by z-slab: NIfTI keeps ``x`` fastest and ``z`` slowest, so the C-order bytes of a
    ``(z, y, x)`` slab are exactly the file's next bytes; the header is written by nibabel first, then the slabs
    (gzipped when the name ends in ``.gz``). nibabel itself can only write a whole in-memory array.

    Geometry: with ``header_source`` (the source NIfTI's path, its nibabel header, or the geometry fields kept by
    ingestion, ``omezarr.geometry(root)["nifti"]``) its qform and sform, their codes, ``pixdim`` and units are
    copied as they are, so the file's affine is bit for bit the source's (and 3D Slicer, ITK-SNAP and FSL place
    the mask on the scan). If they do not give ``affine`` (another affine was passed), the sform is set to
    ``affine``. Without ``header_source`` the sform and qform are set from ``affine`` (codes 1, scanner), stored as
    float32 as NIfTI does.

    Args:
        labels_zyx: labels in ``(z, y, x)`` order (uint8, uint16, int16, uint32, int32, float32, …; bool is
            written as uint8).
        affine: 4x4 voxel ``(x, y, z)`` index to world (RAS+ mm), as nibabel gives it.
        path: the file to write (replaced if it exists).
        header_source: see above.
        description: text kept in the header as a NIfTI comment extension (e.g. the provenance JSON); nibabel
            reads it as ``img.header.extensions``.
        descrip: the header's 80-byte ``descrip`` (cut to fit).

    Returns:
        ``path``.
    """
    import nibabel as nib

    path = Path(path)
    depth, height, width = (int(n) for n in labels_zyx.shape)
    dtype = np.dtype(np.uint8 if np.dtype(labels_zyx.dtype) == np.bool_ else labels_zyx.dtype)
    header_class = nib.Nifti2Header if max(depth, height, width) > _NIFTI1_MAX_DIM else nib.Nifti1Header
    header = header_class()
    header.set_data_shape((width, height, depth))
    header.set_data_dtype(dtype.newbyteorder("<"))
    header.set_slope_inter(1.0, 0.0)
    wanted = np.asarray(affine, dtype=np.float64)
    fields = _geometry_fields(header_source)
    if fields:
        for key, value in fields.items():
            if key == "pixdim":
                pixdim = np.asarray(header["pixdim"], dtype=np.float64)
                pixdim[:4] = np.asarray(value, dtype=np.float64)[:4]  # qfac and the voxel size
                header["pixdim"] = pixdim
            else:
                header[key] = value
        if not np.array_equal(header.get_best_affine(), wanted):
            header.set_sform(wanted, code=int(fields.get("sform_code") or 1))
    else:
        header.set_sform(wanted, code=1)
        header.set_qform(wanted, code=1)
        header.set_xyzt_units("mm")
    if descrip:
        header["descrip"] = descrip.encode("ascii", "replace")[:79]
    if description:
        header.extensions.append(nib.nifti1.Nifti1Extension("comment", description.encode()))
    offset = _header_size(header)
    header.set_data_offset(offset)
    on_disk = header.get_data_dtype()
    with replacing(path) as tmp:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(tmp, "wb") as fh:
            header.write_to(fh)
            fh.write(b"\0" * (offset - fh.tell()))
            for slab in _slabs(labels_zyx, dtype):
                fh.write(np.ascontiguousarray(slab, dtype=on_disk).tobytes())
    return path


def _geometry_fields(source: Any) -> dict[str, Any] | None:
    """The geometry fields of ``source``: a mapping of them, a nibabel header, or a NIfTI file's path."""
    if source is None:
        return None
    from unetcore.io.volumes import nifti_geometry_fields

    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, (str, Path)):
        import nibabel as nib

        return nifti_geometry_fields(nib.load(str(source)).header)
    return nifti_geometry_fields(source)


def _header_size(header: Any) -> int:
    """Bytes of the header as written (348 or 540, plus the 4-byte extension flag of a single file)."""
    import io

    buffer = io.BytesIO()
    header.write_to(buffer)
    return len(buffer.getvalue())


def _slabs(array: Any, dtype: np.dtype) -> Iterator[np.ndarray]:
    """``array`` in z-slabs of about :data:`SLAB_BYTES`, as ``dtype``."""
    depth, height, width = (int(n) for n in array.shape)
    step = max(1, SLAB_BYTES // max(1, height * width * dtype.itemsize))
    for z0 in range(0, depth, step):
        yield np.asarray(array[z0 : min(z0 + step, depth)]).astype(dtype, copy=False)


def write_tiff_stack(
    array_zyx: Any,
    path: str | Path,
    spacing_zyx: Sequence[float] | None = None,
    unit: str = "micrometer",
    *,
    compression: str | None = None,
    description: str | None = None,
    software: str | None = None,
) -> Path:
    """Write a ``(D, H, W)`` array as an ImageJ hyperstack TIFF (one page per z), streamed page by page.

    ImageJ/Fiji reads the voxel size from it: x and y as the resolution (pixels per ``unit``), z as ImageJ's
    ``spacing``. ImageJ holds uint8, uint16, int16 and float32: bool is written as uint8, wider integers (instance
    labels) as float32, which holds integers exactly up to 2**24 (a larger label raises ValueError).

    Args:
        array_zyx: the stack in ``(z, y, x)`` order.
        path: the file to write (replaced if it exists).
        spacing_zyx: voxel size per axis in ``unit``; None writes no size (ImageJ shows pixels).
        unit: ``micrometer`` (written as ImageJ's ``um``), ``nanometer``, ``millimeter``, or any ImageJ unit.
        compression: None (uncompressed, read by every ImageJ) or a tifffile codec such as ``"zlib"``.
        description: text kept as ImageJ's ``Info`` (Image > Show Info; e.g. the provenance JSON).
        software: the TIFF Software tag.

    Returns:
        ``path``.
    """
    import tifffile

    path = Path(path)
    depth, height, width = (int(n) for n in array_zyx.shape)
    source_dtype = np.dtype(array_zyx.dtype)
    if source_dtype == np.bool_:
        dtype = np.dtype(np.uint8)
    elif source_dtype.name in ("uint8", "uint16", "int16", "float32"):
        dtype = source_dtype
    else:
        dtype = np.dtype(np.float32)
    metadata: dict[str, Any] = {"axes": "ZYX"}
    resolution = None
    if spacing_zyx is not None:
        sz, sy, sx = (float(s) for s in spacing_zyx)
        resolution = (1.0 / sx, 1.0 / sy)
        metadata.update(spacing=sz, unit={"micrometer": "um", "nanometer": "nm", "millimeter": "mm"}.get(unit, unit))
    if description:
        metadata["Info"] = description

    def pages() -> Iterator[np.ndarray]:
        for slab in _slabs(array_zyx, source_dtype if source_dtype != np.bool_ else np.dtype(np.uint8)):
            if dtype != slab.dtype and slab.dtype.kind in "iu" and slab.size:
                largest = int(np.abs(slab.astype(np.int64)).max())
                if largest >= _FLOAT32_EXACT:
                    raise ValueError(f"{path}: labels reach {largest:,}, more than float32 holds exactly "
                                     f"({_FLOAT32_EXACT:,})")
            yield from slab.astype(dtype, copy=False)

    with replacing(path) as tmp:
        tifffile.imwrite(tmp, pages(), shape=(depth, height, width), dtype=dtype, imagej=True,
                         resolution=resolution, metadata=metadata, compression=compression, software=software)
    return path


def label_tiles(level: Any, tile: int) -> Iterator[np.ndarray]:
    """Tiles of a 2-D uint8 array-like in row-major order, padded with 0 to ``tile`` x ``tile``; one band read at a
    time (what tifffile's tiled writer takes)."""
    h, w = level.shape
    for y in range(0, h, tile):
        band = np.asarray(level[y:y + tile, :])
        for x in range(0, w, tile):
            out = np.zeros((tile, tile), np.uint8)
            part = band[:, x:x + tile]
            out[: part.shape[0], : part.shape[1]] = part
            yield out


def write_tiff_image(
    labels_yx: Any,
    path: str | Path,
    spacing_yx: Sequence[float] | None = None,
    unit: str | None = None,
    *,
    tile: int = 256,
    compression: str | None = "zlib",
    metadata: dict[str, Any] | None = None,
    software: str | None = None,
) -> Path:
    """Write a ``(H, W)`` uint8 array as a tiled BigTIFF, streamed tile by tile, with its pixel size when known.

    With ``spacing_yx`` in ``unit`` (one of :data:`OME_UNITS`), the pixel size is written twice, so that every
    reader finds it: as OME-XML ``PhysicalSizeX/Y`` with their unit (exactly the stored floats: QuPath, Fiji's
    Bio-Formats importer, tifffile) and as ``XResolution``/``YResolution`` in pixels per centimetre (a rational,
    so rounded: ImageJ, GIS and any TIFF reader), and ``metadata`` (e.g. provenance) as JSON in the OME Image's
    ``Description``. Without them the file holds pixels only, as before, and ``metadata`` is tifffile's JSON
    ImageDescription; ``software`` always goes in the Software tag.
    """
    import tifffile

    path = Path(path)
    h, w = (int(n) for n in labels_yx.shape)

    extra: dict[str, Any] = {"metadata": metadata, "software": software}
    if spacing_yx is not None and unit in OME_UNITS:
        sy, sx = (float(s) for s in spacing_yx)
        symbol = OME_UNITS[unit]
        extra = {"software": software, "ome": True, "resolution": (_PER_CM[unit] / sx, _PER_CM[unit] / sy), "resolutionunit": "CENTIMETER",
                 "metadata": {"axes": "YX", "PhysicalSizeX": sx, "PhysicalSizeXUnit": symbol, "PhysicalSizeY": sy,
                              "PhysicalSizeYUnit": symbol}}
        if metadata:  # the OME-XML is the description: ``metadata`` goes in as the OME Image's Description (JSON)
            extra["metadata"]["Description"] = json.dumps(metadata, sort_keys=True)
    with replacing(path) as tmp:
        tifffile.imwrite(tmp, label_tiles(labels_yx, tile), shape=(h, w), dtype=np.uint8, tile=(tile, tile), bigtiff=True,
                         compression=compression, **extra)
    return path
