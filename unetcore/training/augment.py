"""Augmentation of one (image, mask) pair, 2-D or 3-D, on the CPU, each transform with its own probability.

Spatial transforms move image and mask together (mask resampled with nearest neighbour, so class values
stay exact); intensity transforms touch the image only. All randomness comes from the caller's generator.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field
from scipy import ndimage


class AugmentConfig(BaseModel):
    """Probabilities and ranges of each transform (nnU-Net-like defaults, lighter for CPU)."""

    p_flip: float = Field(0.5, ge=0, le=1, description="Probability of each axis flip.")
    p_rot90: float = Field(0.5, ge=0, le=1, description="Probability of a random 90-degree rotation.")
    p_affine: float = Field(0.2, ge=0, le=1, description="Probability of a small rotation + scaling.")
    max_rotation_deg: float = Field(15.0, ge=0, le=180)
    scale_range: tuple[float, float] = (0.85, 1.25)
    p_intensity: float = Field(0.3, ge=0, le=1, description="Probability of brightness/contrast jitter.")
    p_gamma: float = Field(0.2, ge=0, le=1)
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_noise: float = Field(0.15, ge=0, le=1)
    noise_std: float = Field(0.05, ge=0)
    p_blur: float = Field(0.1, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.5, 1.0)


def _affine(image: np.ndarray, mask: np.ndarray, angle: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by ``angle`` radians in the (y, x) plane and zoom every spatial axis by ``scale``, about the centre
    (image linear, mask nearest)."""
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    matrix = np.eye(mask.ndim) / scale
    matrix[-2:, -2:] = [[c, -s], [s, c]]
    centre = (np.array(mask.shape) - 1) / 2
    offset = centre - matrix @ centre
    image = np.stack(
        [ndimage.affine_transform(ch, matrix, offset, order=1, mode="reflect") for ch in image]
    ).astype(np.float32)
    mask = ndimage.affine_transform(mask, matrix, offset, order=0, mode="reflect")
    return image, mask


def augment_pair(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Augment ``image`` (C, H, W) or (C, D, H, W) float32 and ``mask`` (H, W) or (D, H, W) int together.

    Each spatial axis is flipped with ``p_flip``; quarter turns, rotations and the scaling's rotation are in the
    (y, x) plane (a volume's slices; half turns only when the plane is not square, so the shape stays), the
    scaling zooms every axis. Returns new arrays.
    """
    for axis in range(mask.ndim):
        if rng.random() < cfg.p_flip:
            image, mask = np.flip(image, axis + 1), np.flip(mask, axis)
    if rng.random() < cfg.p_rot90:
        k = int(rng.integers(1, 4))
        if mask.shape[-1] != mask.shape[-2]:
            k = 2
        image, mask = np.rot90(image, k, axes=(-2, -1)), np.rot90(mask, k, axes=(-2, -1))
    if rng.random() < cfg.p_affine:
        angle = np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
        image, mask = _affine(np.ascontiguousarray(image), np.ascontiguousarray(mask), angle, rng.uniform(*cfg.scale_range))
    image = np.array(image, dtype=np.float32, copy=True)
    spatial = tuple(range(1, image.ndim))
    if rng.random() < cfg.p_intensity:
        mean = image.mean(axis=spatial, keepdims=True)
        image = (image - mean) * rng.uniform(0.75, 1.25) + mean + rng.uniform(-0.1, 0.1)
    if rng.random() < cfg.p_gamma:
        lo = image.min(axis=spatial, keepdims=True)
        span = image.max(axis=spatial, keepdims=True) - lo + 1e-6
        image = ((image - lo) / span) ** rng.uniform(*cfg.gamma_range) * span + lo
    if rng.random() < cfg.p_noise:
        image = image + rng.normal(0.0, cfg.noise_std, image.shape).astype(np.float32)
    if rng.random() < cfg.p_blur:
        sigma = rng.uniform(*cfg.blur_sigma)
        image = np.stack([ndimage.gaussian_filter(ch, sigma) for ch in image])
    return image.astype(np.float32), np.ascontiguousarray(mask)
