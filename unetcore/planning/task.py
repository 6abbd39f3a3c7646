"""The task a model solves: what two models must share to be compared, and what a dataset must be to be predicted.

A model records its task in ``config.json`` (``"task"``) and as registry version tags: input channels, classes
(with their names when known), spatial dims of its data and the spacing it works at. The champion gate compares
only models whose channels, classes, class names and dims agree (spacing is recorded, not compared: the gate
measures both models on the same validation set).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from unetcore.config import ModelConfig
from unetcore.planning.fingerprint import DatasetFingerprint
from unetcore.store.manifest import image_id

ANISOTROPY = 3.0
"""An axis this many times coarser than the others (and as many times shorter) is anisotropic (nnU-Net)."""


@dataclass(frozen=True)
class TaskSignature:
    """What a model was trained for.

    Attributes:
        in_channels: input channels.
        num_classes: 1 (binary) or the number of classes including background.
        spatial_dims: 2 (images) or 3 (volumes): the dims of the data it was trained on.
        spacing: the pixel / voxel spacing it works at ([z,] y, x); None if unknown.
        class_names: a name per class (background first) when the dataset gives them; None if unknown.
        unit: the unit of ``spacing`` (an OME-NGFF unit such as ``millimeter``); None for pixels or unknown.
    """

    in_channels: int
    num_classes: int
    spatial_dims: int = 2
    spacing: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    unit: str | None = None

    COMPARED: ClassVar[tuple[str, ...]] = ("in_channels", "num_classes", "spatial_dims", "class_names")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskSignature:
        spacing, names = data.get("spacing"), data.get("class_names")
        return cls(in_channels=int(data["in_channels"]), num_classes=int(data["num_classes"]),
                   spatial_dims=int(data.get("spatial_dims", 2)),
                   spacing=tuple(float(s) for s in spacing) if spacing is not None else None,
                   class_names=tuple(str(n) for n in names) if names is not None else None,
                   unit=data.get("unit"))

    @classmethod
    def of_model(cls, config: Mapping[str, Any]) -> TaskSignature:
        """The task of a saved model's ``config.json``: its ``task``, or (older models) what its ``model`` says."""
        if "task" in config:
            return cls.from_dict(config["task"])
        model = config["model"]
        return cls(int(model["in_channels"]), int(model["num_classes"]), int(model.get("spatial_dims", 2)))

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> TaskSignature:
        """The task a registry version's tags record (versions older than spatial dims were 2-D)."""
        spacing, names = tags.get("spacing"), tags.get("class_names")
        return cls(in_channels=int(tags.get("in_channels", 1)), num_classes=int(tags.get("num_classes", 1)),
                   spatial_dims=int(tags.get("spatial_dims", 2)),
                   spacing=tuple(float(s) for s in spacing.split(",")) if spacing else None,
                   class_names=tuple(names.split(",")) if names else None, unit=tags.get("spacing_unit"))

    def tags(self) -> dict[str, str]:
        """The task as registry version tags (unknown parts left out)."""
        out = {"in_channels": str(self.in_channels), "num_classes": str(self.num_classes),
               "spatial_dims": str(self.spatial_dims)}
        if self.spacing is not None:
            out["spacing"] = ",".join(f"{s:g}" for s in self.spacing)
        if self.class_names is not None:
            out["class_names"] = ",".join(self.class_names)
        if self.unit is not None:
            out["spacing_unit"] = self.unit
        return out

    def differences(self, tags: Mapping[str, str]) -> list[tuple[str, str, str]]:
        """``(key, theirs, mine)`` for each compared part where ``tags`` (another version's) records another value.

        A part that either side does not record is not a difference (versions registered before it was recorded).
        """
        mine = self.tags()
        return [(k, tags[k], mine[k]) for k in self.COMPARED if k in mine and k in tags and tags[k] != mine[k]]

    def describe(self) -> str:
        """In words: ``binary, 1 channel, 2-D`` or ``3 classes (background, nucleus, border), 3 channels, 3-D``."""
        classes = "binary" if self.num_classes == 1 else f"{self.num_classes} classes"
        if self.class_names:
            classes += f" ({', '.join(self.class_names)})"
        channels = f"{self.in_channels} channel" + ("s" if self.in_channels != 1 else "")
        return f"{classes}, {channels}, {self.spatial_dims}-D"


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> tuple[tuple[float, ...],
                                                                                                   str]:
    """nnU-Net's full-resolution target spacing of volumes, and why.

    The median spacing per axis; but when the coarsest axis is anisotropic (its median spacing over
    :data:`ANISOTROPY` times the others' and its median size under 1/:data:`ANISOTROPY` of theirs), it takes the
    10th percentile of its spacings instead (at least the finest other axis'), so that thin-slice scans are not
    thrown away to match thick ones.
    """
    spacing = np.asarray(spacings, np.float64)
    target = np.median(spacing, 0)
    sizes = np.median(np.asarray(shapes, np.float64), 0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    coarse = target[worst] > ANISOTROPY * max(target[a] for a in others)
    thin = sizes[worst] * ANISOTROPY < min(sizes[a] for a in others)
    shown = " x ".join(f"{s:g}" for s in target)
    if not (coarse and thin):
        return tuple(float(s) for s in target), f"median voxel spacing ({shown})"
    value = float(np.percentile(spacing[:, worst], 10))
    if value < max(target[a] for a in others):
        value = float(max(target[a] for a in others)) + 1e-5
    target[worst] = value
    return (tuple(float(s) for s in target),
            f"anisotropic (axis {worst} median spacing {np.median(spacing[:, worst]):g} > {ANISOTROPY:g}x the others, "
            f"{sizes[worst]:g} voxels < 1/{ANISOTROPY:g} of theirs): that axis takes its 10th percentile, the others "
            "their median (nnU-Net)")


def working_spacing(fp: DatasetFingerprint) -> tuple[tuple[float, ...], str]:
    """The spacing a model of this dataset works at, and why: the median pixel size of its labelled images (2-D),
    the :func:`target_spacing` of its labelled volumes (3-D; train and validation splits, as nnU-Net's fingerprint
    takes every training case). Training and inference resample every image whose
    own spacing differs from it by more than 5 % on an axis (on the fly, region by region), so this is the grid
    the model sees."""
    spacings, shapes = [i.spacing for i in fp.images], [i.shape for i in fp.images]
    if fp.spatial_dims == 2:
        median = tuple(float(v) for v in np.median(spacings, 0))
        shown = " x ".join(f"{s:g}" for s in median)
        why = f"median pixel size of the labelled images ({shown})"
    else:
        median, why = target_spacing(spacings, shapes)
    return median, why + "; an image of another spacing is resampled to it in training and in inference"


def trained_spacing(fp: DatasetFingerprint) -> tuple[float, ...]:
    """The spacing a model trained on ``fp`` works at (:func:`working_spacing`): what training resamples the
    images to and what inference resamples an image to."""
    return working_spacing(fp)[0]


def training_task(model: ModelConfig, fp: DatasetFingerprint) -> TaskSignature:
    """The task of a model with architecture ``model`` trained on the dataset ``fp`` (at the spacing it has seen,
    :func:`trained_spacing`, in the dataset's unit; with the class names ingestion recorded when they name the
    model's classes)."""
    names = fp.class_names if fp.class_names is not None and len(fp.class_names) == max(2, model.num_classes) else None
    return TaskSignature(in_channels=model.in_channels, num_classes=model.num_classes, spatial_dims=fp.spatial_dims,
                         spacing=trained_spacing(fp), class_names=names, unit=fp.unit)


def dataset_model_name(name: str, dataset: Path) -> str:
    """A registered-model name of a dataset's own: ``<name>-<dataset folder>`` (what a refusal suggests)."""
    return f"{name}-{image_id(Path(dataset).resolve())}"
