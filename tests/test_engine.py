"""The Dask inference engine end to end: tiled output equals whole-image sliding window, and the operator's cases.

A real (tiny, random-init) UNet saved with ``save_model`` predicts ingested stores with odd sizes and chunkings on
a shared two-worker local cluster; the oracle is :func:`unetcore.inference.stitch.sliding_window` on the whole
image in this process. Slow cases start real processes: a killed ``unet predict`` that is resumed, and a
``dask scheduler`` with two ``dask worker`` processes, one of which is killed mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image
from skimage import io as skio
from skimage import measure
from typer.testing import CliRunner

from app.cli import app
from unetcore.allocator import ARRAY_MMAP_BYTES
from unetcore.cluster import Cluster, dask_cluster
from unetcore.config import InferConfig, IngestConfig, ModelConfig, NormalizationConfig
from unetcore.errors import ConfigError, InputError, OutputExistsError
from unetcore.inference import (
    BlockPredictor,
    check_predictable,
    engine,
    plan_blocks,
    plan_image,
    postprocess_whole,
    predict_dataset,
    predict_entries,
    sliding_window,
)
from unetcore.ingest import ingest_folder
from unetcore.locks import LockedError, exclusive
from unetcore.model import build_model, save_model
from unetcore.store import manifest as mf
from unetcore.store.stats import normalize
from unetcore.tracking.mlflow import pin_model

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


# --- helpers ---------------------------------------------------------------------------------------------


def make_dataset(root: Path, image: np.ndarray, chunk: int, name: str = "img") -> Path:
    """Ingest one image ((H, W) or (H, W, 3) uint8) with the given chunk size; returns the dataset folder."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(root / "images" / f"{name}.tif", image)
    dataset = root / "ds"
    report = ingest_folder(IngestConfig(images=str(root / "images"), output=str(dataset), chunk_size=chunk,
                                        val_fraction=0.0))
    assert not report.failed
    return dataset


def make_model(path: Path, in_channels: int = 1, classes: int = 1, seed: int = 0, head_bias: float | None = None,
               depth: int = 2) -> Path:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(in_channels=in_channels, num_classes=classes, base_channels=4, depth=depth))
    model.eval()
    if head_bias is not None:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.fill_(head_bias)
    return save_model(path, model, {"normalization": NormalizationConfig().model_dump()})


def random_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.random(shape)
    for axis in (0, 1):  # some spatial structure, so the net's predictions form blobs
        smooth = (smooth + np.roll(smooth, 1, axis) + np.roll(smooth, 2, axis)) / 3
    return (smooth * 255).astype(np.uint8)


def oracle_logits(dataset: Path, model_dir: Path, cfg: InferConfig) -> np.ndarray:
    """Whole-image sliding window (K, H, W) with the engine's predictor, in this process."""
    from unetcore.model import load_model

    [entry] = mf.entries(mf.require(dataset))
    image = zarr.open_group(store=str(mf.store_path(dataset, entry["id"])), mode="r")["0"][:]
    model, config = load_model(model_dir)
    bp = BlockPredictor.from_model(model, config, torch.device("cpu"), tile=cfg.tile, overlap=cfg.overlap,
                                   batch_size=cfg.batch_size, skip_empty=cfg.skip_empty)
    x = normalize(image, entry["stats"], NormalizationConfig(**config["normalization"]))
    return sliding_window(x, bp.predictor, (cfg.tile, cfg.tile), cfg.overlap, cfg.batch_size)


def outputs(out_dir: Path, image_id: str = "img") -> zarr.Group:
    return zarr.open_group(store=str(out_dir / f"{image_id}.ome.zarr"), mode="r")


def config(dataset: Path, out: Path, model: Path, **kw: Any) -> InferConfig:
    base = dict(dataset=str(dataset), output=str(out), model=str(model), tile=64, block_size=128,
                threads_per_worker=1)
    return InferConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    with dask_cluster(None, 2, 1) as c:
        yield c


