"""GPU benchmark in one command: training img/s (AMP on/off), inference MP/s (pipeline block path vs bare forward vs
MONAI), GPU busy fraction and peak device memory; one table on stdout and one JSON file.

Runs from the library with tracking off: no MLflow, Prefect, Dask or pydantic on its path (the GPU machines' Python
has torch, numpy, scikit-image, tifffile, typer and rich only). It imports the few ``unetcore`` modules it needs
one by one (the UNet, the pure tiling geometry, the device block kernel, the loss), not their packages'
``__init__`` (which pull in the config system, Zarr and Dask). Zarr is optional: with it (wheels carried, see
``benchmarks/README.md``) the pipeline side reads a compressed Zarr image and writes Zarr labels and float16
probabilities, as ``unet predict`` does; without it, numpy arrays in memory.

Sides (model: UNet depth 4, base 16, random init, batch norms folded for our sides; tile 256, overlap 0.5):

- ``train amp=off|on``: SGD steps on host-pinned synthetic batches copied in ``non_blocking`` (Dice + CE, bf16
  autocast when AMP is on, no per-step host sync); images (patches) per second.
- ``bare``: forward passes only, over as many tiles as the image's dense grid, batches resident on the device.
- ``pipeline``: the pipeline's block path (:func:`unetcore.inference.ondevice.predict_blocks`): read each block's
  region (next block read ahead on a thread), normalise, tile, forward, Gaussian-blend, sigmoid and threshold on
  the device, one copy back per block, write labels and probabilities; MP/s of the image.
- ``monai``: ``sliding_window_inference`` as its users call it (unfolded model, default layout, Gaussian, same tile
  batch, the image on the device, bf16 autocast on CUDA like ours), when MONAI is importable.

GPU busy: the mean of ``torch.cuda.utilization`` (or ``nvidia-smi --query-gpu=utilization.gpu``) sampled every
0.1 s while a side runs; each side is repeated until it has run ``--min-seconds``.

Usage (GPU machine): ``python benchmarks/bench_gpu.py`` (defaults: 8192² image, batch from free memory)
Quick check anywhere: ``python benchmarks/bench_gpu.py --device cpu --quick``
Writes ``benchmarks/results/bench_gpu-<device>.json`` (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
LIGHT_PACKAGES = ("unetcore.model", "unetcore.inference", "unetcore.training")


def light_packages() -> None:
    """Let the modules of the packages the bench uses import one by one, without the packages' ``__init__``."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for name in LIGHT_PACKAGES:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations is not None
        package = types.ModuleType(name, "bare package (benchmarks/bench_gpu.py): its modules, not its __init__")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = package


light_packages()

from unetcore.inference.ondevice import (  # noqa: E402
    Affine,
    DeviceKernel,
    predict_blocks,
    skip_empty_tensor_predictor,
    tensor_predictor,
)
from unetcore.inference.windows import TileGrid, plan_blocks, tile_evaluations  # noqa: E402
from unetcore.model.parts import fold_batch_norm  # noqa: E402
from unetcore.model.unet import UNet  # noqa: E402
from unetcore.training.losses import SegmentationLoss  # noqa: E402


@dataclass
class NetConfig:
    """The fields of ``unetcore.config.ModelConfig`` the UNet reads (so the bench needs no pydantic)."""

    in_channels: int = 1
    num_classes: int = 1
    depth: int = 4
    base_channels: int = 16
    norm: str = "batch"
    upsample: str = "transpose"
    dropout: float = 0.0
    deep_supervision: bool = False
    spatial_dims: int = 2
    pool: list[list[int]] | None = None
    kernels: list[list[int]] | None = None


def make_model(net: NetConfig) -> UNet:
    torch.manual_seed(0)
    return UNet(net)  # type: ignore[arg-type]  # duck-typed config


# --- measuring ------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BusySampler:
    """Samples the GPU's utilisation (percent of time a kernel ran) every ``period`` s on a thread."""

    def __init__(self, device: torch.device, period: float = 0.1) -> None:
        self.device, self.period, self.samples = device, period, []
        self._stop = threading.Event()
        self._read = self._reader()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _reader(self) -> Callable[[], float] | None:
        if self.device.type != "cuda":
            return None
        try:
            torch.cuda.utilization(self.device)
            return lambda: float(torch.cuda.utilization(self.device))
        except Exception:  # no pynvml / amdsmi: ask nvidia-smi
            pass
        if shutil.which("nvidia-smi") is None:
            return None
        index = str(self.device.index or 0)

        def smi() -> float:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", index], capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip().splitlines()[0])

        return smi

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.samples.append(self._read())  # type: ignore[misc]
            except Exception:
                return

    def __enter__(self) -> BusySampler:
        if self._read is not None:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def fraction(self) -> float | None:
        return round(float(np.mean(self.samples)) / 100, 3) if self.samples else None


