"""Normalisation statistics computed while streaming, and the normalisation they drive.

Integer images are summarised by an exact per-channel histogram (so percentiles are exact); float images by a
bounded, evenly strided sample. Mean and std are exact for both. The statistics live in the image's metadata;
training stores the recipe (:class:`~unetcore.config.NormalizationConfig`) with the model, and inference applies
exactly :func:`normalize` with that recipe and the image's statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unetcore.config import ForegroundIntensity, NormalizationConfig
from unetcore.errors import ConfigError

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
    """Per-channel (scale, offset) such that ``normalized = (x - offset) * scale`` (after :func:`clip_range`'s clip
    in ``ct`` mode, before the ``[0, 1]`` clip of ``percentile`` mode)."""
    if recipe.mode == "ct":
        fitted = fitted_foreground(recipe, len(stats["channels"]))
        return (np.asarray([1.0 / f.std if f.std > 1e-12 else 1.0 for f in fitted], np.float32),
                np.asarray([f.mean for f in fitted], np.float32))
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


def clip_range(stats: dict[str, Any], recipe: NormalizationConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel ``(low, high)`` raw intensities clipped to before scaling (``ct`` mode), else None."""
    if recipe.mode != "ct":
        return None
    fitted = fitted_foreground(recipe, len(stats["channels"]))
    return np.asarray([f.low for f in fitted], np.float32), np.asarray([f.high for f in fitted], np.float32)


def normalize(block: np.ndarray, stats: dict[str, Any], recipe: NormalizationConfig) -> np.ndarray:
    """Normalise a block (C, h, w) or (C, d, h, w) of raw intensities into network inputs (float32).

    percentile mode clips to the image's [low, high] percentiles and maps them to [0, 1]; zscore subtracts the
    image's mean and divides by its std; ct clips to the training set's foreground [low, high] percentiles, then
    subtracts the foreground mean and divides by its std (values in ``recipe.foreground``, not in ``stats``).
    The same call serves training patches and inference tiles. It holds one float32 copy of the block (the
    steps run in place), so a block's normalisation costs its float32 size once, not three times.
    """
    scale, offset = scale_and_offset(stats, recipe)
    per_channel = (-1,) + (1,) * (block.ndim - 1)
    values = block.astype(np.float32)  # the one float32 copy; every step below works in place on it
    bounds = clip_range(stats, recipe)
    if bounds is not None:
        np.clip(values, bounds[0].reshape(per_channel), bounds[1].reshape(per_channel), out=values)
    values -= offset.reshape(per_channel)
    values *= scale.reshape(per_channel)
    if recipe.mode == "percentile":
        np.clip(values, 0.0, 1.0, out=values)
    return values


# --- ct: statistics of the training set's foreground ------------------------------------------------------


def fitted_foreground(recipe: NormalizationConfig, channels: int) -> list[ForegroundIntensity]:
    """The ``ct`` recipe's per-channel foreground intensities, checked against the image's channel count.

    Raises:
        ConfigError: the recipe was never fitted (see :func:`fit_normalization`) or has another channel count.
    """
    if recipe.foreground is None:
        raise ConfigError("normalization.foreground", "ct normalisation has not been fitted on a training set "
                          "(training fills it in from the ingested foreground statistics)")
    if len(recipe.foreground) != channels:
        raise ConfigError("normalization.foreground",
                          f"fitted on images of {len(recipe.foreground)} channel(s), the image has {channels}")
    return list(recipe.foreground)


