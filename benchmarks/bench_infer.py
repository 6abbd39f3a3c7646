"""Inference throughput: the Dask pipeline vs the bare model, vs MONAI; and tiles recomputed per block shape.

Side by side in one run, on one synthetic image (default 2048 x 2048, uint8) and one UNet (depth 4, base 16,
random init, the REFERENCE.md model), tile 256, overlap 0.5, 4 tiles per forward pass:

- ``pipeline``: ``predict_dataset`` end to end (Zarr → Dask → UNet → Gaussian blend → Zarr, plus label pyramid
  and preview) on a warm local cluster of the default shape (one single-threaded worker per core);
- ``bare``: the same predictor's forward passes over the grid's tiles in this process (all cores), no I/O,
  no blending: the ceiling for the pipeline;
- ``library``: our whole-image sliding window in RAM in this process (``stitch.sliding_window``);
- ``monai``: MONAI's ``sliding_window_inference`` as its users call it (same weights, Gaussian mode, default
  memory layout, ``torch.no_grad``), on the image in RAM. MONAI is a benchmark-only dependency:
  ``.venv/bin/pip install --no-deps monai==1.6.1`` (``--skip-monai`` leaves it out).

Each side runs ``--repeats`` times, interleaved; the best time of each is reported. The machine is shared, so
each side's CPU time is reported too (this process's, plus the workers' from the completion records for the
pipeline): image megapixels per CPU-second compare the sides' efficiency whatever the neighbours do.

Usage: ``.venv/bin/python benchmarks/bench_infer.py [--size 2048] [--repeats 3] [--skip-monai]``
Writes ``benchmarks/results/bench_infer.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

from unetcore.cluster import dask_cluster, local_cluster_shape
from unetcore.config import InferConfig, IngestConfig, ModelConfig, NormalizationConfig
from unetcore.inference import (
    TileGrid,
    choose_block_shape,
    predict_dataset,
    sliding_window,
    tile_evaluations,
    torch_predictor,
)
from unetcore.ingest import ingest_folder
from unetcore.model import build_model, save_model
from unetcore.store import manifest as mf
from unetcore.store.stats import normalize

RESULTS = Path(__file__).parent / "results"
TILE, OVERLAP, BATCH = 256, 0.5, 4


def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
    """Blobs on a noisy background (uint8), so the network sees texture, not a constant."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = rng.normal(60, 12, (size, size)).astype(np.float32)
    for _ in range(size // 16):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(6, 30)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 100
    return np.clip(img, 0, 255).astype(np.uint8)


def redundancy_table(sizes: list[int], chunk: int, slots: int) -> list[dict[str, Any]]:
    """Tile evaluations for square blocks of several edges and for the chosen shape, per image size."""
    rows = []
    for size in sizes:
        grid = TileGrid.build((size, size), (TILE, TILE), OVERLAP)
        for edge in (512, 1024, 2048, 4096):
            if edge <= size:
                rows.append({"image": size, "block": f"{edge}x{edge}",
                             "tiles_computed": tile_evaluations(grid, (edge, edge)), "grid_tiles": grid.n_tiles})
        chosen = choose_block_shape(grid, (chunk, chunk), 2048**2, slots)
        rows.append({"image": size, "block": f"{chosen[0]}x{chosen[1]} (chosen)",
                     "tiles_computed": tile_evaluations(grid, chosen), "grid_tiles": grid.n_tiles})
    for r in rows:
        r["extra_pct"] = round(100 * (r["tiles_computed"] / r["grid_tiles"] - 1), 1)
    return rows


def bare_forward(predictor: Any, tiles: np.ndarray) -> float:
    start = time.perf_counter()
    for i in range(0, len(tiles), BATCH):
        predictor(tiles[i : i + BATCH])
    return time.perf_counter() - start


def monai_run(model: torch.nn.Module, image: torch.Tensor) -> float:
    from monai.inferers import sliding_window_inference

    start = time.perf_counter()
    with torch.no_grad():
        sliding_window_inference(image, roi_size=(TILE, TILE), sw_batch_size=BATCH, predictor=model,
                                 overlap=OVERLAP, mode="gaussian")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-monai", action="store_true")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    workers, threads = local_cluster_shape(cores, 0)

    table = redundancy_table([args.size, 8192, 32768], 1024, workers)
    print(f"tiles computed per block shape (tile {TILE}, overlap {OVERLAP}, {workers} task slots, chunk 1024)")
    print(f"{'image':>7} {'block':>22} {'computed':>9} {'grid':>9} {'extra':>7}")
    for r in table:
        print(f"{r['image']:>7} {r['block']:>22} {r['tiles_computed']:>9} {r['grid_tiles']:>9} {r['extra_pct']:>6}%")

    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp_str:
        tmp = Path(tmp_str)
        (tmp / "images").mkdir()
        tifffile.imwrite(tmp / "images" / "img.tif", synthetic_image(args.size))
        ingest_folder(IngestConfig(images=str(tmp / "images"), output=str(tmp / "ds"), chunk_size=1024,
                                   val_fraction=0.0))
        torch.manual_seed(0)
        model = build_model(ModelConfig(base_channels=16, depth=4)).eval()
        save_model(tmp / "model", model, {"normalization": NormalizationConfig().model_dump()})
        [entry] = mf.entries(mf.require(tmp / "ds"))
        import zarr

        raw = zarr.open_group(store=str(mf.store_path(tmp / "ds", "img")), mode="r")["0"][:]
        x = normalize(raw, entry["stats"], NormalizationConfig())
        grid = TileGrid.build(x.shape[1:], (TILE, TILE), OVERLAP)
        tiles = np.stack([x[:, y : y + TILE, xx : xx + TILE] for y, xx in grid.tiles()])
        fast = torch_predictor(model, torch.device("cpu"))  # channels_last copy for bare + library
        plain = build_model(ModelConfig(base_channels=16, depth=4)).eval()
        plain.load_state_dict(model.state_dict())  # MONAI's side: same weights, default layout
        image_t = torch.from_numpy(x[None])

        def cfg(name: str) -> InferConfig:
            return InferConfig(dataset=str(tmp / "ds"), output=str(tmp / name), model=str(tmp / "model"),
                               tile=TILE, overlap=OVERLAP, batch_size=BATCH, export="none", skip_empty=False)

        bare_forward(fast, tiles[:BATCH])  # warm-up: oneDNN builds its kernels on the first calls
        with torch.no_grad():
            plain(torch.from_numpy(tiles[:BATCH]))
        times: dict[str, list[float]] = {"pipeline": [], "bare": [], "library": [], "monai": []}
        cpu: dict[str, list[float]] = {k: [] for k in times}

        def timed(side: str, fn: Any) -> Any:
            start, cpu0 = time.perf_counter(), time.process_time()
            out = fn()
            times[side].append(time.perf_counter() - start)
            cpu[side].append(time.process_time() - cpu0)
            return out

        with dask_cluster(None) as cluster:
            predict_dataset(cfg("warm"), cluster=cluster)  # workers load the model once
            for r in range(args.repeats):
                [res] = timed("pipeline", lambda: predict_dataset(cfg(f"run{r}"), cluster=cluster))
                records = (tmp / f"run{r}" / "img.blocks").glob("y*.json")
                cpu["pipeline"][-1] += sum(json.loads(p.read_text())["cpu_seconds"] for p in records)
                timed("bare", lambda: bare_forward(fast, tiles))
                timed("library", lambda: sliding_window(x, fast, (TILE, TILE), OVERLAP, BATCH))
                if not args.skip_monai:
                    timed("monai", lambda: monai_run(plain, image_t))
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s ({cpu[k][-1]:.1f} cpu-s)"
                                                     for k, v in times.items() if v), flush=True)

    mp = args.size**2 / 1e6
    best = {k: min(v) for k, v in times.items() if v}
    best_cpu = {k: min(v) for k, v in cpu.items() if v}
    print(f"\n{args.size}x{args.size}, UNet depth 4 base 16, {workers} workers x {threads} thread(s); pipeline "
          f"computed {res.tile_evaluations} tiles (grid {res.grid_tiles}), blocks {res.block_shape}")
    print(f"{'side':>10} {'best s':>8} {'MP/s':>7} {'cpu-s':>7} {'MP/cpu-s':>9}")
    for k, v in best.items():
        print(f"{k:>10} {v:>8.2f} {mp / v:>7.3f} {best_cpu[k]:>7.1f} {mp / best_cpu[k]:>9.3f}")
    ratios = {"pipeline_vs_bare": best["bare"] / best["pipeline"],
              "pipeline_vs_bare_cpu": best_cpu["bare"] / best_cpu["pipeline"]}
    if "monai" in best:
        ratios["pipeline_vs_monai"] = best["monai"] / best["pipeline"]
        ratios["library_vs_monai"] = best["monai"] / best["library"]
        ratios["pipeline_vs_monai_cpu"] = best_cpu["monai"] / best_cpu["pipeline"]
        ratios["library_vs_monai_cpu"] = best_cpu["monai"] / best_cpu["library"]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_infer.json").write_text(json.dumps(
        {"size": args.size, "workers": workers, "threads": threads, "times": times, "best_s": best, "ratios": ratios,
         "cpu_s": cpu, "best_cpu_s": best_cpu,
         "tile_evaluations": res.tile_evaluations, "grid_tiles": res.grid_tiles, "block_shape": res.block_shape,
         "redundancy": table, "load_avg": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
