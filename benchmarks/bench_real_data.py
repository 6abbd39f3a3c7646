"""Real labelled data: the UNet against classical thresholding on a nuclei image with expert masks.

The data is the 512² fluorescence nuclei image with its instance mask that StarDist ships inside its wheel
(``stardist/data/images/img2d.tif`` and ``mask2d.tif``, from the 2018 Data Science Bowl, BBBC038, CC0). Nothing
is downloaded at run time; only the two TIFFs are read, so the package need not even be importable:

    .venv/bin/pip install --no-deps stardist==0.9.2      # benchmark-only; not a project dependency
    .venv/bin/python benchmarks/bench_real_data.py [--folds 0 1 2 3] [--epochs 8]

Protocol: four folds; fold k holds out quadrant k (256²) as the test image. The other three quadrants are cut
into twelve 128² tiles, ingested (validation split by content hash), and the UNet is trained on them with the
library's recipe and then scored on the held-out quadrant through the inference code path. The baselines see the
same split: Otsu's threshold computed on the test quadrant itself, and scikit-image's local (adaptive) threshold
whose block size and offset are chosen by grid search on the training tiles. Dice is pooled over the four test
quadrants (pixel counts summed), and given per fold. Writes ``benchmarks/results/real_data.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from skimage.filters import threshold_local, threshold_otsu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

from unetcore import training  # noqa: E402
from unetcore.config import IngestConfig, ModelConfig, TrainConfig  # noqa: E402
from unetcore.inference.predict import BlockPredictor  # noqa: E402
from unetcore.ingest import ingest_folder  # noqa: E402
from unetcore.metrics import confusion_counts  # noqa: E402
from unetcore.model import load_model  # noqa: E402
from unetcore.store import manifest as mf  # noqa: E402
from unetcore.store import omezarr  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUADRANT = 256
TILE = 128


def load_stardist_sample() -> tuple[np.ndarray, np.ndarray]:
    """The bundled image (512², uint16) and its binary mask, read from the installed stardist files."""
    spec = importlib.util.find_spec("stardist")  # locates the package without importing it (no numba/TF)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("stardist is not installed: `.venv/bin/pip install --no-deps stardist==0.9.2` (data only)")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "images"
    image = tifffile.imread(folder / "img2d.tif")
    instances = tifffile.imread(folder / "mask2d.tif")
    return image, (instances > 0).astype(np.uint8)


def quadrant(k: int) -> tuple[slice, slice]:
    """Slices of quadrant ``k`` (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right)."""
    y, x = divmod(k, 2)
    return slice(y * QUADRANT, (y + 1) * QUADRANT), slice(x * QUADRANT, (x + 1) * QUADRANT)


def training_tiles(k: int) -> list[tuple[slice, slice]]:
    """The 128² tiles of every quadrant except ``k``."""
    out = []
    for q in range(4):
        if q == k:
            continue
        ys, xs = quadrant(q)
        for dy in (0, TILE):
            for dx in (0, TILE):
                out.append((slice(ys.start + dy, ys.start + dy + TILE), slice(xs.start + dx, xs.start + dx + TILE)))
    return out


def _write(folder: Path, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "images" / f"{name}.tif", image)
    tifffile.imwrite(folder / "masks" / f"{name}.tif", mask)


def counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``[tp, fp, fn]`` of the foreground."""
    tp, fp, fn = confusion_counts(pred.astype(np.int64), truth, 1)
    return np.array([tp[1], fp[1], fn[1]], np.int64)


def dice(c: np.ndarray) -> float:
    tp, fp, fn = c
    return float(2 * tp / max(1, 2 * tp + fp + fn))


