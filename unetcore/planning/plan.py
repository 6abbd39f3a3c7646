"""The training plan: every recipe choice decided from the dataset's fingerprint, each with the reason for it.

Rules (nnU-Net's where it has one, sized for a CPU):

* channels and classes from the data; 2-D or 3-D from the data (or 2-D on volumes when asked: nnU-Net's "2d"
  configuration, a 2-D model on z-slices);
* target spacing: 2-D images take the median pixel size; volumes the median spacing, except that an axis much
  coarser than the others (anisotropic: > 3x in spacing and < 1/3 in voxels) takes its 10th percentile; training
  and inference resample an image of another spacing to it (:func:`~unetcore.planning.task.working_spacing`);
* patch: the largest that is no larger than the median (resampled) image, shaped like it (square in 2-D, where
  training rotates patches by 90 degrees), a multiple of each axis' pooling product, and within the memory
  budget at the smallest batch; depth: as many stages as the patch can pool (at most :data:`MAX_DEPTH`), pooling
  per axis from the spacing (:func:`~unetcore.model.plan_pooling`);
* batch: what the memory budget holds, at most 5 % of the training voxels per batch and :data:`MAX_BATCH`;
* normalisation: CT scheme for HU-like data, else per image; sampling: class-balanced when foreground classes are
  imbalanced; loss: Dice + cross-entropy;
* length: a fixed amount of work (:data:`WORK_PIXELS` patch pixels) as optimiser steps, never wall time, so the
  same data and seed give the same model on an idle and a loaded machine.

:func:`plan_dataset` plans; :meth:`Plan.train_config` turns a plan plus explicit options into the
:class:`~unetcore.config.TrainConfig` that trains, each option overriding exactly its field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

import numpy as np

from unetcore.atomic import atomic_write_json
from unetcore.config import (
    ModelConfig,
    NormalizationConfig,
    PipelineConfig,
    TrainConfig,
    given_options,
    validated,
)
from unetcore.errors import ConfigError, InputError
from unetcore.model import PoolingPlan, deepest, plan_pooling
from unetcore.modes import SpatialDims
from unetcore.planning.fingerprint import DatasetFingerprint, ImageFingerprint, fingerprint
from unetcore.planning.task import working_spacing

PLAN_FILE = "plan.json"
PLAN_VERSION = 1
MEMORY_BUDGET_BYTES = 2 << 30
"""Activation memory one training step may use (estimated by :func:`training_bytes`)."""
WORK_PIXELS = 10 * 50 * 4 * 256 * 256
"""Patch pixels a training processes (the former fixed recipe: 10 epochs of 50 steps of 4 patches of 256²,
about 10 minutes on 2 CPU cores); a voxel counts :data:`VOXEL_COST` pixels."""
VOXEL_COST = 3  # a 3x3x3 convolution costs three 3x3 ones
STEP_OVERHEAD_PIXELS = 256 * 256  # what a step costs besides its patches (optimiser update, small deep layers)
EPOCHS = 10
MIN_STEPS = {2: 100, 3: 400}
"""Fewest optimiser steps per spatial dims: 100 steps of a 3-D UNet on the MNI volume scored below multi-Otsu
(mean Dice 0.899 vs 0.920), 400 above it (0.946; BENCHMARKS.md, real volume)."""
MAX_STEPS = 50_000
MAX_DEPTH = 5
MIN_BATCH = 2
MAX_BATCH = {2: 8, 3: 2}
BATCH_COVERAGE = 0.05  # nnU-Net: a batch holds at most this share of the training voxels
MIN_PATCH = 16
FLOATS_PER_FEATURE = 8  # activations kept for the backward pass per feature-map value (convs, norms, ReLUs, skips)
FOREGROUND_FRACTION = 0.33
BALANCE_BELOW = 0.5  # class-balanced sampling when the rarest foreground class is below this share of the commonest


@dataclass(frozen=True)
class Choice:
    """One decision of the plan.

    Attributes:
        field: the :class:`~unetcore.config.TrainConfig` field it fills (dotted for nested ones), or a plan-only
            name (see :data:`PLAN_ONLY`).
        value: the value training uses (an explicit option's when ``overridden``).
        why: the reason, in words.
        planned: the plan's own value (equal to ``value`` unless overridden).
        overridden: an explicit option set this field.
        details: supporting numbers (e.g. the normalisation statistics), JSON-able.
    """

    field: str
    value: Any
    why: str
    planned: Any = None
    overridden: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "value": self.value, "planned": self.planned, "overridden": self.overridden,
                "why": self.why, **({"details": self.details} if self.details else {})}


PLAN_ONLY = frozenset({"target_spacing", "normalization_scheme", "steps", "class_names"})
"""Choices that fill no TrainConfig field: they explain (the work) or go with the model's task (the spacing
inference resamples to, the class names)."""
_MODEL_ONLY_IF_DECLARED = ("model.spatial_dims", "model.pool", "model.kernels")  # fields of the N-D model


@dataclass(frozen=True)
class Plan:
    """Every choice for training on one dataset, with the fingerprint summary it came from."""

    dataset: str
    choices: tuple[Choice, ...]
    fingerprint: dict[str, Any]
    version: int = PLAN_VERSION

    def choice(self, name: str) -> Choice:
        """The choice for field ``name``.

        Raises:
            KeyError: the plan makes no such choice.
        """
        for c in self.choices:
            if c.field == name:
                return c
        raise KeyError(name)

    def __getitem__(self, name: str) -> Any:
        return self.choice(name).value

    @property
    def overridden(self) -> list[str]:
        """The fields an explicit option set."""
        return [c.field for c in self.choices if c.overridden]

    def with_overrides(self, overrides: Mapping[str, Any]) -> Plan:
        """This plan with the fields named in ``overrides`` (dotted TrainConfig paths) set to their values and
        marked overridden; keys the plan does not choose are ignored here (they pass to the config as given)."""
        choices = tuple(
            replace(c, value=_plain(overrides[c.field]), overridden=True) if c.field in overrides else c
            for c in self.choices
        )
        return replace(self, choices=choices)

    def train_values(self) -> dict[str, Any]:
        """``{dotted TrainConfig field: value}`` the plan fills (plan-only choices left out).

        Raises:
            ConfigError: a 3-D plan while :class:`~unetcore.config.ModelConfig` has no ``spatial_dims`` (the N-D
                model is not in this build).
        """
        declared = ModelConfig.model_fields
        values = {}
        for c in self.choices:
            if c.field in PLAN_ONLY:
                continue
            if c.field in _MODEL_ONLY_IF_DECLARED and c.field.split(".")[1] not in declared:
                if c.field == "model.spatial_dims" and c.value != 2:
                    raise ConfigError("model.spatial_dims", "the plan is 3-D but this build trains 2-D models only")
                continue
            values[c.field] = c.value
        return values

    def train_config(self, overrides: Mapping[str, Any] | None = None, **targets: Any) -> TrainConfig:
        """The TrainConfig of this plan with ``overrides`` (dotted fields, explicit options) applied on top.

        Args:
            overrides: each overrides exactly its field; fields the plan does not choose (lr, seed...) are set too.
            targets: the non-recipe fields (``output``, ``tracking_uri``...); ``dataset`` defaults to the plan's.

        Raises:
            ConfigError: a value out of range, named by its dotted field.
        """
        values = {**self.train_values(), **(overrides or {})}
        return validated(TrainConfig, **{"dataset": self.dataset, **targets, **_nested(values)})

    def params(self) -> dict[str, str]:
        """MLflow params: ``plan.<field>`` = the planned value of each choice, ``plan.overridden`` = the fields an
        option set (comma-separated, ``none`` if none)."""
        out = {f"plan.{c.field}": _param(c.planned) for c in self.choices}
        out["plan.overridden"] = ",".join(self.overridden) or "none"
        return out

    def rows(self) -> list[tuple[str, str, str]]:
        """``(field, value, why)`` per choice; an overridden one reads ``value (option; planned X)``."""
        rows = []
        for c in self.choices:
            value = _shown(c.value)
            if c.overridden:
                value += f" (option; planned {_shown(c.planned)})"
            rows.append((c.field, value, c.why))
        return rows

    def table(self) -> str:
        """The plan as an aligned text table: field, value, why."""
        rows = [("field", "value", "why"), *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        return "\n".join(f"{f:<{widths[0]}}  {v:<{widths[1]}}  {w}".rstrip() for f, v, w in rows)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "dataset": self.dataset, "overridden": self.overridden,
                "choices": [c.to_dict() for c in self.choices], "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        choices = tuple(Choice(field=c["field"], value=c["value"], why=c["why"], planned=c.get("planned"),
                               overridden=bool(c.get("overridden")), details=c.get("details", {}))
                        for c in data["choices"])
        return cls(dataset=data["dataset"], choices=choices, fingerprint=data.get("fingerprint", {}),
                   version=int(data.get("version", PLAN_VERSION)))


def _plain(value: Any) -> Any:
    """A JSON-able form of an option value (pydantic models, tuples)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return json.loads(json.dumps(value, default=list))


