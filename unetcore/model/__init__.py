"""The UNet (2-D or 3-D), its building blocks, its per-axis pooling plan, and weights-only save/load."""

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
from unetcore.model.planning import MIN_FEATURE_MAP, PoolingPlan, plan_pooling
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

__all__ = [
    "CONFIG_FILE",
    "MIN_FEATURE_MAP",
    "WEIGHTS_FILE",
    "DoubleConv",
    "Down",
    "OutHead",
    "PerAxis",
    "PoolingPlan",
    "UNet",
    "Up",
    "build_model",
    "crop",
    "fold_batch_norm",
    "group_count",
    "load_model",
    "make_dropout",
    "make_norm",
    "pad_to_multiple",
    "padded_size",
    "plan_pooling",
    "read_config",
    "save_model",
    "size_multiple",
    "stage_kernels",
    "stage_pools",
]
