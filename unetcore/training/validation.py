"""Whole-image validation during training: Dice / IoU (and HD95) over the validation split, and previews."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetcore.config import TrainConfig
from unetcore.inference.predict import BlockPredictor
from unetcore.inference.resample import resampled_outputs, resampling_for
from unetcore.inference.windows import Block, plan_blocks
from unetcore.metrics import confusion_counts, dice_from_counts, hd95, iou_from_counts
from unetcore.planning.task import TaskSignature
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.tracking import log_volume_preview
from unetcore.tracking import mlflow as tracking

PREVIEW_VOLUME = (64, 256, 256)  # the largest (z, y, x) crop of a volume predicted for a preview


def evaluate(
    predictor: BlockPredictor,
    dataset: Path,
    entries: list[dict[str, Any]],
    block_size: int = 1024,
    *,
    ignore_index: int | None = None,
    with_hd95: bool = False,
    task: TaskSignature | None = None,
) -> dict[str, float]:
    """Whole-image sliding-window validation: Dice and IoU per foreground class and their means.

    With the model's ``task``, an image of another spacing than the task's is predicted at the task's spacing
    and scored on its own grid, as ``unet predict`` does (:mod:`unetcore.inference.resample`).

    Counts are accumulated block by block over the whole set, so memory does not grow with image size
    (except with ``with_hd95``, which holds one image's labels whole). Empty ground truth is explicit:
    ``val_truth_empty_class{c}`` is 1 when no validation pixel has class ``c``; its Dice is then 0 if the model
    predicts the class anywhere, NaN if it does not (MONAI's convention), and NaN classes are left out of
    the means. ``val_hd95`` is the mean over images and classes of the finite per-image distances, in the
    manifest's spacing units (mm for a CT volume; pixels for a 2-D image, whose spacing is 1).
    """
    k = max(2, predictor.num_classes)
    tp, fp, fn = (np.zeros(k, np.int64) for _ in range(3))
    distances: dict[int, list[float]] = {c: [] for c in range(1, k)}
    for entry in entries:
        root = omezarr.open_root(mf.store_path(dataset, entry["id"]))
        image, truth = omezarr.image_array(root), omezarr.label_array(root)
        whole = np.zeros(image.shape[1:], np.uint8) if with_hd95 else None
        for block, labels in _labelled_blocks(predictor, image, entry, block_size, task):
            t, p, n = confusion_counts(labels, np.asarray(truth[block.slices]), predictor.num_classes, ignore_index)
            tp, fp, fn = tp + t, fp + p, fn + n
            if whole is not None:
                whole[block.slices] = labels
        if whole is not None:
            image_hd95(whole, np.asarray(truth[:]), ignore_index, distances, entry.get("spacing"))
    dice, iou = dice_from_counts(tp, fp, fn), iou_from_counts(tp, fp, fn)
    out = {"val_dice": _nanmean(dice[1:]), "val_iou": _nanmean(iou[1:])}
    for c in range(1, k):
        out[f"val_dice_class{c}"] = float(dice[c])
        out[f"val_iou_class{c}"] = float(iou[c])
        out[f"val_truth_empty_class{c}"] = float(tp[c] + fn[c] == 0)
    if with_hd95:
        out["val_hd95"] = _nanmean(np.array([d for ds in distances.values() for d in ds]))
        for c, ds in distances.items():
            out[f"val_hd95_class{c}"] = _nanmean(np.array(ds))
    return out


def _labelled_blocks(predictor: BlockPredictor, image: Any, entry: dict[str, Any], block_size: int,
                     task: TaskSignature | None) -> Iterator[tuple[Block, np.ndarray]]:
    """``(block, labels)`` over one validation image, at the task's spacing when the image has another."""
    shape = tuple(image.shape[1:])
    r = None
    if task is not None:
        own = entry.get("spacing") or [1.0] * len(shape)
        r, _ = resampling_for(shape, own, entry.get("unit"), task.spacing, task.unit)
    if r is None:
        for block, _, labels in predictor.blocks(image, entry["stats"], block_size):
            yield block, labels
        return
    for block in plan_blocks(shape, (block_size,) * len(shape)):
        yield block, resampled_outputs(predictor, image, entry["stats"], block, r)[1]


def image_hd95(pred: np.ndarray, truth: np.ndarray, ignore_index: int | None, out: dict[int, list[float]],
               spacing: Sequence[float] | None = None) -> None:
    """Append each class's HD95 on one image or volume (labels (H, W) or (D, H, W)) to ``out[class]``, in
    ``spacing`` units (the manifest's voxel size per axis; pixels when None); ignored voxels count as background."""
    if ignore_index is not None:
        keep = truth != ignore_index
        pred, truth = np.where(keep, pred, 0), np.where(keep, truth, 0)
    for c in out:
        out[c].append(hd95(pred == c, truth == c, spacing))


def _nanmean(values: np.ndarray) -> float:
    """Mean of the finite values; NaN (no warning) when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def preview(predictor: BlockPredictor, dataset: Path, entry: dict[str, Any], step: int) -> None:
    """Log an input / truth / prediction strip of a validation image's top-left corner (≤ 512²) at ``step``; of a
    volume, three orthogonal mid-slices of its central :data:`PREVIEW_VOLUME` crop."""
    root = omezarr.open_root(mf.store_path(dataset, entry["id"]))
    image, truth = omezarr.image_array(root), omezarr.label_array(root)
    if image.ndim == 4:
        region = tuple(slice((n - min(n, p)) // 2, (n - min(n, p)) // 2 + min(n, p))
                       for n, p in zip(image.shape[1:], PREVIEW_VOLUME))
        crop = np.asarray(image[(slice(None), *region)])
        _, _, labels = next(predictor.blocks(crop, entry["stats"], crop.shape[1:]))
        log_volume_preview(crop, np.asarray(truth[region]), labels, tracking.PREVIEW_KEY, step,
                                    entry.get("spacing"))
        return
    size = min(512, *image.shape[1:])
    _, _, labels = next(predictor.blocks(image[:, :size, :size], entry["stats"], size))
    tracking.log_preview(np.asarray(image[:, :size, :size]), np.asarray(truth[:size, :size]), labels, step)


@dataclass(frozen=True)
class Validation:
    """How a training run validates a model: its validation entries, tiling and scoring options."""

    dataset: Path
    entries: list[dict[str, Any]]
    device: torch.device
    tile: int | tuple[int, ...]  # an edge, or one per axis (a 3-D model's patch)
    batch_size: int
    ignore_index: int | None = None
    with_hd95: bool = False

    @classmethod
    def of(cls, cfg: TrainConfig, entries: list[dict[str, Any]], device: torch.device,
           tile: int | Sequence[int] | None = None) -> Validation:
        """The validation ``cfg`` asks for on ``entries`` (the split's labelled images), at ``tile`` (None =
        ``cfg.val_tile``)."""
        tile = cfg.val_tile if tile is None else tile if isinstance(tile, int) else tuple(int(t) for t in tile)
        return cls(Path(cfg.dataset), entries, device, tile, cfg.batch_size, cfg.ignore_index, cfg.hd95)

    def predictor(self, model: torch.nn.Module, config: dict[str, Any]) -> BlockPredictor:
        """Sliding-window predictor of ``model`` (config as saved with it) at the validation tile, 50 % overlap.

        A model with other axes than the tile (a 3-D champion scored on a 2-D model's validation, or the reverse:
        the "2d" and "3d" configurations of one volume dataset) uses its own saved tile instead."""
        tile = self.tile
        dims = int(config["model"].get("spatial_dims", 2))
        if (2 if isinstance(tile, int) else len(tile)) != dims:  # a 2-D model validates with an edge
            saved = config.get("tile", 256)
            tile = saved if isinstance(saved, int) else tuple(int(t) for t in saved)
        return BlockPredictor.from_model(model, config, self.device, tile=tile, overlap=0.5,
                                         batch_size=self.batch_size)

    def score(self, model: torch.nn.Module, config: dict[str, Any]) -> dict[str, float]:
        """:func:`evaluate` of ``model`` on the validation entries."""
        return evaluate(self.predictor(model, config), self.dataset, self.entries, ignore_index=self.ignore_index,
                        with_hd95=self.with_hd95, task=TaskSignature.of_model(config))

    def preview(self, model: torch.nn.Module, config: dict[str, Any], step: int) -> None:
        """:func:`preview` of the first validation image, logged at ``step``."""
        preview(self.predictor(model, config), self.dataset, self.entries[0], step)

    def set_id(self) -> str:
        """Names the validation set (tile and image hashes): Dice figures compare only on equal ids."""
        return f"tile={self.tile};" + ",".join(sorted(e["id"] + ":" + e["source_hash"][:8] for e in self.entries))
