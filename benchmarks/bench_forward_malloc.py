"""Single-thread UNet forward speed: plain, Dask's worker malloc setting, ours, and ours with folded batch norms.

Each case runs in a fresh subprocess (malloc settings are per process and read at start-up): ``predict_block``
over the 225 tiles of a 2048² image (UNet depth 4, base 16, tile 256, overlap 0.5, batch 4, 1 torch thread,
the engine's ``torch_predictor``). Cases:

- ``plain``: glibc defaults (what training and ``unet`` itself run with);
- ``dask``: ``MALLOC_TRIM_THRESHOLD_=65536``, which Dask's nanny sets for its workers;
- ``dask+heap_buffers``: the same, with the predictor wrapped in :func:`unetcore.allocator.with_heap_buffers`
  as the engine does on its workers;
- ``dask+heap_buffers+folded``: and the model's batch norms folded into its convolutions
  (:func:`unetcore.model.parts.fold_batch_norm`), which is how the engine's workers run it.

The model's batch norms get non-trivial statistics (folding an identity norm would prove little).

Usage: ``.venv/bin/python benchmarks/bench_forward_malloc.py [--repeats 2]``
Writes ``benchmarks/results/bench_forward_malloc.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
import numpy as np, torch
sys.path[:0] = [{root!r}, {bench!r}]
from bench_infer import synthetic_image
from unetcore.allocator import with_heap_buffers
from unetcore.config import ModelConfig
from unetcore.inference import Block, TileGrid, predict_block, torch_predictor
from unetcore.model import build_model
from unetcore.model.parts import fold_batch_norm
torch.set_num_threads(1)
torch.manual_seed(0)
model = build_model(ModelConfig(base_channels=16, depth=4)).eval()
for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
predictor = torch_predictor(fold_batch_norm(model) if {fold} else model, torch.device("cpu"))
if {wrap}:
    predictor = with_heap_buffers(predictor)
image = synthetic_image(2048).astype(np.float32)[None] / 255
grid = TileGrid.build((2048, 2048), (256, 256), 0.5)
predictor(np.zeros((4, 1, 256, 256), np.float32))  # warm-up
start = time.perf_counter()
predict_block(lambda ys, xs: image[:, ys, xs], (2048, 2048), 1, predictor, grid, Block(0, 2048, 0, 2048), 4)
print(json.dumps({{"seconds": time.perf_counter() - start, "tiles": grid.n_tiles}}))
"""

DASK = {"MALLOC_TRIM_THRESHOLD_": "65536"}
CASES = {"plain": ({}, False, False), "dask": (DASK, False, False), "dask+heap_buffers": (DASK, True, False),
         "dask+heap_buffers+folded": (DASK, True, True)}


def run(case: str) -> float:
    extra, wrap, fold = CASES[case]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | extra
    code = CHILD.format(root=str(ROOT), bench=str(ROOT / "benchmarks"), wrap=wrap, fold=fold)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["tiles"] / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {k: [] for k in CASES}
    for r in range(args.repeats):
        for case in CASES:
            rates[case].append(run(case))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} tiles/s" for k, v in rates.items()), flush=True)
    best = {k: max(v) for k, v in rates.items()}
    print(f"\n{'case':>25} {'tiles/s (best)':>15} {'vs plain':>9}")
    for k, v in best.items():
        print(f"{k:>25} {v:>15.2f} {v / best['plain']:>8.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_forward_malloc.json").write_text(json.dumps(
        {"rates": rates, "best": best, "load_avg": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
