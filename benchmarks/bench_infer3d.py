"""3-D inference end to end: ``unet predict`` on a NIfTI volume vs MONAI's ``sliding_window_inference``, whole
processes side by side, with the same 3-D weights.

One synthetic CT-like volume (default 128 x 192 x 192 int16, 1 x 0.8 x 0.8 mm, blobs on noise) is saved as NIfTI and
ingested once (``unet ingest``, timed on its own). One 3-D UNet (default depth 3, base 16, random init) is saved
with ``save_model``. Each side is a fresh process that reads the NIfTI volume and writes a NIfTI mask:

- ``pipeline``: ``python -m app.cli predict <dataset> --export nifti`` (Zarr → Dask local cluster of the default
  shape → UNet → Gaussian blend → Zarr → NIfTI with the source's affine), tile 64³, overlap 0.5, 4 tiles per pass;
- ``monai``: this script with ``--monai-side``: nibabel loads the volume whole, z-score, then
  ``monai.inferers.sliding_window_inference(roi_size=(64, 64, 64), sw_batch_size=4, overlap=0.5,
  mode="gaussian")`` under ``torch.inference_mode`` as its users call it (default memory layout, all cores), the
  sigmoid thresholded at 0.5, and nibabel saves the mask with the same affine.

Both see the volume in ``(z, y, x)`` order, so the masks can be compared (the share of equal voxels is reported;
the two tile grids differ slightly: MONAI's last tile is not flush with the border). Sides are interleaved
``--repeats`` times (1 by default: about 3 minutes on 2 cores); the best wall time of each (and its children's CPU
time) is reported, with the ratio.
MONAI is a benchmark-only dependency: ``.venv/bin/pip install monai`` (it installs without pulling a new torch).

Usage: ``.venv/bin/python benchmarks/bench_infer3d.py [--shape 128 192 192] [--depth 3] [--base 16] [--repeats 1]``
Writes ``benchmarks/results/bench_infer3d.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
ROI, OVERLAP, SW_BATCH = 64, 0.5, 4
SPACING = (1.0, 0.8, 0.8)  # z, y, x in mm


def synthetic_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Bright spheres on a noisy background (int16, HU-like), built slab by slab."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    centres = rng.uniform((0, 0, 0), shape, size=(max(4, d * h * w // 40_000), 3))
    radii = rng.uniform(4, 14, len(centres))
    vol = rng.normal(-100, 40, shape).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for z in range(d):
        for (cz, cy, cx), r in zip(centres, radii):
            if abs(z - cz) < r:
                rr = r * r - (z - cz) ** 2
                vol[z][(yy - cy) ** 2 + (xx - cx) ** 2 < rr] += 400
    return np.clip(vol, -1024, 3000).astype(np.int16)


def monai_side(args: argparse.Namespace) -> None:
    """The MONAI process: load the NIfTI volume whole, sliding window, save the mask."""
    import nibabel as nib
    import torch
    from monai.inferers import sliding_window_inference

    from unetcore.model import load_model

    model, _ = load_model(Path(args.model))
    model.eval()
    image = nib.load(args.input)
    zyx = np.ascontiguousarray(np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0))
    x = torch.from_numpy((zyx - zyx.mean()) / max(float(zyx.std()), 1e-12))[None, None]
    start = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(x, roi_size=(ROI, ROI, ROI), sw_batch_size=SW_BATCH, predictor=model,
                                          overlap=OVERLAP, mode="gaussian")
    mask = (torch.sigmoid(logits[0, 0]) > 0.5).numpy().astype(np.uint8)
    compute_s = time.perf_counter() - start
    nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0), image.affine, image.header), args.output)
    print(json.dumps({"compute_s": compute_s}))


def timed_process(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds and children's CPU seconds of one process (and its stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 192, 192])
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--base", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--monai-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.monai_side:
        monai_side(args)
        return

    import nibabel as nib
    import torch

    from unetcore.config import ModelConfig, NormalizationConfig
    from unetcore.model import build_model, save_model

    try:
        import monai  # noqa: F401
    except ImportError:
        raise SystemExit("MONAI is not installed: .venv/bin/pip install monai") from None
    shape = tuple(args.shape)
    rows: dict[str, list[dict[str, float]]] = {"pipeline": [], "monai": []}
    with tempfile.TemporaryDirectory(prefix="bench-infer3d-") as tmp_str:
        tmp = Path(tmp_str)
        (tmp / "images").mkdir()
        affine = np.diag([-SPACING[2], -SPACING[1], SPACING[0], 1.0])
        nib.save(nib.Nifti1Image(synthetic_volume(shape).transpose(2, 1, 0), affine), tmp / "images" / "ct.nii.gz")
        torch.manual_seed(0)
        model = build_model(ModelConfig(spatial_dims=3, depth=args.depth, base_channels=args.base)).eval()
        save_model(tmp / "model", model, {"normalization": NormalizationConfig(mode="zscore").model_dump()})
        cli = [sys.executable, "-m", "app.cli"]
        ingest_s, ingest_cpu, _ = timed_process([*cli, "ingest", str(tmp / "images"), "-o", str(tmp / "ds"),
                                                 "--val-fraction", "0", "--no-prefect"])
        print(f"ingest: {ingest_s:.1f} s ({ingest_cpu:.1f} cpu-s)", flush=True)
        for r in range(args.repeats):
            out = tmp / f"pred{r}"
            wall, cpu, _ = timed_process([*cli, "predict", str(tmp / "ds"), "-o", str(out), "--model",
                                          str(tmp / "model"), "--tile", str(ROI), "--overlap", str(OVERLAP),
                                          "--batch-size", str(SW_BATCH), "--export", "nifti", "--no-prefect"])
            rows["pipeline"].append({"wall_s": wall, "cpu_s": cpu})
            monai_out = tmp / f"monai{r}.nii.gz"
            wall, cpu, stdout = timed_process([sys.executable, __file__, "--monai-side", "--input",
                                               str(tmp / "images" / "ct.nii.gz"), "--model", str(tmp / "model"),
                                               "--output", str(monai_out)])
            rows["monai"].append({"wall_s": wall, "cpu_s": cpu, **json.loads(stdout.strip().splitlines()[-1])})
            print(f"round {r + 1}: pipeline {rows['pipeline'][-1]['wall_s']:.1f} s, monai {wall:.1f} s "
                  f"(its sliding window {rows['monai'][-1]['compute_s']:.1f} s)", flush=True)
        ours = np.asarray(nib.load(out / "ct_mask.nii.gz").dataobj)
        theirs = np.asarray(nib.load(monai_out).dataobj)
        agreement = float((ours == theirs).mean())
        same_affine = bool(np.array_equal(nib.load(out / "ct_mask.nii.gz").affine,
                                          nib.load(tmp / "images" / "ct.nii.gz").affine))

    best = {k: min(v, key=lambda row: row["wall_s"]) for k, v in rows.items()}
    voxels = int(np.prod(shape))
    ratio = best["monai"]["wall_s"] / best["pipeline"]["wall_s"]
    summary: dict[str, Any] = {
        "shape": list(shape), "spacing": list(SPACING), "model": {"depth": args.depth, "base": args.base},
        "roi": ROI, "overlap": OVERLAP, "sw_batch": SW_BATCH, "cores": os.cpu_count(), "ingest_s": ingest_s,
        "rows": rows, "best": best, "pipeline_vs_monai": ratio,
        "pipeline_vs_monai_with_ingest": best["monai"]["wall_s"] / (best["pipeline"]["wall_s"] + ingest_s),
        "mask_agreement": agreement, "pipeline_mask_has_source_affine": same_affine, "load_avg": os.getloadavg(),
    }
    print(f"\n{'x'.join(map(str, shape))} ({voxels / 1e6:.1f} M voxels), 3-D UNet depth {args.depth} base {args.base}, "
          f"roi {ROI}³, overlap {OVERLAP}, sw_batch {SW_BATCH}, {os.cpu_count()} cores")
    for k, row in best.items():
        print(f"{k:>9}: {row['wall_s']:7.1f} s wall, {row['cpu_s']:7.1f} cpu-s, {voxels / 1e6 / row['wall_s']:.3f} "
              f"M voxels/s")
    print(f"pipeline vs MONAI (whole processes): {ratio:.2f}x; counting ingestion: "
          f"{summary['pipeline_vs_monai_with_ingest']:.2f}x; masks agree on {100 * agreement:.2f} % of voxels")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_infer3d.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
