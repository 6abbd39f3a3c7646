"""Background skipping (issue 15.2): forward tiles and wall time with the tissue mask on and off, same labels.

Data: a 4096² slide-like canvas, 40 % real texture and 60 % empty background. The texture is the 512²
fluorescence nuclei image StarDist ships in its wheel (``stardist/data/images/img2d.tif``, BBBC038, CC0), tiled
with flips and rotations into a contiguous 'tissue' region of 26 of the 64 512² cells; the other cells are the
image's own background level with camera-like noise (not constant, so the constant-tile skip does not apply).
Optionally a second dataset (``--demo IMAGE_FOLDER``, e.g. the demo's held-out synthetic image) checks that the
labels stay identical on data without empty regions.

Each side is a whole ``unet predict --no-prefect --export none`` process as a user runs it (``--no-skip-background``
for the dense side), alternated ``--repeats`` times; the label Dice between the two sides and the tiles computed
(the CLI's ``tiles computed`` line) are reported after each pair. Writes ``benchmarks/results/background.json``
as it goes.

    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_background.py --nuclei img2d.tif --model MODEL_DIR \\
        [--demo DEMO_IMAGES] [--repeats 2] [--workdir /tmp/bench-background]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr
from skimage.filters import threshold_otsu

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CELL, CELLS = 512, 8


def slide_canvas(nuclei: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """A (4096, 4096) canvas: nuclei cells inside an ellipse (26 of 64 cells), noisy background elsewhere.

    Returns the canvas and its texture fraction."""
    rng = np.random.default_rng(seed)
    image = nuclei[:CELL, :CELL].astype(np.float32)
    background = image[image <= threshold_otsu(image)]
    mean, std = float(background.mean()), float(background.std())
    canvas = rng.normal(mean, std, (CELL * CELLS, CELL * CELLS)).clip(0, None)
    centre = (CELLS - 1) / 2
    ranked = sorted(((i - centre) ** 2 / 1.0 + (j - centre - 1.5) ** 2 / 2.2, i, j)
                    for i in range(CELLS) for j in range(CELLS))
    tissue = [(i, j) for _, i, j in ranked[:26]]
    for i, j in tissue:
        cell = np.rot90(image, int(rng.integers(4)))
        cell = cell[::-1] if rng.integers(2) else cell
        canvas[i * CELL:(i + 1) * CELL, j * CELL:(j + 1) * CELL] = cell
    return canvas.round().astype(nuclei.dtype), len(tissue) / CELLS**2


def ingest(images: Path, dataset: Path) -> None:
    cmd = [sys.executable, "-m", "app.cli", "ingest", str(images), "-o", str(dataset), "--val-fraction", "0",
           "--no-prefect"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)


def predict(dataset: Path, out: Path, model: Path, skip: bool) -> dict[str, Any]:
    """One whole `unet predict` process; its wall time and the tiles it computed."""
    cmd = [sys.executable, "-m", "app.cli", "predict", str(dataset), "-o", str(out), "--model", str(model),
           "--no-prefect", "--export", "none", "--overwrite",
           "--skip-background" if skip else "--no-skip-background"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    found = re.search(r"tiles computed (\d+) for (\d+) in the grid", done.stdout)
    own = re.search(r"in ([\d.]+) s", done.stdout)
    return {"wall_s": round(wall, 2), "own_s": float(own.group(1)) if own else None,
            "tiles_computed": int(found.group(1)) if found else None,
            "grid_tiles": int(found.group(2)) if found else None}


def labels(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(zarr.open_group(store=str(p), mode="r")["labels/prediction/0"][:])
            for p in sorted(out.glob("*.ome.zarr"))}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    inter = int(np.logical_and(a > 0, b > 0).sum())
    total = int((a > 0).sum() + (b > 0).sum())
    return 1.0 if total == 0 else 2 * inter / total


def compare(name: str, dataset: Path, work: Path, model: Path, repeats: int, result: dict[str, Any]) -> None:
    """Alternate the two sides ``repeats`` times; after each pair, its label agreement (saved as it goes)."""
    entry = result.setdefault(name, {})
    entry["runs"], entry["labels"] = [], []
    for r in range(repeats):
        for skip in (True, False):
            side = predict(dataset, work / f"pred-{'on' if skip else 'off'}", model, skip)
            entry["runs"].append({"repeat": r + 1, "skip_background": skip, **side})
            print(name, entry["runs"][-1], flush=True)
        on, off = labels(work / "pred-on"), labels(work / "pred-off")
        entry["labels"].append({k: {"dice": round(dice(on[k], off[k]), 6),
                                    "pixels_differing": int((on[k] != off[k]).sum()),
                                    "foreground_on": int((on[k] > 0).sum()), "foreground_off": int((off[k] > 0).sum())}
                                for k in on})
        print(name, entry["labels"][-1], flush=True)
        save(result)


def save(result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "background.json").write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nuclei", type=Path, required=True, help="StarDist's img2d.tif")
    parser.add_argument("--model", type=Path, required=True, help="a trained model folder (config.json, weights.pt)")
    parser.add_argument("--demo", type=Path, default=None, help="folder of demo images to check label agreement on")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-background"))
    args = parser.parse_args()

    result: dict[str, Any] = {"model": str(args.model), "repeats": args.repeats}
    if args.demo is not None:
        demo = args.workdir / "demo"
        ingest(args.demo, demo / "dataset")
        compare("demo", demo / "dataset", demo, args.model, 1, result)
    slide = args.workdir / "slide"
    (slide / "images").mkdir(parents=True, exist_ok=True)
    canvas, fraction = slide_canvas(tifffile.imread(args.nuclei))
    tifffile.imwrite(slide / "images" / "slide.tif", canvas, tile=(256, 256), compression="zlib")
    ingest(slide / "images", slide / "dataset")
    result["slide"] = {"shape": list(canvas.shape), "texture_fraction": fraction}
    compare("slide", slide / "dataset", slide, args.model, args.repeats, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
