"""The MLflow face of the pipeline: the tracking server's health, runs and their bookkeeping (``runs``), previews,
the registry's champion gate, and resolving a model URI to a local, pinned folder. Volumes are previewed as three
orthogonal mid-slices (``previews``)."""

from unetcore.tracking import mlflow, previews, runs
from unetcore.tracking.mlflow import (
    CHALLENGER,
    CHAMPION,
    MODEL_ARTIFACT,
    PinnedModel,
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
from unetcore.tracking.previews import log_volume_preview, orthogonal_slices, volume_preview_strip

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "MODEL_ARTIFACT",
    "PinnedModel",
    "check_tracking_uri",
    "code_version_tags",
    "configure",
    "download_model",
    "log_preview",
    "log_volume_preview",
    "mlflow",
    "orthogonal_slices",
    "pin_model",
    "preview_strip",
    "previews",
    "register",
    "runs",
    "sqlite_path",
    "use_experiment",
    "volume_preview_strip",
]
