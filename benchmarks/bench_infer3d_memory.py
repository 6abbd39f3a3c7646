"""Peak memory of 3-D inference does not grow with the volume: a small volume vs one 4x larger.

For each size, a synthetic volume store (uint8, OME-Zarr ``c, z, y, x``, 1 µm voxels, the ingestion's 3-D chunks of
``1024**2`` voxels, blobs on noise so no tile is skipped) is written slab by slab and listed in a manifest, then
``predict_dataset`` runs on a fresh local cluster of the default shape with a tiny 3-D UNet (depth 1, base 4), tile
64³, overlap 0.5, float16 probabilities, label pyramid and the three-slice preview, no export, and the default
block budget (``block_size**2`` voxels a block: 4 M voxels). The summed resident set size of this process and all
its children (scheduler, nannies, workers) is sampled every 0.2 s (:class:`bench_infer_memory.PeakRss`), and each
process's own high-water mark is read before the workers exit.

Usage: ``.venv/bin/python benchmarks/bench_infer3d_memory.py [--sizes 128x256x256 128x512x512] [--tile 64]
[--overlap 0.5]`` (about 3 minutes on 2 cores; a larger tile and a smaller overlap only cut the compute, the block
budget that bounds memory is the same). Writes ``benchmarks/results/bench_infer3d_memory.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_infer_memory import PeakRss  # type: ignore[import-not-found]  # sibling script

from unetcore.allocator import release_free_memory
from unetcore.cluster import dask_cluster, local_cluster_shape
from unetcore.config import InferConfig, ModelConfig, NormalizationConfig
from unetcore.inference import predict_dataset
from unetcore.model import build_model, save_model
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.store.stats import StreamingStats

RESULTS = Path(__file__).parent / "results"
CHUNK = 1024
TILE = 64


def write_volume_store(dataset: Path, image_id: str, shape: tuple[int, int, int], seed: int = 0) -> None:
    """Write a uint8 volume store slab by slab (never whole in memory) and list it in the manifest."""
    rng = np.random.default_rng(seed)
    depth, height, width = shape
    spacing = (1.0, 1.0, 1.0)
    chunk = omezarr.chunk_shape(shape, CHUNK, spacing)
    path = mf.store_path(dataset, image_id)
    root = omezarr.create_image(path, (1, *shape), np.uint8, chunk, name=image_id, spacing=spacing,
                                unit="micrometer")
    blobs = [(rng.uniform(0, depth), rng.uniform(0, height), rng.uniform(0, width), rng.uniform(4, 16))
             for _ in range(max(8, depth * height * width // 30_000))]
    stats = StreamingStats(1, np.dtype(np.uint8))
    for z0 in range(0, depth, chunk[0]):
        slab = rng.normal(70, 20, (min(chunk[0], depth - z0), height, width))
        for k in range(slab.shape[0]):
            for cz, cy, cx, r in blobs:
                if abs(z0 + k - cz) < r:  # the disc of this sphere in slice z0 + k, drawn in its bounding box
                    y0, y1 = max(0, int(cy - r)), min(height, int(cy + r) + 1)
                    x0, x1 = max(0, int(cx - r)), min(width, int(cx + r) + 1)
                    yy, xx = np.mgrid[y0:y1, x0:x1]
                    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r - (z0 + k - cz) ** 2
                    slab[k, y0:y1, x0:x1][disc] += 100
        slab = np.clip(slab, 0, 255).astype(np.uint8)
        stats.update(slab[..., None])
        root["0"][0, z0 : z0 + slab.shape[0]] = slab
    omezarr.build_pyramid(root, "image")
    geometry = {"spatial_dims": 3, "spacing": list(spacing), "unit": "micrometer", "affine": None, "nifti": None}
    result = stats.result()
    omezarr.set_unet_attrs(root, {"id": image_id, "source": "synthetic", "stats": result, "geometry": geometry})
    mf.put_entry(dataset, {"id": image_id, "source": "synthetic", "source_hash": f"synthetic-{shape}-{seed}",
                           "store": path.name, "shape": list(shape), "channels": 1, "dtype": "uint8", "chunk": CHUNK,
                           "has_mask": False, "classes": [], "stats": result, "split": "train", "spatial_dims": 3,
                           "spacing": list(spacing), "unit": "micrometer", "affine": None})


def measure(tmp: Path, shape: tuple[int, int, int], model_dir: Path, tile: int, overlap: float) -> dict[str, Any]:
    name = "x".join(map(str, shape))
    dataset = tmp / f"ds{name}"
    start = time.perf_counter()
    write_volume_store(dataset, "vol", shape)
    write_s = time.perf_counter() - start
    cfg = InferConfig(dataset=str(dataset), output=str(tmp / f"out{name}"), model=str(model_dir), tile=tile,
                      overlap=overlap, export="none")
    gc.collect()
    release_free_memory()  # what writing the store left in this process's heap is not the inference's
    PeakRss.reset_high_water_mark()
    with PeakRss() as rss:
        start = time.perf_counter()
        with dask_cluster(None) as cluster:
            [res] = predict_dataset(cfg, cluster=cluster)
            marks = PeakRss.high_water_marks()  # before the workers exit
        seconds = time.perf_counter() - start
    driver, largest_worker = rss.driver_and_largest_child()
    voxels = int(np.prod(shape))
    return {"shape": list(shape), "megavoxels": voxels / 1e6, "peak_rss_mb": round(rss.peak / 2**20, 1),
            "sum_of_process_peaks_mb": round(sum(marks.values()) / 2**20, 1),
            "process_peaks_mb": [round(v / 2**20, 1) for v in marks.values()],
            "peak_rss_driver_mb": round(driver / 2**20, 1), "peak_rss_largest_worker_mb": round(largest_worker / 2**20, 1),
            "samples": rss.samples, "seconds": round(seconds, 1), "write_store_s": round(write_s, 1),
            "megavoxels_per_s": round(voxels / 1e6 / seconds, 3), "blocks": res.blocks,
            "block_shape": res.block_shape, "tile_evaluations": res.tile_evaluations, "grid_tiles": res.grid_tiles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["128x256x256", "128x512x512"], help="DxHxW per volume.")
    parser.add_argument("--tmp", type=Path, default=None, help="Where to write the stores (default: system temp).")
    parser.add_argument("--tile", type=int, default=TILE, help="Tile edge (64: the benchmark's default).")
    parser.add_argument("--overlap", type=float, default=0.5, help="Tile overlap (0.5: a 3-D model's default).")
    args = parser.parse_args()
    if args.tmp is not None:
        args.tmp.mkdir(parents=True, exist_ok=True)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    workers, threads = local_cluster_shape(os.cpu_count() or 1, 0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-infer3d-mem-", dir=args.tmp) as tmp_str:
        tmp = Path(tmp_str)
        model = build_model(ModelConfig(base_channels=4, depth=1, spatial_dims=3))
        save_model(tmp / "model", model, {"normalization": NormalizationConfig().model_dump()})
        for shape in shapes:
            rows.append(measure(tmp, shape, tmp / "model", args.tile, args.overlap))
            r = rows[-1]
            print(f"{'x'.join(map(str, shape))} ({r['megavoxels']:.1f} M voxels): peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"over all processes (driver with scheduler {r['peak_rss_driver_mb']:.0f}, largest worker "
                  f"{r['peak_rss_largest_worker_mb']:.0f}); sum of each process's own peak "
                  f"{r['sum_of_process_peaks_mb']:.0f} MB {r['process_peaks_mb']}; {r['seconds']} s, {r['blocks']} "
                  f"blocks of {r['block_shape']}", flush=True)
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    hwm_ratio = rows[-1]["sum_of_process_peaks_mb"] / rows[0]["sum_of_process_peaks_mb"]
    print(f"\n{rows[-1]['megavoxels']:.1f} / {rows[0]['megavoxels']:.1f} M voxels ({workers} workers x {threads} "
          f"thread(s)): sampled peak RSS {ratio:.3f}, sum of process peaks {hwm_ratio:.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_infer3d_memory.json").write_text(json.dumps(
        {"rows": rows, "tile": args.tile, "overlap": args.overlap, "ratio_largest_to_smallest": ratio, "hwm_ratio_largest_to_smallest": hwm_ratio,
         "workers": workers, "threads": threads}, indent=2))


if __name__ == "__main__":
    main()
