"""The training loop: patches → UNet → loss, one epoch's validation, checkpoint and logs, the stopping rules.

``train(cfg)`` is the library entry point (no Prefect). It fails fast on bad inputs and an unreachable
tracking store before any compute (:func:`check_trainable`), validates on whole images
(:mod:`unetcore.training.validation`) and checkpoints atomically every epoch (:mod:`unetcore.training.checkpoint`).
Resuming restores the checkpoint and continues the same MLflow run; because the checkpoint is written before
the epoch's metrics are logged, every epoch's metrics land exactly once (:mod:`unetcore.tracking.runs`).

Mixed precision is bf16 autocast on CUDA only, which needs no gradient scaler (bf16 has float32's range), so
there is no scaler state to checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from torch.utils.data import DataLoader

from unetcore import progress
from unetcore.config import NormalizationConfig, TrainConfig
from unetcore.devices import check_device, device_facts, resolve_device
from unetcore.errors import ConfigError, InputError, UnetError
from unetcore.inference.runtime import ship_graph
from unetcore.model import WEIGHTS_FILE, build_model, save_model
from unetcore.planning import Plan, TaskSignature, dataset_model_name, fingerprint, training_task
from unetcore.store import fit_normalization
from unetcore.store import manifest as mf
from unetcore.tracking import mlflow as tracking
from unetcore.tracking import runs
from unetcore.training.augment import AugmentConfig
from unetcore.training.checkpoint import (
    BEST,
    CHECKPOINT,
    LoopState,
    check_resumable,
    checkpoint_state,
    is_finished,
    load_checkpoint,
    mark_registered,
    restore,
    save_checkpoint,
)
from unetcore.training.losses import DeepSupervisionLoss, SegmentationLoss
from unetcore.training.optim import make_optimizer, make_scheduler
from unetcore.training.sampler import EpochSampler, PatchDataset, load_images
from unetcore.training.validation import Validation

log = logging.getLogger("unetcore.training")

EMA_DECAY = 0.9
Forward = Callable[[torch.Tensor], Any]  # logits, or a list of them at several resolutions (deep supervision)


@dataclass
class TrainResult:
    """What a training produced and where to find it."""

    run_id: str
    experiment_id: str
    model_dir: str
    best_val_dice: float
    best_epoch: int
    epochs_run: int
    model_name: str
    model_version: int
    alias: str
    seconds: float
    stop_reason: str = "completed"  # or "patience", "time_budget"
    gate: str = ""  # why the promotion gate chose the alias

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the front door: pre-flight checks, then train ------------------------------------------------------------


@dataclass(frozen=True)
class TrainInputs:
    """What :func:`check_trainable` read: the dataset's manifest, its labelled validation entries and the task
    the model will be trained for."""

    manifest: dict[str, Any]
    val_entries: list[dict[str, Any]]
    task: TaskSignature


def check_trainable(cfg: TrainConfig) -> TrainInputs:
    """Refuse datasets the recipe cannot train on, an unreachable tracking store and a registered-model name
    whose champion has another task, before any compute.

    Raises:
        InputError: no manifest, no mask, an empty split, or a sqlite store whose folder cannot be made.
        ConfigError: the masks hold undeclared classes, channels differ, patches exceed every image, or the
            champion of ``registered_model`` was trained for another task (channels, classes, dims).
        ServiceError: the tracking server does not answer.
    """
    manifest = mf.require(Path(cfg.dataset))
    _check_labels(cfg, mf.entries(manifest))
    val = [e for e in mf.entries(manifest, "val") if e["has_mask"]]
    if not val:
        raise InputError(cfg.dataset, "the validation split is empty", "re-ingest with --val-fraction > 0")
    _check_training_split(cfg, [e for e in mf.entries(manifest, "train") if e["has_mask"]])
    check_device(cfg.device)
    tracking.check_tracking_uri(cfg.tracking_uri)
    task = training_task(cfg.model, fingerprint(Path(cfg.dataset), manifest))
    tracking.check_same_task(cfg.tracking_uri, cfg.registered_model, task,
                             dataset_model_name(cfg.registered_model, Path(cfg.dataset)))
    return TrainInputs(manifest, val, task)


def _check_labels(cfg: TrainConfig, items: list[dict[str, Any]]) -> None:
    """Some image has a mask; every mask's classes and every image's channels fit the model."""
    if not any(e["has_mask"] for e in items):
        raise InputError(cfg.dataset, "no image in the dataset has a mask", "ingest with --masks")
    n_values = max(2, cfg.model.num_classes)
    for e in items:
        undeclared = [c for c in e["classes"] if c >= n_values and c != cfg.ignore_index]
        if undeclared:
            raise ConfigError(
                "model.num_classes",
                f"mask of '{e['id']}' holds class {max(undeclared)} but the model declares {cfg.model.num_classes} "
                f"(classes 0..{n_values - 1}); raise --num-classes or set the ignore label",
            )
        if e["channels"] != cfg.model.in_channels:
            raise ConfigError(
                "model.in_channels", f"image '{e['id']}' has {e['channels']} channels, the model {cfg.model.in_channels}"
            )


def training_patch(cfg: TrainConfig) -> int | list[int]:
    """The patch the sampler draws: ``patch_shape`` when given, else ``patch_size`` (an edge or one per axis)."""
    return list(cfg.patch_shape) if cfg.patch_shape else cfg.patch_size


def _check_training_split(cfg: TrainConfig, train_items: list[dict[str, Any]]) -> None:
    """The training split has labelled images the model can train on (a 2-D model trains on volumes' z-slices,
    a 3-D one on volumes only), and one at least as large as a patch along every axis the model sees."""
    if not train_items:
        raise InputError(cfg.dataset, "the training split has no image with a mask", "ingest more labelled images")
    ndim = len(train_items[0]["shape"])
    dims = cfg.model.spatial_dims
    if dims > ndim:
        raise ConfigError("model.spatial_dims", f"a {dims}-D model cannot train on {ndim}-D images; leave --dims "
                          "to the plan")
    seen = [e["shape"][ndim - dims:] for e in train_items]  # a slice's (y, x) for a 2-D model on volumes
    patch = training_patch(cfg)
    field = "patch_shape" if cfg.patch_shape else "patch_size"
    if isinstance(patch, int):
        if all(min(s) < patch for s in seen):
            largest = max(min(s) for s in seen)
            raise ConfigError(field, f"{patch} is larger than every training image (≤ {largest} px)")
        return
    if len(patch) != dims:
        raise ConfigError(field, f"{patch} has {len(patch)} axes, the model {dims}")
    if all(any(n < p for n, p in zip(s, patch)) for s in seen):
        raise ConfigError(field, f"{patch} is larger than every training image along some axis")


def train(
    cfg: TrainConfig,
    *,
    tags: dict[str, str] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    plan: Plan | None = None,
) -> TrainResult:
    """Train a UNet on ``cfg.dataset``, track it in MLflow and register it behind the promotion gate.

    Args:
        cfg: the recipe, data, tracking and output options (:func:`unetcore.planning.planned_config` makes it
            from the dataset's plan).
        tags: extra MLflow run tags (the Prefect flow sets its flow-run id here).
        on_epoch: called as ``on_epoch(epoch, metrics)`` after each epoch's checkpoint and metrics.
        plan: the plan ``cfg`` came from: logged with the run (params and ``plan.json``) and stored with the model.

    The model's task (:class:`~unetcore.planning.TaskSignature`) is stored with it and registered as its tags.

    Raises:
        InputError / ConfigError: the dataset or options cannot be trained on (before any compute).
        ServiceError: the tracking server is unreachable (before any compute).
    """
    start = time.perf_counter()
    inputs = check_trainable(cfg)
    experiment_id = tracking.use_experiment(cfg.tracking_uri, cfg.experiment)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    state = _resumed_checkpoint(cfg, out / CHECKPOINT)
    s = _prepare(cfg, inputs, state, out, plan)
    dataset = Path(cfg.dataset)
    run_tags = runs.run_tags(dataset, s.saved_with_model["dataset_manifest"], tags,
                             s.loop.epoch + 1 if state is not None else None)
    with runs.start_run(experiment_id, s.loop.run_id, run_tags, f"train-{dataset.name}") as run:
        runs.log_start(run.info.run_id, cfg.flat_params(), state)
        mlflow.set_tags(device_facts(s.device))  # where it really ran (device=auto says nothing)
        if plan is not None and state is None:
            runs.log_plan(plan)
        s.loop.run_id = run.info.run_id
        try:
            stop_reason, epoch = _run_epochs(s, start, on_epoch)
        except KeyboardInterrupt:
            raise _interrupted(s, run.info.run_id, resumed=state is not None) from None
        _ship_graph(s.best_dir, cfg.registered_model)
        reg, best_dice = runs.register_best(cfg.registered_model, run.info.run_id, s.best_dir,
                                            s.validation.set_id(), s.validation.score, s.loop.best_epoch)
        runs.tag_outcome(reg, stop_reason)
    mark_registered(s.ckpt_path, reg)
    return TrainResult(
        run_id=run.info.run_id, experiment_id=run.info.experiment_id, model_dir=str(s.best_dir),
        best_val_dice=best_dice, best_epoch=s.loop.best_epoch, epochs_run=epoch + 1, model_name=cfg.registered_model,
        model_version=reg["version"], alias=reg["alias"], seconds=round(time.perf_counter() - start, 2),
        stop_reason=stop_reason, gate=reg["gate"],
    )


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during training; ``message`` says truly what was kept and how to go on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _interrupted(s: _Session, run_id: str, resumed: bool) -> TrainingInterrupted:
    """End the MLflow run after an interrupt: KILLED when a checkpoint holds its work, deleted when it is empty."""
    if s.loop.epoch < 0:  # not one epoch finished, in this call or before: nothing to resume
        mlflow.end_run("KILLED")
        if not resumed:
            mlflow.MlflowClient().delete_run(run_id)
        return TrainingInterrupted("interrupted before the first epoch finished: nothing was kept (no checkpoint, "
                                   "the empty MLflow run deleted); re-running the same command starts again")
    mlflow.end_run("KILLED")
    return TrainingInterrupted(
        f"interrupted after epoch {s.loop.epoch + 1} of {s.cfg.epochs}: {s.ckpt_path} and MLflow run {run_id} are "
        "kept; re-run the same command to resume (--restart starts over)")


# --- the pieces of one run ------------------------------------------------------------------------------------


@dataclass
class _Session:
    """One :func:`train` call's moving parts, built before its first epoch."""

    cfg: TrainConfig
    device: torch.device
    model: torch.nn.Module
    forward: Forward
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: torch.nn.Module
    loader: DataLoader
    sampler: EpochSampler
    validation: Validation
    loop: LoopState
    saved_with_model: dict[str, Any]  # what the best model's config.json holds besides the model options
    ckpt_path: Path
    best_dir: Path

    @property
    def model_config(self) -> dict[str, Any]:
        """The config a model of this run is predicted with (as :func:`unetcore.model.load_model` returns it)."""
        return {"model": self.cfg.model.model_dump(), **self.saved_with_model}


def _resumed_checkpoint(cfg: TrainConfig, path: Path) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None to start a new run.

    By default (``resume`` None) an unfinished run in ``output`` is resumed and a finished one (its model
    registered) is started over; ``resume`` True refuses a finished run; False (``--restart``) always starts
    over. A checkpoint of another recipe is refused unless starting over: it is never overwritten silently.
    """
    if cfg.resume is False or not path.exists():
        return None
    state = load_checkpoint(path)
    if cfg.resume is None and is_finished(state):
        return None
    check_resumable(cfg, state, path)
    return state


def _build(cfg: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, Forward, torch.optim.Optimizer, Any]:
    """Seeded model (channels_last for a 2-D one), its forward (compiled if asked), optimiser and LR scheduler."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device).to(memory_format=memory_format(cfg.model.spatial_dims + 2))
    net = model.forward_deep if cfg.model.deep_supervision else model  # outputs at several resolutions, or one
    forward = torch.compile(net) if cfg.compile else net
    optimizer = make_optimizer(cfg, model)
    return model, forward, optimizer, make_scheduler(cfg, optimizer)


def _prepare(cfg: TrainConfig, inputs: TrainInputs, state: dict[str, Any] | None, out: Path,
             plan: Plan | None) -> _Session:
    """Build the model, loss, loader and validation; restore ``state`` (a checkpoint) into them if given."""
    device = resolve_device(cfg.device)
    model, forward, optimizer, scheduler = _build(cfg, device)
    loss_fn: torch.nn.Module = SegmentationLoss(cfg.loss, cfg.model.num_classes, cfg.ignore_index,
                                                cfg.class_weights).to(device)
    if cfg.model.deep_supervision:
        loss_fn = DeepSupervisionLoss(loss_fn)
    train_entries = mf.entries(inputs.manifest, "train")
    recipe = fit_normalization(cfg.normalization, train_entries)  # cfg keeps the recipe as given (resume checks)
    loader, sampler = make_loader(cfg, Path(cfg.dataset), recipe, inputs.task)
    loop = restore(state, model, optimizer, scheduler, device) if state is not None else LoopState()
    saved = {"normalization": recipe.model_dump(), "tile": validation_tile(cfg),
             "dataset_manifest": mf.manifest_hash(Path(cfg.dataset)), "task": inputs.task.to_dict()}
    if plan is not None:
        saved["plan"] = plan.to_dict()
    return _Session(cfg, device, model, forward, optimizer, scheduler, loss_fn, loader, sampler,
                    Validation.of(cfg, inputs.val_entries, device, saved["tile"]), loop, saved, out / CHECKPOINT, out / BEST)


def _run_epochs(
    s: _Session, start: float, on_epoch: Callable[[int, dict[str, float]], None] | None
) -> tuple[str, int]:
    """Run the remaining epochs; return why they stopped and the last epoch run."""
    epoch = s.loop.epoch
    progress.report("train", epoch + 1, s.cfg.epochs)  # where this run starts (ETA is measured from here)
    for epoch in range(s.loop.epoch + 1, s.cfg.epochs):
        metrics = _run_epoch(s, epoch)
        _end_epoch(s, epoch, metrics)
        progress.report("train", epoch + 1, s.cfg.epochs, epoch_line(metrics))
        if on_epoch:
            on_epoch(epoch, metrics)
        reason = _stop_reason(s.cfg, s.loop, start)
        if reason:
            return reason, epoch
    return "completed", epoch


def _run_epoch(s: _Session, epoch: int) -> dict[str, float]:
    """Train one epoch, validate it, update the EMA of val Dice; return the epoch's metrics."""
    s.sampler.set_epoch(epoch)
    s.model.train()
    t0 = time.perf_counter()
    params = list(s.model.parameters())
    total, steps = torch.zeros((), dtype=torch.float64, device=s.device), 0
    for batch in s.loader:  # the losses are summed on the device: no host sync per step, one read per epoch
        total += train_step(s.forward, params, batch, s.loss_fn, s.optimizer, s.device, s.cfg.grad_clip)
        steps += 1
        s.scheduler.step()
    train_loss = float(total) / max(steps, 1)
    train_s = time.perf_counter() - t0
    metrics = s.validation.score(s.model, s.model_config)
    score = _score(metrics)
    s.loop.ema = score if s.loop.ema is None else EMA_DECAY * s.loop.ema + (1 - EMA_DECAY) * score
    metrics.update(train_loss=train_loss, lr=s.scheduler.get_last_lr()[0], ema_val_dice=s.loop.ema,
                   images_per_s=steps * s.cfg.batch_size / max(train_s, 1e-9), epoch_s=time.perf_counter() - t0)
    return metrics


def epoch_line(metrics: dict[str, float]) -> str:
    """An epoch in a few words: ``train loss 0.3121, val Dice 0.8123, 41 s/epoch``."""
    return (f"train loss {metrics['train_loss']:.4f}, val Dice {metrics['val_dice']:.4f}, "
            f"{metrics['epoch_s']:.0f} s/epoch")


def _ship_graph(best_dir: Path, name: str) -> None:
    """Ship the best model's ONNX graph in its folder (and so in its registered artifacts), for CPU inference without
    torch (:mod:`unetcore.inference.runtime`); a graph that cannot be made is one warning, not a failed run."""
    try:
        ship_graph(best_dir, mf.file_hash(best_dir / WEIGHTS_FILE), name)
    except UnetError as exc:
        log.warning("warning: no ONNX graph shipped with the model (%s): CPU inference exports it or runs torch", exc)


def _score(metrics: dict[str, float]) -> float:
    """The epoch's val Dice, 0 when undefined (no foreground anywhere)."""
    return metrics["val_dice"] if np.isfinite(metrics["val_dice"]) else 0.0


def _end_epoch(s: _Session, epoch: int, metrics: dict[str, float]) -> None:
    """Keep the best model, checkpoint, then log the metrics (in this order) and maybe a preview."""
    s.loop.epoch = epoch
    if s.loop.ema > s.loop.best:
        s.loop.best, s.loop.best_epoch, s.loop.bad_epochs = s.loop.ema, epoch, 0
        save_model(s.best_dir, s.model, {**s.saved_with_model, "epoch": epoch, "val_dice": _score(metrics)})
    else:
        s.loop.bad_epochs += 1
    save_checkpoint(s.ckpt_path, checkpoint_state(s.model, s.optimizer, s.scheduler, s.loop, metrics, s.cfg, s.device))
    runs.log_epoch(metrics, epoch)
    if epoch % s.cfg.preview_every == 0 or epoch == s.cfg.epochs - 1:
        s.validation.preview(s.model, s.model_config, epoch)


def _stop_reason(cfg: TrainConfig, loop: LoopState, start: float) -> str | None:
    """``patience`` or ``time_budget`` when a stopping rule fires after this epoch, else None."""
    if cfg.patience and loop.bad_epochs >= cfg.patience:
        return "patience"
    if cfg.time_budget_s and time.perf_counter() - start > cfg.time_budget_s:
        return "time_budget"
    return None


# --- data and one optimiser step ------------------------------------------------------------------------------


def _worker_init(_: int) -> None:
    """One torch thread per DataLoader worker: patches are numpy work, the cores belong to the model."""
    torch.set_num_threads(1)


def memory_format(ndim: int) -> torch.memory_format:
    """The memory format of ``ndim``-D activations: channels_last for (N, C, H, W), channels_last_3d for
    (N, C, D, H, W)."""
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def validation_tile(cfg: TrainConfig) -> int | list[int]:
    """The sliding-window tile of validation, saved as the model's ``tile`` (what ``unet predict`` uses by
    default for a 3-D model): ``val_tile`` for a 2-D model, the training patch per axis for a 3-D one."""
    if cfg.model.spatial_dims == 2:
        return cfg.val_tile
    patch = training_patch(cfg)
    return [patch] * 3 if isinstance(patch, int) else list(patch)


def loader_workers(cfg: TrainConfig, on_gpu: bool) -> int:
    """DataLoader worker processes: ``cfg.num_workers`` when given; on a GPU run that left it unset, up to 4
    (a core kept for the training process), so patches are ready before each step. The batches are the same for
    any number (see :func:`make_loader`), so this changes speed only."""
    if not on_gpu or "num_workers" in cfg.model_fields_set:
        return cfg.num_workers
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def make_loader(cfg: TrainConfig, dataset: Path, normalization: NormalizationConfig | None = None,
                task: TaskSignature | None = None) -> tuple[DataLoader, EpochSampler]:
    """The training DataLoader over ``cfg.dataset``'s train split and its epoch sampler.

    ``normalization`` is the fitted recipe (:func:`~unetcore.store.fit_normalization`); None = ``cfg``'s, fitted.
    Patches are drawn at the spacing of ``task`` (None: the dataset's, :func:`~unetcore.planning.training_task`).

    Workers persist across epochs; the epoch travels inside each index (see :class:`EpochSampler`), so the
    batches are the same for any ``num_workers``.
    """
    if normalization is None:
        normalization = fit_normalization(cfg.normalization, mf.entries(mf.require(dataset), "train"))
    task = training_task(cfg.model, fingerprint(dataset)) if task is None else task
    data = PatchDataset(
        load_images(dataset, "train", cfg.ignore_index, task.spacing, task.unit), training_patch(cfg), cfg.batch_size,
        cfg.steps_per_epoch,
        normalization, cfg.foreground_fraction, AugmentConfig() if cfg.augment else None, seed=cfg.seed,
        sampling=cfg.sampling, spatial_dims=cfg.model.spatial_dims,
    )
    sampler = EpochSampler(len(data))
    on_gpu = torch.cuda.is_available() and cfg.device != "cpu"
    workers = loader_workers(cfg, on_gpu)
    loader = DataLoader(
        data, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers, drop_last=True,
        persistent_workers=workers > 0, worker_init_fn=_worker_init if workers else None,
        pin_memory=on_gpu, prefetch_factor=4 if workers and on_gpu else None,
    )
    return loader, sampler


def train_step(
    forward: Forward,
    params: list[torch.nn.Parameter],
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    grad_clip: float,
) -> torch.Tensor:
    """One optimiser step on ``batch`` = (images (N, C, *patch), targets (N, *patch)); returns the loss, detached,
    as a 0-dim float64 tensor on ``device`` (reading it waits for the step: :func:`_run_epoch` sums on the device).

    Inputs go channels_last (channels_last_3d for volumes: faster convolutions on CPU and with CUDA's tensor
    cores); the forward pass runs under bf16 autocast on CUDA, the loss in float32.
    """
    images, targets = batch
    images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format(images.ndim))
    targets = targets.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = forward(images)
    loss = loss_fn([o.float() for o in logits] if isinstance(logits, list) else logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.detach().double()
