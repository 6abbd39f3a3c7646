"""Readers: open any supported image or mask lazily as an array-like, validated, with our own error types."""

from unetcore.io.readers import (
    IMAGE_DTYPES,
    MASK_DTYPES,
    SUPPORTED_SUFFIXES,
    ImageSource,
    MaskSource,
    check_finite,
    find_mask,
    ignored_inputs,
    image_stem,
    is_supported,
    iter_row_bands,
    list_images,
    open_image,
    open_mask,
)

__all__ = [
    "IMAGE_DTYPES",
    "MASK_DTYPES",
    "SUPPORTED_SUFFIXES",
    "ImageSource",
    "MaskSource",
    "check_finite",
    "find_mask",
    "ignored_inputs",
    "image_stem",
    "is_supported",
    "iter_row_bands",
    "list_images",
    "open_image",
    "open_mask",
]