# --- tiled == whole image ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "chunk", "tile", "block_size", "channels", "classes"),
    [
        ((333, 517), 96, 64, 128, 1, 1),  # blocks (one 96² chunk) larger than the tiles, odd sizes
        ((301, 263), 64, 160, 64, 3, 3),  # blocks smaller than the tiles, RGB, softmax over 3 classes
        ((200, 1000), 128, 96, 300, 1, 2),  # multi-chunk blocks; edges inside tiles
    ],
)
def test_engine_equals_whole_image_sliding_window(
    tmp_path: Path, cluster: Cluster, shape: tuple[int, int], chunk: int, tile: int, block_size: int, channels: int,
    classes: int,
) -> None:
    image = random_image((*shape, channels) if channels > 1 else shape)
    dataset = make_dataset(tmp_path, image, chunk)
    model = make_model(tmp_path / "model", channels, classes)
    cfg = config(dataset, tmp_path / "out", model, tile=tile, block_size=block_size, probability_dtype="float32")
    [result] = predict_dataset(cfg, cluster=cluster)

    assert result.blocks > 1 and result.blocks_skipped == 0
    assert result.tile_evaluations >= result.grid_tiles
    logits = oracle_logits(dataset, model, cfg)
    t = torch.from_numpy(logits)
    probs = (torch.sigmoid(t) if classes == 1 else torch.softmax(t, 0)).numpy()
    out = outputs(tmp_path / "out")
    np.testing.assert_allclose(out["0"][:], probs, atol=1e-5, rtol=0)
    labels = out["labels/prediction/0"][:]
    expected = (probs[0] > 0.5) if classes == 1 else probs.argmax(0)
    if classes == 1:
        decided = np.abs(probs[0] - 0.5) > 1e-4
    else:
        top2 = np.sort(probs, axis=0)[-2:]
        decided = top2[1] - top2[0] > 1e-4
    np.testing.assert_array_equal(labels[decided], expected[decided])
    assert out.attrs["unet"]["complete"] is True
    assert len(list((tmp_path / "out" / "img.blocks").glob("y*_x*.json"))) == result.blocks


def _malloc_tuned() -> int | None:
    from unetcore.allocator import block_mmap_bytes

    return block_mmap_bytes()  # None until a block has applied the settings


def test_workers_get_their_torch_threads_malloc_settings_and_quiet_config(tmp_path: Path) -> None:
    import dask

    dataset = make_dataset(tmp_path, random_image((150, 150)), 64)
    model = make_model(tmp_path / "model")
    with dask_cluster(None, 1, 2) as c:
        assert c.torch_threads == 2
        assert set(c.client.run(_malloc_tuned).values()) == {None}
        predict_dataset(config(dataset, tmp_path / "out", model, threads_per_worker=0, runtime="torch"), cluster=c)
        assert set(c.client.run(torch.get_num_threads).values()) == {2}  # 1 worker on 2 cores: both cores for torch
        assert set(c.client.run(_malloc_tuned).values()) == {ARRAY_MMAP_BYTES[2]}
        intervals = c.client.run(lambda: (dask.config.get("distributed.worker.profile.interval"),
                                   dask.config.get("distributed.worker.memory.monitor-interval")))
        assert set(intervals.values()) == {("100ms", "500ms")}


# --- options -------------------------------------------------------------------------------------------


def test_skipped_empty_tiles_give_background_where_the_model_says_foreground(tmp_path: Path, cluster: Cluster) -> None:
    image = np.zeros((200, 400), np.uint8)
    image[:, 300:] = random_image((200, 100))
    dataset = make_dataset(tmp_path, image, 64)
    model = make_model(tmp_path / "model", head_bias=30.0)  # foreground everywhere when it runs
    on = config(dataset, tmp_path / "on", model)
    off = config(dataset, tmp_path / "off", model, skip_empty=False, skip_background=False)
    predict_dataset(on, cluster=cluster)
    predict_dataset(off, cluster=cluster)

    labels_on = outputs(tmp_path / "on")["labels/prediction/0"][:]
    assert (outputs(tmp_path / "off")["labels/prediction/0"][:] == 1).all()
    # Columns < 236 are covered only by tiles that lie wholly in the constant part (tile 64, last start < 300-64).
    assert (labels_on[:, :236] == 0).all()
    assert (outputs(tmp_path / "on")["0"][0, :, :236].astype(np.float32) < 1e-4).all()
    assert (labels_on[:, 300:] == 1).all()
    np.testing.assert_array_equal(labels_on, (oracle_logits(dataset, model, on)[0] > 0).astype(np.uint8))


