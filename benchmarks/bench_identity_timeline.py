"""The model-free pipeline at a gigapixel, split into head, blocks and tail: where a run's time goes outside its blocks.

The store and the identity predictor are ``bench_infer_memory.py``'s (a synthetic ``--size``² uint8 image, chunk
1024; logits = the normalised input); the model's ONNX graph is shipped in its folder as training ships it, so no
run exports it. Each run predicts into a fresh output on a fresh local cluster of the default shape (cluster start
excluded; pyramid and preview included) with ``unet predict``'s defaults and ``--export none``. From the block
records (each block's seconds and CPU seconds) and their files' modification times it reports the head (call to
first block start), the blocks (first start to last end), the tail (last end to return) and a block's mean wall and
CPU time. The store stays in ``--tmp`` between runs (``/dev/shm`` keeps disk writeback out of the figures).

Usage: ``PYTHONPATH=$PWD:$PWD/benchmarks .venv/bin/python benchmarks/bench_identity_timeline.py --size 32768
--tmp /dev/shm/timeline [--runs 1]``; run it from frozen worktrees, alternating, to compare two commits.
Prints one line per run and writes nothing else.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench_infer_memory import install_identity, write_store

from unetcore.cluster import dask_cluster
from unetcore.config import InferConfig, ModelConfig, NormalizationConfig
from unetcore.inference import predict_dataset
from unetcore.inference.runtime import SHIPPED_GRAPH, ship_graph
from unetcore.model import WEIGHTS_FILE, build_model, save_model
from unetcore.store import manifest as mf


def block_records(output: Path) -> list[tuple[float, float, dict[str, Any]]]:
    """(start, end, record) of each block: end is its record file's mtime, start that less its seconds."""
    rows = []
    for path in output.glob("*.blocks/*.json"):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "cpu_seconds" in record:
            end = path.stat().st_mtime
            rows.append((end - record["seconds"], end, record))
    return rows


def run(tmp: Path, size: int) -> dict[str, Any]:
    dataset, model, output = tmp / f"ds{size}", tmp / "model", tmp / "out"
    if not dataset.exists():
        write_store(dataset, "img", size)
    if not (model / SHIPPED_GRAPH).exists():
        save_model(model, build_model(ModelConfig(base_channels=4, depth=1)),
                   {"normalization": NormalizationConfig().model_dump()})
        ship_graph(model, mf.file_hash(model / WEIGHTS_FILE), "bench-identity-timeline")
    shutil.rmtree(output, ignore_errors=True)
    cfg = InferConfig(dataset=str(dataset), output=str(output), model=str(model), export="none")
    with dask_cluster(None) as cluster:
        cluster.client.run(install_identity)
        start, wall = time.perf_counter(), time.time()
        predict_dataset(cfg, cluster=cluster)
        seconds, done = time.perf_counter() - start, time.time()
    rows = block_records(output)
    first, last = min(r[0] for r in rows), max(r[1] for r in rows)
    return {"size": size, "seconds": round(seconds, 2), "megapixels_per_s": round(size * size / 1e6 / seconds, 1),
            "head_s": round(first - wall, 2), "blocks_s": round(last - first, 2), "tail_s": round(done - last, 2),
            "blocks": len(rows),
            "block_ms": round(1000 * statistics.mean(r[2]["seconds"] for r in rows), 1),
            "block_cpu_ms": round(1000 * statistics.mean(r[2]["cpu_seconds"] for r in rows), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32768)
    parser.add_argument("--tmp", type=Path, required=True, help="where the store, model and output live")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    args.tmp.mkdir(parents=True, exist_ok=True)
    for _ in range(args.runs):
        print(json.dumps(run(args.tmp, args.size)), flush=True)


if __name__ == "__main__":
    main()
