"""The Dask driver of tiled inference: one task per output block, model loaded once per worker.

Each task reads its block plus the halo of the tiles that touch it, blends them with the global Gaussian
weights, writes only its own output chunks (blocks are unions of chunks: one writer per chunk), then writes a
completion record. A re-run skips recorded blocks, so a crash costs only the unfinished blocks, and the output
equals the whole-image sliding-window result. No process ever holds the whole image.

Output ``<output>/<id>.ome.zarr``: labels under ``labels/prediction`` (pyramid), probabilities as the image
(K, H, W) when asked for; ``attributes.unet`` holds the run's signature and ``complete`` (false until every block
and the pyramid are written). Completion records live in ``<output>/<id>.blocks/``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import zarr

from unetcore import progress as progress_bus
from unetcore.config import InferConfig
from unetcore.errors import ConfigError, InputError, OutputExistsError, ServiceError
from unetcore.inference.predict import BlockPredictor, logits_to_outputs, resolve_device
from unetcore.inference.windows import Block, plan_blocks
from unetcore.model import load_model
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.training.metrics import confusion_counts

LABELS_NAME = "prediction"
log = logging.getLogger("unetcore.inference")


@dataclass
class ImageResult:
    """Summary of one predicted image."""

    id: str
    output: str
    pixels: int
    blocks: int
    blocks_skipped: int
    seconds: float
    megapixels_per_s: float
    dice: float | None
    export: str | None
    preview: str | None


# ---------------------------------------------------------------- worker side


@functools.lru_cache(maxsize=4)
def _worker_predictor(model_dir: str, device: str, tile: int, overlap: float, batch: int, threshold: float,
                      tta: bool, threads: int) -> BlockPredictor:
    """Load the model once per worker process (cached by its arguments)."""
    torch.set_num_threads(max(1, threads))
    model, config = load_model(Path(model_dir))
    return BlockPredictor.from_model(model, config, resolve_device(device), tile=tile, overlap=overlap,
                                     batch_size=batch, threshold=threshold, tta=tta)


def _record_path(records: Path, block: Block) -> Path:
    return records / f"y{block.y0}_x{block.x0}.json"


def run_block(task: dict[str, Any], block: Block) -> dict[str, Any]:
    """Predict one block and write its chunks and completion record (runs on a Dask worker)."""
    t0 = time.perf_counter()
    bp = _worker_predictor(task["model_dir"], task["device"], task["tile"], task["overlap"], task["batch_size"],
                           task["threshold"], task["tta"], task["threads"])
    src = omezarr.open_root(Path(task["input"]))
    image = omezarr.image_array(src)
    grid = bp.grid(image.shape[1:])
    logits = bp.logits(image, task["stats"], grid, block)
    probs, labels = logits_to_outputs(logits, bp.num_classes, bp.threshold)
    if task["min_object_size"]:
        labels = _remove_small(labels, task["min_object_size"])
    out = zarr.open_group(store=task["output"], mode="r+")
    out[f"labels/{LABELS_NAME}/0"][block.slices] = labels
    if task["save_probabilities"]:
        out["0"][(slice(None), *block.slices)] = probs.astype(task["probability_dtype"])
    counts = None
    truth = omezarr.label_array(src)
    if truth is not None:
        counts = [c.tolist() for c in confusion_counts(labels, np.asarray(truth[block.slices]), bp.num_classes)]
    record = {"block": [block.y0, block.y1, block.x0, block.x1], "counts": counts,
              "seconds": round(time.perf_counter() - t0, 4)}
    mf.atomic_write_json(_record_path(Path(task["records"]), block), record)
    return record


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop foreground objects smaller than ``min_size`` pixels (per block) and fill holes as small."""
    from skimage import morphology

    fg = labels > 0
    keep = morphology.remove_small_objects(fg, max_size=min_size - 1) if min_size > 1 else fg
    keep = morphology.remove_small_holes(keep, max_size=min_size - 1) if min_size > 1 else keep
    return np.where(keep, np.maximum(labels, 1), 0).astype(labels.dtype)


