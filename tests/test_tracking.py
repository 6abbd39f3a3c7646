"""MLflow tracking: fail-fast URI checks, the promotion gate, weights-only registered models, run tags.

The gate is tested twice: with scripted Dice figures on hand-made model versions (every branch, exact), and
end to end, where a second training that barely trained must not take the champion alias.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from unetcore import training
from unetcore.config import IngestConfig, ModelConfig, TrainConfig
from unetcore.data.synthetic import write_sample
from unetcore.errors import InputError, ServiceError
from unetcore.ingest import ingest_folder
from unetcore.model import build_model, load_model, save_model
from unetcore.tracking import mlflow as tracking


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tracking_uri(store_uri: str) -> str:
    """The module's store, made the current one (other tests may have pointed MLflow elsewhere)."""
    tracking.configure(store_uri, "gate")
    return store_uri


def _logged_model(tmp_path: Path, num_classes: int = 1, seed: int = 0) -> tuple[str, str]:
    """A run holding a tiny untrained model artifact: ``(run_id, artifact_uri)``."""
    torch.manual_seed(seed)
    folder = save_model(tmp_path / f"model{seed}", build_model(ModelConfig(base_channels=4, depth=1,
                                                                             num_classes=num_classes)))
    with mlflow.start_run(experiment_id=MlflowClient().get_experiment_by_name("gate").experiment_id) as run:
        mlflow.log_artifacts(str(folder), tracking.MODEL_ARTIFACT)
        return run.info.run_id, mlflow.get_artifact_uri(tracking.MODEL_ARTIFACT)


def _register(tmp_path: Path, name: str, dice: float, val_set: str = "A", seed: int = 0, num_classes: int = 1,
              evaluate=None) -> dict:
    run_id, uri = _logged_model(tmp_path, num_classes, seed)
    return tracking.register(name, run_id, uri, dice, val_set, evaluate,
                             model_config={"num_classes": num_classes, "in_channels": 1})


def _champion(name: str) -> int:
    return int(MlflowClient().get_model_version_by_alias(name, tracking.CHAMPION).version)


def test_first_model_becomes_champion(tracking_uri: str, tmp_path: Path) -> None:
    reg = _register(tmp_path, "first", 0.5)
    assert reg["alias"] == "champion" and _champion("first") == reg["version"] == 1
    assert MlflowClient().get_model_version("first", "1").tags["gate"] == "first model under this name"


@pytest.mark.parametrize(("second", "alias"), [(0.79, "challenger"), (0.8, "challenger"), (0.81, "champion")])
def test_champion_moves_only_to_a_strictly_better_model(
    tracking_uri: str, tmp_path: Path, second: float, alias: str
) -> None:
    name = f"strict-{alias}-{second}"
    _register(tmp_path, name, 0.8, seed=1)
    reg = _register(tmp_path, name, second, seed=2)
    assert reg["alias"] == alias and reg["champion_dice"] == pytest.approx(0.8)
    assert _champion(name) == (2 if alias == "champion" else 1)
    if alias == "challenger":
        version = MlflowClient().get_model_version_by_alias(name, "challenger")
        assert int(version.version) == 2 and "does not beat" in version.tags["gate"]


def test_other_validation_set_re_evaluates_the_champion(tracking_uri: str, tmp_path: Path) -> None:
    """The champion's stored 0.9 was on set A; on set B it scores 0.6 (measured now), so 0.7 on B wins."""
    seen: list[Path] = []

    def champion_on_b(folder: Path) -> float:
        seen.append(folder)
        model, config = load_model(folder)  # what the loop does: a plain weights-only load
        assert config["model"]["base_channels"] == 4
        return 0.6

    _register(tmp_path, "valset", 0.9, val_set="A", seed=1)
    reg = _register(tmp_path, "valset", 0.7, val_set="B", seed=2, evaluate=champion_on_b)
    assert len(seen) == 1 and reg["alias"] == "champion" and reg["champion_dice"] == pytest.approx(0.6)


def test_model_for_other_classes_is_not_compared(tracking_uri: str, tmp_path: Path) -> None:
    _register(tmp_path, "task", 0.5, seed=1, num_classes=1)
    reg = _register(tmp_path, "task", 0.99, seed=2, num_classes=3)
    assert reg["alias"] == "challenger" and _champion("task") == 1
    assert "not comparable" in MlflowClient().get_model_version("task", "2").tags["gate"]


