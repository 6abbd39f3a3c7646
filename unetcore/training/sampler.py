"""Random patches from OME-Zarr stores, images (2 spatial axes) or volumes (3), with foreground or class-balanced
oversampling, never loading a whole image.

Class locations are looked up once per image on the mask's coarsest pyramid level, read in slabs of at most
:data:`SLAB_VOXELS` (so not even that level is held whole), kept as at most :data:`MAX_LOCATIONS` coordinates per
class, and mapped to full resolution with a random offset inside the coarse voxel (the pyramid may halve some axes
only: the factor is per axis), so sampling costs one patch read whatever the image size.

Sampling is deterministic: patch ``i`` of epoch ``e`` depends only on ``(seed, e, i)``. The epoch travels inside
the index (:class:`EpochSampler` yields ``e * len + i``), so persistent DataLoader workers, which hold their own
copy of the dataset, still draw the right epoch's patches, and any number of workers gives the same batches.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset, Sampler

from unetcore.config import NormalizationConfig
from unetcore.errors import ConfigError, InputError
from unetcore.inference.resample import Resampling, linear_resample, nearest_resample, resampling_for, source_box
from unetcore.inference.windows import Block
from unetcore.modes import SamplingKind
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.store.stats import normalize
from unetcore.training.augment import AugmentConfig, augment_pair

MAX_LOCATIONS = 10_000  # per class and image, as nnU-Net: enough variety, bounded memory
CHUNK_CACHE_BYTES = 256 << 20  # decoded store chunks kept per process (DataLoader worker) for patch reads
SLAB_VOXELS = 1 << 24  # label values read at once when looking up class locations (16 MB of uint8)


class LabelArray(Protocol):
    """What :func:`class_locations` reads: a numpy or Zarr array, sliced along its first axis."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: Any) -> Any: ...


@dataclass
class _Image:
    """One training image: where it lives and what sampling needs to know about it."""

    store: Path
    shape: tuple[int, ...]
    stats: dict[str, Any]
    class_coords: dict[int, np.ndarray] = field(default_factory=dict)  # class -> (n, ndim) coarse coordinates
    coarse_factor: tuple[int, ...] = (1, 1)  # per spatial axis: full-resolution voxels per coarse voxel
    resampling: Resampling | None = None  # its grid -> the model's spacing; None: sampled on its own grid

    @property
    def grid(self) -> tuple[int, ...]:
        """The shape patches are drawn from: the image's own, or its shape at the model's spacing."""
        return self.shape if self.resampling is None else tuple(self.resampling.target)

    def to_grid(self, voxel: Sequence[int]) -> list[int]:
        """A voxel of the image's own grid as the nearest voxel of :attr:`grid`."""
        r = self.resampling
        if r is None:
            return [int(v) for v in voxel]
        return [min(t - 1, max(0, round((v + 0.5) * t / s - 0.5))) for v, s, t in zip(voxel, r.source, r.target)]

    @property
    def fg_coords(self) -> np.ndarray:
        """``(n, ndim)`` coarse coordinates of foreground voxels of any class."""
        if not self.class_coords:
            return np.zeros((0, len(self.shape)), np.int32)
        return np.concatenate(list(self.class_coords.values()))


