"""Normalisation statistics computed while streaming, and the normalisation they drive.

Integer images are summarised by an exact per-channel histogram (so percentiles are exact); float images by a
bounded, evenly strided sample. Mean and std are exact for both. The statistics live in the image's metadata;
training stores the recipe (:class:`~unetcore.config.NormalizationConfig`) with the model, and inference applies
exactly :func:`normalize` with that recipe and the image's statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unetcore.config import NormalizationConfig

PERCENTILES = (0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 98.0, 99.0, 99.5, 99.9, 100.0)
FLOAT_SAMPLE = 2_000_000


_SUB_BLOCK = 1 << 20  # pixels per update step: bounds the float64 temporaries to ~24 MB per thread


class StreamingStats:
    """Accumulate per-channel statistics over regions of an image (h, w, C) or a volume (d, h, w, C), then
    :meth:`result`.

    Regions may be filled by parallel workers into separate instances and combined with :meth:`merge` (in a
    fixed order, for a reproducible result). Integer images keep an exact histogram (mean and std follow from
    it); float images keep every ``n``-th pixel, with ``n`` set from ``image_pixels`` so the sample stays near
    ``FLOAT_SAMPLE`` pixels however many regions (``image_pixels=0``: keep every pixel, for small inputs).
    """

    def __init__(self, channels: int, dtype: np.dtype, image_pixels: int = 0) -> None:
        self.channels = channels
        self.dtype = np.dtype(dtype)
        self.count = 0
        self.sum = np.zeros(channels, np.float64)
        self.sumsq = np.zeros(channels, np.float64)
        self._integer = np.issubdtype(self.dtype, np.integer) and self.dtype.itemsize <= 2
        self._stride = max(1, image_pixels // FLOAT_SAMPLE)
        if self._integer:
            info = np.iinfo(self.dtype)
            self._offset = -int(info.min)
            self._hist = np.zeros((channels, int(info.max) - int(info.min) + 1), np.int64)
            values = np.arange(self._hist.shape[1], dtype=np.float64) - self._offset
            self._values, self._squares = values, values * values
        else:
            self._samples: list[np.ndarray] = []

    def update(self, band: np.ndarray) -> None:
        """Add a region of pixels, shape (..., C)."""
        flat = band.reshape(-1, self.channels)
        for start in range(0, flat.shape[0], _SUB_BLOCK):
            part = flat[start : start + _SUB_BLOCK]
            self.count += part.shape[0]
            if self._integer:
                for c in range(self.channels):
                    hist = _histogram(part[:, c])
                    self._hist[c] += hist
                    self.sum[c] += hist @ self._values
                    self.sumsq[c] += hist @ self._squares
            else:
                as_float = part.astype(np.float64)
                self.sum += as_float.sum(axis=0)
                self.sumsq += np.einsum("ij,ij->j", as_float, as_float)
                self._samples.append(part[:: self._stride].astype(np.float32))

    def merge(self, other: StreamingStats) -> None:
        """Add another region's statistics (call in region order for a reproducible result)."""
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        if self._integer:
            self._hist += other._hist
        else:
            self._samples.extend(other._samples)

    def _percentiles(self, c: int) -> list[float]:
        if self._integer:
            cdf = np.cumsum(self._hist[c])
            total = cdf[-1]
            values = []
            for p in PERCENTILES:
                idx = int(np.searchsorted(cdf, max(1, total * p / 100.0)))
                values.append(float(idx - self._offset))
            return values
        sample = np.concatenate([s[:, c] for s in self._samples])
        return [float(v) for v in np.percentile(sample, PERCENTILES)]

    def result(self) -> dict[str, Any]:
        """Per-channel mean, std and percentiles (``{"channels": [...], "pixels": n}``)."""
        n = max(self.count, 1)
        mean = self.sum / n
        std = np.sqrt(np.maximum(self.sumsq / n - mean * mean, 0.0))
        channels = []
        for c in range(self.channels):
            pct = self._percentiles(c)
            channels.append(
                {
                    "mean": float(mean[c]),
                    "std": float(std[c]),
                    "min": pct[0],
                    "max": pct[-1],
                    "percentiles": {str(p): v for p, v in zip(PERCENTILES, pct, strict=True)},
                }
            )
        return {"pixels": int(self.count), "channels": channels}


def _histogram(values: np.ndarray) -> np.ndarray:
    """Counts of every value of a uint8/uint16/int16 vector, indexed from the dtype's minimum."""
    values = np.ascontiguousarray(values)
    if values.dtype == np.uint8:
        # count pixel pairs as uint16 (half the elements for bincount's slow loop), then split the pairs
        even = values.size // 2 * 2
        pairs = np.bincount(values[:even].view(np.uint16), minlength=1 << 16).reshape(256, 256)
        counts = pairs.sum(axis=0) + pairs.sum(axis=1)
        if even < values.size:
            counts[values[-1]] += 1
        return counts
    if values.dtype == np.int16:  # count the bit patterns, then rotate so that index 0 is -32768
        return np.roll(np.bincount(values.view(np.uint16), minlength=1 << 16), 1 << 15)
    return np.bincount(values, minlength=1 << 16)


def percentile(channel_stats: dict[str, Any], p: float) -> float:
    """Percentile ``p`` of one channel, interpolated between the stored ones."""
    keys = sorted(channel_stats["percentiles"], key=float)
    xs = [float(k) for k in keys]
    ys = [channel_stats["percentiles"][k] for k in keys]
    return float(np.interp(p, xs, ys))


def scale_and_offset(stats: dict[str, Any], recipe: NormalizationConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, offset) such that ``normalized = (x - offset) * scale`` before clipping."""
    offsets, scales = [], []
    for ch in stats["channels"]:
        if recipe.mode == "zscore":
            lo, spread = ch["mean"], ch["std"]
        else:
            lo = percentile(ch, recipe.low_percentile)
            spread = percentile(ch, recipe.high_percentile) - lo
        offsets.append(lo)
        scales.append(1.0 / spread if spread > 1e-12 else 1.0)
    return np.asarray(scales, np.float32), np.asarray(offsets, np.float32)


def normalize(block_cyx: np.ndarray, stats: dict[str, Any], recipe: NormalizationConfig) -> np.ndarray:
    """Normalise a block (C, h, w) or (C, d, h, w) of raw intensities into network inputs (float32).

    percentile mode clips to [low, high] percentiles and maps them to [0, 1]; zscore subtracts the mean and
    divides by the std. The same call serves training patches and inference tiles.
    """
    scale, offset = scale_and_offset(stats, recipe)
    per_channel = (-1,) + (1,) * (block_cyx.ndim - 1)  # broadcast over any number of spatial axes
    out = (block_cyx.astype(np.float32) - offset.reshape(per_channel)) * scale.reshape(per_channel)
    if recipe.mode == "percentile":
        np.clip(out, 0.0, 1.0, out=out)
    return out
