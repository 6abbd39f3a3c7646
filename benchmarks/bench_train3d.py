"""3-D training-step throughput: patches sampled from OME-Zarr volumes against the same patches from RAM.

A few synthetic CT-like volumes (int16, blobs as foreground, 2 x 0.8 x 0.8 mm) are written as NIfTI and ingested
with the default options (chunks of about 1024**2 voxels, shaped from the spacing). A small 3-D conv net (plain
``torch.nn.Conv3d`` layers: the benchmark does not depend on the UNet) trains with Dice + CE on batches of
:class:`unetcore.training.PatchDataset` patches (foreground-oversampled, a third of each batch, read patch by patch
from the store and normalised; augmentation only with ``--augment``), against the same model fed batches already
in memory (the same patches, sampled once beforehand). The sides alternate step by step in one process, so machine
noise hits them alike; the figure of merit is the ratio (goal >= 0.9x), also given as the ratio of median steps
and, steadiest on a shared machine, from the fetch's share of a step (fetch and step are timed apart).

    .venv/bin/python benchmarks/bench_train3d.py [--steps 20] [--patch 24 48 48] [--batch 2] [--augment]

Writes ``benchmarks/results/train3d.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unetcore.config import IngestConfig, NormalizationConfig  # noqa: E402
from unetcore.ingest import ingest_folder  # noqa: E402
from unetcore.store import manifest as mf  # noqa: E402
from unetcore.store.stats import fit_normalization  # noqa: E402
from unetcore.training import AugmentConfig, EpochSampler, PatchDataset, SegmentationLoss, load_images  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SPACING = (2.0, 0.8, 0.8)  # (z, y, x) mm


def write_volumes(folder: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> tuple[Path, Path]:
    """``n`` int16 volumes (HU-like noise around -100, blobs around 60) and their 0/1 masks, as NIfTI."""
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    affine = np.diag([SPACING[2], SPACING[1], SPACING[0], 1.0])
    for i in range(n):
        field = np.zeros(shape, np.float32)
        for _ in range(4):
            centre = [rng.uniform(0.2, 0.8) * s for s in shape]
            radius = rng.uniform(4, 10)
            field += np.exp(-sum(((g - c) * sp) ** 2 for g, c, sp in zip(grid, centre, SPACING)) / (2 * radius**2))
        mask = (field > 0.5).astype(np.uint8)
        image = (-100.0 + 160.0 * mask + rng.normal(0, 40, shape)).astype(np.int16)
        for data, folder_ in ((image, images), (mask, masks)):
            nib.save(nib.Nifti1Image(np.swapaxes(data, 0, 2), affine), str(folder_ / f"ct{i}.nii.gz"))
    return images, masks


class TinyNet3d(nn.Module):
    """Three 3x3x3 convolutions with instance norm and a 1x1x1 head: a stand-in for a small 3-D UNet stage."""

    def __init__(self, in_channels: int = 1, width: int = 16, classes: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in in (in_channels, width, width):
            layers += [nn.Conv3d(c_in, width, 3, padding=1), nn.InstanceNorm3d(width, affine=True),
                       nn.LeakyReLU(0.01, inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv3d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def throughput(dataset: Path, patch: tuple[int, int, int], batch: int, steps: int, augment: bool,
               warmup: int = 2) -> dict[str, Any]:
    """Patches/s of training from the store and from RAM, interleaved step by step (``num_workers=0``).

    The store side starts with an empty chunk cache and fetches each batch inside its timed step; the RAM side
    trains on the same batches, sampled beforehand by an identical dataset. Fetch and step are timed apart, so
    that besides the direct ratio (noisy on a shared machine) the share of the fetch in a step is reported.
    """
    torch.manual_seed(0)
    model = TinyNet3d()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = SegmentationLoss("dice_ce", 2)

    def step(data: tuple[torch.Tensor, torch.Tensor]) -> None:
        images, targets = data
        loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    entries = mf.entries(mf.require(dataset), "train")
    recipe = fit_normalization(NormalizationConfig(mode="ct"), entries)
    t0 = time.perf_counter()
    images = load_images(dataset, "train")
    locations_s = time.perf_counter() - t0

    def loader() -> DataLoader:
        patches = PatchDataset(images, patch, batch, steps + warmup, recipe, 1 / 3,
                               AugmentConfig() if augment else None, seed=0)
        return DataLoader(patches, batch_size=batch, sampler=EpochSampler(len(patches)), num_workers=0)

    in_ram = iter([(x.clone(), y.clone()) for x, y in loader()])  # the very batches the store side will read
    from_store = iter(loader())  # a fresh dataset: its chunk cache starts empty
    fetch, store_step, ram_step = [], [], []
    for i in range(steps + warmup):
        for side in ("store", "ram") if i % 2 else ("ram", "store"):
            t0 = time.perf_counter()
            data = next(from_store if side == "store" else in_ram)
            t1 = time.perf_counter()
            step(data)
            t2 = time.perf_counter()
            if side == "store":
                fetch.append(t1 - t0)
                store_step.append(t2 - t1)
            else:
                ram_step.append(t2 - t0)
    fetch, store_step, ram_step = fetch[warmup:], store_step[warmup:], ram_step[warmup:]
    store_total = [f + s for f, s in zip(fetch, store_step)]
    mean_step = statistics.mean(store_step + ram_step)
    return {"patches_per_s": {"zarr": steps * batch / sum(store_total), "ram": steps * batch / sum(ram_step)},
            "ratio_zarr_vs_ram": sum(ram_step) / sum(store_total),
            "ratio_of_medians": statistics.median(ram_step) / statistics.median(store_total),
            "ratio_from_fetch_share": mean_step / (mean_step + statistics.mean(fetch)),
            "fetch_ms_per_batch": {"mean": 1000 * statistics.mean(fetch), "max": 1000 * max(fetch)},
            "median_step_s": {"zarr": statistics.median(store_step), "ram": statistics.median(ram_step)},
            "class_locations_s": locations_s, "steps": steps, "batch_size": batch, "patch": list(patch),
            "augment": augment, "torch_threads": torch.get_num_threads(),
            "load_avg_1min_at_end": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per side.")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--patch", type=int, nargs=3, default=[24, 48, 48], metavar=("Z", "Y", "X"))
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 160, 160], metavar=("Z", "Y", "X"))
    parser.add_argument("--augment", action="store_true", help="Augment the store's patches (not the RAM ones).")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-train3d-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        images, masks = write_volumes(root / "raw", args.volumes, tuple(args.shape))
        ingest_folder(IngestConfig(images=str(images), masks=str(masks), output=str(root / "ds"), val_fraction=0.0))
        setup_s = time.perf_counter() - t0
        chunks = omezarr_chunks(root / "ds")
        result = throughput(root / "ds", tuple(args.patch), args.batch, args.steps, args.augment)
    result.update(volumes=args.volumes, shape=args.shape, store_chunks=chunks, setup_s=round(setup_s, 1))
    rates = result["patches_per_s"]
    print(f"volumes {args.volumes} x {args.shape}, chunks {chunks}, patch {args.patch}, batch {args.batch}, "
          f"augment {args.augment}, {result['torch_threads']} torch threads")
    print(f"zarr {rates['zarr']:.2f} patches/s, ram {rates['ram']:.2f} patches/s: ratio "
          f"{result['ratio_zarr_vs_ram']:.3f}x (goal >= 0.9x), of medians {result['ratio_of_medians']:.3f}x, "
          f"from the fetch's share {result['ratio_from_fetch_share']:.3f}x; fetch "
          f"{result['fetch_ms_per_batch']['mean']:.1f} ms/batch (max {result['fetch_ms_per_batch']['max']:.0f}), "
          f"median step {result['median_step_s']['zarr']:.3f} / {result['median_step_s']['ram']:.3f} s; "
          f"class locations {result['class_locations_s']:.2f} s")
    out = RESULTS / f"train3d{'_augment' if args.augment else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def omezarr_chunks(dataset: Path) -> list[int]:
    """Level-0 chunk shape (C, z, y, x) of the dataset's first store."""
    from unetcore.store import omezarr

    entry = mf.entries(mf.require(dataset))[0]
    return list(omezarr.image_array(omezarr.open_root(mf.store_path(dataset, entry["id"]))).chunks)


if __name__ == "__main__":
    main()
