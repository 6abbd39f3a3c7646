"""Running a UNet over a stored image, block by block: the code path shared by validation and inference.

A :class:`BlockPredictor` holds the model (once per process) and turns a block of an OME-Zarr image ``(C, H, W)`` or
volume ``(C, D, H, W)`` into blended logits with :func:`unetcore.inference.stitch.predict_block`, normalising each
read with the image's statistics and the model's recipe. A 2-D model predicts a volume slice by slice (tiles one
slice deep, folded into the batch); a 3-D model predicts it with 3-D tiles.

Torch and the device kernel (:mod:`unetcore.inference.ondevice`) are imported only by the torch paths: a predictor
built by :meth:`BlockPredictor.from_forward` (onnxruntime, :mod:`unetcore.inference.runtime`) runs without them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from unetcore.config import NormalizationConfig
from unetcore.elementwise import sigmoid, to_float16
from unetcore.inference.background import masked_block_logits
from unetcore.inference.stitch import (
    Predictor,
    Reader,
    predict_block,
    skip_empty_predictor,
    slicewise_predictor,
    tta_predictor,
)
from unetcore.inference.windows import Block, Shape, TileGrid, plan_blocks
from unetcore.modes import BlockPath, Precision, ProbabilityDtype
from unetcore.store.stats import clip_range, normalize, scale_and_offset

if TYPE_CHECKING:
    import torch

    from unetcore.inference.ondevice import Affine, DeviceKernel, HostRegion


def torch_predictor(model: torch.nn.Module, device: torch.device, spatial_dims: int = 2,
                    precision: Precision = "auto") -> Predictor:
    """Wrap ``model`` as a numpy batch → logits function: inference mode, channels_last, bf16 autocast on CUDA
    (``precision`` ``fp32`` turns it off; see :func:`~unetcore.inference.ondevice.tensor_predictor`).

    ``spatial_dims`` is the model's (2: batches ``(B, C, h, w)``, 3: ``(B, C, d, h, w)``); it picks the memory format.
    """
    from unetcore.inference.ondevice import numpy_predictor, tensor_predictor

    return numpy_predictor(tensor_predictor(model, device, spatial_dims, precision), device)


CPU_BLOCK_PATH: BlockPath = "torch"
"""The block kernel on the CPU: the torch one, measured faster than numpy's there (BENCHMARKS.md, identity pipeline)."""


def affine_of(stats: dict[str, Any], recipe: NormalizationConfig) -> Affine:
    """The image's normalisation (its statistics and the model's recipe) as :class:`~unetcore.inference.ondevice.Affine`
    for the device kernel: the same numbers :func:`unetcore.store.stats.normalize` uses."""
    from unetcore.inference.ondevice import Affine

    scale, offset = scale_and_offset(stats, recipe)
    bounds = clip_range(stats, recipe)
    low, high = (None, None) if bounds is None else (tuple(bounds[0].tolist()), tuple(bounds[1].tolist()))
    return Affine(tuple(scale.tolist()), tuple(offset.tolist()), low, high, unit_clip=recipe.mode == "percentile")