# ---------------------------------------------------------------- driver side


@contextmanager
def dask_client(address: str | None, n_workers: int = 0, threads_per_worker: int = 1) -> Iterator[Any]:
    """A Dask client on ``address``, or on a local cluster of ``n_workers`` single-thread processes.

    Raises:
        ServiceError: the scheduler address does not answer.
    """
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)
    if address:
        try:
            client = Client(address, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise ServiceError(address, f"Dask scheduler unreachable ({type(exc).__name__})",
                               "start `dask scheduler` or fix --scheduler-address") from None
        try:
            yield client
        finally:
            client.close()
        return
    workers = n_workers or max(1, os.cpu_count() or 1)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                           dashboard_address="127.0.0.1:0", host="127.0.0.1", memory_limit="auto")
    client = Client(cluster)
    log.info("Dask dashboard: %s", client.dashboard_link)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _signature(entry: dict[str, Any], model_config: dict[str, Any], weights_hash: str, cfg: InferConfig) -> str:
    """What makes two predictions of one image the same: source, model weights and output-shaping options."""
    keys = ("tile", "overlap", "threshold", "tta", "min_object_size", "save_probabilities", "probability_dtype")
    payload = {"source": entry["source_hash"], "weights": weights_hash, "model": model_config["model"],
               **{k: getattr(cfg, k) for k in keys}}
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=16).hexdigest()


def _prepare_output(path: Path, records: Path, signature: str, shape: tuple[int, int], classes: int,
                    chunk: int, cfg: InferConfig, info: dict[str, Any]) -> None:
    """Create the output store, or keep it to resume when its signature matches; refuse a different result."""
    if path.exists():
        try:
            old = omezarr.unet_attrs(zarr.open_group(store=str(path), mode="r"))
        except Exception:
            old = {}
        if old.get("signature") == signature:
            return
        if not cfg.overwrite:
            raise OutputExistsError(path, "already holds a prediction made with other inputs, model or options")
        shutil.rmtree(path)
        shutil.rmtree(records, ignore_errors=True)
    records.mkdir(parents=True, exist_ok=True)
    # Probabilities are the store's image (K, H, W), one level; left unwritten (empty chunks) when not asked for.
    root = omezarr.create_image(path, (classes, *shape), cfg.probability_dtype, chunk,
                                name=f"{info['id']}-probabilities", n_levels=1)
    omezarr.create_labels(root, LABELS_NAME, shape, np.uint8, chunk)
    omezarr.set_unet_attrs(root, {**info, "signature": signature, "complete": False})


def _finish_output(path: Path, cfg: InferConfig) -> None:
    root = zarr.open_group(store=str(path), mode="r+")
    omezarr.build_pyramid(root[f"labels/{LABELS_NAME}"], "label")
    omezarr.set_unet_attrs(root, {"complete": True})


def _model_dir(cfg: InferConfig, cache: Path) -> tuple[Path, str]:
    """Resolve the model URI once in the driver (an alias is pinned to its version for the whole run)."""
    from unetcore.tracking import mlflow as tracking

    uri = cfg.model
    if uri.startswith("models:/") and "@" in uri:
        from mlflow import MlflowClient

        tracking.check_tracking_uri(cfg.tracking_uri)
        import mlflow

        mlflow.set_tracking_uri(cfg.tracking_uri)
        name, alias = uri[len("models:/"):].split("@", 1)
        try:
            version = MlflowClient().get_model_version_by_alias(name, alias).version
        except Exception as exc:
            raise InputError(uri, f"model URI does not resolve ({str(exc).splitlines()[0][:160]})",
                             "train a model first or check the name/alias") from None
        uri = f"models:/{name}/{version}"
    if uri.startswith(("models:/", "runs:/")) or "://" in uri:
        dst = cache / hashlib.blake2b(uri.encode(), digest_size=8).hexdigest()
        if (dst / "config.json").exists():
            return dst, uri
        return tracking.download_model(uri, cfg.tracking_uri, dst=dst), uri
    return tracking.download_model(uri), uri


