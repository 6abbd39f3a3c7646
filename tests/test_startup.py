"""Start-up of `unet predict`: a small job runs in process (same output as on a cluster), a cached registry
model resolves without MLflow (the same answer as MLflow's), and the CLI imports only what the run uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from tests.test_engine import config, make_dataset, make_model, outputs, random_image
from unetcore.cluster import in_process
from unetcore.config import InferConfig
from unetcore.inference import engine, predict_dataset
from unetcore.tracking.mlflow import pin_model
from unetcore.tracking.pinned import pin_cached

REPO = Path(__file__).resolve().parents[1]


def _arrays(group: zarr.Group) -> dict[str, bytes]:
    return {k: v[:].tobytes() for k, v in group.members(max_depth=None) if isinstance(v, zarr.Array)}


def test_a_small_job_runs_in_process_with_the_same_output_as_on_a_cluster(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = make_dataset(tmp_path, random_image((300, 420), seed=3), 64)
    model = make_model(tmp_path / "model", depth=3)
    opts: dict[str, Any] = dict(tile=64, block_size=128, instances=True, min_object_size=20)
    started: list[bool] = []
    real = engine.dask_cluster

    def spy(*args: Any, **kwargs: Any) -> Any:
        started.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "dask_cluster", spy)
    [local] = predict_dataset(config(dataset, tmp_path / "local", model, threads_per_worker=0, **opts))
    assert engine.runs_in_process(config(dataset, tmp_path / "x", model), []) is True
    with real(None, 2, 1) as c:
        [dask] = predict_dataset(config(dataset, tmp_path / "dask", model, threads_per_worker=1, **opts), cluster=c)
    assert started == []  # the small job started no cluster of its own (the spy saw no call)
    assert local.blocks > 1 and local.instances == dask.instances
    a, b = _arrays(outputs(tmp_path / "local")), _arrays(outputs(tmp_path / "dask"))
    assert a.keys() == b.keys() and {"0", "labels/prediction/0", "labels/instances/0"} <= set(a)
    for key in a:
        assert a[key] == b[key], key  # bit for bit: blocks are computed alike wherever they run


def test_a_small_job_in_process_is_one_block_per_image_unless_a_block_size_is_given(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path, random_image((300, 420), seed=4), 64)
    model = make_model(tmp_path / "model", depth=2)
    one_cfg = InferConfig(dataset=str(dataset), output=str(tmp_path / "one"), model=str(model), tile=64,
                          export="none")
    [one] = predict_dataset(one_cfg)
    [split] = predict_dataset(config(dataset, tmp_path / "split", model, block_size=128, export="none"))
    assert one.blocks == 1 < split.blocks  # blocks of at most 128² when a block size is given
    assert one.tile_evaluations == one.grid_tiles < split.tile_evaluations  # no tile computed twice
    a, b = outputs(tmp_path / "one"), outputs(tmp_path / "split")
    np.testing.assert_allclose(np.asarray(a["0"][:], np.float32), np.asarray(b["0"][:], np.float32), atol=2e-3)
    agree = np.mean(np.asarray(a["labels/prediction/0"][:]) == np.asarray(b["labels/prediction/0"][:]))
    assert agree > 0.999  # block-wise == one block (to float16 rounding at the threshold)


def test_in_process_only_for_a_small_job_without_a_scheduler_or_worker_count(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path, random_image((64, 64)), 64)
    model = make_model(tmp_path / "model")

    class Plan:
        def __init__(self, *shape: int) -> None:
            self.shape = shape

    small, big = [Plan(2048, 2048)], [Plan(4096, 4096), Plan(8, 8)]
    cfg = config(dataset, tmp_path / "o", model)
    assert engine.runs_in_process(cfg, small) and not engine.runs_in_process(cfg, big)
    assert engine.runs_in_process(cfg, [Plan(64, 256, 256)])  # a volume counts its voxels
    assert not engine.runs_in_process(config(dataset, tmp_path / "o", model, n_workers=2), small)
    assert not engine.runs_in_process(config(dataset, tmp_path / "o", model, scheduler_address="tcp://h:1"), small)
    assert in_process(3).torch_threads == 3 and in_process().slots == 1 and in_process().in_process


def _register(tmp_path: Path, seed: int, uri: str, experiment: str) -> int:
    import mlflow

    from unetcore.tracking import mlflow as tracking

    folder = make_model(tmp_path / f"m{seed}", seed=seed)
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifacts(str(folder), tracking.MODEL_ARTIFACT)
        artifact_uri = mlflow.get_artifact_uri(tracking.MODEL_ARTIFACT)
    return tracking.register("fast", run.info.run_id, artifact_uri, 0.5 + seed, "set")["version"]


def test_a_registry_model_pins_without_mlflow_as_mlflow_pins_it(tmp_path: Path) -> None:
    from unetcore.tracking import mlflow as tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.configure(uri, "fast")
    _register(tmp_path, 0, uri, experiment)
    cache_a, cache_b = tmp_path / "a", tmp_path / "b"
    ours = pin_cached("models:/fast@champion", uri, cache_a)  # copied from the file:// source, no MLflow
    theirs = pin_model("models:/fast@champion", uri, cache_b)  # MLflow's client and download
    assert ours is not None
    assert (ours.uri, ours.name, ours.alias, ours.version, ours.run_id, ours.source) == (
        theirs.uri, theirs.name, theirs.alias, theirs.version, theirs.run_id, theirs.source)
    assert ours.directory.name == theirs.directory.name and ours.directory.parent == cache_a
    for name in ("config.json", "weights.pt"):
        assert (ours.directory / name).read_bytes() == (theirs.directory / name).read_bytes()
    assert pin_model("models:/fast@champion", uri, cache_a).directory == ours.directory  # MLflow reuses our copy

    _register(tmp_path, 1, uri, experiment)  # the alias moves to version 2: the cheap path follows it
    moved = pin_cached("models:/fast@champion", uri, cache_a)
    assert moved is not None and moved.uri == "models:/fast/2" == pin_model("models:/fast@champion", uri, cache_b).uri
    assert pin_cached("models:/fast/1", uri, cache_a).directory == ours.directory  # type: ignore[union-attr]
    for unknown in ("models:/fast@nope", "models:/nope@champion", "models:/fast/9", "models:/fast/x", "runs:/a/b"):
        assert pin_cached(unknown, uri, cache_a) is None  # pin_model decides (and words the error)
    assert pin_cached("models:/fast@champion", f"sqlite:///{tmp_path / 'none.db'}", cache_a) is None
    assert not (tmp_path / "none.db").exists()


def test_predict_imports_neither_prefect_mlflow_dask_nor_scipy_for_a_small_job(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path, random_image((128, 128)), 64)
    model = make_model(tmp_path / "model")
    code = ("import sys, runpy; sys.argv = ['unet', 'predict', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('app.cli', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print(__import__('json').dumps(sorted(m for m in ('prefect', 'mlflow', 'distributed', 'dask', 'scipy', "
            "'skimage') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, str(dataset), "-o", str(tmp_path / "out"), "--model", str(model),
                          "--no-prefect", "--export", "none"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert "no Dask cluster" in out.stderr
    assert np.asarray(outputs(tmp_path / "out")["labels/prediction/0"][:]).shape == (128, 128)


def test_a_3d_model_keeps_the_dense_overlap_and_batch_unless_given(tmp_path: Path) -> None:
    import json as _json

    from unetcore.config import InferConfig, InferOptions
    from unetcore.inference import with_model_tile
    from unetcore.tracking import PinnedModel

    for dims, tile in ((3, [8, 32, 32]), (2, None)):
        folder = tmp_path / f"m{dims}"
        folder.mkdir()
        (folder / "config.json").write_text(_json.dumps({"model": {"spatial_dims": dims}, "tile": tile}))
        pinned = PinnedModel(uri=str(folder), directory=folder)
        base = InferConfig(dataset="d", output="o", model=str(folder))
        got = with_model_tile(base, pinned)
        if dims == 3:
            assert (got.tile, got.overlap, got.batch_size) == ([8, 32, 32], 0.5, 4)  # the volumes' measured setting
            given = with_model_tile(InferConfig(dataset="d", output="o", overlap=0.25, batch_size=2), pinned)
            assert (given.overlap, given.batch_size) == (0.25, 2)  # what a user gives wins
        else:
            d = InferOptions()
            assert (got.tile, got.overlap, got.batch_size) == (d.tile, d.overlap, d.batch_size) == (512, 0.125, 1)
