"""The UNet, its building blocks, and weights-only save/load."""

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
    Up,
    fold_batch_norm,
    group_count,
)
from unetcore.model.unet import UNet, build_model, pad_to_multiple, padded_size

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "DoubleConv",
    "Down",
    "OutHead",
    "UNet",
    "Up",
    "build_model",
    "fold_batch_norm",
    "group_count",
    "load_model",
    "pad_to_multiple",
    "padded_size",
    "read_config",
    "save_model",
]
