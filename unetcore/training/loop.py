"""The training loop: patches → UNet → loss, whole-image validation, checkpoints, MLflow, the registry gate.

``train(cfg)`` is the library entry point (no Prefect). It fails fast on bad inputs and an unreachable
tracking store before any compute, checkpoints atomically every epoch (``last.pt``) and resumes from it with
model, optimiser, scheduler, RNG state, epoch and the MLflow run id, so a resumed run continues the same run.
"""

from __future__ import annotations

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
from torch.utils.data import DataLoader

from unetcore import progress
from unetcore.config import TrainConfig
from unetcore.errors import ConfigError, InputError
from unetcore.inference.predict import BlockPredictor, resolve_device
from unetcore.model import build_model, load_model, save_model
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.tracking import mlflow as tracking
from unetcore.training.augment import AugmentConfig
from unetcore.training.losses import SegmentationLoss
from unetcore.training.metrics import confusion_counts, dice_from_counts, iou_from_counts
from unetcore.training.sampler import PatchDataset, load_images

EMA_DECAY = 0.9
PREVIEW_EVERY = 5


@dataclass
class TrainResult:
    """What a training produced and where to find it."""

    run_id: str
    model_dir: str
    best_val_dice: float
    best_epoch: int
    epochs_run: int
    model_name: str
    model_version: int
    alias: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_inputs(cfg: TrainConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Refuse datasets the recipe cannot train on, before any compute."""
    manifest = mf.require(Path(cfg.dataset))
    items = mf.entries(manifest)
    if not any(e["has_mask"] for e in items):
        raise InputError(cfg.dataset, "no image in the dataset has a mask", "ingest with --masks")
    n_values = max(2, cfg.model.num_classes)
    for e in items:
        if e["classes"] and max(e["classes"]) >= n_values:
            raise ConfigError(
                "model.num_classes",
                f"mask of '{e['id']}' holds class {max(e['classes'])} but the model declares {cfg.model.num_classes}",
            )
        if e["channels"] != cfg.model.in_channels:
            raise ConfigError(
                "model.in_channels", f"image '{e['id']}' has {e['channels']} channels, the model {cfg.model.in_channels}"
            )
    val = [e for e in mf.entries(manifest, "val") if e["has_mask"]]
    if not val:
        raise InputError(cfg.dataset, "the validation split is empty", "re-ingest with --val-fraction > 0")
    train_items = [e for e in mf.entries(manifest, "train") if e["has_mask"]]
    if train_items and all(min(e["shape"]) < cfg.patch_size for e in train_items):
        largest = max(min(e["shape"]) for e in train_items)
        raise ConfigError("patch_size", f"{cfg.patch_size} is larger than every training image (≤ {largest} px)")
    return manifest, val


def _lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    warmup = max(1, total // 20) if cfg.schedule == "cosine" else 0

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.schedule == "poly":
            return (1.0 - progress) ** 0.9
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def evaluate(
    predictor: BlockPredictor, dataset: Path, entries: list[dict[str, Any]], block_size: int = 1024
) -> dict[str, float]:
    """Whole-image sliding-window validation: Dice and IoU per foreground class and mean.

    Counts are accumulated block by block, so memory does not grow with image size. A class absent from both
    prediction and truth over the whole set gives NaN and is left out of the mean.
    """
    k = max(2, predictor.num_classes)
    tp = np.zeros(k, np.int64)
    fp = np.zeros(k, np.int64)
    fn = np.zeros(k, np.int64)
    for entry in entries:
        root = omezarr.open_root(mf.store_path(dataset, entry["id"]))
        image, truth = omezarr.image_array(root), omezarr.label_array(root)
        for block, _, labels in predictor.blocks(image, entry["stats"], block_size):
            t, p, n = confusion_counts(labels, np.asarray(truth[block.slices]), predictor.num_classes)
            tp, fp, fn = tp + t, fp + p, fn + n
    dice, iou = dice_from_counts(tp, fp, fn), iou_from_counts(tp, fp, fn)
    fg = slice(1, None)
    out = {"val_dice": float(np.nanmean(dice[fg])) if np.isfinite(dice[fg]).any() else float("nan")}
    out["val_iou"] = float(np.nanmean(iou[fg])) if np.isfinite(iou[fg]).any() else float("nan")
    for c in range(1, k):
        out[f"val_dice_class{c}"] = float(dice[c])
    return out


def _preview(predictor: BlockPredictor, dataset: Path, entry: dict[str, Any], step: int) -> None:
    """Log an input / truth / prediction strip of a validation image's top-left corner."""
    root = omezarr.open_root(mf.store_path(dataset, entry["id"]))
    image, truth = omezarr.image_array(root), omezarr.label_array(root)
    size = min(512, *image.shape[1:])
    block_iter = predictor.blocks(image[:, :size, :size], entry["stats"], size)
    block, _, labels = next(block_iter)
    tracking.log_preview(np.asarray(image[:, :size, :size]), np.asarray(truth[:size, :size]), labels, "preview", step)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def train(
    cfg: TrainConfig,
    *,
    tags: dict[str, str] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a UNet on ``cfg.dataset``, track it in MLflow and register it behind the promotion gate.

    Raises:
        InputError / ConfigError: the dataset or options cannot be trained on (before any compute).
        ServiceError: the tracking server is unreachable (before any compute).
    """
    start = time.perf_counter()
    dataset = Path(cfg.dataset)
    manifest, val_entries = _check_inputs(cfg)
    experiment_id = tracking.configure(cfg.tracking_uri, cfg.experiment)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, best_dir = out / "last.pt", out / "best"

    model = build_model(cfg.model).to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(cfg, model)
    total_steps = cfg.epochs * cfg.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    loss_fn = SegmentationLoss(cfg.loss, cfg.model.num_classes)
    data = PatchDataset(
        load_images(dataset, "train"), cfg.patch_size, cfg.batch_size, cfg.steps_per_epoch, cfg.normalization,
        cfg.foreground_fraction, AugmentConfig() if cfg.augment else None, seed=cfg.seed,
    )
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                        persistent_workers=False, drop_last=True)

    first_epoch, best, ema, best_epoch, bad_epochs, run_id = 0, -1.0, None, -1, 0, None
    if cfg.resume and ckpt_path.exists():
        state = _load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        first_epoch, best, ema = state["epoch"] + 1, state["best"], state["ema"]
        best_epoch, bad_epochs, run_id = state["best_epoch"], state["bad_epochs"], state["run_id"]

    extra = {"normalization": cfg.normalization.model_dump(), "tile": cfg.val_tile, "dataset_manifest": mf.manifest_hash(dataset)}
    val_set = ",".join(sorted(e["id"] + ":" + e["source_hash"][:8] for e in val_entries))

    def make_predictor(m: torch.nn.Module, config: dict[str, Any]) -> BlockPredictor:
        return BlockPredictor.from_model(m, config, device, tile=cfg.val_tile, overlap=0.5, batch_size=cfg.batch_size)

    run_tags = {"dataset": str(dataset.resolve()), "manifest_hash": extra["dataset_manifest"], **(tags or {})}
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, tags=run_tags,
                          run_name=None if run_id else f"train-{dataset.name}", log_system_metrics=True) as run:
        if run_id is None:
            mlflow.log_params(cfg.flat_params())
        epoch = first_epoch - 1
        for epoch in range(first_epoch, cfg.epochs):
            data.set_epoch(epoch)
            model.train()
            t0, losses = time.perf_counter(), []
            for images, targets in loader:
                images = images.to(device)
                if device.type == "cpu":
                    images = images.contiguous(memory_format=torch.channels_last)
                targets = targets.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = loss_fn(model(images), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
            train_s = time.perf_counter() - t0
            model.eval()
            config = {"model": cfg.model.model_dump(), **extra}
            metrics = evaluate(make_predictor(model, config), dataset, val_entries)
            score = metrics["val_dice"] if np.isfinite(metrics["val_dice"]) else 0.0
            ema = score if ema is None else EMA_DECAY * ema + (1 - EMA_DECAY) * score
            metrics.update(train_loss=float(np.mean(losses)), lr=scheduler.get_last_lr()[0], ema_val_dice=ema,
                           images_per_s=len(losses) * cfg.batch_size / max(train_s, 1e-9))
            mlflow.log_metrics(metrics, step=epoch)
            if epoch % PREVIEW_EVERY == 0 or epoch == cfg.epochs - 1:
                _preview(make_predictor(model, config), dataset, val_entries[0], epoch)
            if ema > best:
                best, best_epoch, bad_epochs = ema, epoch, 0
                save_model(best_dir, model, {**extra, "epoch": epoch, "val_dice": score})
            else:
                bad_epochs += 1
            _save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "epoch": epoch, "best": best, "ema": ema,
                "best_epoch": best_epoch, "bad_epochs": bad_epochs, "run_id": run.info.run_id,
            })
            progress.report("train", epoch + 1, cfg.epochs)
            if on_epoch:
                on_epoch(epoch, metrics)
            if cfg.patience and bad_epochs >= cfg.patience:
                break
            if cfg.time_budget_s and time.perf_counter() - start > cfg.time_budget_s:
                break

        best_model, best_config = load_model(best_dir)
        best_dice = float(best_config["val_dice"])
        mlflow.log_metrics({"best_val_dice": best_dice, "best_epoch": best_epoch})
        mlflow.log_artifacts(str(best_dir), tracking.MODEL_ARTIFACT)

        def evaluate_champion(folder: Path) -> float:
            champ, champ_cfg = load_model(folder)
            return evaluate(make_predictor(champ, champ_cfg), dataset, val_entries)["val_dice"]

        reg = tracking.register(cfg.registered_model, run.info.run_id, mlflow.get_artifact_uri(tracking.MODEL_ARTIFACT),
                                best_dice, val_set, evaluate_champion)
        mlflow.set_tags({"model_version": str(reg["version"]), "model_alias": reg["alias"]})
        del best_model
    return TrainResult(
        run_id=run.info.run_id, model_dir=str(best_dir), best_val_dice=best_dice, best_epoch=best_epoch,
        epochs_run=epoch + 1, model_name=cfg.registered_model, model_version=reg["version"], alias=reg["alias"],
        seconds=round(time.perf_counter() - start, 2),
    )
