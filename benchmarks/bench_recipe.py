"""Recipe quality (issue 13, item 5): held-out Dice of the planned defaults against last turn's recipe and
classical baselines on real nuclei, with test-time flips and a cheaper network trained for more steps.

Data: the 2018 Data Science Bowl nuclei image StarDist ships in its wheel (``stardist/data/images/img2d.tif`` and
``mask2d.tif``, 512², BBBC038, CC0), as in ``bench_real_data.py``. Nothing is downloaded at run time: the TIFFs are
read from an installed stardist, or straight out of the wheel file, which one command fetches beforehand:

    .venv/bin/pip download --no-deps stardist==0.9.2 -d /tmp/wheels
    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_recipe.py --wheel /tmp/wheels/stardist-0.9.2-*.whl \
        [--folds 0 3] [--steps 64] [--skip plan-cheap]

Protocol (``bench_real_data``'s): fold k holds out quadrant k (256²); the other three quadrants, cut into twelve
128² tiles, are ingested (validation split by content hash) and trained on; the best checkpoint predicts the
held-out quadrant through the block predictor. Recipes, each from the same seed:

* ``plan``: :func:`unetcore.planning.planned_config` with no option but the length: every choice (patch, batch,
  depth, sampling, normalisation, validation tile...) the plan's; its planned 10 epochs keep, the steps per
  epoch scaled so that the run sees as many patch pixels as ``last`` (``--steps`` x 8 patches of 128²; the plan's
  batch is 2 here, so 4x the steps; its full planned length is 1333 steps);
* ``last``: last turn's recipe, ``TrainConfig``'s library defaults (depth 4, base 16, AdamW 2e-3, poly) with the
  128² patch, validation tile and batch 8 that ``bench_real_data`` had to set (256² patches are refused on 128²
  tiles), for ``--steps`` steps in 8 epochs;
* ``plan+tta``: the ``plan`` model predicting with the 4 flips averaged (no retraining);
* ``plan-cheap``: the plan with ``base_channels`` 8 (a quarter of the FLOPs) for twice the steps (about the same
  wall time);
* ``plan+ds``: the plan with deep supervision (``model.deep_supervision``: extra heads on the decoder's coarser
  stages, nnU-Net's loss weights), the same steps;
* ``plan-fg0`` / ``plan-fg1``: the plan with ``foreground_fraction`` 0 (every patch placed uniformly) and 1 (every
  patch centred on a foreground pixel), the same steps. The plan's 0.33 of a batch of 2 rounds to one patch of
  the two, as nnU-Net's does.

Classical baselines on the same split: Otsu's threshold of the test quadrant; Otsu then a distance-transform
watershed (markers: peaks 5 px apart) with watershed lines, as an instance method scored on its foreground.
Dice pooled over the folds (pixel counts summed). Writes ``benchmarks/results/recipe.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

from bench_real_data import counts, dice, ingest_fold, load_stardist_sample, quadrant  # noqa: E402

from unetcore import training  # noqa: E402
from unetcore.config import ModelConfig, TrainConfig  # noqa: E402
from unetcore.inference import BlockPredictor  # noqa: E402
from unetcore.model import load_model  # noqa: E402
from unetcore.planning import planned_config  # noqa: E402
from unetcore.store import manifest as mf  # noqa: E402
from unetcore.store import omezarr  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAST_BATCH = 8
ALL_TRAINED = ("plan", "plan+tta", "plan-cheap", "plan+ds", "plan-fg0", "plan-fg1", "last")
METHODS = ("plan", "plan+tta", "plan-cheap", "plan+ds", "plan-fg0", "plan-fg1", "last", "otsu", "otsu+watershed")
VARIANTS: dict[str, tuple[dict[str, Any], int]] = {  # the plan's variants: options over the plan, steps factor
    "plan": ({}, 1),
    "plan-cheap": ({"model.base_channels": 8}, 2),
    "plan+ds": ({"model.deep_supervision": True}, 1),
    "plan-fg0": ({"foreground_fraction": 0.0}, 1),
    "plan-fg1": ({"foreground_fraction": 1.0}, 1),
}


def load_sample(wheel: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The image (512², uint16) and its binary mask: from the wheel file when given, else an installed stardist."""
    if wheel is None:
        return load_stardist_sample()
    with zipfile.ZipFile(wheel) as zf:
        image = tifffile.imread(io.BytesIO(zf.read("stardist/data/images/img2d.tif")))
        instances = tifffile.imread(io.BytesIO(zf.read("stardist/data/images/mask2d.tif")))
    return image, (instances > 0).astype(np.uint8)


def otsu_watershed(image: np.ndarray) -> np.ndarray:
    """Foreground of Otsu's threshold split into nuclei by a distance-transform watershed (lines left out)."""
    fg = image > threshold_otsu(image)
    distance = ndi.distance_transform_edt(fg)
    peaks = peak_local_max(distance, min_distance=5, labels=ndi.label(fg)[0], exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=fg, watershed_line=True) > 0


def predict(model_dir: Path, test_ds: Path, tile: int, tta: bool = False) -> np.ndarray:
    """Labels of the held-out quadrant through the block predictor (the inference code path, in-process)."""
    best, config = load_model(model_dir)
    predictor = BlockPredictor.from_model(best, config, torch.device("cpu"), tile=tile, overlap=0.5, batch_size=4,
                                          tta=tta)
    [entry] = mf.entries(mf.require(test_ds))
    store = omezarr.open_root(mf.store_path(test_ds, entry["id"]))
    pred = np.zeros(omezarr.image_array(store).shape[1:], np.uint8)
    for block, _, labels in predictor.blocks(omezarr.image_array(store), entry["stats"], 256):
        pred[block.slices] = labels
    return pred


