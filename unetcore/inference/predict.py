"""Running a UNet over a stored image, block by block: the code path shared by validation and inference.

A :class:`BlockPredictor` holds the model (once per process) and turns a block of an OME-Zarr image ``(C, H, W)`` or
volume ``(C, D, H, W)`` into blended logits with :func:`unetcore.inference.stitch.predict_block`, normalising each
read with the image's statistics and the model's recipe. A 2-D model predicts a volume slice by slice (tiles one
slice deep, folded into the batch); a 3-D model predicts it with 3-D tiles.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from unetcore.config import NormalizationConfig
from unetcore.inference.background import masked_block_logits
from unetcore.inference.stitch import (
    Predictor,
    predict_block,
    skip_empty_predictor,
    slicewise_predictor,
    tta_predictor,
)
from unetcore.inference.windows import Block, Shape, TileGrid, plan_blocks
from unetcore.store.stats import normalize


def torch_predictor(model: torch.nn.Module, device: torch.device, spatial_dims: int = 2) -> Predictor:
    """Wrap ``model`` as a numpy batch → logits function: inference mode, channels-last on CPU, AMP on CUDA.

    ``spatial_dims`` is the model's (2: batches ``(B, C, h, w)``, 3: ``(B, C, d, h, w)``); it picks the memory format.
    """
    fmt = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
    model = model.to(device).eval()
    if device.type == "cpu":
        model = model.to(memory_format=fmt)

    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
        if device.type == "cpu":
            x = x.contiguous(memory_format=fmt)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model(x).float().cpu().numpy()

    return run


def logits_to_outputs(logits: np.ndarray, num_classes: int, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Blended logits (K, *spatial) → (probabilities (K, *spatial) float32, labels (*spatial) uint8)."""
    t = torch.from_numpy(logits)
    if num_classes == 1:
        probs = torch.sigmoid(t)
        labels = (probs[0] > threshold).to(torch.uint8)
    else:
        probs = torch.softmax(t, dim=0)
        labels = probs.argmax(dim=0).to(torch.uint8)
    return probs.numpy(), labels.numpy()


def tile_shape(tile: int | Shape, spatial_dims: int, ndim: int) -> Shape:
    """The tile a model of ``spatial_dims`` uses on an image of ``ndim`` spatial axes.

    ``tile`` is an edge (the same on every axis the model sees) or a shape; a 2-D model on a volume gets tiles
    one slice deep, ``(1, th, tw)``.

    Raises:
        ValueError: a 3-D model on a 2-D image, or a tile shape with the wrong number of axes.
    """
    if spatial_dims > ndim:
        raise ValueError(f"a {spatial_dims}-D model cannot predict a {ndim}-D image")
    edges = (int(tile),) * spatial_dims if isinstance(tile, int) else tuple(int(t) for t in tile)
    if len(edges) != spatial_dims:
        raise ValueError(f"tile {tile!r} does not have the model's {spatial_dims} axes")
    return (1,) * (ndim - spatial_dims) + edges


@dataclass
class BlockPredictor:
    """Everything needed to predict blocks of one image: model, recipe, grid and batching.

    ``predictor`` takes batches of the image's dimension (a 2-D model is wrapped by
    :func:`~unetcore.inference.stitch.slicewise_predictor`); ``spatial_dims`` is the model's.
    """

    predictor: Predictor
    num_classes: int
    recipe: NormalizationConfig
    tile: int | Shape
    overlap: float
    batch_size: int
    threshold: float = 0.5
    spatial_dims: int = 2

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, config: dict[str, Any], device: torch.device, *, tile: int | Shape,
        overlap: float, batch_size: int, threshold: float = 0.5, tta: bool = False, skip_empty: bool = False,
    ) -> BlockPredictor:
        """Build from a loaded model and its ``config.json`` content (without ``spatial_dims``: a 2-D model).

        ``tta`` averages the flips of the model's axes (4 in 2-D, 8 in 3-D); ``skip_empty`` gives constant tiles
        background logits without a forward.
        """
        num_classes = int(config["model"]["num_classes"])
        dims = int(config["model"].get("spatial_dims", 2))
        predictor = torch_predictor(model, device, dims)
        predictor = tta_predictor(predictor) if tta else predictor
        predictor = slicewise_predictor(predictor) if dims == 2 else predictor
        return cls(
            predictor=skip_empty_predictor(predictor, num_classes) if skip_empty else predictor,
            num_classes=num_classes,
            recipe=NormalizationConfig(**config.get("normalization", {})),
            tile=tile,
            overlap=overlap,
            batch_size=batch_size,
            threshold=threshold,
            spatial_dims=dims,
        )

    def grid(self, shape: Shape) -> TileGrid:
        """The global tile grid of an image (H, W) or volume (D, H, W), computed once, identical in every block."""
        return TileGrid.build(shape, tile_shape(self.tile, self.spatial_dims, len(shape)), self.overlap)

    def logits(self, image: zarr.Array, stats: dict[str, Any], grid: TileGrid, block: Block,
               keep: np.ndarray | None = None) -> np.ndarray:
        """Blended logits (K, *block.shape) of ``block`` of ``image`` (C, [D,] H, W).

        ``keep`` (one bool per grid tile, :func:`~unetcore.inference.background.tile_keep_mask`) computes only the
        kept tiles; what none covers is exact background."""
        channels, *spatial = image.shape

        def read(*box: slice) -> np.ndarray:
            return normalize(np.asarray(image[(slice(None), *box)]), stats, self.recipe)

        if keep is not None:
            return masked_block_logits(read, tuple(spatial), channels, self.predictor, grid, block, self.batch_size,
                                       keep, self.num_classes)
        return predict_block(read, tuple(spatial), channels, self.predictor, grid, block, self.batch_size)

    def blocks(
        self, image: zarr.Array, stats: dict[str, Any], block_size: int | Shape
    ) -> Iterator[tuple[Block, np.ndarray, np.ndarray]]:
        """Yield ``(block, probabilities, labels)`` for every block of the image, in order (one process).

        ``block_size`` is a block edge (the same on every axis) or a block shape.
        """
        shape = tuple(image.shape[1:])
        grid = self.grid(shape)
        block = (block_size,) * len(shape) if isinstance(block_size, int) else tuple(block_size)
        for b in plan_blocks(shape, block):
            probs, labels = logits_to_outputs(self.logits(image, stats, grid, b), self.num_classes, self.threshold)
            yield b, probs, labels
