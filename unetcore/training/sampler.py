"""Random patches from OME-Zarr stores, with foreground oversampling, never loading a whole image.

Foreground locations are looked up on the mask's coarsest pyramid level (small), then mapped to full
resolution with a random offset inside the coarse pixel, so sampling costs one patch read whatever the image
size. Sampling is deterministic: patch ``i`` of epoch ``e`` depends only on ``(seed, e, i)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from unetcore.config import NormalizationConfig
from unetcore.errors import InputError
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.store.stats import normalize
from unetcore.training.augment import AugmentConfig, augment_pair


@dataclass
class _Image:
    """One training image: where it lives and what sampling needs to know about it."""

    store: Path
    shape: tuple[int, int]
    stats: dict[str, Any]
    fg_coords: np.ndarray  # (n, 2) coarse-level coordinates of foreground pixels
    coarse_factor: int


def _foreground_coords(root: zarr.Group) -> tuple[np.ndarray, int]:
    """Foreground pixel coordinates on the mask's coarsest level and that level's down-sampling factor."""
    group = root["labels/mask"]
    levels = sorted(int(k) for k in group.array_keys() if k.isdigit())
    coarse = np.asarray(group[str(levels[-1])][:])
    return np.argwhere(coarse > 0).astype(np.int64), 2 ** levels[-1]


def load_images(dataset: Path, split: str) -> list[_Image]:
    """The images of ``split`` that have masks, ready for sampling.

    Raises:
        InputError: no image of that split has a mask.
    """
    manifest = mf.require(dataset)
    out = []
    for entry in mf.entries(manifest, split):
        if not entry["has_mask"]:
            continue
        root = omezarr.open_root(mf.store_path(dataset, entry["id"]))
        coords, factor = _foreground_coords(root)
        out.append(_Image(mf.store_path(dataset, entry["id"]), tuple(entry["shape"]), entry["stats"], coords, factor))
    if not out:
        raise InputError(dataset, f"no images with masks in the '{split}' split", "ingest masks with --masks")
    return out


def _pad_to(arr: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad the last two axes up to ``size`` (for images smaller than the patch)."""
    ph, pw = max(0, size - arr.shape[-2]), max(0, size - arr.shape[-1])
    if ph == 0 and pw == 0:
        return arr
    pad = [(0, 0)] * (arr.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(arr, pad)


class PatchDataset(Dataset):
    """``len = steps * batch`` random patches per epoch; item ``i`` is ``(image (C,p,p), target (p,p))``.

    Within each batch the last ``round(batch * foreground_fraction)`` items are centred on a foreground
    pixel (nnU-Net's oversampling); the others are uniform over a randomly chosen image.
    """

    def __init__(
        self,
        images: list[_Image],
        patch_size: int,
        batch_size: int,
        steps: int,
        normalization: NormalizationConfig,
        foreground_fraction: float,
        augment: AugmentConfig | None,
        seed: int = 0,
    ) -> None:
        self.images = images
        self.patch = patch_size
        self.batch = batch_size
        self.steps = steps
        self.recipe = normalization
        self.n_fg = int(round(batch_size * foreground_fraction))
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._arrays: dict[Path, tuple[zarr.Array, zarr.Array]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose patches ``__getitem__`` returns."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.batch

    def is_foreground_slot(self, index: int) -> bool:
        """Whether item ``index`` is forced to contain foreground."""
        return index % self.batch >= self.batch - self.n_fg

    def _arrays_for(self, store: Path) -> tuple[zarr.Array, zarr.Array]:
        if store not in self._arrays:  # opened lazily: once per DataLoader worker process
            root = omezarr.open_root(store)
            self._arrays[store] = (omezarr.image_array(root), omezarr.label_array(root))
        return self._arrays[store]

    def _origin(self, rng: np.random.Generator, img: _Image, foreground: bool) -> tuple[int, int]:
        h, w = img.shape
        if foreground and len(img.fg_coords):
            cy, cx = img.fg_coords[rng.integers(len(img.fg_coords))]
            y = int(cy) * img.coarse_factor + int(rng.integers(img.coarse_factor))
            x = int(cx) * img.coarse_factor + int(rng.integers(img.coarse_factor))
            y0, x0 = y - self.patch // 2, x - self.patch // 2
        else:
            y0 = int(rng.integers(0, max(1, h - self.patch + 1)))
            x0 = int(rng.integers(0, max(1, w - self.patch + 1)))
        return int(np.clip(y0, 0, max(0, h - self.patch))), int(np.clip(x0, 0, max(0, w - self.patch)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        img = self.images[int(rng.integers(len(self.images)))]
        y0, x0 = self._origin(rng, img, self.is_foreground_slot(index))
        image_arr, label_arr = self._arrays_for(img.store)
        ys, xs = slice(y0, y0 + self.patch), slice(x0, x0 + self.patch)
        image = normalize(np.asarray(image_arr[:, ys, xs]), img.stats, self.recipe)
        target = np.asarray(label_arr[ys, xs]).astype(np.int64)
        image, target = _pad_to(image, self.patch), _pad_to(target, self.patch)
        if self.augment is not None:
            image, target = augment_pair(image, target, rng, self.augment)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(target))
