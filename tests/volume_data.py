"""Tiny volumes written the way scanners and tools write them: NIfTI through nibabel, a CT series through pydicom."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# an oblique-free but non-trivial geometry: anisotropic, flipped x, an origin off the grid
AFFINE = np.array([[-0.75, 0.0, 0.0, 90.5], [0.0, 0.8, 0.0, -120.25], [0.0, 0.0, 2.5, -60.125], [0.0, 0.0, 0.0, 1.0]])


def ramp(shape: tuple[int, ...], dtype: str = "int16", seed: int = 0) -> np.ndarray:
    """Noisy values everywhere, so that a misplaced region or a swapped axis shows."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100.0, 30.0, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(int(info.min), -2000), min(int(info.max), 3000) + 1, shape).astype(dtype)


def save_nifti(path: Path, data_zyx: np.ndarray, affine: np.ndarray = AFFINE, *, qform_code: int = 1,
               sform_code: int = 2, slope: float | None = None, inter: float = 0.0) -> Path:
    """Save ``(z, y, x[, c])`` data as NIfTI (nibabel's ``(x, y, z[, c])``), with both qform and sform set.

    ``slope``/``inter`` are written into the header's ``scl_slope``/``scl_inter`` as they are (nibabel's writer
    would choose its own), so that readers must apply them.
    """
    image = nib.Nifti1Image(np.swapaxes(data_zyx, 0, 2), affine)
    image.header.set_qform(affine, code=qform_code)
    image.header.set_sform(affine, code=sform_code)
    if slope is None:
        nib.save(image, str(path))
        return path
    raw = path.with_name(path.name.removesuffix(".gz"))
    nib.save(image, str(raw))
    with open(raw, "r+b") as fh:
        fh.seek(112)  # scl_slope, scl_inter (float32) in a NIfTI-1 header
        fh.write(np.array([slope, inter], "<f4").tobytes())
    if path != raw:
        path.write_bytes(gzip.compress(raw.read_bytes()))
        raw.unlink()
    return path


def write_ct_series(
    folder: Path,
    raw_zyx: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (2.5, 0.5, 0.7),
    origin: tuple[float, float, float] = (-10.0, 20.0, 30.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    positions: Sequence[float] | None = None,
    prefix: str = "slice",
) -> Path:
    """Write ``raw_zyx`` (uint16 stored values) as an axial CT series, one file per slice, in shuffled file order.

    Slice ``k`` lies at ``origin + k * spacing[0]`` along z unless ``positions`` says otherwise; file names and
    InstanceNumbers are shuffled so that only ImagePositionPatient gives the order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    depth, rows, columns = raw_zyx.shape
    dz, dy, dx = spacing
    z_positions = list(positions) if positions is not None else [origin[2] + k * dz for k in range(depth)]
    shuffled = np.random.default_rng(7).permutation(depth)
    for k in range(depth):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", "anon", uid, uid
        ds.InstanceNumber = int(shuffled[k]) + 1
        ds.Rows, ds.Columns = rows, columns
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.ImagePositionPatient = [origin[0], origin[1], z_positions[k]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(raw_zyx[k], dtype="<u2").tobytes()
        ds.save_as(folder / f"{prefix}{int(shuffled[k]):03d}.dcm", enforce_file_format=True)
    return folder


def ct_affine(spacing: tuple[float, float, float] = (2.5, 0.5, 0.7),
              origin: tuple[float, float, float] = (-10.0, 20.0, 30.0)) -> np.ndarray:
    """The NIfTI (RAS) affine of :func:`write_ct_series`'s geometry: DICOM's LPS with x and y negated."""
    dz, dy, dx = spacing
    return np.array([[-dx, 0.0, 0.0, -origin[0]], [0.0, -dy, 0.0, -origin[1]], [0.0, 0.0, dz, origin[2]],
                     [0.0, 0.0, 0.0, 1.0]])