@contextmanager
def peak_memory(device: torch.device, into: dict[str, Any]) -> Iterator[None]:
    """Record the side's peak device memory (MB) into ``into["peak_mem_mb"]`` (None off CUDA)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    into["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def timed(device: torch.device, run: Callable[[], Any], min_seconds: float, warmup: bool = True) -> dict[str, Any]:
    """Run ``run`` (after one warm-up) until ``min_seconds`` passed; mean seconds per run, busy and peak memory."""
    if warmup:
        run()
        sync(device)
    out: dict[str, Any] = {}
    with peak_memory(device, out), BusySampler(device) as busy:
        runs, t0 = 0, time.perf_counter()
        while True:
            run()
            sync(device)
            runs += 1
            if time.perf_counter() - t0 >= min_seconds:
                break
        seconds = time.perf_counter() - t0
    out.update(runs=runs, seconds=round(seconds / runs, 4), gpu_busy=busy.fraction)
    return out


# --- the sides ------------------------------------------------------------------------------------------------


def bench_training(net: NetConfig, device: torch.device, batch: int, patch: int, steps: int, amp: bool,
                   min_seconds: float) -> dict[str, Any]:
    """SGD steps on host-pinned synthetic batches; images per second."""
    model = make_model(net).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    loss_fn = SegmentationLoss("dice_ce", net.num_classes).to(device)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand((batch, net.in_channels, patch, patch), generator=gen)
    targets = (images[:, 0] > 0.5).long()
    if device.type == "cuda":
        images, targets = images.pin_memory(), targets.pin_memory()
    use_amp = amp and device.type == "cuda"

    def steps_run() -> torch.Tensor:
        total = torch.zeros((), device=device)
        for _ in range(steps):
            x = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
            optimizer.step()
            total += loss.detach()  # summed on the device: no host sync per step
        return total

    out = timed(device, steps_run, min_seconds)
    out.update(side=f"train amp={'on' if amp else 'off'}", batch=batch, patch=patch,
               images_per_s=round(batch * steps / out["seconds"], 2), amp_used=use_amp)
    return out


def bench_bare(model: torch.nn.Module, device: torch.device, grid: TileGrid, batch: int, channels: int,
               min_seconds: float) -> dict[str, Any]:
    """Forward passes over as many tiles as the dense grid, batches already on the device."""
    run_batch = tensor_predictor(model, device, 2)
    x = torch.rand((batch, channels, *grid.tile), device=device)
    n_batches = math.ceil(grid.n_tiles / batch)

    def forwards() -> None:
        with torch.inference_mode():
            for _ in range(n_batches):
                run_batch(x)

    out = timed(device, forwards, min_seconds)
    out.update(side="bare forward", tiles=grid.n_tiles, batch=batch)
    return out


@dataclass
class Store:
    """The image and the outputs: Zarr arrays (compressed, chunked as ``unet ingest`` writes them) or numpy."""

    image: Any
    labels: Any
    probs: Any
    kind: str


def make_store(image: np.ndarray, chunk: int, folder: Path) -> Store:
    try:
        import zarr
    except ImportError:
        return Store(image, np.zeros(image.shape[1:], np.uint8), np.zeros(image.shape, np.float16), "numpy in memory")
    src = zarr.create_array(store=str(folder / "image.zarr"), shape=image.shape, chunks=(1, chunk, chunk),
                            dtype=image.dtype)
    src[:] = image
    labels = zarr.create_array(store=str(folder / "labels.zarr"), shape=image.shape[1:], chunks=(chunk, chunk),
                               dtype=np.uint8)
    probs = zarr.create_array(store=str(folder / "probs.zarr"), shape=image.shape, chunks=(1, chunk, chunk),
                              dtype=np.float16)
    return Store(src, labels, probs, f"zarr {zarr.__version__} on disk")


def bench_pipeline(model: torch.nn.Module, device: torch.device, store: Store, grid: TileGrid, block: int,
                   batch: int, min_seconds: float) -> dict[str, Any]:
    """The pipeline's block path: Zarr (or numpy) → device kernel → Zarr (or numpy)."""
    channels, *spatial = store.image.shape
    kernel = DeviceKernel(skip_empty_tensor_predictor(tensor_predictor(model, device, 2), 1), device, 1)
    affine = Affine(scale=(1 / 255.0,) * channels, offset=(0.0,) * channels, unit_clip=True)
    blocks = plan_blocks(tuple(spatial), (block, block))

    def read(*box: slice) -> np.ndarray:
        return np.asarray(store.image[(slice(None), *box)])

    def run() -> None:
        for b, probs, labels in predict_blocks(kernel, read, tuple(spatial), channels, affine, grid, blocks, batch,
                                               "float16"):
            store.labels[b.slices] = labels
            store.probs[(slice(None), *b.slices)] = probs

    out = timed(device, run, min_seconds)
    out.update(side=f"pipeline block path ({store.kind})", blocks=len(blocks),
               tiles=tile_evaluations(grid, (block, block)), batch=batch)
    return out


