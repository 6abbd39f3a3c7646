"""Ingestion at gigapixel scale: peak memory against image size, and throughput against a plain copy.

For each size (default 10,000² and 40,000² uint8) a tiled, deflate-compressed TIFF is generated tile by tile
(low memory), then, each in a fresh subprocess (peak RSS from ``os.wait4``), alternating over ``--rounds``:

* ``copy``: a plain tifffile -> zarr copy of level 0 (same 1024² chunks and codec, bands one chunk high): the
  floor any ingestion pays for decoding and encoding;
* ``level0``: ``unet ingest`` without the pyramid (reads, checks, statistics, content hash, level 0, manifest);
* ``full``: ``unet ingest`` as users run it (plus the pyramid levels 1..n).

The ratio copy/level0 is the level-0 throughput relative to the copy (goal >= 0.8); full/level0 - 1 is the
pyramid's extra cost. Then, on the smaller image, the chunk-parallel writer with 1 thread against the default
(one per core), and a folder of images ingested one after the other against one Dask task per image.

Run:  .venv/bin/python benchmarks/bench_ingest.py            (about 10 minutes on 2 cores; ~3 GB in /tmp)
      .venv/bin/python benchmarks/bench_ingest.py --sizes 4000 8000 --rounds 1      (quick look)
Writes benchmarks/results/ingest.json. Generated files are deleted at the end (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ingest.json"
TILE = 256
CHUNK = 1024


# --- generated input ----------------------------------------------------------------------------------------


def _tiles(size: int, seed: int = 0):
    """Tiles of a checkerboard plus noise, in TIFF tile order; cheap to make, not trivially compressible."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:TILE, :TILE]
    base = (((yy // 16 + xx // 16) % 2) * 120 + 40).astype(np.uint8)
    noise = [rng.integers(0, 32, (TILE, TILE), dtype=np.uint8) for _ in range(16)]
    n = -(-size // TILE)
    for ty in range(n):
        for tx in range(n):
            yield base + noise[(ty * 7 + tx) % 16] + np.uint8((ty + tx) % 50)


def make_tiff(path: Path, size: int) -> None:
    """A size x size uint8 BigTIFF, 256² tiles, deflate level 1, written tile by tile from a generator."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, _tiles(size), shape=(size, size), dtype=np.uint8, tile=(TILE, TILE), bigtiff=True,
                     compression="zlib", compressionargs={"level": 1})


# --- child side: one measured job per process ----------------------------------------------------------------


def _child_copy(src: Path, out: Path) -> None:
    import tifffile
    import zarr

    from unetcore.store import omezarr

    level0 = zarr.open(tifffile.imread(src, aszarr=True), mode="r")
    height, width = level0.shape
    dst = zarr.create_array(str(out / "copy.zarr"), shape=(1, height, width), chunks=(1, CHUNK, CHUNK),
                            dtype=level0.dtype, compressors=omezarr.compressor(), fill_value=0)
    for y in range(0, height, CHUNK):
        dst[0, y : y + CHUNK, :] = level0[y : y + CHUNK, :]


def _child_ingest(src: Path, out: Path, pyramid: bool, threads: int, n_workers: int, address: str | None) -> None:
    from unetcore.config import IngestConfig
    from unetcore.ingest import ingest_folder

    report = ingest_folder(IngestConfig(images=str(src), output=str(out / "ds"), pyramid=pyramid, threads=threads,
                                        n_workers=n_workers, scheduler_address=address, chunk_size=CHUNK,
                                        val_fraction=0.0))
    assert report.status == "ok", report.to_dict()


def child(args: argparse.Namespace) -> None:
    """Run one job and print its wall time as JSON (imports excluded, cluster start-up included)."""
    src, out = Path(args.src), Path(args.out)
    if args.job == "copy":
        import tifffile  # noqa: F401 - imported before the clock starts, like the ingestion's imports
        import zarr  # noqa: F401
    else:
        import unetcore.ingest  # noqa: F401
    start = time.perf_counter()
    if args.job == "copy":
        _child_copy(src, out)
    else:
        _child_ingest(src, out, args.job != "level0", args.threads, args.n_workers, args.scheduler_address)
    print(json.dumps({"seconds": time.perf_counter() - start}))


# --- parent side ----------------------------------------------------------------------------------------------


def run_child(job: str, src: Path, work: Path, threads: int = 0, n_workers: int = 0,
              address: str | None = None) -> dict[str, float]:
    """Run a job in a fresh process; return its seconds, CPU seconds (with imports) and peak RSS (MB)."""
    out = work / f"out-{job}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--child", job, "--src", str(src), "--out", str(out),
           "--threads", str(threads), "--n-workers", str(n_workers)] + (["--scheduler-address", address] if address
                                                                         else [])
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        stdout = proc.stdout.read() if proc.stdout else b""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{job} failed ({proc.returncode}): {log.read().decode()[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    return {"seconds": result["seconds"], "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def bench_size(size: int, work: Path, rounds: int) -> dict[str, Any]:
    """Copy, level-0 ingestion and full ingestion of one generated image, alternating over rounds."""
    folder = work / f"img{size}"
    tif = folder / f"img{size}.tif"
    start = time.perf_counter()
    make_tiff(tif, size)
    gen_s = time.perf_counter() - start
    runs: dict[str, list[dict[str, float]]] = {"copy": [], "level0": [], "full": []}
    for _ in range(rounds):
        runs["copy"].append(run_child("copy", tif, work))
        runs["level0"].append(run_child("level0", folder, work))
        runs["full"].append(run_child("full", folder, work))
    med = {job: statistics.median(r["seconds"] for r in rs) for job, rs in runs.items()}
    cpu = {job: statistics.median(r["cpu_s"] for r in rs) for job, rs in runs.items()}
    rss = {job: max(r["peak_rss_mb"] for r in rs) for job, rs in runs.items()}
    result = {
        "size": size, "megapixels": size * size / 1e6, "tiff_mb": tif.stat().st_size / 1e6, "generate_s": gen_s,
        "runs": runs, "median_s": med, "median_cpu_s": cpu, "peak_rss_mb": rss,
        "level0_vs_copy": med["copy"] / med["level0"], "pyramid_extra": med["full"] / med["level0"] - 1,
        "full_mp_per_s": size * size / 1e6 / med["full"],
    }
    shutil.rmtree(folder, ignore_errors=True)
    return result


def bench_parallel(work: Path, size: int, n_images: int, image_size: int) -> dict[str, Any]:
    """One image: 1 thread vs the default; a folder: one image at a time vs one Dask task per image.

    Dask runs twice: starting its own local cluster (``--n-workers``), and on a cluster already running
    (``--scheduler-address``, the usual set-up for big jobs), which shows the start-up cost apart.
    """
    from distributed import LocalCluster

    workers = os.cpu_count() or 1
    single = work / "par-single"
    make_tiff(single / "one.tif", size)
    one_thread = run_child("level0", single, work, threads=1)
    default = run_child("level0", single, work, threads=0)
    shutil.rmtree(single, ignore_errors=True)
    folder = work / "par-folder"
    for i in range(n_images):
        make_tiff(folder / f"img{i:02d}.tif", image_size)
    serial_1 = run_child("level0", folder, work, threads=1)
    serial = run_child("level0", folder, work, threads=0)
    cold = run_child("level0", folder, work, threads=1, n_workers=workers)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        warm = run_child("level0", folder, work, threads=1, address=cluster.scheduler_address)
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "single_image": {"size": size, "threads_1_s": one_thread["seconds"], "threads_auto_s": default["seconds"],
                         "speedup": one_thread["seconds"] / default["seconds"]},
        "folder": {"images": n_images, "size": image_size, "serial_threads_1_s": serial_1["seconds"],
                   "serial_s": serial["seconds"], "dask_cold_s": cold["seconds"], "dask_warm_s": warm["seconds"],
                   "dask_workers": workers, "warm_speedup": serial_1["seconds"] / warm["seconds"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="Scratch folder (default: a new one under /tmp).")
    parser.add_argument("--keep", action="store_true", help="Keep the scratch folder.")
    parser.add_argument("--skip-parallel", action="store_true")
    parser.add_argument("--child", choices=["copy", "level0", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--n-workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--scheduler-address", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.job = args.child
        child(args)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        sizes = [bench_size(size, work, args.rounds) for size in args.sizes]
        parallel = None if args.skip_parallel else bench_parallel(work, min(args.sizes), 16, 2500)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'image':>14} {'MP':>6} {'copy s':>7} {'level0 s':>8} {'full s':>7} {'l0/copy':>8} {'pyramid':>8} "
          f"{'RSS copy':>9} {'RSS full':>9}")
    for r in sizes:
        print(f"{r['size']:>6} x {r['size']:<6} {r['megapixels']:>6.0f} {r['median_s']['copy']:>7.1f} "
              f"{r['median_s']['level0']:>8.1f} {r['median_s']['full']:>7.1f} {r['level0_vs_copy']:>7.2f}x "
              f"{r['pyramid_extra']:>+7.0%} {r['peak_rss_mb']['copy']:>7.0f}MB {r['peak_rss_mb']['full']:>7.0f}MB")
    if len(sizes) >= 2:
        small, big = sizes[0]["peak_rss_mb"]["full"], sizes[-1]["peak_rss_mb"]["full"]
        print(f"peak RSS of a full ingestion, largest vs smallest image: {big / small - 1:+.1%}")
    if parallel:
        s, f = parallel["single_image"], parallel["folder"]
        print(f"one {s['size']}² image, level 0: 1 thread {s['threads_1_s']:.1f} s, default threads "
              f"{s['threads_auto_s']:.1f} s ({s['speedup']:.2f}x)")
        print(f"{f['images']} images of {f['size']}², level 0: one at a time {f['serial_threads_1_s']:.1f} s "
              f"(1 thread) / {f['serial_s']:.1f} s (default threads); one Dask task per image on "
              f"{f['dask_workers']} workers: {f['dask_warm_s']:.1f} s on a running cluster "
              f"({f['warm_speedup']:.2f}x vs 1 thread), {f['dask_cold_s']:.1f} s starting one")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu_count": os.cpu_count(), "sizes": sizes, "parallel": parallel}, indent=2))
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
