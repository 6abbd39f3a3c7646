"""The UNet (2-D or 3-D), its building blocks, its per-axis pooling plan, weights-only save/load, and its export
as a self-contained ONNX or TorchScript file.

Names are exported lazily (PEP 562): ``from unetcore.model.packaging import read_config`` or
``unetcore.model.read_config`` imports only the submodule it needs, so reading a model's ``config.json`` does not
import torch (the onnxruntime path of :mod:`unetcore.inference.runtime` runs without it)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unetcore.model.export import (
        ExportableUNet,
        ExportCheck,
        ExportResult,
        check_exportable,
        check_sizes,
        description_path,
        export_model,
        min_sizes,
        run_without_package,
    )
    from unetcore.model.packaging import (
        CONFIG_FILE,
        WEIGHTS_FILE,
        load_model,
        read_config,
        save_model,
    )
    from unetcore.model.parts import (
        DoubleConv,
        Down,
        OutHead,
        PerAxis,
        Up,
        fold_batch_norm,
        group_count,
        make_dropout,
        make_norm,
    )
    from unetcore.model.planning import MIN_FEATURE_MAP, PoolingPlan, deepest, plan_pooling
    from unetcore.model.unet import (
        UNet,
        build_model,
        crop,
        pad_to_multiple,
        padded_size,
        size_multiple,
        stage_kernels,
        stage_pools,
    )

_SUBMODULE = {
    "CONFIG_FILE": "packaging",
    "DoubleConv": "parts",
    "Down": "parts",
    "ExportCheck": "export",
    "ExportResult": "export",
    "ExportableUNet": "export",
    "MIN_FEATURE_MAP": "planning",
    "OutHead": "parts",
    "PerAxis": "parts",
    "PoolingPlan": "planning",
    "UNet": "unet",
    "Up": "parts",
    "WEIGHTS_FILE": "packaging",
    "build_model": "unet",
    "check_exportable": "export",
    "check_sizes": "export",
    "crop": "unet",
    "deepest": "planning",
    "description_path": "export",
    "export_model": "export",
    "fold_batch_norm": "parts",
    "group_count": "parts",
    "load_model": "packaging",
    "make_dropout": "parts",
    "make_norm": "parts",
    "min_sizes": "export",
    "pad_to_multiple": "unet",
    "padded_size": "unet",
    "plan_pooling": "planning",
    "read_config": "packaging",
    "run_without_package": "export",
    "save_model": "packaging",
    "size_multiple": "unet",
    "stage_kernels": "unet",
    "stage_pools": "unet",
}
"""Which submodule defines each exported name."""


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_SUBMODULE[name]}"), name)


__all__ = [
    "CONFIG_FILE",
    "MIN_FEATURE_MAP",
    "WEIGHTS_FILE",
    "DoubleConv",
    "Down",
    "ExportCheck",
    "ExportResult",
    "ExportableUNet",
    "OutHead",
    "PerAxis",
    "PoolingPlan",
    "UNet",
    "Up",
    "build_model",
    "check_exportable",
    "check_sizes",
    "crop",
    "deepest",
    "description_path",
    "export_model",
    "fold_batch_norm",
    "group_count",
    "load_model",
    "make_dropout",
    "make_norm",
    "min_sizes",
    "pad_to_multiple",
    "padded_size",
    "plan_pooling",
    "read_config",
    "run_without_package",
    "save_model",
    "size_multiple",
    "stage_kernels",
    "stage_pools",
]
