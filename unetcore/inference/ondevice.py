"""The block kernel in torch, on the model's device: nnU-Net's ``perform_everything_on_device`` for one block.

The same algorithm as :func:`unetcore.inference.stitch.predict_block` (global tile grid, global Gaussian weights,
the block's tiles in batches, ``prediction * weight`` and ``weight`` summed over the block's extent only), with
every step a torch op on one device: the raw pixels are copied in once (pinned, ``non_blocking`` on CUDA),
normalised there, cut into tiles, predicted, blended, turned into probabilities and labels, and copied back once
(probabilities in their stored dtype, labels as uint8). On the CPU it is the same code on CPU tensors, which is
what the tests compare with the numpy kernel (≤ 1e-5 on probabilities, identical labels).

This module imports only torch, numpy and the pure geometry, so a benchmark can run it without the config
system, Zarr or Dask.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from unetcore.inference.stitch import BACKGROUND_LOGIT, Reader, flip_axes
from unetcore.inference.windows import (
    Block,
    Shape,
    TileGrid,
    gaussian_weight_sum,
    gaussian_weights,
    region_for_tiles,
    tile_batches,
    tile_overlap,
    tile_window,
    tiles_for_block,
)

log = logging.getLogger("unetcore.inference")

TensorPredictor = Callable[[torch.Tensor], torch.Tensor]
"""Maps a batch ``(B, C, *tile)`` float32 tensor to logits ``(B, K, *tile)`` on the same device."""

MAX_AUTO_BATCH = 128
"""Largest tile batch sized from free device memory (nnU-Net-sized GPUs fill up well before this)."""


@dataclass(frozen=True)
class Affine:
    """Normalisation as ``clip(x, low, high)`` → ``(x - offset) * scale`` → ``clip(·, 0, 1)`` if ``unit_clip``, per
    channel: the three modes of :func:`unetcore.store.stats.normalize` (``low``/``high`` are None but in ``ct``)."""

    scale: tuple[float, ...]
    offset: tuple[float, ...]
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    unit_clip: bool = False


def _per_channel(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).reshape(-1, *(1,) * (like.ndim - 1))


def normalize_tensor(raw: torch.Tensor, affine: Affine) -> torch.Tensor:
    """Raw intensities ``(C, *box)`` (any real dtype) → float32 network inputs, the same float32 ops as numpy's."""
    x = raw.to(torch.float32)
    if affine.low is not None and affine.high is not None:
        x = torch.clamp(x, _per_channel(affine.low, x), _per_channel(affine.high, x))
    x = (x - _per_channel(affine.offset, x)) * _per_channel(affine.scale, x)
    return x.clamp_(0.0, 1.0) if affine.unit_clip else x


def normalize_array(raw: np.ndarray, affine: Affine) -> np.ndarray:
    """:func:`normalize_tensor` in numpy (the same float32 ops, the same result), for CPU blocks, where numpy's
    in-place passes measured faster than torch's (BENCHMARKS.md, identity pipeline)."""
    shape = (-1,) + (1,) * (raw.ndim - 1)
    x = raw.astype(np.float32)
    if affine.low is not None and affine.high is not None:
        np.clip(x, np.float32(affine.low).reshape(shape), np.float32(affine.high).reshape(shape), out=x)
    x = (x - np.asarray(affine.offset, np.float32).reshape(shape)) * np.asarray(affine.scale, np.float32).reshape(shape)
    return np.clip(x, 0.0, 1.0, out=x) if affine.unit_clip else x


