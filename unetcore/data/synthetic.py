"""Deterministic synthetic fluorescence-microscopy images with instance labels.

The images imitate a nuclear stain (DAPI/Hoechst) seen through a widefield microscope, so that a small UNet has
something realistic to learn and a global threshold has something to get wrong:

* nuclei are ellipses of random size, orientation and eccentricity whose outline wobbles (a few low radial
  harmonics), with a soft edge, a slight dome and internal texture (smoothed noise plus chromatin-like spots);
* brightness varies a lot and about a quarter of the nuclei are dim;
* about a third of the nuclei are placed next to another one, so that clusters of touching or slightly
  overlapping nuclei occur; where two overlap, each pixel goes to the nucleus whose centre is nearer relative to
  its size, so every instance stays one piece;
* the illumination falls off smoothly across the field (gradient + vignette) and an out-of-focus haze adds a
  smooth, uneven background: dim nuclei in the dark corner end up darker than the background in the bright
  one, which is what defeats a single global (Otsu) threshold;
* a slight optical blur, Poisson (shot) noise and Gaussian read noise finish the picture.

Every object is rendered inside its own bounding box, so a 2048 x 2048 image takes about a second on one core.
Everything is a function of ``seed``: the same seed gives the same arrays on every platform numpy supports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries, relabel_sequential

from unetcore.atomic import replacing
from unetcore.errors import ConfigError

__all__ = ["SampleInfo", "generate_image", "instances_to_semantic", "write_sample"]

_DTYPES = ("uint8", "uint16")
# Output scaling: (camera offset, value of a bright nucleus in full light) per dtype.
_SCALE = {"uint8": (6.0, 150.0), "uint16": (100.0, 2400.0)}
_PHOTONS_BRIGHT = 90.0  # photons collected from a bright nucleus in full light: sets the shot noise
_READ_NOISE = 2.0  # camera read noise, in photons
_CLUSTER_PROB = 0.35  # share of nuclei placed against an existing one
_MAX_OVERLAP = 0.3  # a new nucleus covering more than this share of others is dropped
_EDGE_WIDTH = 1.5  # pixels over which a nucleus fades in at its border


@dataclass(frozen=True)
class _Nucleus:
    """Geometry and appearance of one nucleus (pixel units, angles in radians)."""

    cy: float
    cx: float
    radius: float
    aspect: float  # minor/major axis ratio, in (0, 1]
    angle: float
    harmonics: np.ndarray  # (K, 3): order, amplitude, phase of the outline wobble
    brightness: float
    texture: float  # amplitude of the smoothed-noise texture
    spots: float  # amplitude of the chromatin spots
    channel_weights: np.ndarray  # (C,): brightness factor per channel, 1 for channel 0


def generate_image(
    shape: tuple[int, int],
    seed: int,
    *,
    density: float = 0.3,
    mean_radius: float = 11.0,
    dtype: Literal["uint8", "uint16"] = "uint8",
    channels: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Make one synthetic nuclear-stain image and its instance labels.

    Args:
        shape: ``(H, W)`` of the image.
        seed: everything is drawn from ``numpy.random.default_rng(seed)``.
        density: expected share of the field covered by nuclei (before overlaps are resolved).
        mean_radius: typical nucleus radius in pixels; individual radii vary about +-25 %.
        dtype: ``"uint8"`` or ``"uint16"`` (a 12-bit-camera-like range with a dark offset of 100).
        channels: 1 gives a ``(H, W)`` image; n > 1 gives ``(H, W, n)`` where the extra channels see the same
            nuclei with their own brightness ratio per nucleus, their own haze and their own noise (a
            correlated multi-channel stain).

    Returns:
        ``(image, instances)``: image ``(H, W)`` or ``(H, W, C)`` of ``dtype``; instances ``(H, W)`` int32,
        0 for background and 1..N for the nuclei.
    """
    height, width = _check_args(shape, density, mean_radius, dtype, channels)
    rng = np.random.default_rng(seed)
    texture, spots = _texture_fields(rng, (height, width))
    nuclei = _draw_nuclei(rng, (height, width), density, mean_radius, channels)

    signal = np.zeros((channels, height, width), np.float32)
    instances = np.zeros((height, width), np.int32)
    best = np.full((height, width), np.inf, np.float32)  # normalised radius of the owner of each pixel
    label = 0
    for nucleus in nuclei:
        label += _render(nucleus, label + 1, texture, spots, signal, instances, best)
    instances, _, _ = relabel_sequential(instances)

    illumination = _illumination(rng, (height, width))
    image = np.empty((channels, height, width), np.float32)
    for c in range(channels):
        blurred = ndi.gaussian_filter(signal[c], sigma=rng.uniform(0.8, 1.3))
        haze = _haze(rng, (height, width))
        image[c] = illumination * (blurred + haze)
    image = _camera(rng, image, dtype)
    image = image[0] if channels == 1 else np.moveaxis(image, 0, -1).copy()
    return image, instances.astype(np.int32, copy=False)