def _cdf_knots(channel: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One channel's stored percentiles as a CDF: distinct values, the CDF (in %) just below and at each."""
    keys = sorted(channel["percentiles"], key=float)
    ps = np.array([float(k) for k in keys])
    xs = np.array([float(channel["percentiles"][k]) for k in keys])
    values = np.unique(xs)
    below = np.array([ps[xs == v].min() for v in values])
    at = np.array([ps[xs == v].max() for v in values])
    return values, below, at


def _cdf_at(knots: tuple[np.ndarray, np.ndarray, np.ndarray], x: float) -> tuple[float, float]:
    """``(F(x-), F(x))`` in % of one channel's CDF, linear between its stored percentiles."""
    values, below, at = knots
    if x < values[0]:
        return 0.0, 0.0
    if x > values[-1]:
        return 100.0, 100.0
    k = int(np.searchsorted(values, x))
    if values[k] == x:
        return float(below[k]), float(at[k])
    t = (x - values[k - 1]) / (values[k] - values[k - 1])
    v = float(at[k - 1] + t * (below[k] - at[k - 1]))
    return v, v


def mixture_percentile(channels: list[dict[str, Any]], weights: list[float], p: float) -> float:
    """Percentile ``p`` of the union of several images' pixels, from each image's stored percentiles.

    The union's CDF is the ``weights``-weighted mean (pixel counts) of the images' CDFs, each linear between its
    stored percentiles; the result is its smallest value reaching ``p``. Exact for one image at a stored
    percentile, and wherever the stored percentiles of every image bracket the answer exactly.
    """
    knots = [_cdf_knots(ch) for ch in channels]
    w = np.asarray(weights, np.float64) / float(np.sum(weights))
    grid = np.unique(np.concatenate([k[0] for k in knots]))

    def mixed(x: float) -> tuple[float, float]:
        both = np.array([_cdf_at(k, x) for k in knots])
        return float(w @ both[:, 0]), float(w @ both[:, 1])

    previous = None
    for x in grid:
        left, value = mixed(float(x))
        if value >= p:
            if previous is None or left <= p:
                return float(x)
            x0, f0 = previous  # the crossing lies inside (x0, x), where the mixed CDF is linear
            return float(x0 + (p - f0) / (left - f0) * (x - x0))
        previous = (float(x), value)
    return float(grid[-1])


def pooled_mean_std(channels: list[dict[str, Any]], counts: list[int]) -> tuple[float, float]:
    """Exact mean and std of the union of several images' pixels from each one's count, mean and std."""
    n = np.asarray(counts, np.float64)
    mean = np.array([ch["mean"] for ch in channels], np.float64)
    std = np.array([ch["std"] for ch in channels], np.float64)
    total = n.sum()
    pooled = float(n @ mean / total)
    second = float(n @ (std * std + mean * mean) / total)
    return pooled, float(np.sqrt(max(second - pooled * pooled, 0.0)))


def fit_normalization(recipe: NormalizationConfig, entries: list[dict[str, Any]]) -> NormalizationConfig:
    """The recipe with its dataset statistics filled in from the training ``entries`` (manifest entries).

    ``ct`` mode takes, per channel, the ``low_percentile`` / ``high_percentile`` of the foreground (mask > 0)
    intensities over all the labelled entries (:func:`mixture_percentile`) and their exact pooled mean and std
    (:func:`pooled_mean_std`), from the ``foreground_stats`` ingestion streamed per image, as nnU-Net's CT
    scheme; the other modes are per image and come back unchanged.

    Raises:
        ConfigError: ``ct`` mode and a labelled entry has no foreground statistics (ingested before they were
            kept), or no labelled entry has any foreground.
    """
    if recipe.mode != "ct":
        return recipe
    summaries = []
    for entry in entries:
        if not entry.get("has_mask"):
            continue
        fg = entry.get("foreground_stats")
        if fg is None:
            raise ConfigError("normalization.mode", f"ct needs the foreground statistics of '{entry['id']}', "
                              "which its ingestion did not keep; re-ingest the dataset with --force")
        if fg["pixels"] > 0:
            summaries.append(fg)
    if not summaries:
        raise ConfigError("normalization.mode", "ct needs foreground pixels, and no training mask has any")
    counts = [s["pixels"] for s in summaries]
    fitted = []
    for c in range(len(summaries[0]["channels"])):
        channels = [s["channels"][c] for s in summaries]
        mean, std = pooled_mean_std(channels, counts)
        fitted.append(ForegroundIntensity(low=mixture_percentile(channels, counts, recipe.low_percentile),
                                          high=mixture_percentile(channels, counts, recipe.high_percentile),
                                          mean=mean, std=std))
    return recipe.model_copy(update={"foreground": fitted})
