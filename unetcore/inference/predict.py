"""Running a UNet over a stored image, block by block: the code path shared by validation and inference.

A :class:`BlockPredictor` holds the model (once per process) and turns a block of an OME-Zarr image into
blended logits with :func:`unetcore.inference.stitch.predict_block`, normalising each read with the image's
statistics and the model's recipe.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from unetcore.config import NormalizationConfig
from unetcore.inference.stitch import (
    Predictor,
    predict_block,
    skip_empty_predictor,
    tta_predictor,
)
from unetcore.inference.windows import Block, TileGrid, plan_blocks
from unetcore.store.stats import normalize


def resolve_device(name: str, index: int = 0) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU falls back to CPU.

    ``index`` picks the GPU (taken modulo the number visible), so worker ``i`` of a local cluster with one
    worker per GPU runs on GPU ``i``.
    """
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", index % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def torch_predictor(model: torch.nn.Module, device: torch.device) -> Predictor:
    """Wrap ``model`` as a numpy batch → logits function: inference mode, channels_last, AMP on CUDA."""
    model = model.to(device).eval()
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)

    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model(x).float().cpu().numpy()

    return run


def logits_to_outputs(logits: np.ndarray, num_classes: int, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Blended logits (K, h, w) → (probabilities (K, h, w) float32, labels (h, w) uint8)."""
    t = torch.from_numpy(logits)
    if num_classes == 1:
        probs = torch.sigmoid(t)
        labels = (probs[0] > threshold).to(torch.uint8)
    else:
        probs = torch.softmax(t, dim=0)
        labels = probs.argmax(dim=0).to(torch.uint8)
    return probs.numpy(), labels.numpy()


@dataclass
class BlockPredictor:
    """Everything needed to predict blocks of one image: model, recipe, grid and batching."""

    predictor: Predictor
    num_classes: int
    recipe: NormalizationConfig
    tile: int
    overlap: float
    batch_size: int
    threshold: float = 0.5

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, config: dict[str, Any], device: torch.device, *, tile: int, overlap: float,
        batch_size: int, threshold: float = 0.5, tta: bool = False, skip_empty: bool = False,
    ) -> BlockPredictor:
        """Build from a loaded model and its ``config.json`` content.

        ``tta`` averages the 4 flips; ``skip_empty`` gives constant tiles background logits without a forward.
        """
        num_classes = int(config["model"]["num_classes"])
        predictor = torch_predictor(model, device)
        predictor = tta_predictor(predictor) if tta else predictor
        return cls(
            predictor=skip_empty_predictor(predictor, num_classes) if skip_empty else predictor,
            num_classes=num_classes,
            recipe=NormalizationConfig(**config.get("normalization", {})),
            tile=tile,
            overlap=overlap,
            batch_size=batch_size,
            threshold=threshold,
        )

    def grid(self, shape_yx: tuple[int, int]) -> TileGrid:
        """The global tile grid of an image (computed once per image, identical in every block)."""
        return TileGrid.build(shape_yx, (self.tile, self.tile), self.overlap)

    def logits(self, image: zarr.Array, stats: dict[str, Any], grid: TileGrid, block: Block) -> np.ndarray:
        """Blended logits (K, bh, bw) of ``block`` of ``image`` (C, H, W)."""
        channels, height, width = image.shape

        def read(ys: slice, xs: slice) -> np.ndarray:
            return normalize(np.asarray(image[:, ys, xs]), stats, self.recipe)

        return predict_block(read, (height, width), channels, self.predictor, grid, block, self.batch_size)

    def blocks(
        self, image: zarr.Array, stats: dict[str, Any], block_size: int
    ) -> Iterator[tuple[Block, np.ndarray, np.ndarray]]:
        """Yield ``(block, probabilities, labels)`` for every block of the image, in order (one process)."""
        shape = image.shape[1:]
        grid = self.grid(shape)
        for block in plan_blocks(shape, (block_size, block_size)):
            probs, labels = logits_to_outputs(self.logits(image, stats, grid, block), self.num_classes, self.threshold)
            yield block, probs, labels