def test_registered_model_loads_without_unpickling(tracking_uri: str, tmp_path: Path) -> None:
    """models:/name@champion resolves to weights.pt + config.json only, and a pickled payload is refused."""
    _register(tmp_path, "safe", 0.5, seed=3)
    folder = tracking.download_model("models:/safe@champion", tracking_uri, dst=tmp_path / "dl")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.pt"]
    model, config = load_model(folder)
    torch.manual_seed(3)
    reference = build_model(ModelConfig(base_channels=4, depth=1))
    x = torch.rand(1, 1, 16, 16)
    reference.eval()
    torch.testing.assert_close(model(x), reference(x))

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(folder / "weights.pt", "wb") as fh:  # a tampered artifact: pickled code instead of tensors
        torch.save({"w": Payload()}, fh)
    with pytest.raises(InputError, match="refused|not a readable"):
        load_model(folder)
    assert not marker.exists()  # unpickling the payload would have created the marker


def test_unknown_model_uri_is_one_clear_error(tracking_uri: str) -> None:
    with pytest.raises(InputError, match="models:/nope@champion"):
        tracking.download_model("models:/nope@champion", tracking_uri)


def test_unreachable_server_fails_fast() -> None:
    t0 = time.perf_counter()
    with pytest.raises(ServiceError, match=r"http://127.0.0.1:9.*unreachable"):
        tracking.check_tracking_uri("http://127.0.0.1:9")
    assert time.perf_counter() - t0 < 5


def test_sqlite_store_in_an_uncreatable_folder_is_an_input_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="cannot create"):
        tracking.check_tracking_uri(f"sqlite:///{blocker}/sub/mlflow.db")


def test_preview_strip_is_image_truth_prediction_side_by_side() -> None:
    image = np.linspace(0, 1, 8 * 6, dtype=np.float32).reshape(1, 8, 6)
    truth = np.zeros((8, 6), np.uint8)
    truth[2:4, 2:4] = 1
    strip = tracking.preview_strip(image, truth, np.zeros((8, 6), np.uint8))
    assert strip.shape == (8, 18, 3) and strip.dtype == np.uint8
    assert np.array_equal(strip[:, :6], strip[:, 12:])  # empty prediction: the bare image
    assert (strip[2:4, 8:10, 1] > strip[2:4, 2:4, 1]).all()  # truth tinted green
    bare = strip[:, :6].astype(int)
    expected = np.where(truth[..., None] > 0, (bare + [0, 255, 0]) // 2, bare)  # half image, half green, floored
    np.testing.assert_array_equal(strip[:, 6:12], expected)


def test_preview_strip_shows_three_channels_in_colour() -> None:
    rng = np.random.default_rng(0)
    red = np.zeros((3, 8, 6), np.float32)
    red[0] = rng.random((8, 6))
    strip = tracking.preview_strip(red, None, np.zeros((8, 6), np.uint8))
    assert strip.shape == (8, 12, 3)
    assert strip[:, :6, 0].max() == 255 and not strip[:, :6, 1:].any()  # red stays red
    rgb = rng.random((3, 8, 6)).astype(np.float32)
    base = tracking.preview_strip(rgb, None, np.zeros((8, 6), np.uint8))[:, :6]
    for c in range(3):  # each channel stretched on its own
        assert base[..., c].min() == 0 and base[..., c].max() == 255


def test_preview_strip_shows_one_channel_and_other_counts_in_grey() -> None:
    rng = np.random.default_rng(1)
    two = rng.random((2, 8, 6)).astype(np.float32)
    pred = np.zeros((8, 6), np.uint8)
    grey = tracking.preview_strip(two[:1], None, pred)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert np.array_equal(tracking.preview_strip(two, None, pred), grey)  # 2 channels: the first, in grey
    assert np.array_equal(tracking.preview_strip(two[0], None, pred), grey)  # (H, W) as one channel


def test_previews_are_an_image_series_per_step(tracking_uri: str) -> None:
    """What the run page's image card reads: ``images/<key>+step+<n>+...`` files and the logged-images tag."""
    image = np.random.default_rng(0).random((1, 16, 16)).astype(np.float32)
    labels = (image[0] > 0.5).astype(np.uint8)
    with mlflow.start_run() as run:
        for step in (0, 5, 9):
            tracking.log_preview(image, labels, labels, step)
    client = MlflowClient(tracking_uri)
    names = [Path(a.path).name for a in client.list_artifacts(run.info.run_id, "images")]
    key = tracking.PREVIEW_KEY.replace("/", "~")  # how MLflow names a key with a slash
    for step in (0, 5, 9):
        assert sum(n.startswith(f"{key}+step+{step}+") and n.endswith(".png") for n in names) == 1, names
        assert sum(n.startswith(f"{key}+step+{step}+") and n.endswith("+compressed.webp") for n in names) == 1
    assert client.get_run(run.info.run_id).data.tags["mlflow.loggedImages"] == "True"


def test_run_page_url_opens_the_classic_model_metrics_view() -> None:
    url = tracking.run_page_url("http://mlflow.example:5000/", "7", "abc123")
    assert url == "http://mlflow.example:5000/#/experiments/7/runs/abc123/model-metrics?workflowType=machine_learning"
    assert tracking.ui_command("https://mlflow.example") is None
    assert tracking.browse_hint("http://mlflow.example:5000", "7", "abc123") == url


def test_local_store_url_comes_with_the_command_that_serves_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = "sqlite:///runs/mlflow.db"
    url = tracking.run_page_url(uri, "1", "abc")
    assert url == f"http://127.0.0.1:{tracking.UI_PORT}/#/experiments/1/runs/abc/model-metrics?workflowType=machine_learning"
    command = tracking.ui_command(uri)
    assert command.split()[1:] == ["ui", "--backend-store-uri", f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db",
                                   "--port", str(tracking.UI_PORT)]  # absolute: works from any folder
    assert Path(command.split()[0]).name == "mlflow"
    assert tracking.browse_hint(uri, "1", "abc") == f"{command}  then open {url}"


def test_code_version_names_the_commit_in_a_checkout() -> None:
    tags = tracking.code_version_tags()
    assert tags["package_version"]
    package = Path(tracking.__file__).resolve().parent
    if not any((d / ".git").exists() for d in (package, *package.parents)):  # an installed copy: no commit to name
        assert "git_commit" not in tags and tags["code_version"] == tags["package_version"]
        return
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True, check=True)
    edited = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=package).returncode != 0
    sha = head.stdout.strip()
    assert tags.get("git_commit") == sha and len(sha) == 40
    assert tags["code_version"] == sha[:12] + ("-dirty" if edited else "")


