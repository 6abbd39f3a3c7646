"""The UNet, its building blocks, and weights-only save/load."""

from unetcore.model.packaging import load_model, save_model
from unetcore.model.unet import UNet, build_model

__all__ = ["UNet", "build_model", "load_model", "save_model"]