class ChunkCache:
    """Decoded chunks of Zarr arrays, at most ``max_bytes`` of them (least recently used out first).

    :meth:`read` assembles a region from whole chunks (Zarr decodes whole chunks anyway), so patches that fall on
    chunks read before cost a copy instead of a decode: oversampled patches cluster around the foreground, and a
    volume's chunks (about a million voxels) are far larger than a patch. Memory stays bounded whatever the
    volumes' size; ``max_bytes=0`` reads every region from the store.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._chunks: OrderedDict[tuple[Hashable, tuple[int, ...]], np.ndarray] = OrderedDict()

    def _chunk(self, key: Hashable, array: zarr.Array, index: tuple[int, ...]) -> np.ndarray:
        entry = (key, index)
        chunk = self._chunks.get(entry)
        if chunk is not None:
            self._chunks.move_to_end(entry)
            return chunk
        chunk = np.asarray(array[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, array.chunks))])
        self._chunks[entry] = chunk
        self.nbytes += chunk.nbytes
        while self.nbytes > self.max_bytes and self._chunks:
            self.nbytes -= self._chunks.popitem(last=False)[1].nbytes
        return chunk

    def read(self, key: Hashable, array: zarr.Array, region: tuple[slice, ...]) -> np.ndarray:
        """``array[region]`` (slices with a start, one per axis; stops past the end are cut, as Zarr does)."""
        if self.max_bytes <= 0:
            return np.asarray(array[region])
        bounds = [(r.start or 0, min(n if r.stop is None else r.stop, n)) for r, n in zip(region, array.shape)]
        out = np.empty([b - a for a, b in bounds], array.dtype)
        axes = [range(a // c, (b - 1) // c + 1) for (a, b), c in zip(bounds, array.chunks)]
        for index in itertools.product(*axes):
            chunk = self._chunk(key, array, index)
            src, dst = [], []
            for (a, b), i, c in zip(bounds, index, array.chunks):
                lo, hi = max(a, i * c), min(b, (i + 1) * c)
                src.append(slice(lo - i * c, hi - i * c))
                dst.append(slice(lo - a, hi - a))
            out[tuple(dst)] = chunk[tuple(src)]
        return out


def _slabs(shape: tuple[int, ...], slab_voxels: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges along axis 0 holding at most ``slab_voxels`` values each (one row at least)."""
    rows = max(1, slab_voxels // max(1, math.prod(shape[1:])))
    return [(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)]


def class_locations(
    labels: LabelArray,
    ignore_index: int | None = None,
    max_per_class: int = MAX_LOCATIONS,
    seed: int = 0,
    slab_voxels: int = SLAB_VOXELS,
) -> dict[int, np.ndarray]:
    """Coordinates ``(n, ndim)`` int32 of each foreground class of a label image or volume, at most
    ``max_per_class`` each.

    Class 0 (background) and ``ignore_index`` are left out; the subset kept is a deterministic random choice.
    ``labels`` (numpy or Zarr) is read in slabs along its first axis of at most ``slab_voxels`` values, twice
    (count, then collect), never whole; the result is the same as on the whole array at once.
    """
    slabs = _slabs(tuple(labels.shape), slab_voxels)
    cache: dict[int, np.ndarray] = {}

    def read(i: int) -> np.ndarray:
        if i in cache:
            return cache[i]
        block = np.asarray(labels[slabs[i][0] : slabs[i][1]])
        if len(slabs) == 1:  # one slab: read it once
            cache[i] = block
        return block

    counts: list[dict[int, int]] = []
    for i in range(len(slabs)):
        counts.append(_value_counts(read(i)))
    classes = sorted({v for c in counts for v in c if v != 0 and (ignore_index is None or v != ignore_index)})
    rng = np.random.default_rng(seed)
    chosen: dict[int, np.ndarray | None] = {}
    for value in classes:
        total = sum(c.get(value, 0) for c in counts)
        chosen[value] = np.sort(rng.choice(total, max_per_class, replace=False)) if total > max_per_class else None
    found: dict[int, list[np.ndarray]] = {value: [] for value in classes}
    seen = dict.fromkeys(classes, 0)  # voxels of each class in the slabs before this one
    for i, (start, _) in enumerate(slabs):
        present = [v for v in classes if counts[i].get(v)]
        block = read(i) if present else None
        for value in present:
            coords = np.argwhere(block == value).astype(np.int32)
            coords[:, 0] += start
            keep = chosen[value]
            if keep is not None:
                lo, hi = np.searchsorted(keep, [seen[value], seen[value] + len(coords)])
                coords = coords[keep[lo:hi] - seen[value]]
            seen[value] += counts[i][value]
            found[value].append(coords)
    return {value: np.concatenate(parts) for value, parts in found.items()}


def _value_counts(block: np.ndarray) -> dict[int, int]:
    """``{value: count}`` of the values present in an integer block (bincount for uint8, far faster than unique)."""
    if block.dtype == np.uint8:
        n = np.bincount(block.ravel(), minlength=256)
        return {int(v): int(n[v]) for v in np.flatnonzero(n)}
    values, n = np.unique(block, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, n)}


