"""Like-for-like inference baselines, each side a whole process of its own, on a real-texture mosaic.

Sides (each run as ``python bench_vs_monai.py --side NAME``, timed from outside as a whole process):

- ``pipeline``: ``unet predict DATASET --no-prefect --export none`` with the default options (the command a user
  types; on the CPU its forward passes run on onnxruntime); ``pipeline-torch``: the same with ``--runtime torch``
  (the forward passes and the block kernel on torch); ``pipeline-dense``: the same with today's dense setting
  ``--tile 256 --overlap 0.5 --batch-size 4``;
- ``monai``: MONAI's ``sliding_window_inference`` as its users call it: roi 256, overlap 0.5, Gaussian,
  sw_batch 4, ``torch.inference_mode``, the model as loaded (default memory layout, batch norms unfolded) — the
  headline baseline; ``monai-prepared``: the same call with our prepared model (folded batch norms,
  channels-last, the allocator settings of ``unetcore.allocator``): what the pipeline itself adds;
- ``bare-dense``: forward passes alone over the dense grid's tiles (tile 256, overlap 0.5, 4 a pass), with the best
  preparation we know (folded, channels-last, ``tune_for_blocks`` + heap buffers, ``inference_mode``, every core),
  no I/O, no blending; ``bare-default``: the same over the default grid (tile 512, 64 px, 1 a pass).

Every side normalises with the ingested image's statistics (the same inputs), thresholds at 0.5 and leaves its
labels in the work folder; the parent compares them (Dice of the foreground) with each other and with the mask.

Data: the StarDist nuclei image mirrored to ``--size`` (``benchmarks/real_texture.py``). Model: a trained model
folder (``--model``, e.g. ``demo/train/best`` of ``unet demo``: depth 4, base 16).

``--startup`` measures instead the fixed cost of ``unet predict`` on a 512² image: whole-process wall time minus
the forward passes (the bare side over the same grid, its own process), with a registry model
(``--tracking-uri`` + ``models:/unet@champion``) into a fresh output each time; ``--code`` runs another checkout's
CLI (the code before a change).

Usage::

    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_vs_monai.py --model demo/train/best \\
        --sample /tmp/stardist-data/stardist/data/images --size 4096 --repeats 2 --work /tmp/vs-monai
    flock /tmp/bench.lock .venv/bin/python benchmarks/bench_vs_monai.py --startup --model demo/train/best \\
        --tracking-uri sqlite:///$PWD/demo/mlflow.db --sample ... --work /tmp/vs-startup

Writes ``benchmarks/results/bench_vs_monai.json`` (``bench_startup.json`` with ``--startup``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
SIDES = ("pipeline", "pipeline-torch", "pipeline-dense", "monai", "monai-prepared", "bare-dense", "bare-default")
DENSE = {"tile": 256, "overlap": 0.5, "batch": 4}


# ---------------------------------------------------------------- the children (one side per process)


def _image_and_stats(dataset: Path) -> tuple[np.ndarray, Any]:
    """The ingested image normalised with its own statistics and the model's recipe, (C, H, W) float32."""
    import zarr

    from unetcore.store import manifest as mf

    [entry] = mf.entries(mf.require(dataset))
    raw = zarr.open_group(store=str(mf.store_path(dataset, entry["id"])), mode="r")["0"][:]
    return raw, entry


def _normalised(dataset: Path, model_dir: Path) -> np.ndarray:
    from unetcore.config import NormalizationConfig
    from unetcore.model.packaging import read_config
    from unetcore.store.stats import normalize

    raw, entry = _image_and_stats(dataset)
    return normalize(raw, entry["stats"], NormalizationConfig(**read_config(model_dir)[1].get("normalization", {})))


def _prepared(model: Any) -> Any:
    """Folded batch norms, channels-last, eval: the bare side's model."""
    import torch

    from unetcore.model import fold_batch_norm

    return fold_batch_norm(model).eval().to(memory_format=torch.channels_last)


