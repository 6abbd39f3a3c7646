"""How much of the dense overlap-0.5 sliding window the labels need: tile size and overlap (pixels) vs agreement.

Overlap 0.5 computes every pixel about four times. This measures, on real texture with a trained model, how label
agreement with today's dense output (tile 256, overlap 0.5) and Dice against the expert mask depend on the tile
edge and the overlap in pixels, next to the network's receptive field, and the forward time of each setting.

Data: a mosaic of StarDist's bundled nuclei image (``benchmarks/real_texture.py``; its mask gives Dice vs truth)
and, with ``--dataset``, any ingested dataset (e.g. the demo's held-out synthetic image ``demo/holdout``).
Model: a trained model folder (``demo/train/best`` after ``unet demo``). The labels are computed by the library's
block predictor on the ingested image, one block (the pipeline's own arithmetic: normalisation from the ingested
statistics, folded batch norms, channels-last, Gaussian blend), with ``skip_empty`` on as in the pipeline.

Usage::

    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_overlap.py --model demo/train/best \\
        --sample /tmp/stardist-data/stardist/data/images --size 2048 [--dataset demo/holdout]

Writes ``benchmarks/results/bench_overlap.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_texture import sample_folder, write_mosaic  # noqa: E402

from unetcore.allocator import tune_for_blocks, with_heap_buffers  # noqa: E402
from unetcore.config import IngestConfig  # noqa: E402
from unetcore.inference import BlockPredictor  # noqa: E402
from unetcore.ingest import ingest_folder  # noqa: E402
from unetcore.model import fold_batch_norm, load_model  # noqa: E402
from unetcore.store import manifest as mf  # noqa: E402
from unetcore.store import omezarr  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DENSE = (256, 0.5)
SETTINGS = [(256, 64), (256, 32), (384, 64), (384, 32), (512, 128), (512, 96), (512, 64), (512, 48), (512, 32),
            (768, 64), (1024, 64), (1024, 32)]
"""(tile edge, overlap in pixels) measured against the dense setting."""


def receptive_field(model: torch.nn.Module, edge: int = 512) -> int:
    """Edge of the input region that reaches the centre output pixel (non-zero input gradient), in pixels."""
    x = torch.randn(1, 1, edge, edge, requires_grad=True)
    model.eval()
    model(x)[0, 0, edge // 2, edge // 2].backward()
    rows = np.nonzero(x.grad[0, 0].abs().sum(dim=1).numpy())[0]
    return int(rows.max() - rows.min() + 1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Foreground Dice of two binary label maps (1.0 when both are empty)."""
    inter, total = int(np.count_nonzero(a & b)), int(np.count_nonzero(a) + np.count_nonzero(b))
    return 1.0 if total == 0 else 2 * inter / total


def labels_for(model: torch.nn.Module, config: dict[str, Any], image: zarr.Array, stats: dict[str, Any],
               tile: int, overlap: float, batch: int) -> tuple[np.ndarray, float, int]:
    """(labels, seconds, tiles) of the whole image as one block with this tile and overlap fraction."""
    bp = BlockPredictor.from_model(model, config, torch.device("cpu"), tile=tile, overlap=overlap, batch_size=batch,
                                   skip_empty=True)
    bp.predictor = with_heap_buffers(bp.predictor)
    shape = tuple(image.shape[1:])
    start = time.perf_counter()
    [(_, _, labels)] = list(bp.blocks(image, stats, shape))
    return labels, time.perf_counter() - start, bp.grid(shape).n_tiles


def measure(name: str, dataset: Path, model: torch.nn.Module, config: dict[str, Any], batch: int,
            settings: list[tuple[int, int]]) -> list[dict]:
    """One row per setting (dense first) for the first image of ``dataset``."""
    entry = mf.entries(mf.require(dataset))[0]
    src = omezarr.open_root(mf.store_path(dataset, entry["id"]))
    image, truth = omezarr.image_array(src), omezarr.label_array(src)
    truth = None if truth is None else np.asarray(truth[:]) > 0
    ref, ref_s, ref_tiles = labels_for(model, config, image, entry["stats"], *DENSE, batch)
    rows = []
    for tile, px in [(DENSE[0], int(DENSE[0] * DENSE[1])), *settings]:
        if (tile, px) == (DENSE[0], int(DENSE[0] * DENSE[1])):
            labels, seconds, tiles = ref, ref_s, ref_tiles
        else:
            labels, seconds, tiles = labels_for(model, config, image, entry["stats"], tile, px / tile, batch)
        row = {"data": name, "tile": tile, "overlap_px": px, "overlap": round(px / tile, 4), "tiles": tiles,
               "forward_pixels_per_pixel": round(tiles * tile * tile / labels.size, 3), "seconds": round(seconds, 2),
               "speedup_vs_dense": round(ref_s / seconds, 2), "dice_vs_dense": round(dice(labels > 0, ref > 0), 6),
               "pixels_differing": int(np.count_nonzero(labels != ref)),
               "dice_vs_truth": None if truth is None else round(dice(labels > 0, truth), 4)}
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Trained model folder (config.json + weights.pt).")
    parser.add_argument("--sample", default=None, help="Folder with img2d.tif and mask2d.tif (real_texture.py).")
    parser.add_argument("--size", type=int, default=2048, help="Edge of the nuclei mosaic.")
    parser.add_argument("--dataset", action="append", default=[], help="Also measure this ingested dataset.")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--settings", nargs="*", default=None, metavar="TILE/PX",
                        help="only these (tile edge / overlap px) settings, e.g. 512/64 (default: the whole table)")
    parser.add_argument("--out", default="bench_overlap.json", help="JSON file name in benchmarks/results")
    args = parser.parse_args()
    settings = SETTINGS if args.settings is None else [tuple(int(v) for v in s.split("/")) for s in args.settings]
    torch.set_num_threads(args.threads)
    tune_for_blocks()
    model, config = load_model(Path(args.model))
    rf = receptive_field(model)
    model = fold_batch_norm(model)
    print(f"receptive field: {rf} px (radius {rf // 2})", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-overlap-") as tmp_str:
        tmp = Path(tmp_str)
        images, masks = write_mosaic(args.size, sample_folder(args.sample), tmp / "src")
        ingest_folder(IngestConfig(images=str(images), masks=str(masks), output=str(tmp / "ds"), val_fraction=0.0))
        rows += measure(f"nuclei mosaic {args.size}²", tmp / "ds", model, config, args.batch, settings)
    for ds in args.dataset:
        rows += measure(ds, Path(ds), model, config, args.batch, settings)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(
        {"model": args.model, "receptive_field_px": rf, "dense": {"tile": DENSE[0], "overlap": DENSE[1]},
         "batch": args.batch, "threads": args.threads, "rows": rows, "load_avg": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