def instances_to_semantic(instances: np.ndarray, mode: Literal["binary", "boundary"] = "binary") -> np.ndarray:
    """Turn instance labels ``(H, W)`` into a semantic mask ``(H, W)`` uint8.

    ``"binary"``: 0 background, 1 nucleus. ``"boundary"``: 0 background, 1 interior, 2 the inner boundary of
    each instance (``find_boundaries(mode="inner")``), which separates touching nuclei.
    """
    if mode == "binary":
        return (instances > 0).astype(np.uint8)
    if mode == "boundary":
        out = (instances > 0).astype(np.uint8)
        out[find_boundaries(instances, mode="inner") & (instances > 0)] = 2
        return out
    raise ConfigError("mode", f"'{mode}' is not one of 'binary', 'boundary'")


@dataclass(frozen=True)
class SampleInfo:
    """What :func:`write_sample` wrote."""

    root: Path
    images: list[Path] = field(default_factory=list)  # small images first, then the large one
    masks: list[Path] = field(default_factory=list)  # same order and stems as ``images``
    large_image: Path | None = None
    n_objects: int = 0  # nuclei over all images
    seeds: list[int] = field(default_factory=list)  # generate_image seed of each image, to remake one

    @property
    def n_images(self) -> int:
        """Number of images written (small and large)."""
        return len(self.images)


def write_sample(
    out_dir: Path,
    *,
    n_images: int = 8,
    size: int = 512,
    large_size: int = 2048,
    seed: int = 0,
    fmt: Literal["png", "tif"] = "png",
) -> SampleInfo:
    """Write a small labelled data set: ``images/<stem>.<fmt>`` and ``masks/<stem>.png`` (0/1 uint8).

    ``n_images`` images of ``size``² are called ``sample_000`` ...; unless ``large_size`` is 0, one more image of
    ``large_size``² called ``large_000`` is written as a tiled TIFF (256 x 256 tiles, zlib), whatever ``fmt``
    is, so that lazy region reads can be exercised. Each file is written under a hidden temporary name and
    renamed into place, so a reader never sees half a file. The same ``seed`` writes the same pixels.
    """
    if fmt not in ("png", "tif"):
        raise ConfigError("fmt", f"'{fmt}' is not one of 'png', 'tif'")
    if n_images < 0 or size < 16 or large_size < 0:
        raise ConfigError("n_images/size/large_size", "need n_images >= 0, size >= 16, large_size >= 0")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    seeds = np.random.SeedSequence(seed).generate_state(n_images + 1, np.uint32)

    jobs = [(f"sample_{i:03d}", size, int(seeds[i]), fmt) for i in range(n_images)]
    if large_size:
        jobs.append(("large_000", large_size, int(seeds[n_images]), "tiled"))
    images, masks, n_objects, large = [], [], 0, None
    for stem, edge, image_seed, kind in jobs:
        image, instances = generate_image((edge, edge), image_seed)
        suffix = "png" if kind == "png" else "tif"
        image_path = out_dir / "images" / f"{stem}.{suffix}"
        mask_path = out_dir / "masks" / f"{stem}.png"
        _atomic_write(image_path, image, tiled=kind == "tiled")
        _atomic_write(mask_path, instances_to_semantic(instances, "binary"), tiled=False)
        images.append(image_path)
        masks.append(mask_path)
        n_objects += int(instances.max())
        if kind == "tiled":
            large = image_path
    return SampleInfo(
        root=out_dir,
        images=images,
        masks=masks,
        large_image=large,
        n_objects=n_objects,
        seeds=[job[2] for job in jobs],
    )


# --- helpers ------------------------------------------------------------------------------------------------


