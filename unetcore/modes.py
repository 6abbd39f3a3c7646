"""Every mode of the pipeline, declared once: configs, functions and the CLI import these aliases.

Functions that take a mode look it up with :func:`check_mode`, which refuses an unknown value with the valid ones.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from unetcore.errors import ConfigError

LossKind = Literal["dice_ce", "ce", "dice", "focal"]
NormKind = Literal["batch", "instance", "group"]
UpsampleKind = Literal["transpose", "bilinear"]
NormalizationMode = Literal["percentile", "zscore", "ct"]  # ct: fitted on the training set's foreground
ChannelAxis = Literal["auto", "yx", "yxc", "cyx", "zyx", "zyxc", "czyx"]  # the last three: volumes
OptimizerKind = Literal["adamw", "sgd"]
ScheduleKind = Literal["poly", "cosine", "constant"]
SamplingKind = Literal["foreground", "class_balanced"]
Device = Literal["auto", "cpu", "cuda"]
SplitChoice = Literal["all", "train", "val", "test"]
Split = Literal["train", "val", "test"]
ProbabilityDtype = Literal["float16", "float32"]
Precision = Literal["auto", "bf16", "fp32"]  # forward passes: auto = bf16 autocast on CUDA, float32 on the CPU
Runtime = Literal["auto", "torch", "onnxruntime"]
"""What runs a model's forward passes in inference: torch, or onnxruntime (the CPU, no torch import); auto = onnxruntime
on the CPU where it is installed (see :mod:`unetcore.inference.runtime`), else torch."""
BlockPath = Literal["numpy", "torch"]  # the block kernel: numpy arrays, or torch ops on the model's device
ExportKind = Literal["none", "png", "tiff", "nifti", "geojson", "geotiff"]
"""Label mask export: none; PNG (small images; a volume gets a TIFF stack); tiled TIFF with the pixel size (a
volume: an ImageJ TIFF stack); NIfTI (volumes read from NIfTI or DICOM, with the source's affine); GeoJSON (2-D images with
instances: the outlines QuPath/QGIS import, and an object table); GeoTIFF (images read from a GeoTIFF: tiled, with
overviews and the source's georeferencing tags)."""
ModelFormat = Literal["onnx", "torchscript"]
"""``unet export``: an ONNX graph (onnxruntime and any ONNX runtime) or a TorchScript module (``torch.jit.load``)."""
SpatialDims = Literal[2, 3]
"""Spatial axes a model convolves: 2 (images; volumes slice by slice) or 3 (volumes)."""


def choices(mode: Any) -> tuple[str, ...]:
    """The valid values of a ``Literal`` mode."""
    return tuple(get_args(mode))


def check_mode(mode: Any, value: str, option: str) -> str:
    """``value`` if it is one of ``mode``'s values.

    Raises:
        ConfigError: naming ``option`` and listing the valid values.
    """
    valid = choices(mode)
    if value not in valid:
        raise ConfigError(option, f"unknown value {value!r}; valid: {', '.join(str(v) for v in valid)}")
    return value