def recipes(ds: Path, root: Path, steps: int) -> dict[str, tuple[TrainConfig, Any]]:
    """The trained recipes of one fold: (TrainConfig, plan or None)."""
    targets = {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}
    out: dict[str, tuple[TrainConfig, Any]] = {}
    planned = planned_config(ds)[1]
    epochs, batch = planned["epochs"], planned["batch_size"]
    plan_steps = steps * LAST_BATCH / batch  # the same patch pixels as the last recipe's steps
    for name, (extra, factor) in VARIANTS.items():
        n = factor * plan_steps
        cfg, plan = planned_config(ds, {"steps_per_epoch": max(1, round(n / epochs)), **extra},
                                   output=str(root / name), **targets, registered_model=f"bench-{name}")
        out[name] = (cfg, plan)
    epochs = 8
    last = TrainConfig(dataset=str(ds), patch_size=128, val_tile=128, batch_size=LAST_BATCH, epochs=epochs,
                       steps_per_epoch=max(1, round(steps / epochs)), output=str(root / "last"),
                       model=ModelConfig(), registered_model="bench-last", **targets)
    out["last"] = (last, None)
    return out


def run_fold(k: int, image: np.ndarray, mask: np.ndarray, steps: int, skip: set[str]) -> dict[str, Any]:
    ys, xs = quadrant(k)
    truth = mask[ys, xs]
    test_image = image[ys, xs]
    fold: dict[str, Any] = {"counts": {"otsu": counts(test_image > threshold_otsu(test_image), truth),
                                       "otsu+watershed": counts(otsu_watershed(test_image), truth)},
                            "train_s": {}, "val_dice": {}, "recipe": {}}
    if skip >= set(ALL_TRAINED):  # the baselines alone (seconds)
        return fold
    with tempfile.TemporaryDirectory(prefix=f"bench-recipe-{k}-") as tmp:
        root = Path(tmp)
        ds, test_ds = ingest_fold(root, k, image, mask)
        for name, (cfg, plan) in recipes(ds, root, steps).items():
            if name in skip:
                continue
            t0 = time.perf_counter()
            result = training.train(cfg, plan=plan)
            fold["train_s"][name] = round(time.perf_counter() - t0, 1)
            fold["val_dice"][name] = result.best_val_dice
            fold["recipe"][name] = {"patch": cfg.patch_size, "batch": cfg.batch_size, "depth": cfg.model.depth,
                                    "base": cfg.model.base_channels, "steps": cfg.epochs * cfg.steps_per_epoch,
                                    "sampling": cfg.sampling, "val_tile": cfg.val_tile}
            fold["counts"][name] = counts(predict(Path(result.model_dir), test_ds, cfg.val_tile), truth)
            if name == "plan" and "plan+tta" not in skip:
                fold["counts"]["plan+tta"] = counts(predict(Path(result.model_dir), test_ds, cfg.val_tile, True),
                                                    truth)
    return fold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, default=None, help="stardist wheel file (else an installed stardist)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--steps", type=int, default=64, help="Optimiser steps of the last recipe (batch 8); the "
                        "plan gets the same patch pixels.")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(ALL_TRAINED))
    parser.add_argument("--out", default=None, help="result file name in benchmarks/results (default recipe.json)")
    args = parser.parse_args()
    image, mask = load_sample(args.wheel)
    t_start = time.perf_counter()
    folds = []
    for k in args.folds:
        fold = run_fold(k, image, mask, args.steps, set(args.skip))
        folds.append(fold)
        shown = "  ".join(f"{m} {dice(c):.4f}" for m, c in fold["counts"].items())
        print(f"fold {k}: {shown}  train s {fold['train_s']}", flush=True)
        _save(folds, args, time.perf_counter() - t_start)
    pooled = _save(folds, args, time.perf_counter() - t_start)
    print(f"\n{'method':<18}{'pooled held-out Dice':>22}")
    for method in METHODS:
        if method in pooled:
            print(f"{method:<18}{pooled[method]:>22.4f}")
    print(f"total {time.perf_counter() - t_start:.0f} s; wrote {RESULTS / _result_name(args)}")


def _result_name(args: argparse.Namespace) -> str:
    if args.out:
        return str(args.out)
    trained = set(ALL_TRAINED) - set(args.skip)
    return "recipe.json" if trained else "recipe_baselines.json"


def _save(folds: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> dict[str, float]:
    """Write the pooled and per-fold figures so far; return the pooled Dice per method."""
    totals: dict[str, np.ndarray] = {}
    for fold in folds:
        for method, c in fold["counts"].items():
            totals[method] = totals.get(method, np.zeros(3, np.int64)) + c
    pooled = {m: dice(c) for m, c in totals.items()}
    RESULTS.mkdir(exist_ok=True)
    per_fold = [{**{k: v for k, v in f.items() if k != "counts"}, "dice": {m: dice(c) for m, c in f["counts"].items()},
                 "counts": {m: c.tolist() for m, c in f["counts"].items()}} for f in folds]
    (RESULTS / _result_name(args)).write_text(json.dumps(
        {"pooled_dice": pooled, "folds": args.folds, "steps": args.steps, "per_fold": per_fold,
         "seconds": round(seconds, 1)}, indent=2, default=str))
    return pooled


if __name__ == "__main__":
    main()
