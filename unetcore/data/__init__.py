"""The bundled, generated sample: nuclei-like images with exact masks, written deterministically from a seed."""

from unetcore.data.synthetic import (
    SampleInfo,
    generate_image,
    instances_to_semantic,
    write_sample,
)

__all__ = ["SampleInfo", "generate_image", "instances_to_semantic", "write_sample"]