def test_barely_trained_model_does_not_take_champion(tracking_uri: str, tmp_path: Path) -> None:
    """End to end: a real training becomes champion; a 1-step run on the same data stays challenger."""
    write_sample(tmp_path / "raw", n_images=5, size=128, large_size=0, seed=0)
    ingest_folder(IngestConfig(images=str(tmp_path / "raw/images"), masks=str(tmp_path / "raw/masks"),
                               output=str(tmp_path / "ds")))
    base = dict(dataset=str(tmp_path / "ds"), model=ModelConfig(base_channels=8, depth=2), patch_size=64,
                batch_size=4, val_tile=64, tracking_uri=tracking_uri, experiment="e2e", registered_model="e2e")
    good = training.train(TrainConfig(**base, epochs=3, steps_per_epoch=10, output=str(tmp_path / "good")))
    assert good.alias == "champion" and good.best_val_dice > 0.7
    bad = training.train(TrainConfig(**base, epochs=1, steps_per_epoch=1, output=str(tmp_path / "bad")))
    assert bad.best_val_dice < good.best_val_dice
    assert bad.alias == "challenger" and _champion("e2e") == good.model_version
    folder = tracking.download_model("models:/e2e@champion", tracking_uri, dst=tmp_path / "dl")
    _, config = load_model(folder)
    assert config["val_dice"] == pytest.approx(good.best_val_dice)


_FLOW_RUN = textwrap.dedent("""
    import json, sys
    from prefect.testing.utilities import prefect_test_harness
    from flows.train import train
    from unetcore.config import TrainConfig
    cfg = TrainConfig.model_validate_json(sys.argv[1])
    with prefect_test_harness(server_startup_timeout=300):
        state = train(cfg, return_state=True)
        print(json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "run_id": state.result()["run_id"]}))
""")


@pytest.mark.slow
def test_train_flow_tags_the_run_with_its_prefect_flow_run(tracking_uri: str, tmp_path: Path) -> None:
    # In a fresh process: Prefect keeps process-wide clients that other tests' (stopped) servers can leave stale.
    write_sample(tmp_path / "raw", n_images=3, size=96, large_size=0, seed=2)
    ingest_folder(IngestConfig(images=str(tmp_path / "raw/images"), masks=str(tmp_path / "raw/masks"),
                               output=str(tmp_path / "ds")))
    cfg = TrainConfig(dataset=str(tmp_path / "ds"), model=ModelConfig(base_channels=4, depth=2), patch_size=64,
                      batch_size=2, epochs=1, steps_per_epoch=2, val_tile=64, output=str(tmp_path / "out"),
                      tracking_uri=tracking_uri, experiment="flow", registered_model="flow")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", _FLOW_RUN, cfg.model_dump_json()], capture_output=True, text=True,
                          timeout=600, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = json.loads(proc.stdout.strip().splitlines()[-1])
    tags = MlflowClient(tracking_uri).get_run(ids["run_id"]).data.tags
    assert tags["prefect_flow_run_id"] == ids["flow_run_id"]
