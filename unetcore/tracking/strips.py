"""Preview strips (image, truth overlay, prediction overlay) as plain arrays: MLflow logs them, inference writes
them as PNG previews; kept apart from the MLflow module so that a prediction's preview does not import MLflow."""

from __future__ import annotations

import numpy as np

__all__ = ["preview_strip"]


def preview_strip(image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray) -> np.ndarray:
    """Side-by-side uint8 RGB strip: the image, the truth overlay (green), the prediction overlay (magenta).

    Args:
        image: (C, H, W) or (H, W). Three channels are shown as RGB, one as grey, any other count by its first
            channel in grey; each channel is stretched between its 1st and 99th percentiles.
        truth: (H, W) labels, or None (no truth panel).
        pred: (H, W) labels.

    Returns:
        (H, k·W, 3) uint8, k = 3 with truth, 2 without.
    """
    channels = image[None] if image.ndim == 2 else (image if image.shape[0] == 3 else image[:1])
    base = np.stack([_stretch(c) for c in channels], -1)
    if base.shape[-1] == 1:
        base = np.repeat(base, 3, -1)

    def overlay(labels: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
        """Half image, half ``colour`` where ``labels`` > 0: floor((pixel + colour) / 2), in integers."""
        mixed = ((base.astype(np.uint16) + np.array(colour, np.uint16)) >> 1).astype(np.uint8)
        return np.where((labels > 0)[..., None], mixed, base)

    panels = [base]
    if truth is not None:
        panels.append(overlay(truth, (0, 255, 0)))
    panels.append(overlay(pred, (255, 0, 255)))
    return np.concatenate(panels, axis=1)


def _stretch(channel: np.ndarray) -> np.ndarray:
    """(H, W) values to uint8, linearly between their 1st and 99th percentiles."""
    lo, hi = np.percentile(channel, [1, 99])
    return (np.clip((channel - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
