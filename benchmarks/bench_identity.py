"""The CPU side of inference alone: the pipeline with an identity predictor (Zarr → blend → Zarr), and where a
block's time goes.

The identity predictor (logits = the normalised input, no model) leaves everything else of the engine: Zarr
reads, normalisation, tiling, Gaussian multiply-add, division, sigmoid and threshold, float16 cast, Zarr writes
with compression, completion records, pyramid. Its throughput is the ceiling that a GPU worker's host side sets.

1. ``engine``: ``predict_dataset`` end to end on a synthetic ``--size``² uint8 image (ingested like ``unet ingest``
   writes it, chunk 1024), a local cluster of the default shape (2 single-thread workers on 2 cores), float16
   probabilities saved, ``--export none``, the tile grid of ``unet predict``'s defaults (``--tile`` and
   ``--overlap`` to change it: 256 and 0.5 is the dense setting); for each block kernel (``numpy``, ``torch``:
   the device kernel on CPU tensors). MP/s whole (cluster start excluded; pyramid included) and per worker-second from the records.
2. ``stages``: one block of the engine's block shape, in this process with 1 torch thread, each stage timed
   alone (best of ``--repeats``) for both kernels, reading the same source store and writing the output store's
   own arrays (same chunks and codecs).

Usage: ``flock /tmp/bench.lock .venv/bin/python benchmarks/bench_identity.py [--size 8192] [--repeats 3]
[--engine-repeats 1] [--tile 512 --overlap 0.125] [--labels-only]``
Writes ``benchmarks/results/bench_identity.json`` (``bench_identity-labels-only.json`` with ``--labels-only``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_infer_memory import write_store  # noqa: E402

from unetcore.cluster import dask_cluster  # noqa: E402
from unetcore.config import InferConfig, ModelConfig, NormalizationConfig  # noqa: E402
from unetcore.inference import (  # noqa: E402
    BlockPredictor,
    TileGrid,
    gaussian_weights,
    logits_to_outputs,
    plan_blocks,
    predict_block,
    predict_dataset,
    set_worker_predictor_factory,
)
from unetcore.inference.layout import LABELS_NAME  # noqa: E402
from unetcore.inference.ondevice import (  # noqa: E402
    DeviceKernel,
    blend_block,
    copy_back,
    outputs_tensor,
    read_region,
    region_tensor,
)
from unetcore.inference.predict import affine_of  # noqa: E402
from unetcore.inference.runtime import ship_graph  # noqa: E402
from unetcore.model import WEIGHTS_FILE, build_model, save_model  # noqa: E402
from unetcore.store import manifest as mf  # noqa: E402
from unetcore.store import normalize, omezarr  # noqa: E402

RESULTS = Path(__file__).parent / "results"
KERNELS = ("numpy", "torch")
OUTPUTS = "sigmoid + threshold + float16 cast"  # numpy kernel: logits_to_outputs (onnxruntime's kernels)


def identity_predictor(kernel: str) -> Callable[[Any], BlockPredictor]:
    """A worker's predictor factory: logits = normalised channel 0, on the chosen block kernel."""

    def make(spec: Any) -> BlockPredictor:
        device = DeviceKernel(lambda t: t[:, :1], torch.device("cpu"), 1, spec.threshold) if kernel == "torch" else None
        return BlockPredictor(lambda batch: batch[:, :1], 1, NormalizationConfig(), spec.tile, spec.overlap,
                              spec.batch_size, spec.threshold, kernel=device)

    return make


def install(kernel: str) -> None:
    """On a worker: the identity predictor on ``kernel``."""
    set_worker_predictor_factory(identity_predictor(kernel))


def engine(tmp: Path, dataset: Path, model_dir: Path, kernel: str, size: int, grid: dict[str, Any],
           repeat: int = 0) -> dict[str, Any]:
    out = tmp / f"out-{kernel}-{repeat}"  # a fresh output each run (the same one would resume: nothing to do)
    cfg = InferConfig(dataset=str(dataset), output=str(out), model=str(model_dir), export="none", **grid)
    with dask_cluster(None) as cluster:
        cluster.client.run(install, kernel)
        start = time.perf_counter()
        [res] = predict_dataset(cfg, cluster=cluster)
        seconds = time.perf_counter() - start
    records = [json.loads(p.read_text()) for p in Path(res.output).parent.glob("*.blocks/*.json")
               if "counts" in p.read_text()]
    busy = sum(r["seconds"] for r in records)
    mp = size * size / 1e6
    per_block = {key: round(1000 * sum(r[key] for r in records) / max(1, len(records)), 1)
                 for key in ("seconds", "predict_seconds", "cpu_seconds")}  # where a worker's block time goes
    return {"kernel": kernel, "seconds": round(seconds, 2), "megapixels_per_s": round(mp / seconds, 2),
            "blocks": res.blocks, "block_shape": res.block_shape, "block_seconds_sum": round(busy, 2),
            "block_ms_mean": per_block,
            "megapixels_per_worker_second": round(mp / busy, 2) if busy else None, "output": res.output}