def tune_local_threshold(tiles: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Block size and offset of ``threshold_local`` with the best pooled Dice on the training tiles."""
    best = {"dice": -1.0}
    scale = float(np.percentile(np.concatenate([t.ravel() for t, _ in tiles]), 99.5))
    for block in (15, 25, 35, 51, 75, 101, 127, 155, 201, 255):
        for offset in np.linspace(-0.1, 0.1, 11) * scale:
            total = sum(counts(img > threshold_local(img, block, offset=offset), m) for img, m in tiles)
            if dice(total) > best["dice"]:
                best = {"dice": dice(total), "block_size": block, "offset": float(offset)}
    return best


def ingest_fold(root: Path, k: int, image: np.ndarray, mask: np.ndarray) -> tuple[Path, Path]:
    """Ingest fold ``k``: the tiles outside quadrant ``k`` as ``root/ds``, the quadrant as ``root/test_ds``."""
    for i, (ys, xs) in enumerate(training_tiles(k)):
        _write(root / "train", f"tile_{i:02d}", image[ys, xs], mask[ys, xs])
    ys, xs = quadrant(k)
    _write(root / "test", f"quadrant_{k}", image[ys, xs], mask[ys, xs])
    ingest_folder(IngestConfig(images=str(root / "train/images"), masks=str(root / "train/masks"),
                               output=str(root / "ds"), chunk_size=128))
    ingest_folder(IngestConfig(images=str(root / "test/images"), masks=str(root / "test/masks"),
                               output=str(root / "test_ds"), chunk_size=256, val_fraction=0.0))
    return root / "ds", root / "test_ds"


def unet_fold(root: Path, k: int, image: np.ndarray, mask: np.ndarray, options: dict[str, Any]) -> dict[str, Any]:
    """Train on the tiles outside quadrant ``k``; return the test counts and the training summary."""
    ingest_fold(root, k, image, mask)
    ys, xs = quadrant(k)
    model = ModelConfig(**options.pop("model", {}))
    cfg = TrainConfig(dataset=str(root / "ds"), model=model, output=str(root / "run"),
                      tracking_uri=f"sqlite:///{root / 'mlflow.db'}", **options)
    t0 = time.perf_counter()
    result = training.train(cfg)
    seconds = time.perf_counter() - t0
    best, config = load_model(Path(result.model_dir))
    predictor = BlockPredictor.from_model(best, config, torch.device("cpu"), tile=cfg.val_tile, overlap=0.5,
                                          batch_size=4)
    [entry] = mf.entries(mf.require(root / "test_ds"))
    store = omezarr.open_root(mf.store_path(root / "test_ds", entry["id"]))
    pred = np.zeros((QUADRANT, QUADRANT), np.uint8)
    for block, _, labels in predictor.blocks(omezarr.image_array(store), entry["stats"], QUADRANT):
        pred[block.slices] = labels
    return {"counts": counts(pred, mask[ys, xs]), "val_dice": result.best_val_dice, "epochs": result.epochs_run,
            "train_s": round(seconds, 1), "config": cfg.flat_params()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25, help="Steps per epoch.")
    parser.add_argument("--baselines-only", action="store_true", help="Skip the UNet (seconds instead of an hour).")
    args = parser.parse_args()
    image, mask = load_stardist_sample()
    recipe = {"patch_size": TILE, "val_tile": TILE, "batch_size": 8, "epochs": args.epochs,
              "steps_per_epoch": args.steps}
    if args.baselines_only:
        recipe["baselines_only"] = True
    totals = {"unet": np.zeros(3, np.int64), "otsu": np.zeros(3, np.int64), "local": np.zeros(3, np.int64)}
    folds = []
    for k in args.folds:
        ys, xs = quadrant(k)
        test_image, test_mask = image[ys, xs], mask[ys, xs]
        tiles = [(image[t].astype(np.float64), mask[t]) for t in training_tiles(k)]
        local = tune_local_threshold(tiles)
        fold = {
            "otsu": counts(test_image > threshold_otsu(test_image), test_mask),
            "local": counts(test_image > threshold_local(test_image.astype(np.float64), local["block_size"],
                                                         offset=local["offset"]), test_mask),
        }
        if args.baselines_only:
            trained = {"counts": np.zeros(3, np.int64), "epochs": 0, "train_s": 0.0}
        else:
            with tempfile.TemporaryDirectory(prefix=f"bench-real-{k}-") as tmp:
                trained = unet_fold(Path(tmp), k, image, mask, dict(recipe))
        fold["unet"] = trained.pop("counts")
        trained["counts"] = {m: fold[m].tolist() for m in ("unet", "otsu", "local")}
        for method in totals:
            totals[method] += fold[method]
        folds.append({"fold": k, **{m: dice(fold[m]) for m in totals}, "local_params": local, **trained})
        print(f"fold {k}: UNet {dice(fold['unet']) if not args.baselines_only else float('nan'):.4f}  Otsu {dice(fold['otsu']):.4f}  "
              f"local {dice(fold['local']):.4f}  ({trained['epochs']} epochs, {trained['train_s']:.0f} s)", flush=True)
        _save(totals, folds, recipe)  # after every fold: a long run that is stopped keeps what it measured
    pooled = _save(totals, folds, recipe)
    print(f"\n{'method':<28}{'held-out Dice (pooled)':>24}")
    for method, label in (("unet", "UNet (library recipe)"), ("otsu", "Otsu (per test image)"),
                          ("local", "local threshold (tuned)")):
        if not (method == "unet" and args.baselines_only):
            print(f"{label:<28}{pooled[method]:>24.4f}")
    print(f"wrote {RESULTS / _result_name(recipe)}")


def _result_name(recipe: dict[str, Any]) -> str:
    return "real_data_baselines.json" if recipe.get("baselines_only") else "real_data.json"


def _save(totals: dict[str, np.ndarray], folds: list[dict[str, Any]], recipe: dict[str, Any]) -> dict[str, float]:
    """Write the pooled and per-fold figures so far; return the pooled Dice per method."""
    pooled = {m: dice(c) for m, c in totals.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / _result_name(recipe)).write_text(
        json.dumps({"pooled_dice": pooled, "folds": folds, "recipe": recipe}, indent=2, default=str))
    return pooled


if __name__ == "__main__":
    main()
