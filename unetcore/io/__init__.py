"""Readers and writers: open any supported image, volume or mask lazily as an array-like, validated, with our own
error types (``readers``, ``volumes``); write label volumes back as NIfTI or TIFF stacks, and 2-D masks as tiled
TIFFs with their pixel size (``writers``); read and write GeoTIFF georeferencing (``geotiff``)."""

from unetcore.io.geotiff import GEO_TAGS, nodata_pixels, read_georef, same_placement, write_geotiff
from unetcore.io.readers import (
    IMAGE_DTYPES,
    MASK_DTYPES,
    SUPPORTED_SUFFIXES,
    VOLUME_SUFFIXES,
    Geometry,
    ImageSource,
    MaskSource,
    check_finite,
    dropped_resolution,
    find_mask,
    ignored_inputs,
    image_stem,
    is_supported,
    iter_row_bands,
    list_images,
    open_image,
    open_mask,
    pyramid_level_count,
)
from unetcore.io.slides import MPP_TOLERANCE, ResampledSource, SlidePlacement, choose_level, open_at_mpp
from unetcore.io.writers import OME_UNITS, write_nifti, write_tiff_image, write_tiff_stack

__all__ = [
    "GEO_TAGS",
    "IMAGE_DTYPES",
    "MPP_TOLERANCE",
    "MASK_DTYPES",
    "OME_UNITS",
    "SUPPORTED_SUFFIXES",
    "VOLUME_SUFFIXES",
    "Geometry",
    "ImageSource",
    "MaskSource",
    "ResampledSource",
    "SlidePlacement",
    "check_finite",
    "choose_level",
    "dropped_resolution",
    "find_mask",
    "ignored_inputs",
    "image_stem",
    "is_supported",
    "iter_row_bands",
    "nodata_pixels",
    "list_images",
    "open_at_mpp",
    "open_image",
    "open_mask",
    "pyramid_level_count",
    "read_georef",
    "same_placement",
    "write_geotiff",
    "write_nifti",
    "write_tiff_image",
    "write_tiff_stack",
]