def _check_args(
    shape: tuple[int, int], density: float, mean_radius: float, dtype: str, channels: int
) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 1:
        raise ConfigError("shape", f"need (H, W) with H, W >= 1, got {shape}")
    if not 0.0 <= density <= 1.0:
        raise ConfigError("density", f"need 0 <= density <= 1, got {density}")
    if mean_radius < 2.0:
        raise ConfigError("mean_radius", f"need mean_radius >= 2 pixels, got {mean_radius}")
    if dtype not in _DTYPES:
        raise ConfigError("dtype", f"'{dtype}' is not one of {', '.join(_DTYPES)}")
    if not 1 <= channels <= 64:
        raise ConfigError("channels", f"need 1 <= channels <= 64, got {channels}")
    return int(shape[0]), int(shape[1])


def _draw_nuclei(
    rng: np.random.Generator, shape: tuple[int, int], density: float, mean_radius: float, channels: int
) -> list[_Nucleus]:
    """Draw the nuclei: positions (uniform, or against an earlier nucleus to form clusters) and appearance."""
    height, width = shape
    count = rng.poisson(density * height * width / (np.pi * mean_radius**2))
    nuclei: list[_Nucleus] = []
    for _ in range(count):
        radius = mean_radius * float(np.clip(rng.lognormal(0.0, 0.25), 0.45, 2.0))
        brightness = float(rng.lognormal(0.0, 0.25))
        if rng.random() < 0.25:  # dim nuclei: the ones a global threshold loses in the dark corner
            brightness *= rng.uniform(0.25, 0.5)
        if rng.random() < 0.05:  # small, bright, compact (mitotic-looking)
            radius *= 0.6
            brightness *= 1.6
        if nuclei and rng.random() < _CLUSTER_PROB:
            parent = nuclei[rng.integers(len(nuclei))]
            theta = rng.uniform(0, 2 * np.pi)
            dist = (parent.radius + radius) * rng.uniform(0.8, 1.05)
            cy, cx = parent.cy + dist * np.sin(theta), parent.cx + dist * np.cos(theta)
        else:
            cy, cx = rng.uniform(-radius, height + radius), rng.uniform(-radius, width + radius)
        orders = np.arange(2, 6)
        harmonics = np.stack(
            [orders, rng.normal(0.0, 0.07, orders.size) / np.sqrt(orders - 1), rng.uniform(0, 2 * np.pi, orders.size)],
            axis=1,
        )
        weights = np.concatenate([[1.0], rng.uniform(0.3, 1.2, channels - 1)])
        nuclei.append(
            _Nucleus(
                cy=float(cy),
                cx=float(cx),
                radius=radius,
                aspect=float(rng.uniform(0.6, 1.0)),
                angle=float(rng.uniform(0, np.pi)),
                harmonics=harmonics,
                brightness=brightness,
                texture=float(rng.uniform(0.08, 0.25)),
                spots=float(rng.uniform(0.1, 0.6)),
                channel_weights=weights,
            )
        )
    return nuclei


def _render(
    nucleus: _Nucleus,
    label: int,
    texture: np.ndarray,
    spots: np.ndarray,
    signal: np.ndarray,
    instances: np.ndarray,
    best: np.ndarray,
) -> int:
    """Add one nucleus to ``signal`` (C, H, W) and ``instances`` inside its bounding box; return 1 if drawn."""
    height, width = instances.shape
    major = nucleus.radius / np.sqrt(nucleus.aspect)
    minor = nucleus.radius * np.sqrt(nucleus.aspect)
    reach = major * (1.0 + np.abs(nucleus.harmonics[:, 1]).sum()) + 1.0
    y0, y1 = max(int(nucleus.cy - reach), 0), min(int(nucleus.cy + reach) + 2, height)
    x0, x1 = max(int(nucleus.cx - reach), 0), min(int(nucleus.cx + reach) + 2, width)
    if y0 >= y1 or x0 >= x1:
        return 0
    dy = (np.arange(y0, y1, dtype=np.float32) - nucleus.cy)[:, None]
    dx = (np.arange(x0, x1, dtype=np.float32) - nucleus.cx)[None, :]
    cos, sin = float(np.cos(nucleus.angle)), float(np.sin(nucleus.angle))
    u = (dx * cos + dy * sin) / major
    v = (dy * cos - dx * sin) / minor
    phi = np.arctan2(v, u)
    outline = np.ones_like(phi)
    for order, amplitude, phase in nucleus.harmonics:
        outline += amplitude * np.cos(order * phi + phase)
    t = np.sqrt(u * u + v * v) / outline  # < 1 inside, 0 at the centre
    inside = t < 1.0
    area = int(inside.sum())
    if area == 0:
        return 0
    box = (slice(y0, y1), slice(x0, x1))
    if np.count_nonzero(instances[box][inside]) > _MAX_OVERLAP * area:
        return 0

    owned = inside & (t < best[box])
    instances[box][owned] = label
    best[box][owned] = t[owned]
    edge = np.clip((1.0 - t) * (nucleus.radius / _EDGE_WIDTH), 0.0, 1.0)
    profile = nucleus.brightness * edge * (1.0 - 0.25 * np.minimum(t, 1.0) ** 2)
    grain = 1.0 + nucleus.texture * texture[box]
    signal[0][box] += profile * (grain + nucleus.spots * spots[box])
    for c in range(1, signal.shape[0]):
        signal[c][box] += profile * grain * nucleus.channel_weights[c]
    return 1