def _param(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _shown(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return " x ".join(f"{v:g}" for v in value)
    if isinstance(value, list):
        return json.dumps(value)
    return "none" if value is None else str(value)


def _nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"model.depth": 3, "lr": 1e-3}`` -> ``{"model": {"depth": 3}, "lr": 1e-3}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# --- the pure rules -----------------------------------------------------------------------------------------


def resampled_shape(image: ImageFingerprint, spacing: Sequence[float]) -> list[float]:
    """The shape ``image`` takes at ``spacing`` (voxels, not rounded)."""
    return [n * s / t for n, s, t in zip(image.shape, image.spacing, spacing)]


def training_bytes(patch: Sequence[int], batch: int, base_channels: int, pool: Sequence[Sequence[int]]) -> int:
    """Estimated activation memory of one training step (float32, kept for the backward pass).

    Each stage ``s`` holds ``base_channels * 2**s`` feature maps of its (pooled) size, in the encoder and again in
    the decoder, :data:`FLOATS_PER_FEATURE` values per feature-map element.
    """
    voxels = float(math.prod(patch))
    values = 0.0
    for stage in range(len(pool) + 1):
        values += base_channels * 2**stage * voxels
        if stage < len(pool):
            voxels /= math.prod(pool[stage])
    return int(batch * values * 2 * FLOATS_PER_FEATURE * 4)


@dataclass(frozen=True)
class PatchPlan:
    """The patch, depth and pooling chosen together, and why."""

    patch: tuple[int, ...]
    depth: int
    pooling: PoolingPlan
    why: str


def plan_patch(median: Sequence[float], spacing: Sequence[float], *, square: bool, base_channels: int = 16,
               budget: int = MEMORY_BUDGET_BYTES, max_depth: int = MAX_DEPTH, min_batch: int = MIN_BATCH) -> PatchPlan:
    """The largest patch no larger than ``median`` (the median image, in voxels of ``spacing``), shaped like it
    (``square``: every axis the shortest median axis), each axis a multiple of its pooling product, whose training
    step at ``min_batch`` fits ``budget``; with as many stages as it can pool, up to ``max_depth``.

    While over budget, the axis largest relative to the median image shrinks by its pooling multiple (all axes
    when square), as nnU-Net does.

    Raises:
        ValueError: the median image is too small for a patch of :data:`MIN_PATCH` or one pooling stage.
    """
    patch = [int(math.floor(m)) for m in median]
    if square:
        patch = [min(patch)] * len(patch)
    limit = "the median image"
    while True:
        if min(patch) < 1 or max(patch) < MIN_PATCH:
            raise ValueError(f"the median image ({' x '.join(f'{m:g}' for m in median)}) is too small to train on "
                             f"patches (at least {MIN_PATCH} voxels along an axis)")
        depth = deepest(spacing, patch, max_depth)
        if depth == 0:
            raise ValueError(f"a patch of {' x '.join(map(str, patch))} cannot be pooled once")
        pooling = plan_pooling(spacing, patch, depth)
        multiple = pooling.multiple
        rounded = [max(m, p // m * m) for p, m in zip(patch, multiple)]
        if square:
            rounded = [min(rounded)] * len(rounded)
        if training_bytes(rounded, min_batch, base_channels, pooling.pool) <= budget:
            break
        limit = "the memory budget"
        if square:
            patch = [rounded[0] - max(multiple)] * len(rounded)
        else:
            axis = int(np.argmax([r / m for r, m in zip(rounded, median)]))
            patch = list(rounded)
            patch[axis] -= multiple[axis]
    shape = "square (2-D patches are rotated by 90 degrees)" if square else "shaped like the median image"
    why = (f"the largest patch, {shape}, no larger than the median image "
           f"({' x '.join(f'{m:g}' for m in median)}), a multiple of the pooling ({' x '.join(map(str, multiple))}) "
           f"and within {budget / 2**30:g} GiB of activations at batch {min_batch}; limited by {limit}")
    return PatchPlan(tuple(rounded), depth, pooling, why)


def plan_batch(patch: Sequence[int], pool: Sequence[Sequence[int]], training_voxels: float, spatial_dims: int,
               base_channels: int = 16, budget: int = MEMORY_BUDGET_BYTES) -> tuple[int, str]:
    """The batch size, and why: what ``budget`` holds, at most :data:`BATCH_COVERAGE` of the ``training_voxels``
    and :data:`MAX_BATCH`, at least :data:`MIN_BATCH`."""
    by_memory = budget // max(1, training_bytes(patch, 1, base_channels, pool))
    by_data = int(BATCH_COVERAGE * training_voxels // math.prod(patch))
    cap = MAX_BATCH[spatial_dims]
    what = "voxels" if spatial_dims == 3 else "pixels"
    limits = {"the memory budget": by_memory, f"{BATCH_COVERAGE:.0%} of the training {what} per batch": by_data,
              f"at most {cap} on a CPU": cap}
    binding = min(limits, key=lambda k: limits[k])
    batch = max(MIN_BATCH, min(limits.values()))
    if batch == MIN_BATCH and limits[binding] < MIN_BATCH:
        return batch, f"the minimum, {MIN_BATCH} ({binding} would allow {limits[binding]})"
    return batch, f"limited by {binding}"


def plan_steps(patch: Sequence[int], batch: int, spatial_dims: int) -> tuple[int, int, str]:
    """``(epochs, steps_per_epoch, why)``: :data:`WORK_PIXELS` of work as optimiser steps in :data:`EPOCHS` epochs
    (between :data:`MIN_STEPS` of the dims and :data:`MAX_STEPS` steps in all); a step costs its patch pixels (a
    voxel :data:`VOXEL_COST`) plus :data:`STEP_OVERHEAD_PIXELS`."""
    cost = batch * math.prod(patch) * (VOXEL_COST if spatial_dims == 3 else 1) + STEP_OVERHEAD_PIXELS
    fewest = MIN_STEPS[3 if spatial_dims == 3 else 2]
    steps = int(np.clip(round(WORK_PIXELS / cost), fewest, MAX_STEPS))
    per_epoch = math.ceil(steps / EPOCHS)
    amount = (f"the fewest a {spatial_dims}-D UNet is given ({WORK_PIXELS / 1e6:.0f} M pixels of patches would make "
              f"{round(WORK_PIXELS / cost)})" if steps == fewest and round(WORK_PIXELS / cost) < fewest
              else f"a fixed amount of work ({WORK_PIXELS / 1e6:.0f} M pixels of patches)")
    why = (f"{EPOCHS} epochs x {per_epoch} = {EPOCHS * per_epoch} optimiser steps: {amount}, not wall time, so the "
           "same data and seed give the same model on any machine; --time-budget-s only caps it")
    return EPOCHS, per_epoch, why


def plan_sampling(num_classes: int, frequencies: Mapping[int, float] | None) -> tuple[str, str]:
    """``foreground`` for one foreground class or balanced ones, ``class_balanced`` when the rarest foreground
    class is under :data:`BALANCE_BELOW` of the commonest (or frequencies are unknown), and why."""
    if num_classes <= 2:
        return "foreground", "one foreground class: a share of each batch is centred on foreground (nnU-Net)"
    if frequencies is None:
        return "class_balanced", "several foreground classes, their frequencies not measured: each class as often"
    foreground = {c: f for c, f in frequencies.items() if c != 0}
    if not foreground or min(foreground.values()) >= BALANCE_BELOW * max(foreground.values()):
        return "foreground", "foreground classes about equally frequent: centred on any foreground"
    rarest = min(foreground, key=lambda c: foreground[c])
    commonest = max(foreground, key=lambda c: foreground[c])
    return ("class_balanced",
            f"class {rarest} is {foreground[rarest]:.2%} of the labelled pixels, class {commonest} "
            f"{foreground[commonest]:.2%}: patches are centred on each class as often")


# --- the plan of a dataset ----------------------------------------------------------------------------------


def _normalization(fp: DatasetFingerprint) -> tuple[Choice, Choice]:
    recipe = NormalizationConfig()
    if fp.modality != "ct":
        scheme = Choice("normalization_scheme", "per_image", f"{fp.modality_why}: each image by its own statistics")
        mode = Choice("normalization.mode", recipe.mode,
                      f"per image: clip to its {recipe.low_percentile:g}-{recipe.high_percentile:g} percentiles, "
                      "scale to [0, 1]")
        return scheme, mode
    source, stats = ("foreground", fp.foreground) if fp.foreground else ("whole-image (foreground not measured)",
                                                                        fp.intensity)
    ch = stats[0]
    details = {"clip": [ch.low, ch.high], "mean": ch.mean, "std": ch.std, "source": source}
    scheme = Choice("normalization_scheme", "ct",
                    f"{fp.modality_why}: clip to the {source} {ch.low:g}..{ch.high:g} (percentiles 0.5-99.5), then "
                    f"z-score by its mean {ch.mean:.1f} and std {ch.std:.1f} (nnU-Net's CT scheme)", details=details)
    mode = Choice("normalization.mode", "ct",
                  "ct: training fits the clip and z-score from the training split's foreground statistics "
                  "(unetcore.store.fit_normalization) and stores them with the model")
    return scheme, mode


def _classes(fp: DatasetFingerprint) -> Choice:
    shown = ", ".join(map(str, fp.classes)) or "none"
    num = fp.num_classes
    what = "binary (sigmoid)" if num == 1 else f"{num} classes (softmax, class 0 background)"
    declared = f"; declared at ingestion: {fp.declared_classes}" if fp.declared_classes > 1 else ""
    return Choice("model.num_classes", num, f"mask values {shown}{declared}: {what}")


def _class_names(fp: DatasetFingerprint) -> Choice:
    names, expected = fp.class_names, max(2, fp.num_classes)
    if names is None:
        return Choice("class_names", None, "not given: classes are numbered (ingest --class-names to name them)")
    if len(names) != expected:
        return Choice("class_names", None, f"ingestion named {len(names)} classes ({', '.join(names)}), the masks "
                                           f"hold {expected}: not recorded (re-ingest with {expected} names)")
    return Choice("class_names", list(names), "given at ingestion (--class-names); recorded with the model and "
                                              "its predictions")


def plan_from_fingerprint(fp: DatasetFingerprint, *, budget: int = MEMORY_BUDGET_BYTES,
                          spatial_dims: int | None = None) -> Plan:
    """The plan of a fingerprinted dataset (see the module docstring for the rules).

    ``spatial_dims`` 2 on volumes plans nnU-Net's "2d" configuration: a 2-D model trained on z-slices, its square
    patch no larger than the median slice, its batch over the slices' pixels; None plans the data's own dims.

    Raises:
        InputError: the images are too small to train on.
        ConfigError: ``spatial_dims`` 3 on 2-D images.
    """
    data_dims = fp.spatial_dims
    dims = data_dims if spatial_dims is None else int(spatial_dims)
    if dims not in get_args(SpatialDims):
        raise ConfigError("model.spatial_dims", f"--dims {dims}: must be one of {', '.join(map(str, get_args(SpatialDims)))}")
    if dims > data_dims:
        raise ConfigError("model.spatial_dims", f"--dims {dims} on {data_dims}-D data: a {dims}-D model needs "
                          f"{dims}-D images; leave the dimension to the plan")
    base = ModelConfig().base_channels
    dims_why = (f"the labelled images are {dims}-D" if dims == data_dims else
                "a 2-D model on the volumes' z-slices (nnU-Net's \"2d\" configuration; the volumes are 3-D)")
    choices = [Choice("model.spatial_dims", dims, dims_why)]
    spacing, spacing_why = working_spacing(fp)
    if dims == 2:
        grid: tuple[float, ...] = (1.0, 1.0)  # pooling and voxel counts on the pixel grid
        median = fp.shape.median[data_dims - 2:]  # a volume's slice: (y, x)
    else:
        grid = spacing
        median = tuple(float(v) for v in np.median([resampled_shape(i, spacing) for i in fp.training], 0))
    choices.append(Choice("target_spacing", list(spacing), spacing_why))
    channels_why = f"every labelled image has {fp.channels} channel{'s' if fp.channels != 1 else ''}"
    choices += [Choice("model.in_channels", fp.channels, channels_why), _classes(fp), _class_names(fp)]
    try:
        patch = plan_patch(median, grid, square=dims == 2, base_channels=base, budget=budget)
    except ValueError as exc:
        raise InputError(fp.dataset, str(exc), "ingest larger images") from None
    patch_value: int | list[int] = patch.patch[0] if dims == 2 else list(patch.patch)
    choices += [
        Choice("patch_size", patch_value, patch.why),
        Choice("model.depth", patch.depth,
               f"as many 2x poolings as the patch allows (feature maps >= 4), at most {MAX_DEPTH}"),
        Choice("model.pool", None if patch.pooling.is_default else patch.pooling.pool,
               "2 along every axis at every stage" if patch.pooling.is_default else
               "per axis from the spacing: a coarse axis waits until the fine ones catch up (nnU-Net)",
               details={"pool": patch.pooling.pool}),
        Choice("model.kernels", None if patch.pooling.is_default else patch.pooling.kernels,
               "3 along every axis" if patch.pooling.is_default else
               "1 along an axis while it is much coarser than the finest (no mixing of thick slices)",
               details={"kernels": patch.pooling.kernels}),
    ]
    training_voxels = sum(math.prod(i.shape if dims == 2 else resampled_shape(i, spacing)) for i in fp.training)
    # (a 2-D model on volumes: every slice's pixels, no resampling)
    batch, batch_why = plan_batch(patch.patch, patch.pooling.pool, training_voxels, dims, base, budget)
    choices.append(Choice("batch_size", batch, batch_why))
    choices += _normalization(fp)
    sampling, sampling_why = plan_sampling(max(2, fp.num_classes), fp.class_frequencies)
    fg_share = (f"; foreground is {1 - fp.class_frequencies.get(0, 0.0):.1%} of the labelled pixels"
                if fp.class_frequencies is not None else "")
    choices += [
        Choice("sampling", sampling, sampling_why),
        Choice("foreground_fraction", FOREGROUND_FRACTION, f"a third of each batch centred on foreground (nnU-Net)"
                                                           f"{fg_share}"),
        Choice("loss", "dice_ce", "Dice + cross-entropy (nnU-Net): robust to class imbalance"),
    ]
    epochs, per_epoch, steps_why = plan_steps(patch.patch, batch, dims)
    choices += [
        Choice("steps", epochs * per_epoch, steps_why),
        Choice("epochs", epochs, f"a validation (and checkpoint) every {per_epoch} steps"),
        Choice("steps_per_epoch", per_epoch, f"{epochs * per_epoch} steps in {epochs} epochs"),
        Choice("time_budget_s", 0.0, "no wall-clock cut: the run is its steps (the same model on any machine)"),
    ]
    if dims == 2:
        choices.append(Choice("val_tile", patch.patch[0], "validation tiles the size of the training patch"))
    return Plan(dataset=fp.dataset, choices=tuple(replace(c, planned=c.value) for c in choices),
                fingerprint=json.loads(json.dumps(fp.to_dict())))


def plan_dataset(dataset: Path, manifest: dict[str, Any] | None = None, *,
                 budget: int = MEMORY_BUDGET_BYTES, spatial_dims: int | None = None) -> Plan:
    """Fingerprint ``dataset`` and plan its training (``spatial_dims``: see :func:`plan_from_fingerprint`).

    Raises:
        InputError: no manifest, no labelled image, mixed channels or dims, images too small.
        ConfigError: ``spatial_dims`` 3 on 2-D images.
    """
    return plan_from_fingerprint(fingerprint(dataset, manifest), budget=budget, spatial_dims=spatial_dims)


def write_plan(plan: Plan, dataset: Path | None = None) -> Path:
    """Write ``plan`` as ``<dataset>/plan.json`` (atomically); return the path."""
    path = Path(dataset if dataset is not None else plan.dataset) / PLAN_FILE
    atomic_write_json(path, plan.to_dict())
    return path


def planned_config(dataset: Path, overrides: Mapping[str, Any] | None = None, **targets: Any
                   ) -> tuple[TrainConfig, Plan]:
    """The TrainConfig that trains on ``dataset``: its plan with ``overrides`` on top, and that plan (its
    overridden choices marked).

    Raises:
        InputError: the dataset cannot be planned; ConfigError: an override is out of range.
    """
    overrides = dict(overrides or {})
    dims = overrides.get("model.spatial_dims")
    plan = plan_dataset(dataset, spatial_dims=dims)  # --dims 2 on volumes: the "2d" configuration's own plan
    data_dims = int(plan.fingerprint.get("spatial_dims", plan["model.spatial_dims"]))
    plan = plan.with_overrides(overrides)
    if dims is not None and dims != data_dims:  # shown as "2 (option; planned 3)": the data's own configuration
        plan = replace(plan, choices=tuple(replace(c, planned=data_dims) if c.field == "model.spatial_dims" else c
                                           for c in plan.choices))
    return plan.train_config(overrides, dataset=str(dataset), **targets), plan


def planned_training(config: TrainConfig) -> tuple[TrainConfig, Plan]:
    """A TrainConfig made without ``unet train`` (a deployment run from the Prefect UI, a schedule, the API) planned
    as ``unet train`` plans its options: the fields set explicitly override the dataset's plan, each its own field;
    the rest is the plan's.

    Raises:
        InputError: the dataset cannot be planned; ConfigError: an option is out of range.
    """
    given = given_options(config)
    return planned_config(Path(given.pop("dataset")), given)


def pipeline_training(config: PipelineConfig) -> tuple[TrainConfig, Plan]:
    """The pipeline's training (once its dataset is ingested): the dataset's plan with the options given in
    ``config.train`` (and ``num_classes``, when given) on top, exactly as ``unet train`` with those options.

    Raises:
        InputError: the dataset cannot be planned; ConfigError: an option is out of range.
    """
    targets = config.train_targets()
    return planned_config(Path(targets.pop("dataset")), config.train_overrides(), **targets)
