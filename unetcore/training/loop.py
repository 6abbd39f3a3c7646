"""The training loop: patches → UNet → loss, whole-image validation, checkpoints, MLflow, the registry gate.

``train(cfg)`` is the library entry point (no Prefect). It fails fast on bad inputs and an unreachable
tracking store before any compute, and checkpoints atomically every epoch (``last.pt``: model, optimiser,
scheduler, RNG states, epoch, early-stopping state, the epoch's metrics and the MLflow run id). Resuming
restores all of it and continues the same MLflow run; because the checkpoint is written before the epoch's
metrics are logged, and a resume logs the checkpointed epoch's metrics if the run lacks them, every epoch's
metrics land exactly once whatever the moment of a crash.

Mixed precision is bf16 autocast on CUDA only, which needs no gradient scaler (bf16 has float32's range), so
there is no scaler state to checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from torch.utils.data import DataLoader

from unetcore import progress
from unetcore.atomic import atomic_write
from unetcore.config import TrainConfig
from unetcore.errors import ConfigError, InputError
from unetcore.inference.predict import BlockPredictor, resolve_device
from unetcore.metrics import confusion_counts, dice_from_counts, hd95, iou_from_counts
from unetcore.model import build_model, load_model, save_model
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.tracking import mlflow as tracking
from unetcore.training.augment import AugmentConfig
from unetcore.training.losses import SegmentationLoss
from unetcore.training.sampler import EpochSampler, PatchDataset, load_images

log = logging.getLogger(__name__)

EMA_DECAY = 0.9
CHECKPOINT = "last.pt"
BEST = "best"
# Options that may change between a run and its resumption; any other change makes the checkpoint foreign.
RESUMABLE_CHANGES = frozenset(
    {"epochs", "time_budget_s", "patience", "resume", "num_workers", "device", "compile", "hd95", "preview_every"}
)


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


@dataclass
class _Progress:
    """The loop state a checkpoint carries besides the tensors."""

    epoch: int = -1  # last finished epoch
    best: float = -1.0  # best EMA of validation Dice so far
    ema: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    run_id: str | None = None


def _check_inputs(cfg: TrainConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Refuse datasets the recipe cannot train on, before any compute."""
    manifest = mf.require(Path(cfg.dataset))
    items = mf.entries(manifest)
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
    val = [e for e in mf.entries(manifest, "val") if e["has_mask"]]
    if not val:
        raise InputError(cfg.dataset, "the validation split is empty", "re-ingest with --val-fraction > 0")
    train_items = [e for e in mf.entries(manifest, "train") if e["has_mask"]]
    if not train_items:
        raise InputError(cfg.dataset, "the training split has no image with a mask", "ingest more labelled images")
    if all(min(e["shape"]) < cfg.patch_size for e in train_items):
        largest = max(min(e["shape"]) for e in train_items)
        raise ConfigError("patch_size", f"{cfg.patch_size} is larger than every training image (≤ {largest} px)")
    return manifest, val