def side_monai(args: argparse.Namespace, prepared: bool) -> dict[str, Any]:
    import torch
    from monai.inferers import sliding_window_inference

    from unetcore.allocator import heap_buffers, tune_for_blocks
    from unetcore.model import load_model

    t0 = time.perf_counter()
    model, _ = load_model(Path(args.model))
    model = _prepared(model) if prepared else model.eval()
    if prepared:
        tune_for_blocks()
    x = torch.from_numpy(_normalised(Path(args.dataset), Path(args.model))[None])

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        return model(batch.contiguous(memory_format=torch.channels_last) if prepared else batch)

    start = time.perf_counter()
    with torch.inference_mode(), heap_buffers() if prepared else _nothing():
        logits = sliding_window_inference(x, roi_size=(DENSE["tile"],) * 2, sw_batch_size=DENSE["batch"],
                                          predictor=predictor, overlap=DENSE["overlap"], mode="gaussian")
    window = time.perf_counter() - start
    labels = (torch.sigmoid(logits[0, 0]) > 0.5).to(torch.uint8).numpy()
    np.save(Path(args.work) / f"labels-{args.side}.npy", labels)
    return {"window_s": round(window, 2), "inside_s": round(time.perf_counter() - t0, 2),
            "threads": torch.get_num_threads()}


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def side_bare(args: argparse.Namespace, tile: int, overlap: float, batch: int) -> dict[str, Any]:
    import torch

    from unetcore.allocator import tune_for_blocks, with_heap_buffers
    from unetcore.inference import TileGrid, torch_predictor
    from unetcore.model import fold_batch_norm, load_model

    tune_for_blocks()
    model, _ = load_model(Path(args.model))
    run = with_heap_buffers(torch_predictor(fold_batch_norm(model), torch.device("cpu")))  # channels-last on CPU
    x = _normalised(Path(args.dataset), Path(args.model))
    grid = TileGrid.build(x.shape[1:], (tile, tile), overlap)
    tiles = [(y, xx) for y, xx in grid.tiles()]
    pad = np.zeros((x.shape[0], max(x.shape[1], tile), max(x.shape[2], tile)), np.float32)
    pad[:, : x.shape[1], : x.shape[2]] = x
    run(np.stack([pad[:, y : y + tile, xx : xx + tile] for y, xx in tiles[:batch]]))  # oneDNN's first-call set-up
    start = time.perf_counter()
    for i in range(0, len(tiles), batch):
        run(np.stack([pad[:, y : y + tile, xx : xx + tile] for y, xx in tiles[i : i + batch]]))
    return {"forward_s": round(time.perf_counter() - start, 2), "tiles": len(tiles), "tile": tile,
            "overlap": overlap, "batch": batch, "threads": torch.get_num_threads()}


def run_child(args: argparse.Namespace) -> None:
    if args.side in ("monai", "monai-prepared"):
        out = side_monai(args, args.side == "monai-prepared")
    elif args.side == "bare-dense":
        out = side_bare(args, DENSE["tile"], DENSE["overlap"], DENSE["batch"])
    elif args.side == "bare-default":
        from unetcore.config import InferOptions

        d = InferOptions()
        out = side_bare(args, d.tile, d.overlap, d.batch_size)
    else:
        raise SystemExit(f"unknown side {args.side}")
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------- the parent