def logits_to_outputs(logits: np.ndarray, num_classes: int, threshold: float = 0.5,
                      probability_dtype: ProbabilityDtype = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Blended logits (K, *spatial) → (probabilities (K, *spatial) in ``probability_dtype``, labels (*spatial) uint8).

    In float32: the sigmoid (:func:`~unetcore.elementwise.sigmoid`: numpy's formula for float32
    probabilities, onnxruntime's kernel for float16 ones, within 2.4e-7 of it and ≈ 6x faster), or the softmax over
    the class axis in numpy (its maximum subtracted first, in place on one new array); the float16 cast on
    onnxruntime's kernel (:func:`~unetcore.elementwise.to_float16`, the same bytes, ≈ 5x faster).
    """
    t = np.asarray(logits, np.float32)
    if num_classes == 1:
        probs = sigmoid(t, exact=probability_dtype != "float16")
        labels = (probs[0] > threshold).view(np.uint8)
    else:
        probs = t - t.max(axis=0, keepdims=True)
        np.exp(probs, out=probs)
        probs /= probs.sum(axis=0, keepdims=True)
        labels = probs.argmax(axis=0).astype(np.uint8)
    return (to_float16(probs) if probability_dtype == "float16" else probs), labels


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


def _raw_reader(image: zarr.Array) -> Reader:
    """Reads the raw pixels ``(C, *box)`` of ``image`` (any array-like: Zarr, numpy)."""

    def read(*box: slice) -> np.ndarray:
        return np.asarray(image[(slice(None), *box)])

    return read


@dataclass
class BlockPredictor:
    """Everything needed to predict blocks of one image: model, recipe, grid and batching.

    ``predictor`` takes numpy batches of the image's dimension (a 2-D model is wrapped by
    :func:`~unetcore.inference.stitch.slicewise_predictor`); ``spatial_dims`` is the model's. With a ``kernel``
    (:meth:`from_model` gives one on CUDA, and on the CPU when :data:`CPU_BLOCK_PATH` is ``torch``) blocks run on
    the device end to end (:mod:`unetcore.inference.ondevice`), reads of the next block overlapping compute in
    :meth:`blocks`; without one, the numpy kernel :func:`~unetcore.inference.stitch.predict_block` runs.
    """

    predictor: Predictor
    num_classes: int
    recipe: NormalizationConfig
    tile: int | Shape
    overlap: float
    batch_size: int
    threshold: float = 0.5
    spatial_dims: int = 2
    kernel: DeviceKernel | None = None

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, config: dict[str, Any], device: torch.device, *, tile: int | Shape,
        overlap: float, batch_size: int, threshold: float = 0.5, tta: bool = False, skip_empty: bool = False,
        precision: Precision = "auto", auto_batch: bool = False, path: BlockPath | None = None,
    ) -> BlockPredictor:
        """Build from a loaded model and its ``config.json`` content (without ``spatial_dims``: a 2-D model).

        ``tta`` averages the flips of the model's axes (4 in 2-D, 8 in 3-D; on the device kernel stacked into one
        batch); ``skip_empty`` gives constant tiles background logits without a forward; ``precision`` ``fp32``
        turns off CUDA's bf16 autocast; ``auto_batch`` sizes the tile batch from free GPU memory (on CUDA only;
        ``batch_size`` elsewhere); ``path`` picks the kernel (None: ``torch`` on CUDA, :data:`CPU_BLOCK_PATH` on
        the CPU).
        """
        from unetcore.inference.ondevice import (
            DeviceKernel,
            numpy_predictor,
            probe_batch_size,
            skip_empty_tensor_predictor,
            slicewise_tensor_predictor,
            tensor_predictor,
            tta_tensor_predictor,
        )

        num_classes = int(config["model"]["num_classes"])
        dims = int(config["model"].get("spatial_dims", 2))
        forward = tensor_predictor(model, device, dims, precision)
        predictor = numpy_predictor(forward, device)
        chosen = path or ("torch" if device.type == "cuda" else CPU_BLOCK_PATH)
        kernel = None
        if chosen == "torch":
            tensors = tta_tensor_predictor(forward) if tta else forward
            tensors = slicewise_tensor_predictor(tensors) if dims == 2 else tensors
            if auto_batch:
                channels = int(config["model"].get("in_channels", 1))
                batch_size = probe_batch_size(tensors, channels, tile_shape(tile, dims, dims), device, batch_size)
            tensors = skip_empty_tensor_predictor(tensors, num_classes) if skip_empty else tensors
            kernel = DeviceKernel(tensors, device, num_classes, threshold)
        bp = cls.from_forward(predictor, config, tile=tile, overlap=overlap, batch_size=batch_size,
                              threshold=threshold, tta=tta, skip_empty=skip_empty)
        bp.kernel = kernel
        return bp

    @classmethod
    def from_forward(
        cls, forward: Predictor, config: dict[str, Any], *, tile: int | Shape, overlap: float, batch_size: int,
        threshold: float = 0.5, tta: bool = False, skip_empty: bool = False,
    ) -> BlockPredictor:
        """Build the numpy-path predictor around ``forward``, a numpy batch ``(B, C, *tile)`` → logits function of
        the model's own dimension (an onnxruntime session, or a wrapped torch model); ``config`` and the options
        as in :meth:`from_model`."""
        num_classes = int(config["model"]["num_classes"])
        dims = int(config["model"].get("spatial_dims", 2))
        predictor = tta_predictor(forward) if tta else forward
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

    def _host_region(self, image: zarr.Array, grid: TileGrid, block: Block) -> HostRegion:
        from unetcore.inference.ondevice import read_region

        return read_region(_raw_reader(image), tuple(image.shape[1:]), grid, block)

    def logits(self, image: zarr.Array, stats: dict[str, Any], grid: TileGrid, block: Block,
               keep: np.ndarray | None = None) -> np.ndarray:
        """Blended logits (K, *block.shape) of ``block`` of ``image`` (C, [D,] H, W).

        ``keep`` (one bool per grid tile, :func:`~unetcore.inference.background.tile_keep_mask`) computes only the
        kept tiles, on the numpy path; what none covers is exact background."""
        channels, *spatial = image.shape
        if self.kernel is not None and keep is None:
            import torch

            host = self._host_region(image, grid, block)
            with torch.inference_mode():
                return self.kernel.logits(host, channels, affine_of(stats, self.recipe), grid, block,
                                          self.batch_size).cpu().numpy()

        def read(*box: slice) -> np.ndarray:
            return normalize(np.asarray(image[(slice(None), *box)]), stats, self.recipe)

        if keep is not None:
            return masked_block_logits(read, tuple(spatial), channels, self.predictor, grid, block, self.batch_size,
                                       keep, self.num_classes)
        return predict_block(read, tuple(spatial), channels, self.predictor, grid, block, self.batch_size)

    def outputs(self, image: zarr.Array, stats: dict[str, Any], grid: TileGrid, block: Block,
                probability_dtype: str | None = "float32", host: HostRegion | None = None
                ) -> tuple[np.ndarray | None, np.ndarray]:
        """(probabilities ``(K, *block.shape)`` in ``probability_dtype``, or None when it is None; labels uint8).

        On the device kernel everything stays on the device and each output is copied back once; ``host`` is the
        block's region when it was read ahead (:meth:`blocks`).
        """
        if self.kernel is None:
            probs, labels = logits_to_outputs(self.logits(image, stats, grid, block), self.num_classes,
                                              self.threshold, probability_dtype or "float16")
            return (None if probability_dtype is None else probs), labels
        host = self._host_region(image, grid, block) if host is None else host
        return self.kernel.outputs(host, image.shape[0], affine_of(stats, self.recipe), grid, block, self.batch_size,
                                   probability_dtype)

    def blocks(
        self, image: zarr.Array, stats: dict[str, Any], block_size: int | Shape
    ) -> Iterator[tuple[Block, np.ndarray, np.ndarray]]:
        """Yield ``(block, probabilities, labels)`` for every block of the image, in order (one process).

        ``block_size`` is a block edge (the same on every axis) or a block shape. On the device kernel a thread
        reads the next block's pixels while this one computes.
        """
        shape = tuple(image.shape[1:])
        grid = self.grid(shape)
        block = (block_size,) * len(shape) if isinstance(block_size, int) else tuple(block_size)
        plan = plan_blocks(shape, block)
        if self.kernel is None:
            for b in plan:
                probs, labels = logits_to_outputs(self.logits(image, stats, grid, b), self.num_classes, self.threshold)
                yield b, probs, labels
            return
        from unetcore.inference.ondevice import predict_blocks

        affine = affine_of(stats, self.recipe)
        for b, probs, labels in predict_blocks(self.kernel, _raw_reader(image), shape, image.shape[0], affine, grid, plan,
                                               self.batch_size, "float32"):
            assert probs is not None
            yield b, probs, labels
