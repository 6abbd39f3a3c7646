"""Local cluster shape: 1 worker x 1 thread vs N single-thread workers vs 1 worker x N torch threads.

The same prediction (synthetic uint8 image of each ``--sizes``, UNet depth 4 base 16, tile 256, overlap 0.5,
batch 4, ``export none``) runs end to end with ``predict_dataset`` on a local cluster of each shape, interleaved
over ``--repeats`` rounds. Each round starts each cluster afresh (only one is up at a time, as in use: the idle
workers of another cluster would take CPU from the one measured) and loads the model on every worker with a
small warm-up prediction before the timed one. The best time per shape is reported, with throughput ratios:
``N x 1`` vs ``1 x 1`` is the scaling from one worker to N; ``N x 1`` vs ``1 x N`` decides the default local
cluster shape.

The block plan depends on the workers (at least one block per worker), so a small image split for N workers
computes more tiles twice at block borders than one worker does (the ``tiles`` column); from 4096² up, the
block size limit already splits the image for one worker and both compute the same tiles. Tiles per
CPU-second (summed over the blocks' process CPU time, from the completion records) separate the engine's
efficiency from a noisy machine: with cores to itself, N single-thread workers run N times the 1 x 1 rate
times this ratio.

Usage: ``.venv/bin/python benchmarks/bench_infer_scaling.py [--sizes 2048 4096] [--repeats 3]``
Writes ``benchmarks/results/bench_infer_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import tifffile
import torch
from bench_infer import synthetic_image  # type: ignore[import-not-found]  # sibling script

from unetcore.cluster import dask_cluster
from unetcore.config import InferConfig, IngestConfig, ModelConfig, NormalizationConfig
from unetcore.inference import predict_dataset
from unetcore.ingest import ingest_folder
from unetcore.model import build_model, save_model

RESULTS = Path(__file__).parent / "results"


def _ingest(tmp: Path, name: str, size: int, chunk: int) -> Path:
    (tmp / name / "images").mkdir(parents=True)
    tifffile.imwrite(tmp / name / "images" / "img.tif", synthetic_image(size))
    ingest_folder(IngestConfig(images=str(tmp / name / "images"), output=str(tmp / name / "ds"), chunk_size=chunk,
                               val_fraction=0.0))
    return tmp / name / "ds"


def _workers_used(output: Path) -> int:
    return len({json.loads(p.read_text())["worker"] for p in (output / "img.blocks").glob("y*.json")})


def measure(tmp: Path, model: Path, warm: Path, size: int, repeats: int,
            shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Best end-to-end time, tile evaluations and tiles per CPU-second of each cluster shape on one image."""
    dataset = _ingest(tmp, f"img{size}", size, 1024)
    times: dict[str, list[float]] = {k: [] for k in shapes}
    info: dict[str, dict[str, Any]] = {}
    cpu_rate: dict[str, float] = {}

    def cfg(ds: Path, name: str, threads: int) -> InferConfig:
        return InferConfig(dataset=str(ds), output=str(tmp / f"out{size}" / name), model=str(model), export="none",
                           skip_empty=False, threads_per_worker=threads)

    for r in range(repeats):
        for key, (workers, threads) in shapes.items():
            with dask_cluster(None, workers, threads) as cluster:
                predict_dataset(cfg(warm, f"warm-{key}-{r}", threads), cluster=cluster)
                if (used := _workers_used(tmp / f"out{size}" / f"warm-{key}-{r}")) < workers:
                    print(f"  warning: the warm-up reached {used} of {workers} workers", flush=True)
                start = time.perf_counter()
                [res] = predict_dataset(cfg(dataset, f"{key}-{r}", threads), cluster=cluster)
                times[key].append(time.perf_counter() - start)
            records = [json.loads(p.read_text()) for p in (tmp / f"out{size}" / f"{key}-{r}" / "img.blocks").glob("y*.json")]
            cpu = sum(rec["cpu_seconds"] for rec in records)
            cpu_rate[key] = max(cpu_rate.get(key, 0.0), res.tile_evaluations / cpu)
            info[key] = {"blocks": res.blocks, "block_shape": res.block_shape, "tile_evaluations": res.tile_evaluations}
        print(f"{size}² round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    return {"times": times, "best_s": {k: min(v) for k, v in times.items()}, "info": info, "tiles_per_cpu_s": cpu_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    shapes = {"1x1": (1, 1), f"{cores}x1": (cores, 1), f"1x{cores}": (1, cores)}
    n, t = f"{cores}x1", f"1x{cores}"
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-infer-scaling-") as tmp_str:
        tmp = Path(tmp_str)
        torch.manual_seed(0)
        save_model(tmp / "model", build_model(ModelConfig(base_channels=16, depth=4)),
                   {"normalization": NormalizationConfig().model_dump()})
        warm = _ingest(tmp, "warm", 1024, 256)  # 16 chunks: a block for every worker, seconds to predict
        for size in args.sizes:
            results[str(size)] = measure(tmp, tmp / "model", warm, size, args.repeats, shapes)

    print(f"\nUNet depth 4 base 16, tile 256, overlap 0.5, {cores} cores, best of {args.repeats}")
    print(f"{'image':>6} {'workers x threads':>18} {'best s':>8} {'MP/s':>7} {'tiles':>6} {'tiles/cpu-s':>12} "
          f"{'block':>13}")
    for size, res in results.items():
        mp = int(size) ** 2 / 1e6
        for k, v in res["best_s"].items():
            print(f"{size:>6} {k:>18} {v:>8.2f} {mp / v:>7.3f} {res['info'][k]['tile_evaluations']:>6} "
                  f"{res['tiles_per_cpu_s'][k]:>12.2f} {str(res['info'][k]['block_shape']):>13}")
        best, rate = res["best_s"], res["tiles_per_cpu_s"]
        res["ratios"] = {f"{n}_vs_1x1": best["1x1"] / best[n], f"{n}_vs_{t}": best[t] / best[n],
                         f"cpu_efficiency_{n}_vs_1x1": rate[n] / rate["1x1"],
                         f"cpu_efficiency_{n}_vs_{t}": rate[n] / rate[t]}
        print(f"{size}²: " + ", ".join(f"{k} {v:.2f}x" for k, v in res["ratios"].items()))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_infer_scaling.json").write_text(json.dumps(
        {"cores": cores, "repeats": args.repeats, "sizes": results, "load_avg": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
