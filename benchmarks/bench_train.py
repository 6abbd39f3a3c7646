"""Training benchmarks: pipeline throughput against an in-memory loop, and the default recipe's held-out Dice.

Part ``throughput``: images/s of the real training path (OME-Zarr patch sampling + augmentation through the
DataLoader + :func:`unetcore.training.train_step`) against the same model, batch and step fed from tensors
already in memory; and, for reference, a naive loop (default memory layout, no clipping). The sides alternate
step by step within one process, so machine noise hits them alike; the figure of merit is the ratio.

Part ``recipe``: the generated sample (10 images of 512², seed 0) ingested and trained with ``TrainConfig``'s
defaults, then the Dice of the best model on the held-out 2048² image (seed 1), never seen in training, through
the inference code path; wall-clock time of the whole thing.

    .venv/bin/python benchmarks/bench_train.py --part throughput
    .venv/bin/python benchmarks/bench_train.py --part recipe --track [--set epochs=10 --set patch_size=128 ...]

Writes ``benchmarks/results/train_<part>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

from unetcore import training  # noqa: E402
from unetcore.config import IngestConfig, ModelConfig, TrainConfig  # noqa: E402
from unetcore.data.synthetic import write_sample  # noqa: E402
from unetcore.inference.predict import BlockPredictor  # noqa: E402
from unetcore.ingest import ingest_folder  # noqa: E402
from unetcore.model import build_model, load_model  # noqa: E402
from unetcore.store import manifest as mf  # noqa: E402
from unetcore.training import SegmentationLoss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_sample(root: Path) -> tuple[Path, Path]:
    """The demo's sample: 10 training images of 512² and one held-out 2048² image, ingested."""
    write_sample(root / "train", n_images=10, size=512, large_size=0, seed=0)
    write_sample(root / "holdout", n_images=0, size=512, large_size=2048, seed=1)
    ingest_folder(IngestConfig(images=str(root / "train/images"), masks=str(root / "train/masks"),
                               output=str(root / "ds")))
    ingest_folder(IngestConfig(images=str(root / "holdout/images"), masks=str(root / "holdout/masks"),
                               output=str(root / "holdout_ds"), val_fraction=0.0))
    return root / "ds", root / "holdout_ds"


def _timed(step: Any, batches: Iterator[Any]) -> float:
    """Seconds for one ``step`` on the next item of ``batches`` (fetching it included)."""
    t0 = time.perf_counter()
    step(next(batches))
    return time.perf_counter() - t0


def throughput(cfg: TrainConfig, steps: int, warmup: int = 2) -> dict[str, Any]:
    """Images/s of the pipeline, the in-memory loop and the naive loop, interleaved step by step.

    Each round times one step of every side, in an order that rotates from round to round, so that the load of
    a shared machine, which drifts over seconds, falls on all sides alike. The pipeline side fetches its batch
    inside the timed step (``num_workers=0``: sampling, reading and augmenting are on the critical path).
    """
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_model(cfg.model).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    loss_fn = SegmentationLoss(cfg.loss, cfg.model.num_classes)
    params = list(model.parameters())

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        training.train_step(model, params, batch, loss_fn, optimizer, device, cfg.grad_clip)

    naive_model = build_model(cfg.model)
    naive_opt = torch.optim.AdamW(naive_model.parameters(), lr=cfg.lr)

    def naive_step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        images, targets = batch
        loss = loss_fn(naive_model(images), targets)
        naive_opt.zero_grad()
        loss.backward()
        naive_opt.step()

    loader, _ = training.make_loader(cfg.model_copy(update={"steps_per_epoch": steps + warmup}), Path(cfg.dataset))
    in_memory = [(x.clone(), y.clone()) for _, (x, y) in zip(range(8), loader)]  # real patches, already in RAM
    sides = {
        "pipeline": (step, iter(loader)),
        "in_memory": (step, itertools.cycle(in_memory)),
        "naive": (naive_step, itertools.cycle(in_memory)),
    }
    times: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for i in range(steps + warmup):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            run, batches = sides[name]
            times[name].append(_timed(run, batches))
    counted = {k: v[warmup:] for k, v in times.items()}
    rates = {k: steps * cfg.batch_size / sum(v) for k, v in counted.items()}
    return {"images_per_s": rates, "ratio_vs_in_memory": {k: v / rates["in_memory"] for k, v in rates.items()},
            "median_step_s": {k: statistics.median(v) for k, v in counted.items()},
            "steps": steps, "batch_size": cfg.batch_size, "patch_size": cfg.patch_size,
            "model": cfg.model.model_dump(), "torch_threads": torch.get_num_threads(),
            "load_avg_1min_at_end": os.getloadavg()[0]}


def sampler_speed(cfg: TrainConfig, n: int) -> dict[str, float]:
    """Milliseconds per patch of the sampler alone, with and without augmentation."""
    out = {}
    for aug in (False, True):
        loader, _ = training.make_loader(cfg.model_copy(update={"augment": aug}), Path(cfg.dataset))
        data = loader.dataset
        data[0]
        t0 = time.perf_counter()
        for i in range(n):
            data[i]
        out["ms_per_patch_augmented" if aug else "ms_per_patch_plain"] = 1000 * (time.perf_counter() - t0) / n
    return out