def _coarse_labels(root: zarr.Group) -> tuple[zarr.Array, tuple[int, ...]]:
    """The mask's coarsest pyramid level (not read) and its down-sampling factor per spatial axis."""
    group = root["labels/mask"]
    levels = sorted(int(k) for k in group.array_keys() if k.isdigit())
    coarse, full = group[str(levels[-1])], group[str(levels[0])]
    datasets = group.attrs.get("ome", {}).get("multiscales", [{}])[0].get("datasets", [])
    scales = {d["path"]: d["coordinateTransformations"][0]["scale"] for d in datasets}
    if str(levels[-1]) in scales and str(levels[0]) in scales:
        factor = tuple(max(1, round(c / f)) for c, f in zip(scales[str(levels[-1])], scales[str(levels[0])]))
    else:  # no metadata: every axis halved per level
        factor = (2 ** levels[-1],) * full.ndim
    return coarse, factor


def load_images(dataset: Path, split: str, ignore_index: int | None = None,
                spacing: Sequence[float] | None = None, unit: str | None = None) -> list[_Image]:
    """The images of ``split`` that have masks, ready for sampling; with ``spacing`` (the model's, in ``unit``),
    each image whose own spacing differs from it is sampled on its grid at that spacing
    (:func:`~unetcore.inference.resample.resampling_for`, as inference resamples it).

    Raises:
        InputError: no image of that split has a mask.
        ConfigError: the split mixes images and volumes (2 and 3 spatial axes).
    """
    manifest = mf.require(dataset)
    out = []
    for entry in mf.entries(manifest, split):
        if not entry["has_mask"]:
            continue
        store = mf.store_path(dataset, entry["id"])
        coarse, factor = _coarse_labels(omezarr.open_root(store))
        coords = class_locations(coarse, ignore_index)
        shape = tuple(entry["shape"])
        own = entry.get("spacing") or [1.0] * len(shape)
        resampling = None if spacing is None else resampling_for(shape, own, entry.get("unit"), spacing, unit)[0]
        out.append(_Image(store, shape, entry["stats"], coords, factor, resampling))
    if not out:
        raise InputError(dataset, f"no images with masks in the '{split}' split", "ingest masks with --masks")
    dims = sorted({len(img.shape) for img in out})
    if len(dims) > 1:
        raise ConfigError("dataset", f"the '{split}' split mixes images and volumes ({' and '.join(map(str, dims))} "
                                     "spatial axes); train on one kind at a time")
    return out


