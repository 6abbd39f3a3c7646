"""Faults survived: a full disk, a killed training, unreachable servers, two writers at once.

Each test provokes one fault for real (a write that fails with ENOSPC, a SIGKILL, a closed port, two processes)
and checks what a user would check afterwards: one clear line, earlier results intact, nothing half-written
listed, and a re-run that finishes. Faults tested elsewhere (RELIABILITY.md has the whole list):
tests/test_ingest.py (ingestion SIGKILLed mid-image), tests/test_engine.py (prediction SIGKILLed, Dask worker
killed), tests/test_training.py (crash between checkpoint and metrics), tests/test_cli.py (Prefect API
unreachable).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr.storage._local as zarr_local
from mlflow import MlflowClient
from typer.testing import CliRunner

from app.cli import app
from unetcore import training
from unetcore.config import IngestConfig, ModelConfig
from unetcore.data.synthetic import write_sample
from unetcore.errors import InputError, UnetError
from unetcore.ingest import ingest_folder
from unetcore.locks import LockedError, exclusive, lock_path
from unetcore.model import build_model, load_model, save_model
from unetcore.store import manifest as mf
from unetcore.store import omezarr

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
UNET = str(Path(sys.executable).with_name("unet"))
runner = CliRunner()


def _noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _cfg(images: Path, dataset: Path, **kw: object) -> IngestConfig:
    return IngestConfig(images=str(images), output=str(dataset), chunk_size=64, threads=2, **kw)


def _hidden_leftovers(dataset: Path) -> list[str]:
    return sorted(p.name for p in dataset.iterdir() if ".tmp" in p.name or ".old-" in p.name)


def _level0(dataset: Path, entry_id: str) -> np.ndarray:
    return np.asarray(omezarr.image_array(omezarr.open_root(mf.store_path(dataset, entry_id)), 0))


@pytest.fixture
def disk_full_after(monkeypatch: pytest.MonkeyPatch) -> Iterator[callable]:
    """``arm(n)``: from now on, Zarr chunk writes after the n-th fail with ENOSPC, as on a full disk."""
    real_put = zarr_local._put
    state = {"left": None}

    def put(*args, **kwargs):  # noqa: ANN002, ANN003 - same signature as zarr's private writer
        if state["left"] is not None:
            if state["left"] <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            state["left"] -= 1
        return real_put(*args, **kwargs)

    monkeypatch.setattr(zarr_local, "_put", put)

    def arm(n: int | None) -> None:
        state["left"] = n

    yield arm


# --- the disk fills up ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["new image", "re-ingesting the existing image"])
def test_disk_full_mid_ingestion_keeps_earlier_images_and_a_rerun_finishes(
    tmp_path: Path, disk_full_after, case: str
) -> None:
    images, ds = tmp_path / "img", tmp_path / "ds"
    images.mkdir()
    a = _noise((200, 150), 0)
    np.save(images / "a.npy", a)
    assert ingest_folder(_cfg(images, ds)).added == ["a"]
    entry_a = mf.load(ds)["images"]["a"]
    if case == "new image":
        np.save(images / "b.npy", _noise((300, 260), 1))  # 5 x 5 chunks of 64, plus the pyramid: > 30 writes
        victim, kw = "b", {}
    else:
        victim, kw = "a", {"force": True}

    disk_full_after(12)  # a dozen chunks land, then the disk is full
    report = ingest_folder(_cfg(images, ds, **kw))
    disk_full_after(None)

    [failure] = report.failed
    assert report.status in ("partial", "failed")
    assert Path(failure["file"]).name == f"{victim}.npy" and "\n" not in failure["error"]
    assert "No space left on device" in failure["error"], failure["error"]
    manifest = mf.load(ds)["images"]
    assert list(manifest) == ["a"] and manifest["a"] == entry_a  # the earlier entry, untouched
    np.testing.assert_array_equal(_level0(ds, "a")[0], a)  # and its store still holds the same pixels
    assert not mf.store_path(ds, "b").exists()  # nothing half-written is listed or visible under an id
    assert _hidden_leftovers(ds) == []  # the temporary store was deleted on the way out
    assert json.loads((ds / "ingest_report.json").read_text())["failed"] == report.failed

    again = ingest_folder(_cfg(images, ds, **kw))  # the disk has room again
    assert again.status == "ok" and victim in again.added + again.updated
    for entry_id in mf.load(ds)["images"]:
        assert _level0(ds, entry_id).shape[1:] == np.load(images / f"{entry_id}.npy").shape


def test_disk_full_while_writing_the_manifest_keeps_the_old_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, ds = tmp_path / "img", tmp_path / "ds"
    images.mkdir()
    np.save(images / "a.npy", _noise((100, 90), 0))
    ingest_folder(_cfg(images, ds))
    before = (ds / mf.MANIFEST).read_bytes()
    np.save(images / "b.npy", _noise((100, 90), 1))
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{mf.MANIFEST}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left on device"):
        ingest_folder(_cfg(images, ds))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (ds / mf.MANIFEST).read_bytes() == before  # the old manifest, byte for byte
    assert not [p for p in ds.iterdir() if p.name.startswith(f".{mf.MANIFEST}.")]  # its temp file removed
    report = ingest_folder(_cfg(images, ds))
    assert report.status == "ok" and sorted(mf.load(ds)["images"]) == ["a", "b"]


def _failing_torch_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save writes a few bytes, then the disk is full."""

    def save(obj: object, f: object, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / training.CHECKPOINT
    training.save_checkpoint(path, {"epoch": 3, "w": torch.arange(4.0)})
    _failing_torch_save(monkeypatch)
    with pytest.raises(OSError, match="No space left on device"):
        training.save_checkpoint(path, {"epoch": 4, "w": torch.zeros(4)})
    monkeypatch.undo()
    state = training.load_checkpoint(path)  # what --resume would read
    assert state["epoch"] == 3 and torch.equal(state["w"], torch.arange(4.0))


TINY = ModelConfig(base_channels=4, depth=2)


def test_disk_full_while_saving_a_model_never_leaves_a_mixed_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed save leaves a folder that loads as the old model or is refused in one line: never new config
    with old weights, and no temporary files."""
    torch.manual_seed(0)
    old = build_model(TINY)
    folder = save_model(tmp_path / "m", old)
    _failing_torch_save(monkeypatch)
    with pytest.raises(OSError, match="No space left on device"):
        save_model(folder, build_model(TINY.model_copy(update={"base_channels": 8})))
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) in (["config.json", "weights.pt"], ["weights.pt"])
    try:
        loaded, _ = load_model(folder)
    except InputError as err:
        assert "config.json: missing" in str(err) and "\n" not in str(err)
    else:
        x = torch.rand(1, 1, 32, 32)
        assert torch.equal(loaded(x), old.eval()(x))


def test_disk_full_while_saving_a_model_keeps_the_previous_model_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    old = build_model(TINY)
    folder = save_model(tmp_path / "m", old)
    _failing_torch_save(monkeypatch)
    with pytest.raises(OSError):
        save_model(folder, build_model(TINY))
    monkeypatch.undo()
    loaded, _ = load_model(folder)
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(loaded(x), old.eval()(x))


# --- training killed, then resumed ----------------------------------------------------------------------------

_KILL_MID_EPOCH = textwrap.dedent("""
    import os, signal, sys
    from unetcore.training import loop
    real, calls, kill_at = loop.train_step, [], int(sys.argv[1])
    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at:  # mid-way through an epoch: no clean-up code runs
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    loop.train_step = step
    from app.cli import main
    sys.argv = ["unet", *sys.argv[2:]]
    main()
""")


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five 128² nuclei images with binary masks (at least one in validation)."""
    root = tmp_path_factory.mktemp("faults-ds")
    write_sample(root, n_images=5, size=128, large_size=0, seed=0)
    cfg = IngestConfig(images=str(root / "images"), masks=str(root / "masks"), output=str(root / "ds"))
    assert ingest_folder(cfg).status == "ok"
    return root / "ds"


@pytest.mark.slow
def test_training_sigkilled_mid_epoch_resumes_in_the_same_run_with_every_epoch_once(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    args = ["train", str(tiny_dataset), "--output", str(out), "--epochs", "2", "--steps-per-epoch", "3",
            "--patch-size", "64", "--batch-size", "2", "--base-channels", "4", "--depth", "2",
            "--tracking-uri", uri, "--registered-model", "faults", "--no-prefect"]
    # steps 1-3 are epoch 0 (checkpointed, logged); the 5th step is the middle of epoch 1
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_EPOCH, "5", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert training.load_checkpoint(out / training.CHECKPOINT)["progress"]["epoch"] == 0  # epoch 0 finished
    client = MlflowClient(uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "unet"]
    [killed] = client.search_runs([experiment.experiment_id])
    assert [m.step for m in client.get_metric_history(killed.info.run_id, "val_dice")] == [0]

    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output

    [run] = client.search_runs([experiment.experiment_id])  # no second run
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.info.run_id in result.output
    for key in ("val_dice", "train_loss"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == [0, 1], (key, steps)  # each epoch exactly once: none lost, none duplicated
    assert run.data.tags["resumed_at_epoch"] == "1"


# --- servers that do not answer --------------------------------------------------------------------------------

DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens there


def _one_line(result) -> str:  # noqa: ANN001 - click's Result
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize(
    ("command", "extra"),
    [("train", ["--patch-size", "64"]), ("predict", ["--model", "models:/x@champion"])],
)
def test_unreachable_mlflow_fails_fast_before_any_work(tiny_dataset: Path, tmp_path: Path, command: str,
                                                       extra: list[str]) -> None:
    out = tmp_path / "out"
    start = time.perf_counter()
    result = runner.invoke(app, [command, str(tiny_dataset), "--output", str(out), *extra, "--tracking-uri", DEAD,
                                 "--no-prefect"])
    elapsed = time.perf_counter() - start
    line = _one_line(result)
    assert DEAD in line and "unreachable" in line
    assert elapsed < 10, elapsed
    assert not out.exists()  # no work started: not even the output folder


# --- two writers at once --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ingestions_of_one_dataset_at_once_lose_nothing(tmp_path: Path) -> None:
    """Two `unet ingest` processes on overlapping folders into one dataset: the second may be refused while the
    first holds the dataset (one line, exit 2) or run after it; either way the manifest is valid JSON, every
    listed store opens with its source's pixels, and re-running the refused one completes the union."""
    first, second, ds = tmp_path / "one", tmp_path / "two", tmp_path / "ds"
    first.mkdir()
    second.mkdir()
    pixels = {name: _noise((260, 200), seed) for seed, name in enumerate("abcd")}
    for name in "abc":
        np.save(first / f"{name}.npy", pixels[name])
    for name in "bcd":
        np.save(second / f"{name}.npy", pixels[name])
    commands = [[UNET, "ingest", str(folder), "-o", str(ds), "--chunk-size", "64", "--no-prefect"]
                for folder in (first, second)]
    procs = [subprocess.Popen(c, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    outcomes = [(p.wait(timeout=300), *p.communicate()) for p in procs]

    refused = []
    for command, (code, _out, err) in zip(commands, outcomes):
        assert code in (0, 2), err
        if code == 2:
            assert err.strip().count("\n") == 0 and "another ingestion is writing to this dataset" in err, err
            refused.append(command)
    manifest = json.loads((ds / mf.MANIFEST).read_text())  # valid JSON whatever the interleaving
    for entry_id in manifest["images"]:
        np.testing.assert_array_equal(_level0(ds, entry_id)[0], pixels[entry_id])
    for command in refused:
        assert subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, timeout=300).returncode == 0
    assert sorted(mf.load(ds)["images"]) == ["a", "b", "c", "d"]
    assert _hidden_leftovers(ds) == []


_HOLD = textwrap.dedent("""
    import sys
    from unetcore.locks import exclusive
    with exclusive(sys.argv[1], sys.argv[2]):
        print("held", flush=True)
        sys.stdin.readline()  # hold until the test says so (or kills us)
""")

_TRY = textwrap.dedent("""
    import sys
    from unetcore.errors import UnetError
    from unetcore.locks import exclusive
    try:
        with exclusive(sys.argv[1], sys.argv[2]):
            print("got it")
    except UnetError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
""")


def _holder(folder: Path, what: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder), what], cwd=ROOT, env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"  # blocks until the lock is taken: no sleeping
    return proc


def _try(folder: Path, what: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _TRY, str(folder), what], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=60)


def test_output_lock_refuses_a_second_process_and_is_released_on_exit(tmp_path: Path) -> None:
    out = tmp_path / "pred"
    holder = _holder(out, "img-1")
    try:
        other = _try(out, "img-1")
        assert other.returncode == 2 and other.stdout == ""
        assert other.stderr.strip() == (f"error: {out}: another run is writing here "
                                        "(wait for it to finish, or choose another output)")
        with pytest.raises(LockedError, match="another run is writing here"):  # this process too, at once
            with exclusive(out, "img-1"):
                pass
        assert _try(out, "img-2").stdout.strip() == "got it"  # another id in the same folder is free
    finally:
        holder.communicate("done\n", timeout=60)
    assert holder.returncode == 0
    assert _try(out, "img-1").stdout.strip() == "got it"


def test_output_lock_is_released_when_its_holder_is_sigkilled(tmp_path: Path) -> None:
    out = tmp_path / "pred"
    holder = _holder(out, "night")
    holder.kill()
    holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    assert lock_path(out, "night").exists()  # the file stays; the kernel dropped the lock with the process
    with exclusive(out, "night") as held:
        assert held == lock_path(out, "night")


@pytest.mark.parametrize(("what", "name"), [("a/../../x", ".a_.._.._x.lock"), ("..", ".output.lock"),
                                            ("img 1", ".img_1.lock")])
def test_lock_names_stay_inside_the_output(tmp_path: Path, what: str, name: str) -> None:
    target = lock_path(tmp_path, what)
    assert target.parent == tmp_path and target.name == name
    with exclusive(tmp_path, what):
        pass
    assert issubclass(LockedError, UnetError)