_TORCH_DTYPES = (np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``: on CUDA through pinned memory with a ``non_blocking`` copy.

    Integer pixels travel as they are (a quarter of float32's bytes for uint8); dtypes torch cannot take from
    numpy (uint16, uint32, float64) become float32 first, exactly as numpy's normalisation would cast them.
    """
    array = np.ascontiguousarray(array)
    if array.dtype.type not in _TORCH_DTYPES:
        array = array.astype(np.float32)
    t = torch.from_numpy(array)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class HostRegion:
    """The raw pixels one block needs, read on the host: ``pixels`` ``(C, *inside)`` at ``inside`` of ``region``
    (the rest of the region lies outside the image and is zero after normalisation)."""

    region: Block
    inside: tuple[slice, ...]
    pixels: np.ndarray | None


def read_region(read_raw: Reader, image_shape: Shape, grid: TileGrid, block: Block) -> HostRegion:
    """Read the raw pixels of the bounding region of every tile touching ``block`` (the I/O half of the kernel,
    which a prefetch thread can run for the next block while this one computes)."""
    region = region_for_tiles(tiles_for_block(grid, block), grid.tile)
    lo = [max(a, 0) for a in region.start]
    hi = [min(b, n) for b, n in zip(region.stop, image_shape)]
    if not all(a < b for a, b in zip(lo, hi)):
        return HostRegion(region, (), None)
    inside = tuple(slice(a - r, b - r) for a, b, r in zip(lo, hi, region.start))
    return HostRegion(region, inside, np.asarray(read_raw(*(slice(a, b) for a, b in zip(lo, hi)))))


def region_tensor(host: HostRegion, channels: int, affine: Affine, device: torch.device) -> torch.Tensor:
    """The region's normalised pixels ``(C, *region.shape)`` float32 on ``device``, zero outside the image
    (normalised on the device; on the CPU with numpy, the same numbers)."""
    if device.type == "cpu":
        out = np.zeros((channels, *host.region.shape), dtype=np.float32)
        if host.pixels is not None:
            out[(slice(None), *host.inside)] = normalize_array(host.pixels, affine)
        return torch.from_numpy(out)
    region = torch.zeros((channels, *host.region.shape), dtype=torch.float32, device=device)
    if host.pixels is not None:
        region[(slice(None), *host.inside)] = normalize_tensor(to_device(host.pixels, device), affine)
    return region


def _checked(predictor: TensorPredictor, batch: torch.Tensor) -> torch.Tensor:
    """Run ``predictor`` and check it kept the batch and spatial sizes (float32 out)."""
    out = predictor(batch).float()
    b, spatial = batch.shape[0], tuple(batch.shape[2:])
    if out.ndim != batch.ndim or out.shape[0] != b or tuple(out.shape[2:]) != spatial:
        expected = ", ".join(str(v) for v in (b, "K", *spatial))
        raise ValueError(f"predictor mapped {tuple(batch.shape)} to {tuple(out.shape)}; expected ({expected})")
    return out


def blend_block(
    data: torch.Tensor,
    region: Block,
    predictor: TensorPredictor,
    grid: TileGrid,
    block: Block,
    batch_size: int,
    weights: torch.Tensor,
    accumulate_on: torch.device | None = None,
    weight_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blended logits ``(K, *block.shape)`` float32 of ``block`` from its region's normalised pixels ``data``.

    Tiles are cut from ``data`` on its device and predicted there in batches of ``batch_size``; the weighted sums
    live on ``accumulate_on`` (default: ``data``'s device; the CPU is the out-of-memory fallback). ``weight_sum``,
    the sum of the weights over the block (:func:`~unetcore.inference.windows.gaussian_weight_sum`), spares the
    pass per tile that sums them.
    """
    acc_device = data.device if accumulate_on is None else accumulate_on
    w = weights.to(acc_device)
    acc: torch.Tensor | None = None
    summed = weight_sum is not None
    norm = weight_sum.to(acc_device) if weight_sum is not None else torch.zeros(block.shape, device=acc_device)
    for batch in tile_batches(tiles_for_block(grid, block), batch_size):
        windows = [data[(slice(None), *tile_window(o, region.start, grid.tile))] for o in batch]
        inputs = windows[0].unsqueeze(0) if len(windows) == 1 else torch.stack(windows)  # one tile: a view, no copy
        out = _checked(predictor, inputs).to(acc_device)
        if acc is None:
            acc = torch.zeros((out.shape[1], *block.shape), dtype=torch.float32, device=acc_device)
        for origin, pred in zip(batch, out):
            in_tile, in_block = tile_overlap(origin, grid.tile, block)
            acc[(slice(None), *in_block)].addcmul_(pred[(slice(None), *in_tile)], w[in_tile])  # fused: one pass
            if not summed:
                norm[in_block] += w[in_tile]
    assert acc is not None  # every block is touched by at least one tile
    return acc.div_(norm)


def outputs_tensor(logits: torch.Tensor, num_classes: int, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Blended logits ``(K, *spatial)`` → (probabilities float32, labels uint8), on the logits' device."""
    if num_classes == 1:
        probs = torch.sigmoid(logits)
        return probs, (probs[0] > threshold).to(torch.uint8)
    probs = torch.softmax(logits, dim=0)
    return probs, probs.argmax(dim=0).to(torch.uint8)


def copy_back(probs: torch.Tensor | None, labels: torch.Tensor, probability_dtype: str = "float16"
              ) -> tuple[np.ndarray | None, np.ndarray]:
    """One copy to the host per output: probabilities cast on the device to their stored dtype, labels uint8."""
    p = None if probs is None else probs.to(getattr(torch, probability_dtype)).cpu().numpy()
    return p, labels.cpu().numpy()


@dataclass
class DeviceKernel:
    """The torch block kernel of one image: a tensor predictor, the device it runs on and the Gaussian weights.

    :meth:`outputs` runs a block end to end on ``device``; when CUDA runs out of memory the block is retried
    with its accumulators on the CPU (the model stays on the GPU), as nnU-Net does.
    """

    predictor: TensorPredictor
    device: torch.device
    num_classes: int
    threshold: float = 0.5

    def logits(self, host: HostRegion, channels: int, affine: Affine, grid: TileGrid, block: Block,
               batch_size: int, accumulate_on: torch.device | None = None) -> torch.Tensor:
        """Blended logits ``(K, *block.shape)`` of ``block`` from its host region."""
        data = region_tensor(host, channels, affine, self.device)
        weights = torch.from_numpy(np.array(gaussian_weights(grid.tile))).to(self.device)
        summed = gaussian_weight_sum(grid, block)
        weight_sum = None if summed is None else torch.from_numpy(summed).to(self.device)
        return blend_block(data, host.region, self.predictor, grid, block, batch_size, weights, accumulate_on,
                           weight_sum)

    def outputs(self, host: HostRegion, channels: int, affine: Affine, grid: TileGrid, block: Block,
                batch_size: int, probability_dtype: str | None = "float16") -> tuple[np.ndarray | None, np.ndarray]:
        """(probabilities ``(K, *block.shape)`` in ``probability_dtype`` or None, labels uint8) on the host."""
        with torch.inference_mode():
            try:
                logits = self.logits(host, channels, affine, grid, block, batch_size)
            except torch.cuda.OutOfMemoryError:
                log.warning("CUDA out of memory for block %s: accumulating it on the CPU", block)
                torch.cuda.empty_cache()
                logits = self.logits(host, channels, affine, grid, block, batch_size, torch.device("cpu"))
            probs, labels = outputs_tensor(logits, self.num_classes, self.threshold)
            return copy_back(probs if probability_dtype else None, labels, probability_dtype or "float32")


def predict_blocks(kernel: DeviceKernel, read_raw: Reader, image_shape: Shape, channels: int, affine: Affine,
                   grid: TileGrid, blocks: Sequence[Block], batch_size: int, probability_dtype: str | None = "float32"
                   ) -> Iterator[tuple[Block, np.ndarray | None, np.ndarray]]:
    """``(block, probabilities, labels)`` of every block in order, a thread reading the next block's pixels while
    this one computes (so a GPU does not wait for the host's reads)."""
    if not blocks:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="unet-prefetch") as pool:
        ahead = pool.submit(read_region, read_raw, image_shape, grid, blocks[0])
        for i, block in enumerate(blocks):
            host = ahead.result()
            if i + 1 < len(blocks):
                ahead = pool.submit(read_region, read_raw, image_shape, grid, blocks[i + 1])
            probs, labels = kernel.outputs(host, channels, affine, grid, block, batch_size, probability_dtype)
            yield block, probs, labels


# --- tensor predictors ----------------------------------------------------------------------------------------


def memory_format_of(spatial_dims: int) -> torch.memory_format:
    """channels_last for a 2-D model's ``(N, C, H, W)``, channels_last_3d for a 3-D model's ``(N, C, D, H, W)``."""
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether forward passes run under bf16 autocast: ``auto`` means on CUDA only; ``bf16``/``fp32`` force it."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def tensor_predictor(model: torch.nn.Module, device: torch.device, spatial_dims: int = 2,
                     precision: str = "auto") -> TensorPredictor:
    """``model`` as a tensor → logits function on ``device``: eval, inference mode, channels_last (CPU and CUDA),
    ``cudnn.benchmark`` on CUDA (tile shapes repeat), bf16 autocast per :func:`uses_bf16`, float32 logits out."""
    fmt = memory_format_of(spatial_dims)
    model = model.to(device).eval().to(memory_format=fmt)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    bf16 = uses_bf16(device, precision)

    def run(batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(device, dtype=torch.float32, non_blocking=True).contiguous(memory_format=fmt)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(x).float()

    return run


def tta_tensor_predictor(predictor: TensorPredictor) -> TensorPredictor:
    """Flip test-time augmentation with every flip stacked into one batch (``2**d`` × the tiles per forward)."""

    def predict(batch: torch.Tensor) -> torch.Tensor:
        flips = flip_axes(batch.ndim - 2)
        stacked = torch.cat([batch.flip(axes) if axes else batch for axes in flips])
        out = _checked(predictor, stacked)
        parts = [p.flip(axes) if axes else p for p, axes in zip(out.split(batch.shape[0]), flips)]
        total = parts[0].clone()
        for p in parts[1:]:  # summed in flip order, as the numpy wrapper does
            total += p
        return total / len(flips)

    return predict


def slicewise_tensor_predictor(predictor: TensorPredictor) -> TensorPredictor:
    """Let a 2-D ``predictor`` predict ``(B, C, d, h, w)`` tiles slice by slice (``B * d`` images); 2-D batches pass."""

    def predict(batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim == 4:
            return predictor(batch)
        b, c, d, h, w = batch.shape
        out = _checked(predictor, batch.movedim(2, 1).reshape(b * d, c, h, w))
        return out.reshape(b, d, out.shape[1], h, w).movedim(1, 2)

    return predict


def skip_empty_tensor_predictor(predictor: TensorPredictor, num_classes: int) -> TensorPredictor:
    """Constant tiles get background logits (±``BACKGROUND_LOGIT``) without a forward pass, as the numpy wrapper."""
    k = max(1, num_classes)

    def predict(batch: torch.Tensor) -> torch.Tensor:
        flat = batch.reshape(batch.shape[0], batch.shape[1], -1)
        skip = (flat.amax(dim=-1) == flat.amin(dim=-1)).all(dim=-1)
        if not bool(skip.any()):
            return predictor(batch)
        out = torch.full((batch.shape[0], k, *batch.shape[2:]), -BACKGROUND_LOGIT, dtype=torch.float32,
                         device=batch.device)
        if num_classes > 1:
            out[:, 0] = BACKGROUND_LOGIT
        if not bool(skip.all()):
            out[~skip] = _checked(predictor, batch[~skip].contiguous())
        return out

    return predict


def numpy_predictor(predictor: TensorPredictor, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """A tensor predictor as the numpy kernel's batch → logits function (one copy each way)."""

    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
        with torch.inference_mode():
            return predictor(x).float().cpu().numpy()

    return run


# --- the tile batch from free device memory ------------------------------------------------------------------


def batch_for_memory(free_bytes: int, bytes_per_tile: int, fraction: float = 0.4, low: int = 1,
                     high: int = MAX_AUTO_BATCH) -> int:
    """Tiles per forward pass that fit ``fraction`` of ``free_bytes`` at ``bytes_per_tile``, within [low, high]
    (0.4: a GPU worker runs two block tasks at once, see :data:`unetcore.cluster.GPU_TASKS`)."""
    if bytes_per_tile <= 0:
        return high
    return int(max(low, min(high, int(free_bytes * fraction) // bytes_per_tile)))


def probe_batch_size(predictor: TensorPredictor, channels: int, tile: Shape, device: torch.device,
                     fallback: int, high: int = MAX_AUTO_BATCH) -> int:
    """The tile batch sized from free device memory: one 2-tile forward measures a tile's peak activation bytes.

    Off CUDA it returns ``fallback`` (the CPU has no such limit and gains nothing from larger batches).
    """
    if device.type != "cuda":
        return fallback
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        predictor(torch.rand((2, channels, *tile), dtype=torch.float32, device=device))
    torch.cuda.synchronize(device)
    per_tile = max(1, (torch.cuda.max_memory_allocated(device) - base) // 2)
    free, _ = torch.cuda.mem_get_info(device)
    return batch_for_memory(free, per_tile, high=high)