def test_instances_get_one_id_across_block_borders(tmp_path: Path, cluster: Cluster) -> None:
    dataset = make_dataset(tmp_path, random_image((300, 340), seed=3), 64)
    model = make_model(tmp_path / "model", seed=1)
    probe = config(dataset, tmp_path / "probe", model)
    threshold = float(np.median(torch.sigmoid(torch.from_numpy(oracle_logits(dataset, model, probe)[0]))))
    cfg = config(dataset, tmp_path / "out", model, threshold=threshold, instances=True, block_size=64)
    [result] = predict_dataset(cfg, cluster=cluster)

    out = outputs(tmp_path / "out")
    semantic, inst = out["labels/prediction/0"][:], out["labels/instances/0"][:]
    ref = measure.label(semantic, background=0, connectivity=1)
    assert result.instances == inst.max() == ref.max() > 1
    assert len(set(zip(inst.ravel().tolist(), ref.ravel().tolist()))) == len(np.unique(ref))  # same partition
    blocks = plan_blocks(semantic.shape, tuple(result.block_shape))
    spans = [sum(bool((inst[b.slices] == i).any()) for b in blocks) for i in range(1, int(inst.max()) + 1)]
    assert max(spans) >= 3  # objects do cross block borders, and keep one id
    assert len(out["labels/instances"].attrs["ome"]["multiscales"][0]["datasets"]) >= 1


def test_small_objects_removed_by_whole_image_size(tmp_path: Path, cluster: Cluster) -> None:
    dataset = make_dataset(tmp_path, random_image((260, 300), seed=5), 64)
    model = make_model(tmp_path / "model", seed=2)
    probe = config(dataset, tmp_path / "probe", model)
    threshold = float(np.median(torch.sigmoid(torch.from_numpy(oracle_logits(dataset, model, probe)[0]))))
    raw_cfg = config(dataset, tmp_path / "raw", model, threshold=threshold, block_size=64)
    post_cfg = config(dataset, tmp_path / "post", model, threshold=threshold, block_size=64, min_object_size=40)
    predict_dataset(raw_cfg, cluster=cluster)
    predict_dataset(post_cfg, cluster=cluster)
    raw = outputs(tmp_path / "raw")["labels/prediction/0"][:]
    post = outputs(tmp_path / "post")["labels/prediction/0"][:]
    assert (raw != post).any()
    np.testing.assert_array_equal(post, postprocess_whole(raw, 40))
    assert not (tmp_path / "post" / "img.blocks" / "scratch.zarr").exists()  # scratch removed when complete


def test_exports_png_tiff_and_preview(tmp_path: Path, cluster: Cluster) -> None:
    dataset = make_dataset(tmp_path, random_image((210, 190)), 64)
    model = make_model(tmp_path / "model")
    [png] = predict_dataset(config(dataset, tmp_path / "png", model, export="png"), cluster=cluster)
    [tif] = predict_dataset(config(dataset, tmp_path / "tif", model, export="tiff"), cluster=cluster)
    labels = outputs(tmp_path / "png")["labels/prediction/0"][:]
    np.testing.assert_array_equal(np.asarray(Image.open(png.export)), labels)  # a palette PNG: values are the ids
    with tifffile.TiffFile(tif.export) as f:
        page = f.pages[0]
        assert f.is_bigtiff and page.is_tiled and page.tilewidth == 256
        np.testing.assert_array_equal(page.asarray(), labels)
    preview = skio.imread(png.preview)
    assert preview.shape[:2] == (210, 190) and preview.shape[2] == 3


# --- refusing, resuming --------------------------------------------------------------------------------