def predict_image(
    entry: dict[str, Any], dataset: Path, cfg: InferConfig, client: Any, model_dir: Path, model_uri: str,
) -> ImageResult:
    """Predict one ingested image on the Dask ``client``; resume from completion records when possible."""
    t0 = time.perf_counter()
    src_path = mf.store_path(dataset, entry["id"])
    src = omezarr.open_root(src_path)
    channels, height, width = omezarr.image_array(src).shape
    model_config = json.loads((model_dir / "config.json").read_text())
    if model_config["model"]["in_channels"] != channels:
        raise ConfigError("model", f"{model_uri} expects {model_config['model']['in_channels']} channels, "
                                   f"image '{entry['id']}' has {channels}")
    classes = int(model_config["model"]["num_classes"])
    out_dir = Path(cfg.output)
    out_path = out_dir / f"{entry['id']}.ome.zarr"
    records = out_dir / f"{entry['id']}.blocks"
    chunk = min(int(entry.get("chunk", 1024)), cfg.block_size)
    block_edge = max(chunk, (cfg.block_size // chunk) * chunk)
    signature = _signature(entry, model_config, mf.file_hash(model_dir / "weights.pt"), cfg)
    info = {"id": entry["id"], "source_store": str(src_path.resolve()), "model": model_uri}
    _prepare_output(out_path, records, signature, (height, width), classes, chunk, cfg, info)
    blocks = plan_blocks((height, width), (block_edge, block_edge))
    todo = [b for b in blocks if not _record_path(records, b).exists()]
    n_threads = _threads_per_worker(client)
    task = {"input": str(src_path), "output": str(out_path), "records": str(records), "model_dir": str(model_dir),
            "stats": entry["stats"], "device": cfg.device, "tile": cfg.tile, "overlap": cfg.overlap,
            "batch_size": cfg.batch_size, "threshold": cfg.threshold, "tta": cfg.tta, "threads": n_threads,
            "min_object_size": cfg.min_object_size, "save_probabilities": cfg.save_probabilities,
            "probability_dtype": cfg.probability_dtype}
    from distributed import as_completed

    futures = client.map(run_block, [task] * len(todo), todo, pure=False, retries=2)
    done = len(blocks) - len(todo)
    stage = f"predict {entry['id']}"
    progress_bus.report(stage, done, len(blocks))
    for future in as_completed(futures):
        future.result()
        done += 1
        progress_bus.report(stage, done, len(blocks))
    _finish_output(out_path, cfg)
    dice = _dice_from_records(records, blocks, classes) if entry.get("has_mask") else None
    export = _export(out_path, out_dir, entry["id"], cfg.export)
    preview = write_preview(src_path, out_path, out_dir / f"{entry['id']}_preview.png")
    seconds = time.perf_counter() - t0
    return ImageResult(id=entry["id"], output=str(out_path), pixels=height * width, blocks=len(blocks),
                       blocks_skipped=len(blocks) - len(todo), seconds=round(seconds, 3),
                       megapixels_per_s=round(height * width / 1e6 / max(seconds, 1e-9), 3), dice=dice,
                       export=export, preview=preview)


def _threads_per_worker(client: Any) -> int:
    info = client.scheduler_info()["workers"]
    return max(1, min((w.get("nthreads", 1) for w in info.values()), default=1))


def _dice_from_records(records: Path, blocks: list[Block], num_classes: int) -> float:
    """Mean foreground Dice of the whole image from the per-block confusion counts."""
    from unetcore.training.metrics import dice_from_counts

    total = None
    for b in blocks:
        counts = np.asarray(json.loads(_record_path(records, b).read_text())["counts"], np.int64)
        total = counts if total is None else total + counts
    dice = dice_from_counts(*total)
    fg = dice[1:]
    return float(np.nanmean(fg)) if np.isfinite(fg).any() else float("nan")


EXPORT_MAX_PIXELS = 64_000_000


def _export(out_path: Path, out_dir: Path, image_id: str, kind: str) -> str | None:
    """Export the label mask as PNG (small images) or tiled BigTIFF (any size, streamed by tiles)."""
    if kind == "none":
        return None
    labels = zarr.open_group(store=str(out_path), mode="r")[f"labels/{LABELS_NAME}/0"]
    h, w = labels.shape
    if kind == "png" and h * w <= EXPORT_MAX_PIXELS:
        from skimage import io as skio

        dst = out_dir / f"{image_id}_mask.png"
        tmp = dst.with_name(f".{dst.name}.tmp.png")
        skio.imsave(tmp, np.asarray(labels[:]), check_contrast=False)
        os.replace(tmp, dst)
        return str(dst)
    import tifffile

    tile = 256
    dst = out_dir / f"{image_id}_mask.tif"
    tmp = dst.with_name(f".{dst.name}.tmp.tif")

    def tiles() -> Iterator[np.ndarray]:
        for y in range(0, h, tile):
            band = np.asarray(labels[y:y + tile, :])
            for x in range(0, w, tile):
                t = np.zeros((tile, tile), np.uint8)
                part = band[:, x:x + tile]
                t[: part.shape[0], : part.shape[1]] = part
                yield t

    tifffile.imwrite(tmp, tiles(), shape=(h, w), dtype=np.uint8, tile=(tile, tile), bigtiff=True, compression="zlib")
    os.replace(tmp, dst)
    return str(dst)


def write_preview(src_path: Path, out_path: Path, dst: Path, max_edge: int = 1024) -> str:
    """A down-sampled overlay PNG (prediction in magenta over the image) from the coarsest pyramid levels."""
    from skimage import io as skio
    from skimage.transform import resize

    from unetcore.tracking.mlflow import preview_strip

    src = omezarr.open_root(src_path)
    levels = sorted(int(k) for k in src.array_keys() if k.isdigit())
    image = np.asarray(src[str(levels[-1])][:])
    pred_group = zarr.open_group(store=str(out_path), mode="r")[f"labels/{LABELS_NAME}"]
    plevels = sorted(int(k) for k in pred_group.array_keys() if k.isdigit())
    pred = np.asarray(pred_group[str(plevels[-1])][:])
    scale = min(1.0, max_edge / max(image.shape[1:]))
    shape = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[2] * scale)))
    image = np.stack([resize(ch.astype(np.float32), shape, preserve_range=True) for ch in image])
    pred = resize(pred, shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.uint8)
    strip = preview_strip(image, None, pred)[:, shape[1]:]  # the overlay panel only
    tmp = dst.with_name(f".{dst.name}.tmp.png")
    skio.imsave(tmp, strip, check_contrast=False)
    os.replace(tmp, dst)
    return str(dst)


def predict_dataset(cfg: InferConfig) -> list[ImageResult]:
    """Predict the images of an ingested dataset (all, one split, or listed ids) on Dask.

    Raises:
        InputError: the dataset or model URI cannot be used; ServiceError: the scheduler is unreachable.
    """
    dataset = Path(cfg.dataset)
    manifest = mf.require(dataset)
    chosen = mf.entries(manifest, cfg.split)
    if cfg.images:
        unknown = sorted(set(cfg.images) - {e["id"] for e in chosen})
        if unknown:
            raise ConfigError("images", f"not in the dataset's '{cfg.split}' split: {', '.join(unknown)}")
        chosen = [e for e in chosen if e["id"] in cfg.images]
    if not chosen:
        raise InputError(dataset, f"no images in split '{cfg.split}'", "use --split all")
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir, model_uri = _model_dir(cfg, out_dir / ".models")
    results = []
    with dask_client(cfg.scheduler_address, cfg.n_workers) as client:
        for entry in chosen:
            results.append(predict_image(entry, dataset, cfg, client, model_dir, model_uri))
    return results


def results_to_dicts(results: list[ImageResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
