"""A real-texture mosaic for the inference benchmarks: StarDist's bundled nuclei image, mirrored to any size.

The image is the 512² fluorescence nuclei image with its instance mask that StarDist ships inside its wheel
(``stardist/data/images/img2d.tif`` and ``mask2d.tif``, from the 2018 Data Science Bowl, BBBC038, CC0); only the two
TIFFs are read. Either install the package (``.venv/bin/pip install --no-deps stardist==0.9.2``, benchmark-only) or
unpack them from the wheel without installing anything::

    .venv/bin/pip download --no-deps stardist==0.9.2 -d /tmp/whl
    unzip -o /tmp/whl/stardist-0.9.2-*.whl 'stardist/data/images/*' -d /tmp/stardist-data
    # then pass --sample /tmp/stardist-data/stardist/data/images

The mosaic mirrors the image at its borders (``np.pad(mode="symmetric")``), so the texture is continuous across
copies: every tile sees nuclei, as on a real slide, and the mask mirrors with it (Dice against truth).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import tifffile


def sample_folder(given: str | None) -> Path:
    """The folder holding ``img2d.tif`` and ``mask2d.tif``: ``given``, else the installed stardist package's."""
    if given:
        return Path(given)
    spec = importlib.util.find_spec("stardist")  # locates the package without importing it (no numba/TF)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no nuclei sample: install stardist (--no-deps) or pass --sample (see benchmarks/real_texture.py)")
    return Path(spec.submodule_search_locations[0]) / "data" / "images"


def nuclei_mosaic(size: int, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image uint16, binary mask uint8) of ``size`` x ``size``: the 512² sample mirrored at its borders."""
    image = tifffile.imread(folder / "img2d.tif")
    mask = (tifffile.imread(folder / "mask2d.tif") > 0).astype(np.uint8)
    pad = ((0, max(0, size - image.shape[0])), (0, max(0, size - image.shape[1])))
    return (np.pad(image, pad, mode="symmetric")[:size, :size], np.pad(mask, pad, mode="symmetric")[:size, :size])


def write_mosaic(size: int, folder: Path, out: Path, name: str = "mosaic") -> tuple[Path, Path]:
    """Write the mosaic and its mask as ``out/images/<name>.tif`` and ``out/masks/<name>.tif`` (ingestable)."""
    image, mask = nuclei_mosaic(size, folder)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(out / "images" / f"{name}.tif", image)
    tifffile.imwrite(out / "masks" / f"{name}.tif", mask)
    return out / "images", out / "masks"