def _tree_digest(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_different_result_refused_unless_overwrite_and_nothing_touched(tmp_path: Path, cluster: Cluster) -> None:
    dataset = make_dataset(tmp_path, random_image((150, 170)), 64)
    model = make_model(tmp_path / "model")
    predict_dataset(config(dataset, tmp_path / "out", model), cluster=cluster)
    before = _tree_digest(tmp_path / "out")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        predict_dataset(config(dataset, tmp_path / "out", model, threshold=0.3), cluster=cluster)
    assert _tree_digest(tmp_path / "out") == before
    [again] = predict_dataset(config(dataset, tmp_path / "out", model), cluster=cluster)  # same options: resumes
    assert again.blocks_skipped == again.blocks
    [replaced] = predict_dataset(config(dataset, tmp_path / "out", model, threshold=0.3, overwrite=True),
                                 cluster=cluster)
    assert replaced.blocks_skipped == 0 and outputs(tmp_path / "out").attrs["unet"]["complete"] is True


def _one_line_error(result: Any, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path, random_image((100, 120)), 64)
    model = make_model(tmp_path / "model")
    rgb_model = make_model(tmp_path / "rgb", in_channels=3)
    out = tmp_path / "out"

    def predict(*args: str) -> Any:
        return runner.invoke(app, ["predict", str(dataset), "-o", str(out), "--no-prefect", *args])

    _one_line_error(predict("--model", str(rgb_model)), "expects 3 channels", "has 1")
    _one_line_error(predict("--model", str(tmp_path / "missing")), "missing", "config.json")
    _one_line_error(predict("--model", str(model), "--scheduler-address", "tcp://127.0.0.1:1"),
                    "tcp://127.0.0.1:1", "unreachable")
    assert not out.exists()
    # A manifest that lists a store which is not an image store.
    store = mf.store_path(dataset, "img")
    (store / "zarr.json").unlink()
    _one_line_error(predict("--model", str(model)), str(store))
    assert not out.exists()


@pytest.mark.slow
def test_model_uri_that_does_not_resolve(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path, random_image((80, 80)), 64)
    db = tmp_path / "mlflow.db"
    result = runner.invoke(app, ["predict", str(dataset), "-o", str(tmp_path / "out"), "--no-prefect", "--model",
                                 "models:/nope@champion", "--tracking-uri", f"sqlite:///{db}"])
    _one_line_error(result, "models:/nope@champion", "does not resolve", "no MLflow database")
    assert not db.exists()  # a typo in the URI does not leave an empty database behind
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    mlflow.search_experiments()  # creates the (empty) database
    result = runner.invoke(app, ["predict", str(dataset), "-o", str(tmp_path / "out"), "--no-prefect", "--model",
                                 "models:/nope@champion", "--tracking-uri", f"sqlite:///{db}"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: models:/nope@champion: model URI does not "
                                                             "resolve")


def _records(records: Path) -> list[Path]:
    return [p for p in records.glob("y*_x*.json") if p.name.count(".") == 1]


def _kill_group_after_records(proc: subprocess.Popen, records: Path, n: int, timeout_s: float = 180) -> int:
    """SIGKILL ``proc``'s whole process group once ``n`` completion records exist; returns how many there were."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if records.is_dir() and len(_records(records)) >= n:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)  # polling interval, not a timing assumption
    proc.wait(timeout=30)
    return len(_records(records))


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(tmp_path: Path, cluster: Cluster) -> None:
    dataset = make_dataset(tmp_path, random_image((384, 640), seed=7), 64)
    model = make_model(tmp_path / "model", depth=3)
    args = ["--model", str(model), "--tile", "64", "--block-size", "64", "--workers", "2", "--threads-per-worker",
            "1", "--instances", "--min-object-size", "20", "--no-prefect"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "predict", str(dataset), "-o", str(killed), *args],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_at_kill = _kill_group_after_records(proc, killed / "img.blocks", 4)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert outputs(killed).attrs["unet"]["complete"] is False

    cfg = dict(tile=64, block_size=64, n_workers=2, instances=True, min_object_size=20)
    [resumed] = predict_dataset(config(dataset, killed, model, **cfg), cluster=cluster)
    [whole] = predict_dataset(config(dataset, tmp_path / "whole", model, **cfg), cluster=cluster)
    assert 0 < done_at_kill <= resumed.blocks_skipped < resumed.blocks
    a, b = outputs(killed), outputs(tmp_path / "whole")
    arrays_a = {k for k, v in a.members(max_depth=None) if isinstance(v, zarr.Array)}
    arrays_b = {k for k, v in b.members(max_depth=None) if isinstance(v, zarr.Array)}
    assert arrays_a == arrays_b
    assert {"0", "labels/prediction/0", "labels/instances/0"} <= arrays_b
    for key in sorted(arrays_b):
        assert a[key][:].tobytes() == b[key][:].tobytes(), key
    assert a.attrs["unet"]["complete"] is True


# --- a real scheduler and workers ----------------------------------------------------------------------


def _dask(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([str(Path(sys.executable).with_name("dask")), *args], cwd=REPO, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_real_scheduler_and_two_workers_survive_a_killed_worker(tmp_path: Path) -> None:
    from distributed import Client

    dataset = make_dataset(tmp_path, random_image((320, 448), seed=11), 64)
    model = make_model(tmp_path / "model", depth=3)
    sched_file = tmp_path / "scheduler.json"
    procs = [_dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file",
                   str(sched_file), log=tmp_path / "scheduler.log")]
    try:
        for i in range(2):
            procs.append(_dask("worker", "--scheduler-file", str(sched_file), "--nthreads", "1", "--nworkers", "1",
                               "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}",
                               log=tmp_path / f"worker{i}.log"))
        deadline = time.monotonic() + 120
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        with Client(address, timeout="60s") as c:
            c.wait_for_workers(2, timeout=120)
            worker_pids = list(c.run(os.getpid).values())
        cfg = config(dataset, tmp_path / "out", model, block_size=64, scheduler_address=address,
                     threads_per_worker=0, probability_dtype="float32")
        records = tmp_path / "out" / "img.blocks"
        killed: list[int] = []

        def kill_one_worker_mid_run() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if records.is_dir() and len(_records(records)) >= 3:
                    os.kill(worker_pids[0], signal.SIGKILL)  # the nanny restarts it; its tasks are rescheduled
                    killed.append(worker_pids[0])
                    return
                time.sleep(0.02)

        watcher = threading.Thread(target=kill_one_worker_mid_run)
        watcher.start()
        [result] = predict_dataset(cfg)
        watcher.join()
        assert killed, "the worker was never killed"
        assert result.blocks_skipped == 0 and len(_records(records)) == result.blocks
        probs = torch.sigmoid(torch.from_numpy(oracle_logits(dataset, model, cfg))).numpy()
        np.testing.assert_allclose(outputs(tmp_path / "out")["0"][:], probs, atol=1e-5, rtol=0)
    finally:
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_a_second_run_into_the_same_output_is_refused_while_one_writes(tmp_path: Path, cluster: Cluster) -> None:
    dataset = make_dataset(tmp_path, random_image((100, 90)), 64)
    model = make_model(tmp_path / "model")
    with exclusive(tmp_path / "out", "predict"), pytest.raises(LockedError, match="another run is writing here"):
        predict_dataset(config(dataset, tmp_path / "out", model), cluster=cluster)
    assert not (tmp_path / "out" / "img.ome.zarr").exists()
    [done] = predict_dataset(config(dataset, tmp_path / "out", model), cluster=cluster)  # free again
    assert done.blocks_skipped == 0


# --- the front door and nightly's entry point ----------------------------------------------------------


def two_image_dataset(root: Path) -> Path:
    make_dataset(root, random_image((90, 100), seed=1), 64, name="a")
    return make_dataset(root, random_image((80, 110), seed=2), 64, name="b")


def test_predict_entries_reports_a_failing_image_through_on_error_and_predicts_the_others(
    tmp_path: Path, cluster: Cluster
) -> None:
    dataset = two_image_dataset(tmp_path)
    model = pin_model(str(make_model(tmp_path / "model")), "sqlite:///unused.db", tmp_path / "cache")
    (mf.store_path(dataset, "a") / "zarr.json").unlink()  # "a" can no longer be read
    entries = mf.entries(mf.require(dataset))
    cfg = config(dataset, tmp_path / "out", Path(model.uri))
    with pytest.raises(InputError, match="a.ome.zarr"):
        predict_entries(cfg, entries, model, cluster)
    assert not list((tmp_path / "out").glob("*.ome.zarr"))  # planned first: nothing written

    failed, done = [], []
    results = predict_entries(cfg, entries, model, cluster, on_error=lambda e, exc: failed.append((e["id"], exc)),
                              on_result=lambda e, r: done.append((e["id"], r.id)))
    assert [r.id for r in results] == ["b"] and done == [("b", "b")]
    assert [i for i, _ in failed] == ["a"] and isinstance(failed[0][1], InputError)
    assert outputs(tmp_path / "out", "b").attrs["unet"]["complete"] is True


def test_predict_entries_takes_the_same_output_lock_as_predict_dataset(tmp_path: Path, cluster: Cluster) -> None:
    dataset = make_dataset(tmp_path, random_image((70, 80)), 64)
    model = pin_model(str(make_model(tmp_path / "model")), "sqlite:///unused.db", tmp_path / "cache")
    cfg = config(dataset, tmp_path / "out", Path(model.uri))
    with exclusive(tmp_path / "out", "predict"), pytest.raises(LockedError, match="another run is writing here"):
        predict_entries(cfg, mf.entries(mf.require(dataset)), model, cluster, on_error=lambda e, exc: None)
    assert not (tmp_path / "out" / "img.ome.zarr").exists()


def test_each_image_is_planned_once_per_run(tmp_path: Path, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = two_image_dataset(tmp_path)
    planned: list[str] = []

    def counting(entry: dict, *args: Any) -> Any:
        planned.append(entry["id"])
        return plan_image(entry, *args)

    monkeypatch.setattr(engine, "plan_image", counting)
    results = predict_dataset(config(dataset, tmp_path / "out", make_model(tmp_path / "model")), cluster=cluster)
    assert sorted(planned) == ["a", "b"] and sorted(r.id for r in results) == ["a", "b"]


def test_check_predictable_finds_every_problem_before_work(tmp_path: Path) -> None:
    dataset = two_image_dataset(tmp_path)
    model = make_model(tmp_path / "model")
    check = check_predictable(config(dataset, tmp_path / "out", model))
    assert [p.entry["id"] for p in check.plans] == ["a", "b"] and check.model.directory == model
    assert not (tmp_path / "out").exists()  # checked writable, nothing written

    (tmp_path / "a-file").write_text("")
    with pytest.raises(InputError, match=r"a-file/out: cannot write here"):
        check_predictable(config(dataset, tmp_path / "a-file" / "out", model))
    with pytest.raises(ConfigError, match="not in the dataset's 'all' split: nope"):
        check_predictable(config(dataset, tmp_path / "out", model, images=["nope"]))
    with pytest.raises(ConfigError, match="expects 3 channels"):
        check_predictable(config(dataset, tmp_path / "out", make_model(tmp_path / "rgb", in_channels=3)))


# --- model pinning -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pin_model_pins_an_alias_and_downloads_each_version_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    import mlflow

    from unetcore.tracking import mlflow as tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.configure(uri, "pin")

    def register(seed: int) -> int:
        folder = make_model(tmp_path / f"m{seed}", seed=seed)
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_artifacts(str(folder), tracking.MODEL_ARTIFACT)
            artifact_uri = mlflow.get_artifact_uri(tracking.MODEL_ARTIFACT)
        return tracking.register("pinned", run.info.run_id, artifact_uri, 0.5 + seed, "set")["version"]

    register(0)
    cache = tmp_path / "cache"
    first = pin_model("models:/pinned@champion", uri, cache)
    assert (first.uri, first.name, first.alias, first.version) == ("models:/pinned/1", "pinned", "champion", 1)
    assert sorted(p.name for p in first.directory.iterdir()) == ["config.json", "weights.pt"]
    assert first.directory.parent == cache and first.run_id and first.source

    def no_download(**kwargs: Any) -> str:
        raise AssertionError("downloaded again")

    with monkeypatch.context() as m:
        m.setattr(mlflow.artifacts, "download_artifacts", no_download)
        assert pin_model("models:/pinned/1", uri, cache).directory == first.directory  # re-used, not downloaded

    register(1)  # beats the champion: the alias moves to version 2, whose weights differ
    second = pin_model("models:/pinned@champion", uri, cache)
    assert second.uri == "models:/pinned/2" and second.directory != first.directory
    assert (second.directory / "weights.pt").read_bytes() != (first.directory / "weights.pt").read_bytes()

    with pytest.raises(InputError, match=r"^models:/pinned@nope: model URI does not resolve") as err:
        pin_model("models:/pinned@nope", uri, cache)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="no MLflow database"):
        pin_model("models:/pinned@champion", f"sqlite:///{tmp_path / 'none.db'}", cache)
    assert not (tmp_path / "none.db").exists()
