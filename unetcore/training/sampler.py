"""Random patches from OME-Zarr stores, with foreground or class-balanced oversampling, never loading a whole image.

Class locations are looked up once per image on the mask's coarsest pyramid level (small), kept as at most
:data:`MAX_LOCATIONS` coordinates per class, and mapped to full resolution with a random offset inside the
coarse pixel, so sampling costs one patch read whatever the image size.

Sampling is deterministic: patch ``i`` of epoch ``e`` depends only on ``(seed, e, i)``. The epoch travels inside
the index (:class:`EpochSampler` yields ``e * len + i``), so persistent DataLoader workers, which hold their own
copy of the dataset, still draw the right epoch's patches, and any number of workers gives the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset, Sampler

from unetcore.config import NormalizationConfig
from unetcore.errors import InputError
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.store.stats import normalize
from unetcore.training.augment import AugmentConfig, augment_pair

SamplingMode = Literal["foreground", "class_balanced"]
MAX_LOCATIONS = 10_000  # per class and image, as nnU-Net: enough variety, bounded memory


@dataclass
class _Image:
    """One training image: where it lives and what sampling needs to know about it."""

    store: Path
    shape: tuple[int, int]
    stats: dict[str, Any]
    class_coords: dict[int, np.ndarray] = field(default_factory=dict)  # class -> (n, 2) coarse coordinates
    coarse_factor: int = 1

    @property
    def fg_coords(self) -> np.ndarray:
        """``(n, 2)`` coarse coordinates of foreground pixels of any class."""
        if not self.class_coords:
            return np.zeros((0, 2), np.int32)
        return np.concatenate(list(self.class_coords.values()))


def class_locations(
    coarse: np.ndarray, ignore_index: int | None = None, max_per_class: int = MAX_LOCATIONS, seed: int = 0
) -> dict[int, np.ndarray]:
    """Coordinates ``(n, 2)`` int32 of each foreground class of a label image, at most ``max_per_class`` each.

    Class 0 (background) and ``ignore_index`` are left out; the subset kept is a deterministic random choice.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for value in np.unique(coarse):
        if value == 0 or (ignore_index is not None and value == ignore_index):
            continue
        coords = np.argwhere(coarse == value).astype(np.int32)
        if len(coords) > max_per_class:
            coords = coords[np.sort(rng.choice(len(coords), max_per_class, replace=False))]
        out[int(value)] = coords
    return out


def _coarse_labels(root: zarr.Group) -> tuple[np.ndarray, int]:
    """The mask's coarsest pyramid level and its down-sampling factor."""
    group = root["labels/mask"]
    levels = sorted(int(k) for k in group.array_keys() if k.isdigit())
    return np.asarray(group[str(levels[-1])][:]), 2 ** levels[-1]


def load_images(dataset: Path, split: str, ignore_index: int | None = None) -> list[_Image]:
    """The images of ``split`` that have masks, ready for sampling.

    Raises:
        InputError: no image of that split has a mask.
    """
    manifest = mf.require(dataset)
    out = []
    for entry in mf.entries(manifest, split):
        if not entry["has_mask"]:
            continue
        store = mf.store_path(dataset, entry["id"])
        coarse, factor = _coarse_labels(omezarr.open_root(store))
        coords = class_locations(coarse, ignore_index)
        out.append(_Image(store, tuple(entry["shape"]), entry["stats"], coords, factor))
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


class EpochSampler(Sampler[int]):
    """Yields ``epoch * n + i`` for ``i < n``: the dataset reads the epoch from the index itself."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose indices the next iteration yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.epoch * self.n, (self.epoch + 1) * self.n))

    def __len__(self) -> int:
        return self.n


class PatchDataset(Dataset):
    """``len = steps * batch`` random patches per epoch; item ``i`` is ``(image (C,p,p), target (p,p))``.

    Within each batch the last ``round(batch * foreground_fraction)`` items are centred on a labelled pixel
    (nnU-Net's oversampling): in ``foreground`` mode on any foreground pixel of a random image, in
    ``class_balanced`` mode on a pixel of a class drawn uniformly from the foreground classes present (so
    rare classes are seen as often as common ones). The other items are uniform over a random image.
    Index ``e * len + i`` is item ``i`` of epoch ``e`` (see :class:`EpochSampler`), offset by :meth:`set_epoch`.
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
        sampling: SamplingMode = "foreground",
    ) -> None:
        self.images = images
        self.patch = patch_size
        self.batch = batch_size
        self.steps = steps
        self.recipe = normalization
        self.n_fg = int(round(batch_size * foreground_fraction))
        self.augment = augment
        self.seed = seed
        self.sampling = sampling
        self.epoch = 0
        self.classes = sorted({c for img in images for c in img.class_coords})
        self._arrays: dict[Path, tuple[zarr.Array, zarr.Array]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Offset the epoch read from indices: index ``i < len`` then returns item ``i`` of ``epoch``."""
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

    def _pick(self, rng: np.random.Generator, foreground: bool) -> tuple[_Image, np.ndarray | None]:
        """The image to read and, for a foreground slot, the coarse locations to centre on."""
        if foreground and self.sampling == "class_balanced" and self.classes:
            cls = self.classes[int(rng.integers(len(self.classes)))]
            having = [img for img in self.images if cls in img.class_coords]
            img = having[int(rng.integers(len(having)))]
            return img, img.class_coords[cls]
        img = self.images[int(rng.integers(len(self.images)))]
        return img, (img.fg_coords if foreground else None)

    def _origin(self, rng: np.random.Generator, img: _Image, coords: np.ndarray | None) -> tuple[int, int]:
        h, w = img.shape
        if coords is not None and len(coords):
            cy, cx = coords[rng.integers(len(coords))]
            y = int(cy) * img.coarse_factor + int(rng.integers(img.coarse_factor))
            x = int(cx) * img.coarse_factor + int(rng.integers(img.coarse_factor))
            y0, x0 = y - self.patch // 2, x - self.patch // 2
        else:
            y0 = int(rng.integers(0, max(1, h - self.patch + 1)))
            x0 = int(rng.integers(0, max(1, w - self.patch + 1)))
        return int(np.clip(y0, 0, max(0, h - self.patch))), int(np.clip(x0, 0, max(0, w - self.patch)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, item = divmod(index, len(self))
        epoch += self.epoch
        rng = np.random.default_rng([self.seed, epoch, item])
        img, coords = self._pick(rng, self.is_foreground_slot(item))
        y0, x0 = self._origin(rng, img, coords)
        image_arr, label_arr = self._arrays_for(img.store)
        ys, xs = slice(y0, y0 + self.patch), slice(x0, x0 + self.patch)
        image = normalize(np.asarray(image_arr[:, ys, xs]), img.stats, self.recipe)
        target = np.asarray(label_arr[ys, xs]).astype(np.int64)
        image, target = _pad_to(image, self.patch), _pad_to(target, self.patch)
        if self.augment is not None:
            image, target = augment_pair(image, target, rng, self.augment)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(target))