def _lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Factor of the peak LR at each step: poly (power 0.9), cosine with 5 % linear warm-up, or constant."""
    warmup = max(1, total // 20) if cfg.schedule == "cosine" else 0

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.schedule == "poly":
            return (1.0 - done) ** 0.9
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


def _optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum 0.99 (nnU-Net's; give it a larger lr, e.g. 1e-2)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _worker_init(_: int) -> None:
    """One torch thread per DataLoader worker: patches are numpy work, the cores belong to the model."""
    torch.set_num_threads(1)


def make_loader(cfg: TrainConfig, dataset: Path) -> tuple[DataLoader, EpochSampler]:
    """The training DataLoader over ``cfg.dataset``'s train split and its epoch sampler.

    Workers persist across epochs; the epoch travels inside each index (see :class:`EpochSampler`), so the
    batches are the same for any ``num_workers``.
    """
    data = PatchDataset(
        load_images(dataset, "train", cfg.ignore_index), cfg.patch_size, cfg.batch_size, cfg.steps_per_epoch,
        cfg.normalization, cfg.foreground_fraction, AugmentConfig() if cfg.augment else None, seed=cfg.seed,
        sampling=cfg.sampling,
    )
    sampler = EpochSampler(len(data))
    workers = cfg.num_workers
    loader = DataLoader(
        data, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers, drop_last=True,
        persistent_workers=workers > 0, worker_init_fn=_worker_init if workers else None,
        pin_memory=torch.cuda.is_available() and cfg.device != "cpu",
    )
    return loader, sampler


def train_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    params: list[torch.nn.Parameter],
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    grad_clip: float,
) -> float:
    """One optimiser step on ``batch`` = (images (N, C, p, p), targets (N, p, p)); returns the loss.

    Inputs go channels_last (faster convolutions on CPU and with CUDA's tensor cores); the forward pass runs
    under bf16 autocast on CUDA, the loss in float32.
    """
    images, targets = batch
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    targets = targets.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = forward(images)
    loss = loss_fn(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return float(loss.detach())


def evaluate(
    predictor: BlockPredictor,
    dataset: Path,
    entries: list[dict[str, Any]],
    block_size: int = 1024,
    *,
    ignore_index: int | None = None,
    with_hd95: bool = False,
) -> dict[str, float]:
    """Whole-image sliding-window validation: Dice and IoU per foreground class and their means.

    Counts are accumulated block by block over the whole set, so memory does not grow with image size
    (except with ``with_hd95``, which holds one image's labels whole). Empty ground truth is explicit:
    ``val_truth_empty_class{c}`` is 1 when no validation pixel has class ``c``; its Dice is then 0 if the model
    predicts the class anywhere, NaN if it does not (MONAI's convention), and NaN classes are left out of
    the means. ``val_hd95`` is the mean over images and classes of the finite per-image distances.
    """
    k = max(2, predictor.num_classes)
    tp, fp, fn = (np.zeros(k, np.int64) for _ in range(3))
    distances: dict[int, list[float]] = {c: [] for c in range(1, k)}
    for entry in entries:
        root = omezarr.open_root(mf.store_path(dataset, entry["id"]))
        image, truth = omezarr.image_array(root), omezarr.label_array(root)
        whole = np.zeros(image.shape[1:], np.uint8) if with_hd95 else None
        for block, _, labels in predictor.blocks(image, entry["stats"], block_size):
            t, p, n = confusion_counts(labels, np.asarray(truth[block.slices]), predictor.num_classes, ignore_index)
            tp, fp, fn = tp + t, fp + p, fn + n
            if whole is not None:
                whole[block.slices] = labels
        if whole is not None:
            _image_hd95(whole, np.asarray(truth[:]), ignore_index, distances)
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


def _image_hd95(pred: np.ndarray, truth: np.ndarray, ignore_index: int | None, out: dict[int, list[float]]) -> None:
    """Append each class's HD95 on one image to ``out[class]`` (ignored pixels count as background)."""
    if ignore_index is not None:
        keep = truth != ignore_index
        pred, truth = np.where(keep, pred, 0), np.where(keep, truth, 0)
    for c in out:
        out[c].append(hd95(pred == c, truth == c))


def _nanmean(values: np.ndarray) -> float:
    """Mean of the finite values; NaN (no warning) when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _preview(predictor: BlockPredictor, dataset: Path, entry: dict[str, Any], step: int) -> None:
    """Log an input / truth / prediction strip of a validation image's top-left corner."""
    root = omezarr.open_root(mf.store_path(dataset, entry["id"]))
    image, truth = omezarr.image_array(root), omezarr.label_array(root)
    size = min(512, *image.shape[1:])
    _, _, labels = next(predictor.blocks(image[:, :size, :size], entry["stats"], size))
    tracking.log_preview(np.asarray(image[:, :size, :size]), np.asarray(truth[:size, :size]), labels, "preview", step)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` under a temporary name, fsync it, then rename it over ``path`` (never half-written)."""
    atomic_write(path, lambda fh: torch.save(state, fh))


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (tensors and plain containers, never code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise InputError(path, f"unreadable checkpoint ({type(exc).__name__})", "delete it or drop --resume") from None


def _recipe(cfg: TrainConfig) -> dict[str, Any]:
    """The options a checkpoint must share with the run that resumes it."""
    return {k: v for k, v in cfg.flat_params().items() if k not in RESUMABLE_CHANGES}


def _check_resumable(cfg: TrainConfig, state: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint written with another recipe, or one whose run already finished."""
    for key, value in state["recipe"].items():
        now = _recipe(cfg).get(key)
        if now != value:
            raise ConfigError("resume", f"{path} was trained with {key}={value!r}, not {now!r}; "
                                        "drop --resume or choose another --output")
    if state["progress"]["epoch"] + 1 >= cfg.epochs and state.get("registered"):
        raise ConfigError("resume", f"the run in {path.parent} finished all {cfg.epochs} epochs and registered "
                                    f"version {state['registered']['version']}; raise --epochs to train longer")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def log_epoch(metrics: dict[str, float], epoch: int) -> None:
    """Log one epoch's metrics at ``step=epoch`` (NaN values are left out: MLflow charts cannot draw them)."""
    mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)}, step=epoch)


def _log_if_missing(run_id: str, state: dict[str, Any]) -> None:
    """On resume: log the checkpointed epoch's metrics if the crash came between checkpoint and logging."""
    epoch = state["progress"]["epoch"]
    if epoch < 0:
        return
    history = MlflowClient().get_metric_history(run_id, "train_loss")
    if all(m.step != epoch for m in history):
        log_epoch(state["metrics"], epoch)


def _build(
    cfg: TrainConfig, device: torch.device
) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor], torch.optim.Optimizer, Any]:
    """Seeded model (channels_last), its forward (compiled if asked), optimiser and LR scheduler."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last)
    forward = torch.compile(model) if cfg.compile else model
    optimizer = _optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, cfg.epochs * cfg.steps_per_epoch))
    return model, forward, optimizer, scheduler


def _start_run(experiment_id: str, run_id: str | None, tags: dict[str, str], name: str) -> mlflow.ActiveRun:
    """Start a new run, or reopen ``run_id`` (a resume); ConfigError when that run is not in this store."""
    system = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() not in ("false", "0")
    if run_id is None:
        return mlflow.start_run(experiment_id=experiment_id, tags=tags, run_name=name, log_system_metrics=system)
    try:
        return mlflow.start_run(run_id=run_id, tags=tags, log_system_metrics=system)
    except MlflowException as exc:
        first = str(exc).splitlines()[0][:160]
        raise ConfigError("resume", f"cannot reopen MLflow run {run_id} ({first}); "
                                    "use the tracking URI it was logged to, or drop --resume") from None


def train(
    cfg: TrainConfig,
    *,
    tags: dict[str, str] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a UNet on ``cfg.dataset``, track it in MLflow and register it behind the promotion gate.

    Args:
        cfg: the recipe, data, tracking and output options.
        tags: extra MLflow run tags (the Prefect flow sets its flow-run id here).
        on_epoch: called as ``on_epoch(epoch, metrics)`` after each epoch's checkpoint and metrics.

    Raises:
        InputError / ConfigError: the dataset or options cannot be trained on (before any compute).
        ServiceError: the tracking server is unreachable (before any compute).
    """
    start = time.perf_counter()
    dataset = Path(cfg.dataset)
    _, val_entries = _check_inputs(cfg)
    experiment_id = tracking.configure(cfg.tracking_uri, cfg.experiment)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, best_dir = out / CHECKPOINT, out / BEST
    state = _load_checkpoint(ckpt_path) if cfg.resume and ckpt_path.exists() else None
    if state is not None:
        _check_resumable(cfg, state, ckpt_path)

    device = resolve_device(cfg.device)
    model, forward, optimizer, scheduler = _build(cfg, device)
    loss_fn = SegmentationLoss(cfg.loss, cfg.model.num_classes, cfg.ignore_index, cfg.class_weights).to(device)
    loader, sampler = make_loader(cfg, dataset)
    prog = _Progress()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        prog = _Progress(**state["progress"])

    manifest_hash = mf.manifest_hash(dataset)
    extra = {"normalization": cfg.normalization.model_dump(), "tile": cfg.val_tile, "dataset_manifest": manifest_hash}
    val_set = f"tile={cfg.val_tile};" + ",".join(sorted(e["id"] + ":" + e["source_hash"][:8] for e in val_entries))

    def make_predictor(m: torch.nn.Module, config: dict[str, Any]) -> BlockPredictor:
        return BlockPredictor.from_model(m, config, device, tile=cfg.val_tile, overlap=0.5, batch_size=cfg.batch_size)

    def validate(m: torch.nn.Module, config: dict[str, Any]) -> dict[str, float]:
        return evaluate(make_predictor(m, config), dataset, val_entries, ignore_index=cfg.ignore_index,
                        with_hd95=cfg.hd95)

    run_tags = {"dataset": str(dataset.resolve()), "manifest_hash": manifest_hash, **tracking.code_version_tags(),
                **(tags or {})}
    if state is not None:
        run_tags["resumed_at_epoch"] = str(prog.epoch + 1)
    stop_reason, epoch = "completed", prog.epoch
    with _start_run(experiment_id, prog.run_id, run_tags, f"train-{dataset.name}") as run:
        if state is None:
            mlflow.log_params(cfg.flat_params())
        else:
            _log_if_missing(run.info.run_id, state)
        prog.run_id = run.info.run_id
        params = list(model.parameters())
        config = {"model": cfg.model.model_dump(), **extra}
        for epoch in range(prog.epoch + 1, cfg.epochs):
            sampler.set_epoch(epoch)
            model.train()
            t0 = time.perf_counter()
            losses = []
            for batch in loader:
                losses.append(train_step(forward, params, batch, loss_fn, optimizer, device, cfg.grad_clip))
                scheduler.step()
            train_s = time.perf_counter() - t0
            metrics = validate(model, config)
            score = metrics["val_dice"] if np.isfinite(metrics["val_dice"]) else 0.0
            prog.ema = score if prog.ema is None else EMA_DECAY * prog.ema + (1 - EMA_DECAY) * score
            metrics.update(train_loss=float(np.mean(losses)), lr=scheduler.get_last_lr()[0], ema_val_dice=prog.ema,
                           images_per_s=len(losses) * cfg.batch_size / max(train_s, 1e-9),
                           epoch_s=time.perf_counter() - t0)
            prog.epoch = epoch
            if prog.ema > prog.best:
                prog.best, prog.best_epoch, prog.bad_epochs = prog.ema, epoch, 0
                save_model(best_dir, model, {**extra, "epoch": epoch, "val_dice": score})
            else:
                prog.bad_epochs += 1
            _save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "progress": asdict(prog), "metrics": metrics, "recipe": _recipe(cfg),
            })
            log_epoch(metrics, epoch)
            if epoch % cfg.preview_every == 0 or epoch == cfg.epochs - 1:
                _preview(make_predictor(model, config), dataset, val_entries[0], epoch)
            progress.report("train", epoch + 1, cfg.epochs)
            if on_epoch:
                on_epoch(epoch, metrics)
            if cfg.patience and prog.bad_epochs >= cfg.patience:
                stop_reason = "patience"
                break
            if cfg.time_budget_s and time.perf_counter() - start > cfg.time_budget_s:
                stop_reason = "time_budget"
                break

        reg, best_dice = _register(cfg, run.info.run_id, best_dir, val_set, validate, prog)
        mlflow.set_tags({"model_version": str(reg["version"]), "model_alias": reg["alias"],
                         "stop_reason": stop_reason})
    if ckpt_path.exists():  # mark the checkpoint as registered: resuming it again needs more epochs
        _save_checkpoint(ckpt_path, {**_load_checkpoint(ckpt_path), "registered": reg})
    return TrainResult(
        run_id=run.info.run_id, experiment_id=run.info.experiment_id, model_dir=str(best_dir), best_val_dice=best_dice, best_epoch=prog.best_epoch,
        epochs_run=epoch + 1, model_name=cfg.registered_model, model_version=reg["version"], alias=reg["alias"],
        seconds=round(time.perf_counter() - start, 2), stop_reason=stop_reason, gate=reg["gate"],
    )


def _register(
    cfg: TrainConfig,
    run_id: str,
    best_dir: Path,
    val_set: str,
    validate: Callable[[torch.nn.Module, dict[str, Any]], dict[str, float]],
    prog: _Progress,
) -> tuple[dict[str, Any], float]:
    """Log the best model as a weights-only artifact, register it, apply the champion gate."""
    _, best_config = load_model(best_dir)
    best_dice = float(best_config["val_dice"])
    mlflow.log_metrics({"best_val_dice": best_dice, "best_epoch": prog.best_epoch})
    mlflow.log_artifacts(str(best_dir), tracking.MODEL_ARTIFACT)

    def evaluate_champion(folder: Path) -> float:
        champion, champion_cfg = load_model(folder)
        return validate(champion, champion_cfg)["val_dice"]

    reg = tracking.register(
        cfg.registered_model, run_id, mlflow.get_artifact_uri(tracking.MODEL_ARTIFACT), best_dice, val_set,
        evaluate_champion, model_config=best_config["model"],
    )
    return reg, best_dice