def whole_process(cmd: list[str], env: dict[str, str] | None = None, cwd: Path = REPO
                  ) -> tuple[float, dict[str, Any], str]:
    """(wall seconds, the child's RESULT json or {}, its output) of one process run in ``cwd``."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return wall, json.loads(lines[-1][7:]) if lines else {}, proc.stdout + proc.stderr


def predict_cmd(dataset: Path, out: Path, model: str, extra: list[str], tracking_uri: str | None = None
                ) -> list[str]:
    cmd = [sys.executable, "-m", "app.cli", "predict", str(dataset), "-o", str(out), "--model", model,
           "--no-prefect", "--export", "none", *extra]
    return cmd + (["--tracking-uri", tracking_uri] if tracking_uri else [])


def pipeline_side(args: argparse.Namespace, name: str, out: Path) -> tuple[float, dict[str, Any]]:
    import zarr

    extra = {"pipeline-dense": ["--tile", "256", "--overlap", "0.5", "--batch-size", "4"],
             "pipeline-torch": ["--runtime", "torch"]}.get(name, [])
    wall, _, text = whole_process(predict_cmd(Path(args.dataset), out, args.model, extra))
    line = next(ln for ln in text.splitlines() if " MP in " in ln)  # "  mosaic: 16.78 MP in 31.2 s (...)"
    own = float(line.split(" MP in ")[1].split(" s")[0])
    labels = np.asarray(zarr.open_group(store=str(out / "mosaic.ome.zarr"), mode="r")["labels/prediction/0"][:])
    np.save(Path(args.work) / f"labels-{name}.npy", labels)
    tiles = next((ln.strip() for ln in text.splitlines() if "tiles computed" in ln), "")
    return wall, {"own_timing_s": own, "tiles": tiles}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2 * int(np.count_nonzero(a & b)) / total


def prepare(args: argparse.Namespace) -> Path:
    """Ingest the mosaic (and its mask) once into ``work/ds``."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))
    from real_texture import sample_folder, write_mosaic

    from unetcore.config import IngestConfig
    from unetcore.ingest import ingest_folder

    work = Path(args.work)
    ds = work / f"ds{args.size}"
    if not (ds / "manifest.json").exists():
        images, masks = write_mosaic(args.size, sample_folder(args.sample), work / f"src{args.size}")
        ingest_folder(IngestConfig(images=str(images), masks=str(masks), output=str(ds), val_fraction=0.0))
    return ds


def child_cmd(args: argparse.Namespace, side: str, dataset: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--side", side, "--model", args.model, "--dataset",
            str(dataset), "--work", args.work]


