"""The MLflow face of the pipeline: the tracking server's health, runs and their bookkeeping (``runs``), previews,
the registry's champion gate, and resolving a model URI to a local, pinned folder."""

from unetcore.tracking import mlflow, runs
from unetcore.tracking.mlflow import (
    CHALLENGER,
    CHAMPION,
    MODEL_ARTIFACT,
    PinnedModel,
    check_same_task,
    check_tracking_uri,
    code_version_tags,
    configure,
    download_model,
    log_preview,
    pin_model,
    preview_strip,
    register,
    sqlite_path,
    use_experiment,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "MODEL_ARTIFACT",
    "PinnedModel",
    "check_same_task",
    "check_tracking_uri",
    "code_version_tags",
    "configure",
    "download_model",
    "log_preview",
    "mlflow",
    "pin_model",
    "preview_strip",
    "register",
    "runs",
    "sqlite_path",
    "use_experiment",
]
