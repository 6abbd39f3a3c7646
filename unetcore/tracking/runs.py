"""Run bookkeeping of a training: start or reopen the MLflow run, log its plan and each epoch once, register the
best model.

Every epoch's metrics land exactly once whatever the moment of a crash: the loop checkpoints an epoch before
logging its metrics, and a resumed run logs the checkpointed epoch's metrics when the run lacks them
(:func:`log_start`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from unetcore.errors import ConfigError
from unetcore.model import load_model
from unetcore.planning import PLAN_FILE, Plan, TaskSignature
from unetcore.tracking import mlflow as tracking

Validate = Callable[[torch.nn.Module, dict[str, Any]], dict[str, float]]


def run_tags(dataset: Path, manifest_hash: str, extra: dict[str, str] | None, resumed_at: int | None) -> dict[str, str]:
    """A training run's tags: its dataset, the manifest's hash, the code version, ``extra``, the resume epoch."""
    tags = {"dataset": str(dataset.resolve()), "manifest_hash": manifest_hash, **tracking.code_version_tags(),
            **(extra or {})}
    if resumed_at is not None:
        tags["resumed_at_epoch"] = str(resumed_at)
    return tags


def start_run(experiment_id: str, run_id: str | None, tags: dict[str, str], name: str) -> mlflow.ActiveRun:
    """Start a new run, or reopen ``run_id`` (a resume).

    Raises:
        ConfigError: ``run_id`` is not in this tracking store.
    """
    system = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() not in ("false", "0")
    if run_id is None:
        return mlflow.start_run(experiment_id=experiment_id, tags=tags, run_name=name, log_system_metrics=system)
    try:
        return mlflow.start_run(run_id=run_id, tags=tags, log_system_metrics=system)
    except MlflowException as exc:
        first = str(exc).splitlines()[0][:160]
        raise ConfigError("resume", f"cannot reopen MLflow run {run_id} ({first}); "
                                    "use the tracking URI it was logged to, or drop --resume") from None


def log_start(run_id: str, params: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
    """A new run logs its parameters; a resumed one (``checkpoint`` given) logs what its crash may have lost."""
    if checkpoint is None:
        mlflow.log_params(params)
    else:
        log_if_missing(run_id, checkpoint["progress"]["epoch"], checkpoint["metrics"])


def log_epoch(metrics: dict[str, float], epoch: int) -> None:
    """Log one epoch's metrics at ``step=epoch`` (NaN values are left out: MLflow charts cannot draw them)."""
    mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)}, step=epoch)


def log_if_missing(run_id: str, epoch: int, metrics: dict[str, float]) -> None:
    """Log ``epoch``'s metrics unless the run has them (the crash came between checkpoint and logging)."""
    if epoch < 0:
        return
    history = MlflowClient().get_metric_history(run_id, "train_loss")
    if all(m.step != epoch for m in history):
        log_epoch(metrics, epoch)


def register_best(
    name: str, run_id: str, best_dir: Path, val_set: str, validate: Validate, best_epoch: int
) -> tuple[dict[str, Any], float]:
    """Log the best model as a weights-only artifact, register it under ``name``, apply the champion gate.

    ``validate(model, config)`` scores a champion whose Dice was measured on another validation set.

    Returns:
        The registration (see :func:`unetcore.tracking.mlflow.register`) and the best model's val Dice.
    """
    _, best_config = load_model(best_dir)
    best_dice = float(best_config["val_dice"])
    mlflow.log_metrics({"best_val_dice": best_dice, "best_epoch": best_epoch})
    mlflow.log_artifacts(str(best_dir), tracking.MODEL_ARTIFACT)

    def evaluate_champion(folder: Path) -> float:
        champion, champion_cfg = load_model(folder)
        return validate(champion, champion_cfg)["val_dice"]

    task = TaskSignature.from_dict(best_config["task"]) if "task" in best_config else None
    reg = tracking.register(
        name, run_id, mlflow.get_artifact_uri(tracking.MODEL_ARTIFACT), best_dice, val_set, evaluate_champion,
        model_config=best_config["model"], task=task,
    )
    return reg, best_dice


def log_plan(plan: Plan) -> None:
    """Log the training plan to the active run: ``plan.<field>`` params (the planned values), ``plan.overridden``
    (the fields an explicit option set) and the whole plan as the ``plan.json`` artifact."""
    mlflow.log_params(plan.params())
    mlflow.log_dict(plan.to_dict(), PLAN_FILE)


def tag_outcome(registered: dict[str, Any], stop_reason: str) -> None:
    """Tag the active run with its registered version, the alias the gate gave it and why training stopped."""
    mlflow.set_tags({"model_version": str(registered["version"]), "model_alias": registered["alias"],
                     "stop_reason": stop_reason})
