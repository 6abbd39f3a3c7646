"""GeoJSON export speed and memory: a 4096² instance mask with tens of thousands of cells.

Synthetic cells (discs of radius 3-9 px at random places, four classes, touching and overlapping cells merged
as the pipeline's 4-connected instances would be) are written into a prediction-like store (1024² chunks);
:func:`unetcore.inference.write_shapes` then writes the GeoJSON and the object table, read in 2048² blocks (so
cells on the block faces are joined). Reported: seconds, objects per second, the peak RSS growth of the export
(the store's arrays are never loaded whole by it) and the file sizes. Each repeat runs in this process after a
warm-up on a small store.

Usage: ``.venv/bin/python benchmarks/bench_geojson.py [--size 4096] [--cells 40000] [--repeats 2]``
Writes ``benchmarks/results/bench_geojson.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"

from skimage import measure  # noqa: E402

from unetcore.inference import write_shapes  # noqa: E402
from unetcore.store import omezarr  # noqa: E402


def cells(size: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(classes uint8, instances uint32) of ``n`` random discs on a ``size``² image."""
    rng = np.random.default_rng(seed)
    sem = np.zeros((size, size), np.uint8)
    for y, x, r, c in zip(rng.integers(0, size, n), rng.integers(0, size, n), rng.integers(3, 10, n),
                          rng.integers(1, 5, n)):
        y0, y1, x0, x1 = max(0, y - r), min(size, y + r + 1), max(0, x - r), min(size, x + r + 1)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        sem[y0:y1, x0:x1][(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = c
    return sem, measure.label(sem, background=0, connectivity=1).astype(np.uint32)


def store(path: Path, sem: np.ndarray, inst: np.ndarray) -> object:
    root = omezarr.create_image(path, (1, *sem.shape), "float16", 1024, n_levels=1)
    omezarr.create_labels(root, "prediction", sem.shape, np.uint8, 1024, n_levels=1)
    omezarr.create_labels(root, "instances", sem.shape, np.uint32, 1024, n_levels=1)
    root["labels/prediction/0"][:] = sem
    root["labels/instances/0"][:] = inst
    return root


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--cells", type=int, default=40000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-geojson-"))
    try:
        small = store(work / "small.ome.zarr", *cells(256, 200))
        write_shapes(small, work / "small_mask.geojson", "small")  # warm-up: imports, GDAL
        sem, inst = cells(args.size, args.cells)
        root = store(work / "big.ome.zarr", sem, inst)
        n_objects = int(inst.max())
        del sem, inst
        before = peak_rss_mb()
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            geojson, table = write_shapes(root, work / "big_mask.geojson", "big")
            runs.append(round(time.perf_counter() - t0, 2))
        result = {"size": args.size, "objects": n_objects, "seconds": runs,
                  "objects_per_s": [round(n_objects / s) for s in runs],
                  "peak_rss_mb_before_export": round(before), "peak_rss_mb_after_export": round(peak_rss_mb()),
                  "geojson_mb": round(geojson.stat().st_size / 1e6, 1), "csv_mb": round(table.stat().st_size / 1e6, 1)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_geojson.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
