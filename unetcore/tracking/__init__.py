"""The MLflow face of the pipeline: the tracking server's health, runs and their bookkeeping (``runs``), previews,
the registry's champion gate, and resolving a model URI to a local, pinned folder. Volumes are previewed as three
orthogonal mid-slices (``previews``)."""

from __future__ import annotations

import importlib
from typing import Any

from unetcore.tracking.pinned import PinnedModel, pin_cached

_LAZY = {
    **dict.fromkeys(("CHALLENGER", "CHAMPION", "ML_VIEW_QUERY", "MODEL_ARTIFACT", "PREVIEW_KEY", "UI_PORT",
                     "browse_hint", "check_same_task", "check_tracking_uri", "code_version_tags", "configure",
                     "download_model", "log_export", "log_preview", "pin_model", "preview_strip", "register",
                     "run_page_url",
                     "sqlite_path", "ui_command", "use_experiment"), "unetcore.tracking.mlflow"),
    **dict.fromkeys(("log_volume_preview", "orthogonal_slices", "volume_preview_strip"), "unetcore.tracking.previews"),
}
"""Names served from their module on first use: importing MLflow costs seconds, which a run that needs only
:class:`PinnedModel` or :func:`pin_cached` (a cached model, ``unet predict``) does not pay."""


def __getattr__(name: str) -> Any:
    if name in ("mlflow", "previews", "runs"):
        return importlib.import_module(f"unetcore.tracking.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unetcore.tracking' has no attribute {name!r}")


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "ML_VIEW_QUERY",
    "MODEL_ARTIFACT",
    "PinnedModel",
    "PREVIEW_KEY",
    "UI_PORT",
    "browse_hint",
    "check_same_task",
    "check_tracking_uri",
    "code_version_tags",
    "configure",
    "download_model",
    "log_export",
    "log_preview",
    "log_volume_preview",
    "mlflow",
    "orthogonal_slices",
    "pin_cached",
    "pin_model",
    "preview_strip",
    "previews",
    "register",
    "run_page_url",
    "runs",
    "sqlite_path",
    "ui_command",
    "use_experiment",
    "volume_preview_strip",
]