def _texture_fields(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Full-frame smoothed noise (zero mean, unit std) and chromatin spots (blurred sparse points, peak ~1)."""
    grain = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=1.5)
    grain /= grain.std() + 1e-6
    points = (rng.random(shape, dtype=np.float32) < 0.02).astype(np.float32) * rng.uniform(0.5, 1.5, shape).astype(
        np.float32
    )
    spots = ndi.gaussian_filter(points, sigma=1.0) * (2 * np.pi)  # a lone point of weight 1 peaks at ~1
    return grain, spots


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], n_waves: int = 3) -> np.ndarray:
    """A smooth random field in [0, 1]: a few long plane waves, built from separable outer products."""
    height, width = shape
    y = np.arange(height, dtype=np.float32)[:, None] / max(height, width)
    x = np.arange(width, dtype=np.float32)[None, :] / max(height, width)
    out = np.zeros(shape, np.float32)
    for _ in range(n_waves):
        fy, fx = (float(f) * 2 * np.pi for f in rng.uniform(-1.2, 1.2, 2))
        phase = rng.uniform(0, 2 * np.pi)
        # cos(a + b) = cos a cos b - sin a sin b keeps the work at two outer products per wave
        out += np.cos(fy * y + phase) * np.cos(fx * x) - np.sin(fy * y + phase) * np.sin(fx * x)
    out -= out.min()
    return out / (out.max() + 1e-6)


def _illumination(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Multiplicative illumination: a linear fall-off in a random direction plus an off-centre vignette."""
    height, width = shape
    scale = max(height, width)
    y = np.arange(height, dtype=np.float32)[:, None] / scale
    x = np.arange(width, dtype=np.float32)[None, :] / scale
    theta = rng.uniform(0, 2 * np.pi)
    ramp = float(np.cos(theta)) * x + float(np.sin(theta)) * y
    cy, cx = rng.uniform(0.2, 0.8) * height / scale, rng.uniform(0.2, 0.8) * width / scale
    vignette = (y - cy) ** 2 + (x - cx) ** 2
    falloff = ramp + 0.8 * vignette
    falloff -= falloff.min()
    falloff /= falloff.max() + 1e-6
    depth = rng.uniform(0.55, 0.7)  # the darkest corner gets 30-45 % of the light
    return (1.0 - depth * falloff).astype(np.float32)


def _haze(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Out-of-focus background light: a base level plus a smooth, uneven field."""
    return (rng.uniform(0.04, 0.1) + rng.uniform(0.25, 0.4) * _smooth_field(rng, shape)).astype(np.float32)


def _camera(rng: np.random.Generator, image: np.ndarray, dtype: str) -> np.ndarray:
    """Shot noise and read noise on ``image`` (relative units, bright nucleus ~1), then scale and clip."""
    photons = rng.poisson(np.maximum(image, 0.0) * _PHOTONS_BRIGHT).astype(np.float32)
    photons += rng.normal(0.0, _READ_NOISE, image.shape).astype(np.float32)
    offset, bright = _SCALE[dtype]
    values = offset + photons * (bright / _PHOTONS_BRIGHT)
    info = np.iinfo(dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(dtype)


def _atomic_write(path: Path, array: np.ndarray, *, tiled: bool) -> None:
    """Write ``array`` to ``path`` under a hidden temporary name, then rename it into place."""
    with replacing(path) as tmp:
        if tiled:
            tifffile.imwrite(tmp, array, tile=(256, 256), compression="zlib")
        elif path.suffix == ".tif":
            tifffile.imwrite(tmp, array, compression="zlib")
        else:
            Image.fromarray(array).save(tmp, format="PNG")