def best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def stages(dataset: Path, output: str, block_shape: list[int], repeats: int,
           options: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each stage of one block alone, numpy and torch kernels, on the engine's tile grid; milliseconds."""
    torch.set_num_threads(1)
    entry = mf.entries(mf.require(dataset))[0]
    image = omezarr.image_array(omezarr.open_root(mf.store_path(dataset, entry["id"])))
    stats, recipe = entry["stats"], NormalizationConfig()
    shape = tuple(image.shape[1:])
    grid = TileGrid.build(shape, (options["tile"],) * 2, options["overlap"])
    blocks = plan_blocks(shape, tuple(block_shape))
    block = blocks[len(blocks) // 2 + 1] if len(blocks) > 2 else blocks[0]  # an interior block: halo on all sides
    out = zarr.open_group(store=output, mode="r+")
    labels_arr, probs_arr = out[f"labels/{LABELS_NAME}/0"], out["0"]

    def read_raw(*box: slice) -> np.ndarray:
        return np.asarray(image[(slice(None), *box)])

    host = read_region(read_raw, shape, grid, block)
    timings: dict[str, dict[str, float]] = {}
    t_read, _ = best(lambda: read_region(read_raw, shape, grid, block), repeats)

    # numpy kernel
    t_norm, normed = best(lambda: normalize(host.pixels, stats, recipe), repeats)
    lo = [max(a, 0) for a in host.region.start]  # where the normalised pixels start in the image

    def read_normed(*box: slice) -> np.ndarray:
        return normed[(slice(None), *(slice(b.start - a, b.stop - a) for b, a in zip(box, lo)))]

    weights = gaussian_weights(grid.tile)
    t_blend, logits = best(lambda: predict_block(read_normed, shape, 1, lambda b: b[:, :1], grid, block, 64, weights),
                           repeats)
    t_out, (probs16, labels) = best(lambda: logits_to_outputs(logits, 1, 0.5, "float16"), repeats)
    t_wl, _ = best(lambda: labels_arr.__setitem__(block.slices, labels), repeats)
    t_wp, _ = best(lambda: probs_arr.__setitem__((slice(None), *block.slices), probs16), repeats)
    timings["numpy"] = {"read": t_read, "normalise": t_norm, "tiles + blend + divide": t_blend,
                        OUTPUTS: t_out, "write labels": t_wl, "write probabilities": t_wp}

    # torch kernel (CPU tensors)
    affine = affine_of(stats, recipe)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        t_norm, data = best(lambda: region_tensor(host, 1, affine, cpu), repeats)
        w = torch.from_numpy(np.array(weights))
        t_blend, tlogits = best(lambda: blend_block(data, host.region, lambda t: t[:, :1], grid, block, 64, w), repeats)
        t_out, (tp, tl) = best(lambda: outputs_tensor(tlogits, 1), repeats)
        t_cast, (p16, l8) = best(lambda: copy_back(tp, tl, "float16"), repeats)
    timings["torch"] = {"read": t_read, "normalise": t_norm, "tiles + blend + divide": t_blend,
                        OUTPUTS: t_out + t_cast, "write labels": t_wl, "write probabilities": t_wp}
    np.testing.assert_allclose(tlogits.numpy(), logits, atol=1e-5)  # the two kernels agree
    mp = float(np.prod(block.shape)) / 1e6
    for k in KERNELS:
        timings[k] = {name: round(1000 * s, 1) for name, s in timings[k].items()}
        timings[k]["total"] = round(sum(timings[k].values()), 1)
        timings[k]["megapixels_per_s"] = round(mp / (timings[k]["total"] / 1000), 1)
    timings["block"] = {"bounds": list(block.bounds), "megapixels": mp}  # type: ignore[dict-item]
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine-repeats", type=int, default=1, help="end-to-end runs per kernel, alternating")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--tile", type=int, default=InferConfig.model_fields["tile"].default,
                        help="tile edge (default: unet predict's; 256 with --overlap 0.5 is the dense setting)")
    parser.add_argument("--overlap", type=float, default=InferConfig.model_fields["overlap"].default)
    parser.add_argument("--labels-only", action="store_true",
                        help="no probabilities saved (unet predict --no-save-probabilities): labels and their pyramid")
    args = parser.parse_args()
    options = {"tile": args.tile, "overlap": args.overlap}
    if args.labels_only:
        options["save_probabilities"] = False
    result: dict[str, Any] = {"size": args.size, **options, "engine": []}
    with tempfile.TemporaryDirectory(prefix="bench-identity-") as tmp_name:
        tmp = Path(tmp_name)
        dataset = tmp / "ds"
        write_store(dataset, "img", args.size)
        model_dir = tmp / "model"
        save_model(model_dir, build_model(ModelConfig(depth=1, base_channels=4)),
                   {"normalization": NormalizationConfig().model_dump()})
        # as training ships it: the run loads the graph instead of exporting it (1.5 s of a 4 s run otherwise)
        ship_graph(model_dir, mf.file_hash(model_dir / WEIGHTS_FILE), "bench-identity")
        for repeat in range(args.engine_repeats):  # the kernels alternate: a noisy machine hits both alike
            for kernel in args.kernels:
                row = {"repeat": repeat, **engine(tmp, dataset, model_dir, kernel, args.size, options, repeat)}
                result["engine"].append(row)
                print(json.dumps(row), flush=True)
        if not args.labels_only:  # the stages time the probabilities' writes too
            result["stages_ms"] = stages(dataset, result["engine"][0]["output"], result["engine"][0]["block_shape"],
                                         args.repeats, options)
            print(json.dumps(result["stages_ms"], indent=1))
    RESULTS.mkdir(exist_ok=True)
    name = "bench_identity-labels-only.json" if args.labels_only else "bench_identity.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