def main_compare(args: argparse.Namespace) -> None:
    import shutil

    import zarr

    ds = prepare(args)
    args.dataset = str(ds)
    sides = args.sides or list(SIDES)
    runs: list[dict[str, Any]] = []
    for r in range(args.repeats):
        row: dict[str, Any] = {"load_avg_start": os.getloadavg()}
        for side in sides:
            if side.startswith("pipeline"):
                out = Path(args.work) / f"out-{side}"
                shutil.rmtree(out, ignore_errors=True)
                wall, info = pipeline_side(args, side, out)
            else:
                wall, info, _ = whole_process(child_cmd(args, side, ds))
            row[side] = {"wall_s": round(wall, 2), **info}
            print(f"run {r + 1} {side}: {wall:.2f} s {info}", flush=True)
        row["load_avg_end"] = os.getloadavg()
        runs.append(row)
    truth = np.asarray(omezarr_mask(ds))
    labels = {s: np.load(Path(args.work) / f"labels-{s}.npy") for s in sides if not s.startswith("bare")}
    agreement = {f"{a} vs {b}": round(dice(labels[a], labels[b]), 6) for i, a in enumerate(labels)
                 for b in list(labels)[i + 1:]}
    vs_truth = {s: round(dice(v, truth), 4) for s, v in labels.items()}
    ratios = []
    for row in runs:
        w = {s: row[s]["wall_s"] for s in sides}
        rr: dict[str, float] = {}
        if "pipeline" in w and "monai" in w:
            rr["monai / pipeline (whole processes)"] = round(w["monai"] / w["pipeline"], 2)
        if "pipeline" in w and "monai-prepared" in w:
            rr["monai-prepared / pipeline"] = round(w["monai-prepared"] / w["pipeline"], 2)
        if "pipeline" in w and "bare-dense" in row:
            rr["bare-dense forward / pipeline (whole process)"] = round(row["bare-dense"]["forward_s"] / w["pipeline"],
                                                                       2)
            rr["bare-dense forward / pipeline own timing"] = round(
                row["bare-dense"]["forward_s"] / row["pipeline"]["own_timing_s"], 2)
        if "pipeline-torch" in w and "pipeline" in w:
            rr["pipeline-torch / pipeline"] = round(w["pipeline-torch"] / w["pipeline"], 2)
        if "pipeline-dense" in w and "pipeline" in w:
            rr["pipeline-dense / pipeline"] = round(w["pipeline-dense"] / w["pipeline"], 2)
        if "monai" in row and "monai-prepared" in row:
            rr["monai window / monai-prepared window"] = round(row["monai"]["window_s"] /
                                                               row["monai-prepared"]["window_s"], 2)
        ratios.append(rr)
    report = {"size": args.size, "model": args.model, "cores": os.cpu_count(), "sides": sides, "runs": runs,
              "ratios": ratios, "dice_between": agreement, "dice_vs_truth": vs_truth}
    print(json.dumps({"ratios": ratios, "dice_between": agreement, "dice_vs_truth": vs_truth}, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(report, indent=2))
    del zarr


def omezarr_mask(ds: Path) -> np.ndarray:
    sys.path.insert(0, str(REPO))
    from unetcore.store import manifest as mf
    from unetcore.store import omezarr

    [entry] = mf.entries(mf.require(ds))
    return np.asarray(omezarr.label_array(omezarr.open_root(mf.store_path(ds, entry["id"])))[:])


def main_startup(args: argparse.Namespace) -> None:
    """Fixed cost of ``unet predict`` on a 512² image: whole-process wall minus the bare forward passes."""
    import shutil

    args.size = 512
    ds = prepare(args)
    args.dataset = str(ds)
    codes = args.code or [str(REPO)]
    model = "models:/unet@champion" if args.tracking_uri else args.model
    rows = []
    for r in range(args.repeats):
        for code in codes:
            out = Path(args.work) / f"startup-{r}-{abs(hash(code))}"
            shutil.rmtree(out, ignore_errors=True)
            env = {"PYTHONPATH": code}
            cmd = predict_cmd(ds, out, model, [], args.tracking_uri)
            wall, _, text = whole_process(cmd, env, Path(code))  # fresh output: the model is fetched
            shutil.rmtree(out / "mosaic.ome.zarr")
            shutil.rmtree(out / "mosaic.blocks")
            cached, _, _ = whole_process(cmd, env, Path(code))  # model already in the cache
            tiles = int(text.split("tiles computed ")[1].split()[0])
            fwds = [whole_process(child_cmd(args, side, ds))[1] for side in ("bare-default", "bare-dense")]
            fwd = next((f for f in fwds if f["tiles"] == tiles), fwds[0])  # the grid that checkout's defaults use
            rows.append({"code": code, "fresh_output_s": round(wall, 2), "cached_model_s": round(cached, 2),
                         "forward_s": fwd["forward_s"], "tiles": fwd["tiles"],
                         "fixed_fresh_s": round(wall - fwd["forward_s"], 2),
                         "fixed_cached_s": round(cached - fwd["forward_s"], 2),
                         "in_process": "no Dask cluster" in text, "load_avg": os.getloadavg()})
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_startup.json").write_text(json.dumps({"model": model, "tracking_uri": args.tracking_uri,
                                                            "rows": rows}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=SIDES, help="(internal) run one side in this process")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset")
    parser.add_argument("--sample", default=None)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default="/tmp/bench-vs-monai")
    parser.add_argument("--sides", nargs="*", choices=SIDES)
    parser.add_argument("--out", default="bench_vs_monai.json")
    parser.add_argument("--startup", action="store_true")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--code", action="append", help="checkout whose CLI runs the pipeline side (startup)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.side:
        run_child(args)
    elif args.startup:
        main_startup(args)
    else:
        main_compare(args)


if __name__ == "__main__":
    main()
