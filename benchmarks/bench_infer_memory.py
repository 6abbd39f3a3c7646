"""Peak memory of distributed inference does not grow with the image: 64 megapixels vs 1 gigapixel.

For each size, a synthetic OME-Zarr store (uint8, chunk 1024, texture + noise so no tile is skipped) is written
band by band, then ``predict_dataset`` runs on a fresh local cluster of the default shape with ``unet predict``'s
default options (tile 512, overlap 0.125, float16 probabilities, label pyramid, no export). The predictor is a tiny
UNet (depth 1, base 4) or, with ``--predictor identity`` (to make a gigapixel affordable on 2 cores: the tiny UNet
costs ~25-50 ms a tile here), the identity on the normalised input, installed on each worker in place of the loaded
model; everything else (Zarr reads, normalisation, batching, blending, writes, pyramid) is the engine's. A sampler
adds up the resident set size (RSS) of this process and all its children (scheduler, nannies, workers) every
0.2 s; the peak of that sum is reported. Shared library pages count once per process, so the sum overstates
real use (PSS would be lower); it is the conservative figure.

Usage: ``.venv/bin/python benchmarks/bench_infer_memory.py [--sizes 8192 32768] [--predictor identity|unet]``
(the 1-gigapixel case writes ~2 GB to the temporary folder).
Writes ``benchmarks/results/bench_infer_memory_<predictor>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from unetcore.allocator import release_free_memory
from unetcore.cluster import dask_cluster, local_cluster_shape
from unetcore.config import InferConfig, ModelConfig, NormalizationConfig
from unetcore.inference import predict_dataset
from unetcore.inference.runtime import ship_graph
from unetcore.model import WEIGHTS_FILE, build_model, save_model
from unetcore.store import manifest as mf
from unetcore.store import omezarr
from unetcore.store.stats import StreamingStats

RESULTS = Path(__file__).parent / "results"
CHUNK = 1024


class PeakRss:
    """Samples the summed RSS of this process tree in a thread; ``peak`` in bytes, ``peaks`` per process.

    With a local cluster the scheduler and the nannies run in this process ("driver"); the children are the
    workers.
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s, self.peak, self.samples = interval_s, 0, 0
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue  # a process that just ended
            total += rss
            self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), rss)
        return total

    @staticmethod
    def high_water_marks() -> dict[int, int]:
        """Each live process's own peak RSS so far (Linux ``VmHWM``, exact: no sampling), by pid."""
        me = psutil.Process()
        marks = {}
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{p.pid}/status").read_text()
                marks[p.pid] = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM"))) * 1024
        return marks

    @staticmethod
    def reset_high_water_mark() -> None:
        """Start this process's ``VmHWM`` afresh (writing 5 to ``clear_refs``; Linux >= 4.0)."""
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def driver_and_largest_child(self) -> tuple[int, int]:
        me = os.getpid()
        return self.peaks.get(me, 0), max((v for k, v in self.peaks.items() if k != me), default=0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def write_store(dataset: Path, image_id: str, size: int, seed: int = 0) -> None:
    """Write a ``size``² uint8 OME-Zarr image band by band (never whole in memory) and list it in the manifest."""
    rng = np.random.default_rng(seed)
    patch = rng.normal(80, 20, (CHUNK, CHUNK + 37))
    yy, xx = np.mgrid[0:CHUNK, 0 : CHUNK + 37]
    for _ in range(40):
        cy, cx, r = rng.uniform(0, CHUNK), rng.uniform(0, CHUNK), rng.uniform(8, 40)
        patch[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 90
    patch = np.clip(patch, 0, 255).astype(np.uint8)
    path = mf.store_path(dataset, image_id)
    root = omezarr.create_image(path, (1, size, size), np.uint8, CHUNK, name=image_id)
    stats = StreamingStats(1, np.dtype(np.uint8))
    reps = -(-size // patch.shape[1])
    for y in range(0, size, CHUNK):
        band = np.roll(np.tile(patch, (1, reps)), shift=y // CHUNK * 131, axis=1)[: min(CHUNK, size - y), :size]
        stats.update(band[..., None])
        root["0"][0, y : y + band.shape[0], :] = band
    omezarr.build_pyramid(root, "image")
    result = stats.result()
    omezarr.set_unet_attrs(root, {"id": image_id, "source": "synthetic", "stats": result})
    mf.put_entry(dataset, {"id": image_id, "source": "synthetic", "source_hash": f"synthetic-{size}-{seed}",
                           "store": path.name, "shape": [size, size], "channels": 1, "dtype": "uint8", "chunk": CHUNK,
                           "has_mask": False, "classes": [], "stats": result, "split": "train"})


def install_identity() -> None:
    """On a worker: replace the model with the identity (logits = normalised channel 0); keeps the rest."""
    from unetcore.config import NormalizationConfig as Norm
    from unetcore.inference import BlockPredictor, set_worker_predictor_factory

    def identity(spec: Any) -> BlockPredictor:
        return BlockPredictor(lambda batch: batch[:, :1], 1, Norm(), spec.tile, spec.overlap, spec.batch_size,
                              spec.threshold)

    set_worker_predictor_factory(identity)


def measure(tmp: Path, size: int, model_dir: Path, predictor: str) -> dict[str, Any]:
    dataset = tmp / f"ds{size}"
    start = time.perf_counter()
    write_store(dataset, "img", size)
    write_s = time.perf_counter() - start
    cfg = InferConfig(dataset=str(dataset), output=str(tmp / f"out{size}"), model=str(model_dir), export="none")
    gc.collect()
    release_free_memory()  # what writing the store left in this process's heap is not the inference's
    PeakRss.reset_high_water_mark()  # forget the store writing above
    with PeakRss() as rss:
        start = time.perf_counter()
        with dask_cluster(None) as cluster:
            if predictor == "identity":
                cluster.client.run(install_identity)
            [res] = predict_dataset(cfg, cluster=cluster)
            marks = PeakRss.high_water_marks()  # before the workers exit
        seconds = time.perf_counter() - start
    driver, largest_worker = rss.driver_and_largest_child()
    return {"size": size, "predictor": predictor, "megapixels": size * size / 1e6,
            "peak_rss_mb": round(rss.peak / 2**20, 1),
            "sum_of_process_peaks_mb": round(sum(marks.values()) / 2**20, 1),
            "process_peaks_mb": [round(v / 2**20, 1) for v in marks.values()],
            "peak_rss_driver_mb": round(driver / 2**20, 1),
            "peak_rss_largest_worker_mb": round(largest_worker / 2**20, 1),
            "samples": rss.samples, "seconds": round(seconds, 1), "write_store_s": round(write_s, 1),
            "megapixels_per_s": round(size * size / 1e6 / seconds, 2), "blocks": res.blocks,
            "block_shape": res.block_shape}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--tmp", type=Path, default=None, help="Where to write the stores (default: system temp).")
    parser.add_argument("--predictor", choices=["unet", "identity"], default="unet")
    args = parser.parse_args()
    workers, threads = local_cluster_shape(os.cpu_count() or 1, 0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-infer-mem-", dir=args.tmp) as tmp_str:
        tmp = Path(tmp_str)
        model = build_model(ModelConfig(base_channels=4, depth=1))
        save_model(tmp / "model", model, {"normalization": NormalizationConfig().model_dump()})
        # as training ships it: each run loads the graph instead of exporting it (a second of every run otherwise)
        ship_graph(tmp / "model", mf.file_hash(tmp / "model" / WEIGHTS_FILE), "bench-infer-memory")
        for size in args.sizes:
            rows.append(measure(tmp, size, tmp / "model", args.predictor))
            r = rows[-1]
            print(f"{size}x{size} ({r['megapixels']:.0f} MP): peak RSS {r['peak_rss_mb']:.0f} MB over all processes (driver with "
                  f"scheduler {r['peak_rss_driver_mb']:.0f}, largest worker {r['peak_rss_largest_worker_mb']:.0f}); "
                  f"sum of each process's own peak {r['sum_of_process_peaks_mb']:.0f} MB {r['process_peaks_mb']}, "
                  f"{r['seconds']} s ({r['megapixels_per_s']} MP/s), {r['blocks']} blocks of {r['block_shape']}",
                  flush=True)
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    hwm_ratio = rows[-1]["sum_of_process_peaks_mb"] / rows[0]["sum_of_process_peaks_mb"]
    print(f"\n{rows[-1]['megapixels']:.0f} MP / {rows[0]['megapixels']:.0f} MP ({workers} workers x {threads} "
          f"thread(s)): sampled peak RSS {ratio:.3f}, sum of process peaks {hwm_ratio:.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_infer_memory_{args.predictor}.json").write_text(json.dumps(
        {"rows": rows, "ratio_largest_to_smallest": ratio, "hwm_ratio_largest_to_smallest": hwm_ratio, "workers": workers, "threads": threads}, indent=2))


if __name__ == "__main__":
    main()