def held_out_dice(model_dir: Path, holdout: Path, tile: int) -> float:
    """Dice of the model saved in ``model_dir`` on the held-out dataset, through the inference code path."""
    best, config = load_model(model_dir)
    predictor = BlockPredictor.from_model(best, config, torch.device("cpu"), tile=tile, overlap=0.5, batch_size=4)
    return training.evaluate(predictor, holdout, mf.entries(mf.require(holdout)))["val_dice"]


def recipe(root: Path, overrides: dict[str, Any], budget_s: float, track: bool) -> dict[str, Any]:
    """Ingest the sample, train with the defaults (plus overrides), score the held-out image.

    With ``track``, the best model so far is also scored on the held-out image after every epoch; that time
    is measured and left out of the totals, so the curve shows what stopping at each epoch would have given.
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    dataset, holdout = make_sample(root)
    model = ModelConfig(**overrides.pop("model", {}))
    cfg = TrainConfig(dataset=str(dataset), model=model, output=str(root / "run"), time_budget_s=budget_s,
                      tracking_uri=f"sqlite:///{root / 'mlflow.db'}", **overrides)
    curve: list[dict[str, Any]] = []
    spent = [0.0, 0.0]  # wall and CPU seconds of the tracking evaluations

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        point = {"epoch": epoch, "val_dice": round(metrics["val_dice"], 4),
                 "s": round(time.perf_counter() - t0 - spent[0], 1),
                 "cpu_s": round(time.process_time() - cpu0 - spent[1], 1)}
        if track:
            w, c = time.perf_counter(), time.process_time()
            point["held_out_dice_of_best"] = round(held_out_dice(Path(cfg.output) / training.BEST, holdout,
                                                                 cfg.val_tile), 4)
            spent[0] += time.perf_counter() - w
            spent[1] += time.process_time() - c
        curve.append(point)
        print(point, flush=True)

    result = training.train(cfg, on_epoch=on_epoch)
    score = held_out_dice(Path(result.model_dir), holdout, cfg.val_tile)
    return {"held_out_dice": score, "val_dice": result.best_val_dice, "epochs_run": result.epochs_run,
            "stop_reason": result.stop_reason,
            "total_s": round(time.perf_counter() - t0 - spent[0], 1),
            "total_cpu_s": round(time.process_time() - cpu0 - spent[1], 1),
            "load_avg_1min_at_end": os.getloadavg()[0], "config": cfg.flat_params(), "curve": curve}


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (JSON values where they parse; ``model.x=`` goes into the model section)."""
    out: dict[str, Any] = {}
    for item in items:
        key, value = item.split("=", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if key.startswith("model."):
            out.setdefault("model", {})[key[6:]] = parsed
        else:
            out[key] = parsed
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["throughput", "recipe"], default="throughput")
    parser.add_argument("--steps", type=int, default=24, help="Timed steps per side (throughput).")
    parser.add_argument("--budget", type=float, default=0.0, help="Training time budget in s (recipe; 0 = none).")
    parser.add_argument("--track", action="store_true", help="Score the held-out image after every epoch (recipe).")
    parser.add_argument("--set", action="append", default=[], help="TrainConfig override key=value (recipe).")
    parser.add_argument("--name", default="", help="Suffix of the result file.")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        if args.part == "throughput":
            dataset, _ = make_sample(root)
            cfg = TrainConfig(dataset=str(dataset))  # the defaults: base 16, depth 4, batch 4, 256² patches
            result = {"throughput": throughput(cfg, args.steps),
                      "sampler": sampler_speed(cfg, 100)}
            print(f"{'side':<14}{'images/s':>10}{'x in-memory':>13}{'median step s':>15}")
            tp = result["throughput"]
            for side, rate in tp["images_per_s"].items():
                print(f"{side:<14}{rate:>10.2f}{tp['ratio_vs_in_memory'][side]:>13.2f}"
                      f"{tp['median_step_s'][side]:>15.2f}")
            print("sampler ms/patch: " + ", ".join(f"{k}={v:.2f}" for k, v in result["sampler"].items()))
        else:
            result = recipe(root, _parse_set(args.set), args.budget, args.track)
            for point in result["curve"]:
                extra = f"  held-out {point['held_out_dice_of_best']:.4f}" if "held_out_dice_of_best" in point else ""
                print(f"epoch {point['epoch']:>3}  val Dice {point['val_dice']:.4f}{extra}  at {point['s']:>6.0f} s "
                      f"({point['cpu_s']:.0f} CPU-s)")
            print(f"held-out Dice {result['held_out_dice']:.4f} (val {result['val_dice']:.4f}), "
                  f"{result['epochs_run']} epochs ({result['stop_reason']}), total {result['total_s']:.0f} s "
                  f"wall, {result['total_cpu_s']:.0f} CPU-s")
    out = RESULTS / f"train_{args.part}{'_' + args.name if args.name else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