def patch_shape(patch_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """The patch per spatial axis: ``patch_size`` on every axis, or the given shape (one side per axis).

    Raises:
        ConfigError: the shape has another number of axes than the images.
    """
    if isinstance(patch_size, (int, np.integer)):
        return (int(patch_size),) * spatial_dims
    shape = tuple(int(p) for p in patch_size)
    if len(shape) != spatial_dims:
        raise ConfigError("patch_shape", f"{list(shape)} has {len(shape)} axes, the images {spatial_dims}")
    return shape


def slice_patch(patch_size: int | Sequence[int], image_dims: int, model_dims: int | None = None) -> tuple[int, ...]:
    """The region a patch reads from an image of ``image_dims`` spatial axes for a model of ``model_dims`` (None:
    the image's): :func:`patch_shape` of the model, one voxel deep along the axes the model does not see (a 2-D
    model on a volume reads ``(1, py, px)``, one z-slice).

    Raises:
        ConfigError: a model of more axes than the images, or a patch shape of another number of axes.
    """
    model_dims = image_dims if model_dims is None else int(model_dims)
    if model_dims > image_dims:
        raise ConfigError("model.spatial_dims", f"a {model_dims}-D model cannot train on {image_dims}-D images")
    return (1,) * (image_dims - model_dims) + patch_shape(patch_size, model_dims)


def pad_to(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Zero-pad the last ``len(shape)`` axes of ``arr`` up to ``shape`` (for images smaller than the patch)."""
    lead = arr.ndim - len(shape)
    pads = [(0, max(0, int(p) - n)) for n, p in zip(arr.shape[lead:], shape)]
    if not any(after for _, after in pads):
        return arr
    return np.pad(arr, [(0, 0)] * lead + pads)


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
    """``len = steps * batch`` random patches per epoch; item ``i`` is ``(image (C, *patch), target (*patch))``.

    ``patch`` is ``(p, p)`` for images, ``(pz, py, px)`` for volumes (``patch_size`` an int: the same on every
    axis); only the chunks under the patch are read. ``spatial_dims`` is the model's (None: the images'): 2 on
    volumes draws 2-D patches ``(C, py, px)`` from single z-slices (nnU-Net's "2d" configuration), each read as
    a ``(1, py, px)`` region of the volume's store, oversampled around the same foreground locations. Within each batch the last
    ``round(batch * foreground_fraction)`` items are centred on a labelled voxel (nnU-Net's oversampling): in
    ``foreground`` mode on any foreground voxel of a random image, in ``class_balanced`` mode on a voxel of a
    class drawn uniformly from the foreground classes present (so rare classes are seen as often as common
    ones). The other items are uniform over a random image. Index ``e * len + i`` is item ``i`` of epoch ``e``
    (see :class:`EpochSampler`), offset by :meth:`set_epoch`. Patches are read through a :class:`ChunkCache` of
    ``cache_bytes`` per process.
    """

    def __init__(
        self,
        images: list[_Image],
        patch_size: int | Sequence[int],
        batch_size: int,
        steps: int,
        normalization: NormalizationConfig,
        foreground_fraction: float,
        augment: AugmentConfig | None,
        seed: int = 0,
        sampling: SamplingKind = "foreground",
        cache_bytes: int = CHUNK_CACHE_BYTES,
        spatial_dims: int | None = None,
    ) -> None:
        self.images = images
        self.patch = slice_patch(patch_size, len(images[0].shape), spatial_dims)
        self.spatial_dims = len(images[0].shape) if spatial_dims is None else int(spatial_dims)
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
        self.cache = ChunkCache(cache_bytes)

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

    def _origin(self, rng: np.random.Generator, img: _Image, coords: np.ndarray | None) -> tuple[int, ...]:
        """The patch's first voxel: centred on a random one of ``coords`` (coarse), else uniform; inside the image."""
        grid = img.grid
        if coords is not None and len(coords):
            centre = coords[rng.integers(len(coords))]
            voxel = img.to_grid([int(c) * f + int(rng.integers(f)) for c, f in zip(centre, img.coarse_factor)])
            start = [v - p // 2 for v, p in zip(voxel, self.patch)]
        else:
            start = [int(rng.integers(0, max(1, n - p + 1))) for n, p in zip(grid, self.patch)]
        return tuple(int(np.clip(s, 0, max(0, n - p))) for s, n, p in zip(start, grid, self.patch))

    def read_patch(self, img: _Image, origin: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The normalised image ``(C, *region)`` and labels ``(*region)`` of the patch at ``origin`` of the image's
        :attr:`~_Image.grid` (the region stops at the grid's end): read from the store, resampled to the model's
        spacing when the image has another (linear for the image, nearest for the labels)."""
        image_arr, label_arr = self._arrays_for(img.store)
        box = Block.from_corners(origin, [min(o + p, n) for o, p, n in zip(origin, self.patch, img.grid)])
        r = img.resampling
        src = box if r is None else source_box(r, box)
        raw = self.cache.read((img.store, "image"), image_arr, (slice(0, image_arr.shape[0]), *src.slices))
        image = normalize(raw, img.stats, self.recipe)
        target = self.cache.read((img.store, "labels"), label_arr, src.slices)
        if r is not None:
            image = linear_resample(image, r.source, r.target, src.start, box)
            target = nearest_resample(target, r.source, r.target, src.start, box)
        return image, target.astype(np.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, item = divmod(index, len(self))
        epoch += self.epoch
        rng = np.random.default_rng([self.seed, epoch, item])
        img, coords = self._pick(rng, self.is_foreground_slot(item))
        image, target = self.read_patch(img, self._origin(rng, img, coords))
        image, target = pad_to(image, self.patch), pad_to(target, self.patch)
        model_patch = self.patch[len(self.patch) - self.spatial_dims:]  # a slice's (py, px) for a 2-D model
        image, target = image.reshape(image.shape[0], *model_patch), target.reshape(model_patch)
        if self.augment is not None:
            image, target = augment_pair(image, target, rng, self.augment)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(target))
