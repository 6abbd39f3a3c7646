"""Local cluster shape: 1 worker x 1 thread vs N single-thread workers vs 1 worker x N torch threads.

The same prediction (synthetic 2048² uint8 image, UNet depth 4 base 16, tile 256, overlap 0.5, batch 4,
``export none``) runs end to end with ``predict_dataset`` on local clusters of each shape, interleaved over
``--repeats`` rounds; the model is loaded by a warm-up run on each cluster, which stays up for all rounds. The
best time per shape is reported, with throughput ratios: ``N x 1`` vs ``1 x 1`` is the scaling from one worker
to N; ``N x 1`` vs ``1 x N`` decides the default local cluster shape.

On a shared machine wall time mostly measures the neighbours, so the script also reports tiles per CPU-second
(summed over the blocks' process CPU time, from the completion records): with cores to itself, N single-thread
workers run N times the 1 x 1 rate times this efficiency ratio.

Usage: ``.venv/bin/python benchmarks/bench_infer_scaling.py [--size 2048] [--repeats 2]``
Writes ``benchmarks/results/bench_infer_scaling.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import tifffile
import torch

from bench_infer import synthetic_image  # type: ignore[import-not-found]  # sibling script
from unetcore.config import IngestConfig, InferConfig, ModelConfig, NormalizationConfig
from unetcore.inference.engine import dask_client, predict_dataset
from unetcore.ingest import ingest_folder
from unetcore.model import build_model, save_model

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    shapes = {"1x1": (1, 1), f"{cores}x1": (cores, 1), f"1x{cores}": (1, cores)}
    times: dict[str, list[float]] = {k: [] for k in shapes}
    info: dict[str, dict[str, object]] = {}
    cpu_rate: dict[str, float] = {}  # best tiles per CPU-second of the workers
    with tempfile.TemporaryDirectory(prefix="bench-infer-scaling-") as tmp_str, contextlib.ExitStack() as stack:
        tmp = Path(tmp_str)
        (tmp / "images").mkdir()
        tifffile.imwrite(tmp / "images" / "img.tif", synthetic_image(args.size))
        ingest_folder(IngestConfig(images=str(tmp / "images"), output=str(tmp / "ds"), chunk_size=1024,
                                   val_fraction=0.0))
        torch.manual_seed(0)
        save_model(tmp / "model", build_model(ModelConfig(base_channels=16, depth=4)),
                   {"normalization": NormalizationConfig().model_dump()})

        def cfg(name: str, threads: int) -> InferConfig:
            return InferConfig(dataset=str(tmp / "ds"), output=str(tmp / name), model=str(tmp / "model"),
                               export="none", skip_empty=False, threads_per_worker=threads)

        clients = {}
        for key, (workers, threads) in shapes.items():
            clients[key] = stack.enter_context(dask_client(None, workers, threads))
            predict_dataset(cfg(f"warm-{key}", threads), client=clients[key])
        for r in range(args.repeats):
            for key, (_, threads) in shapes.items():
                start = time.perf_counter()
                [res] = predict_dataset(cfg(f"{key}-{r}", threads), client=clients[key])
                times[key].append(time.perf_counter() - start)
                records = [json.loads(p.read_text()) for p in (tmp / f"{key}-{r}" / "img.blocks").glob("y*.json")]
                cpu = sum(rec["cpu_seconds"] for rec in records)
                cpu_rate[key] = max(cpu_rate.get(key, 0.0), res.tile_evaluations / cpu)
                info[key] = {"blocks": res.blocks, "block_shape": res.block_shape,
                             "tile_evaluations": res.tile_evaluations}
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)

    mp = args.size**2 / 1e6
    best = {k: min(v) for k, v in times.items()}
    print(f"\n{args.size}x{args.size}, UNet depth 4 base 16, {cores} cores")
    print(f"{'workers x threads':>18} {'best s':>8} {'MP/s':>7} {'tiles':>6} {'tiles/cpu-s':>12} {'blocks':>14}")
    for k, v in best.items():
        print(f"{k:>18} {v:>8.2f} {mp / v:>7.3f} {info[k]['tile_evaluations']:>6} {cpu_rate[k]:>12.2f} "
              f"{str(info[k]['block_shape']):>14}")
    n = f"{cores}x1"
    ratios = {f"{n}_vs_1x1": best["1x1"] / best[n], f"{n}_vs_1x{cores}": best[f"1x{cores}"] / best[n],
              f"cpu_efficiency_{n}_vs_1x1": cpu_rate[n] / cpu_rate["1x1"],
              f"cpu_efficiency_{n}_vs_1x{cores}": cpu_rate[n] / cpu_rate[f"1x{cores}"]}
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_infer_scaling.json").write_text(json.dumps(
        {"size": args.size, "cores": cores, "times": times, "best_s": best, "ratios": ratios, "info": info,
         "tiles_per_cpu_s": cpu_rate,
         "load_avg": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