def bench_monai(model: torch.nn.Module, device: torch.device, image: np.ndarray, tile: int, batch: int,
                min_seconds: float) -> dict[str, Any] | None:
    """MONAI's sliding window as its users call it; None when MONAI is not importable."""
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return None
    model = model.to(device).eval()
    x = torch.from_numpy(image[None].astype(np.float32) / 255.0).to(device)

    def run() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            sliding_window_inference(x, (tile, tile), batch, model, overlap=0.5, mode="gaussian")

    out = timed(device, run, min_seconds)
    out.update(side="monai sliding_window_inference", batch=batch)
    return out


# --- the run --------------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device cuda, but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def auto_batch(model: torch.nn.Module, device: torch.device, tile: int, channels: int, fallback: int) -> int:
    from unetcore.inference.ondevice import probe_batch_size

    return probe_batch_size(tensor_predictor(model, device, 2), channels, (tile, tile), device, fallback)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    quick = args.quick
    size = args.size or (256 if quick else 8192 if device.type == "cuda" else 2048)
    tile = args.tile or (64 if quick else 256)
    net = NetConfig(depth=2 if quick else 4, base_channels=4 if quick else 16)
    min_s = args.min_seconds if args.min_seconds is not None else (0.0 if quick else 5.0)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or (1 if quick else torch.get_num_threads()))  # quick: shared CI cores
    model = fold_batch_norm(make_model(net).eval())
    batch = args.batch or auto_batch(model, device, tile, net.in_channels, 4)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (net.in_channels, size, size), dtype=np.uint8)
    grid = TileGrid.build((size, size), (tile, tile), 0.5)
    rows: list[dict[str, Any]] = []
    train_batch = args.train_batch or (2 if quick else 32 if device.type == "cuda" else 4)
    train_steps = 2 if quick else 20
    for amp in (False, True):
        rows.append(bench_training(net, device, train_batch, tile, train_steps, amp, min_s))
    rows.append(bench_bare(model, device, grid, batch, net.in_channels, min_s))
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        store = make_store(image, args.chunk or (64 if quick else 1024), Path(tmp))
        rows.append(bench_pipeline(model, device, store, grid, args.block or (128 if quick else 2048), batch, min_s))
    if not args.skip_monai:
        monai_row = bench_monai(make_model(net), device, image, tile, batch, min_s)
        if monai_row is not None:
            rows.append(monai_row)
    megapixels = size * size / 1e6
    for row in rows:
        if not row["side"].startswith("train"):
            row["megapixels_per_s"] = round(megapixels / row["seconds"], 3)
    facts = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
             "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
             "image": [size, size], "tile": tile, "overlap": 0.5, "model": {"depth": net.depth,
                                                                          "base_channels": net.base_channels},
             "tile_batch": batch, "quick": quick, "cpu_threads": torch.get_num_threads()}
    by_side = {r["side"].split(" (")[0]: r for r in rows}
    pipe, bare = by_side.get("pipeline block path"), by_side.get("bare forward")
    ratios = {"pipeline_vs_bare": round(pipe["megapixels_per_s"] / bare["megapixels_per_s"], 3)} if pipe and bare else {}
    if pipe and "monai sliding_window_inference" in by_side:
        ratios["pipeline_vs_monai"] = round(pipe["megapixels_per_s"]
                                            / by_side["monai sliding_window_inference"]["megapixels_per_s"], 3)
    return {"facts": facts, "rows": rows, "ratios": ratios}


def table(result: dict[str, Any]) -> str:
    head = ["side", "img/s", "MP/s", "s/run", "runs", "GPU busy", "peak MB", "batch"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in result["rows"]:
        busy = "-" if r.get("gpu_busy") is None else f"{100 * r['gpu_busy']:.0f} %"
        lines.append(" | ".join(str(v) for v in (
            r["side"], r.get("images_per_s", "-"), r.get("megapixels_per_s", "-"), r["seconds"], r["runs"], busy,
            r.get("peak_mem_mb") if r.get("peak_mem_mb") is not None else "-", r.get("batch", "-"))))
    facts = result["facts"]
    lines.append(f"device {facts['device']} {facts['gpu'] or ''}, torch {facts['torch']} (CUDA {facts['cuda']}), "
                 f"image {facts['image'][0]}², tile {facts['tile']}, ratios {result['ratios']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny model and image: a check that it runs (< 1 min)")
    parser.add_argument("--size", type=int, default=0, help="image edge (default 8192 on CUDA, 2048 on CPU)")
    parser.add_argument("--tile", type=int, default=0)
    parser.add_argument("--batch", type=int, default=0, help="tiles per forward (default: from free GPU memory)")
    parser.add_argument("--train-batch", type=int, default=0)
    parser.add_argument("--block", type=int, default=0, help="block edge of the pipeline side (default 2048)")
    parser.add_argument("--chunk", type=int, default=0, help="Zarr chunk edge (default 1024)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (default: all; 1 with --quick)")
    parser.add_argument("--min-seconds", type=float, default=None, help="run each side at least this long")
    parser.add_argument("--skip-monai", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args)
    print(table(result))
    path = args.json or ROOT / "benchmarks" / "results" / f"bench_gpu-{result['facts']['device'].split(':')[0]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
