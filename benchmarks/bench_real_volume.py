"""A real labelled volume a package ships, end to end: the default recipe trained on one half, scored on the other.

The volume is the MNI ICBM 2009a symmetric T1 template (197 x 233 x 189, 1 mm, an average of 152 real T1 MRI
scans) with its grey- and white-matter probability maps, as the ``nilearn`` wheel ships them
(``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``). They are read from the
wheel file itself (``--wheel``; nothing is downloaded or installed at run time: fetch it once with
``pip download --no-deps nilearn``). Labels: 1 = grey matter, 2 = white matter, where that map is > 0.5 (the
template authors' tissue classification), 0 elsewhere.

Split by hemisphere: the left one (x < 98 in voxel order) is cut into three antero-posterior pieces saved as
NIfTI, ingested (``--val-fraction 0.001``: the ingestion then puts exactly one piece in the validation split) and
trained on with ``unet train`` and no recipe option (the plan: a 3-D UNet; ``--time-budget-s`` only caps the wall
time on a loaded machine, and the report says whether it cut); the right hemisphere (x >= 99) is ingested on its own and predicted with ``unet predict --export nifti``.
Dice per class on the right hemisphere, against two classical baselines fitted on the left hemisphere and applied
to the right: multi-Otsu (4 classes of the whole-head intensities: the brightest is white matter, the next grey
matter), and one Otsu threshold between grey and white inside the true grey + white mask (an oracle mask: an
upper bound for thresholding, not a method).

Usage: ``.venv/bin/python benchmarks/bench_real_volume.py --wheel nilearn-0.14.1-py3-none-any.whl
[--time-budget-s 600] [--workdir DIR] [--smoke]``. Writes ``benchmarks/results/bench_real_volume.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from skimage.filters import threshold_multiotsu, threshold_otsu

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
MEMBER = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
MID = 98  # the template's mid-sagittal voxel column (x = 0 mm)


def from_wheel(wheel: Path, name: str) -> nib.Nifti1Image:
    """One template volume, read from the wheel (a zip) without unpacking it to disk."""
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read(MEMBER.format(name)))
    return nib.Nifti1Image.from_bytes(raw)


def run(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds and output of one CLI process (fails loudly)."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - start, done.stdout


def dice(pred: np.ndarray, truth: np.ndarray, c: int) -> float:
    p, t = pred == c, truth == c
    return float(2 * np.logical_and(p, t).sum() / max(1, p.sum() + t.sum()))


def otsu_labels(t1: np.ndarray, fit_on: np.ndarray) -> np.ndarray:
    """Multi-Otsu (4 classes) thresholds of the ``fit_on`` intensities applied to ``t1``: top class 2, next 1."""
    low, mid, high = threshold_multiotsu(fit_on, classes=4)
    return np.where(t1 > high, 2, np.where(t1 > mid, 1, 0)).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, required=True, help="nilearn wheel (pip download --no-deps nilearn)")
    parser.add_argument("--time-budget-s", type=float, default=600.0, help="wall-clock cap of unet train")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="check the script: 1 epoch of 2 steps (no figures)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override the plan's epochs (its steps per epoch kept): a longer run of the same recipe")
    args = parser.parse_args()
    t1_img = from_wheel(args.wheel, "t1")
    t1 = np.asarray(t1_img.dataobj)
    gm, wm = (np.asarray(from_wheel(args.wheel, n).dataobj) / 255.0 for n in ("gm", "wm"))
    labels = np.where(wm > 0.5, 2, np.where(gm > 0.5, 1, 0)).astype(np.uint8)
    tissue = labels > 0  # the true grey + white mask (the wheel has no CSF map)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-real-volume-"))
    for sub in ("train/images", "train/masks", "test/images", "test/masks"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    affine = t1_img.affine
    left, right = slice(0, MID), slice(MID + 1, t1.shape[0])
    cuts = np.linspace(0, t1.shape[1], 4).astype(int)
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        shift = affine @ np.array([0, a, 0, 1.0])
        piece_affine = affine.copy()
        piece_affine[:3, 3] = shift[:3]
        nib.save(nib.Nifti1Image(t1[left, a:b], piece_affine), workdir / "train/images" / f"left{i}.nii.gz")
        nib.save(nib.Nifti1Image(labels[left, a:b], piece_affine), workdir / "train/masks" / f"left{i}.nii.gz")
    right_affine = affine.copy()
    right_affine[:3, 3] = (affine @ np.array([MID + 1, 0, 0, 1.0]))[:3]
    nib.save(nib.Nifti1Image(t1[right], right_affine), workdir / "test/images" / "right.nii.gz")
    nib.save(nib.Nifti1Image(labels[right], right_affine), workdir / "test/masks" / "right.nii.gz")

    cli = [sys.executable, "-m", "app.cli"]
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    timings = {}
    timings["ingest_s"], _ = run([*cli, "ingest", str(workdir / "train/images"), "--masks", str(workdir / "train/masks"),
                                  "-o", str(workdir / "ds"), "--val-fraction", "0.001", "--num-classes", "3",
                                  "--no-prefect"])
    run([*cli, "ingest", str(workdir / "test/images"), "--masks", str(workdir / "test/masks"), "-o",
         str(workdir / "test-ds"), "--val-fraction", "0", "--num-classes", "3", "--no-prefect"])
    timings["train_s"], train_out = run([*cli, "train", str(workdir / "ds"), "--no-prefect", "--tracking-uri", uri,
                                         "--output", str(workdir / "run"), "--time-budget-s",
                                         str(args.time_budget_s), "--registered-model", "mni",
                                         *(["--epochs", "1", "--steps-per-epoch", "2"] if args.smoke else []),
                                         *(["--epochs", str(args.epochs)] if args.epochs and not args.smoke else [])])
    timings["predict_s"], _ = run([*cli, "predict", str(workdir / "test-ds"), "-o", str(workdir / "pred"), "--model",
                                   str(workdir / "run/best"), "--export", "nifti", "--no-prefect"])
    config = json.loads((workdir / "run/best/config.json").read_text())
    pred = np.asarray(nib.load(workdir / "pred" / "right_mask.nii.gz").dataobj)
    truth = labels[right]
    otsu = otsu_labels(t1[right], t1[left].ravel())
    split = threshold_otsu(t1[left][tissue[left]])  # grey vs white inside the true tissue mask (an oracle)
    masked = np.where(tissue[right], np.where(t1[right] > split, 2, 1), 0).astype(np.uint8)
    scores = {name: {"grey": dice(p, truth, 1), "white": dice(p, truth, 2)}
              for name, p in (("unet", pred), ("multi_otsu", otsu), ("otsu_in_true_tissue_mask", masked))}
    for s in scores.values():
        s["mean"] = (s["grey"] + s["white"]) / 2
    plan_lines = [line.strip() for line in train_out.splitlines()
                  if line.startswith(("patch_size", "batch_size", "steps ", "model.depth", "trained in"))]
    result = {"volume": "MNI ICBM152 2009a sym T1 + GM/WM maps > 0.5 (nilearn wheel)", "shape": list(t1.shape),
              "train": "left hemisphere, 3 pieces (1 validation)", "test": "right hemisphere",
              "time_budget_s": args.time_budget_s, "epochs_option": args.epochs, "val_dice": config.get("val_dice"),
              "plan": plan_lines, **timings, "dice": scores}
    print(json.dumps(result, indent=2))
    if args.smoke:
        return
    RESULTS.mkdir(exist_ok=True)
    suffix = f"-epochs{args.epochs}" if args.epochs else ""
    (RESULTS / f"bench_real_volume{suffix}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
