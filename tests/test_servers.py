"""Against real servers, as an operator runs them: `prefect server start`, `mlflow server`, `prefect deploy` of
deployments/prefect.yaml, `unet serve`, runs triggered through the API, and the nightly flow on a real API.

Both servers are started here on 127.0.0.1 with free ports, temporary homes and databases, and stopped after the
module. Data: three 128² images; model: base 4, depth 2, one epoch of three steps, trained over HTTP.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import zarr

from unetcore.config import (
    InferOptions,
    IngestConfig,
    IngestOptions,
    ModelConfig,
    NightlyConfig,
    TrainConfig,
)
from unetcore.data.synthetic import write_sample

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], what: str, timeout_s: float, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Poll ``check`` every 0.5 s; fail with the log's tail if the process died or time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"{what} not ready after {timeout_s:.0f} s (exit code {proc.poll() if proc else None}):\n{tail}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status == 200


@contextlib.contextmanager
def background(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in its own process group; on exit stop that group (SIGTERM, then SIGKILL after 20 s)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="module")
def servers(root: Path) -> Iterator[tuple[dict[str, str], str]]:
    """`prefect server start` and `mlflow server` (sqlite, proxied artifacts) on free ports, started side by side.

    Yields the environment a Prefect client process needs (PREFECT_API_URL, PREFECT_HOME) and the MLflow URL.
    """
    prefect_port, mlflow_port = free_port(), free_port()
    home = root / "prefect-home"
    home.mkdir()
    api = f"http://127.0.0.1:{prefect_port}/api"
    # PREFECT_UI_API_URL: the UI's browser code would look for the API on port 4200 otherwise.
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "true", "PREFECT_UI_API_URL": api, "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_API_URL", None)
    prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    mlflow_cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                  "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
                  "--artifacts-destination", str(root / "mlartifacts")]
    prefect_log, mlflow_log = root / "prefect-server.log", root / "mlflow-server.log"
    with background(prefect_cmd, env, prefect_log) as prefect_proc, \
            background(mlflow_cmd, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, mlflow_log) as mlflow_proc:
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        wait_until(lambda: http_ok(f"{mlflow_url}/health"), "mlflow server", 120, mlflow_proc, mlflow_log)
        wait_until(lambda: http_ok(f"{api}/health"), "prefect server", 150, prefect_proc, prefect_log)
        yield {**env, "PREFECT_API_URL": api}, mlflow_url


@pytest.fixture(scope="module")
def prefect_api(servers) -> dict[str, str]:
    return servers[0]


@pytest.fixture(scope="module")
def mlflow_url(servers) -> str:
    return servers[1]


@pytest.fixture(scope="module")
def sample(root: Path) -> Path:
    write_sample(root / "sample", n_images=3, size=128, large_size=0, seed=5)
    return root / "sample"


@pytest.fixture(scope="module")
def trained(root: Path, sample: Path, mlflow_url: str) -> tuple[dict[str, Any], Path]:
    """A tiny model trained and registered over HTTP; returns (train result, dataset folder)."""
    from unetcore.ingest import ingest_folder
    from unetcore.training.loop import train

    dataset = root / "dataset"
    ingest_folder(IngestConfig(images=str(sample / "images"), masks=str(sample / "masks"), output=str(dataset),
                               chunk_size=128, val_fraction=0.34))
    cfg = TrainConfig(dataset=str(dataset), model=ModelConfig(base_channels=4, depth=2), epochs=1, steps_per_epoch=3,
                      patch_size=64, batch_size=2, val_tile=64, output=str(root / "train"), tracking_uri=mlflow_url,
                      experiment="servers-test", registered_model=MODEL, augment=False)
    return train(cfg, tags={"prefect_flow_run_id": "test-run"}).to_dict(), dataset


def prefect_client_call(env: dict[str, str], call: Callable[[Any], Any]) -> Any:
    """Run ``await call(client)`` against the test's Prefect server (not the session's default API)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def main() -> Any:
        async with get_client() as client:
            return await call(client)

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return anyio.run(main)


def artifact_keys(env: dict[str, str], flow_run_id: Any) -> dict[str, list[Any]]:
    """Artifacts of one flow run, by key (each key's versions, oldest first)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    found = prefect_client_call(env, lambda c: c.read_artifacts(artifact_filter=flt))
    out: dict[str, list[Any]] = {}
    for art in sorted(found, key=lambda a: a.created):
        out.setdefault(art.key, []).append(art)
    return out


def test_prefect_ui_is_served_and_points_at_this_api(prefect_api) -> None:
    import json

    ui = prefect_api["PREFECT_API_URL"].removesuffix("/api")
    with urllib.request.urlopen(f"{ui}/ui-settings", timeout=10) as resp:
        assert json.load(resp)["api_url"] == prefect_api["PREFECT_API_URL"]
    with urllib.request.urlopen(f"{ui}/", timeout=10) as resp:
        assert resp.status == 200 and b"<html" in resp.read(2000).lower()


# ---------------------------------------------------------------- (b) MLflow server


def test_training_over_http_is_found_with_metrics_and_champion(trained, mlflow_url: str) -> None:
    from mlflow import MlflowClient

    result, dataset = trained
    client = MlflowClient(mlflow_url)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.base_channels"] == "4" and run.data.params["patch_size"] == "64"
    assert run.data.tags["prefect_flow_run_id"] == "test-run"
    assert run.data.tags["dataset"] == str(dataset.resolve())
    history = client.get_metric_history(run.info.run_id, "val_dice")
    assert [m.step for m in history] == [0] and 0.0 <= history[0].value <= 1.0
    assert "train_loss" in run.data.metrics
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert int(champion.version) == result["model_version"] and champion.run_id == run.info.run_id
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {
            "model/weights.pt", "model/config.json", "model/model.onnx", "model/model.onnx.json"}
    assert champion.source.startswith("mlflow-artifacts:")  # stored through the server, not a local path


# ---------------------------------------------------------------- (a) deployments on a Prefect server


@pytest.fixture(scope="module")
def yaml_deployments(prefect_api: dict[str, str], root: Path) -> dict[str, Any]:
    """`prefect work-pool create` + `prefect deploy --all` of deployments/prefect.yaml, as the README says."""
    base = [str(BIN / "prefect"), "--no-prompt"]
    for args in (["work-pool", "create", "unet-pool", "--type", "process"],
                 ["deploy", "--all", "--prefect-file", "deployments/prefect.yaml"]):
        done = subprocess.run(base + args, env=prefect_api, cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    async def read_then_delete(client: Any) -> dict[str, Any]:
        found = {n: await client.read_deployment_by_name(f"{n}/{n}")
                 for n in ("ingest", "train", "infer", "pipeline", "nightly")}
        for dep in found.values():  # one server, one mode: `unet serve` below must not inherit the pool's pull steps
            await client.delete_deployment(dep.id)
        return found

    return prefect_client_call(prefect_api, read_then_delete)


def test_prefect_yaml_deploys_five_deployments_to_the_pool(yaml_deployments) -> None:
    for name, dep in yaml_deployments.items():
        assert dep.work_pool_name == "unet-pool" and dep.entrypoint == f"flows/{name}.py:{name}"
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    [schedule] = yaml_deployments["nightly"].schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.slug) == ("0 2 * * *", "Europe/Berlin",
                                                                                  "nightly")
    assert yaml_deployments["nightly"].global_concurrency_limit.limit == 1


@pytest.fixture(scope="module")
def served(prefect_api: dict[str, str], yaml_deployments, root: Path, mlflow_url: str) -> Iterator[Path]:
    """`unet serve` in a subprocess (after the yaml's deployments were removed); yields the nightly inbox it watches."""
    inbox = root / "served-inbox"
    cmd = [str(BIN / "unet"), "serve", "--nightly-images", str(inbox), "--nightly-workdir", str(root / "served-night"),
           "--tracking-uri", mlflow_url, "--registered-model", MODEL]
    log = root / "serve.log"

    async def nightly_params(client: Any) -> dict[str, Any]:
        return (await client.read_deployment_by_name("nightly/nightly")).parameters

    with background(cmd, prefect_api, log) as proc:
        wait_until(lambda: prefect_client_call(prefect_api, nightly_params)["config"]["images"] == str(inbox),
                   "unet serve", 120, proc, log)
        yield inbox


def test_served_nightly_deployment_carries_cron_timezone_and_parameters(prefect_api, served, mlflow_url) -> None:
    dep = prefect_client_call(prefect_api, lambda c: c.read_deployment_by_name("nightly/nightly"))
    [schedule] = dep.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "Europe/Berlin", True)
    config = NightlyConfig(**dep.parameters["config"])
    assert (config.images, config.tracking_uri, config.model_name) == (str(served), mlflow_url, MODEL)


def test_served_infer_run_completes_with_non_default_parameters(prefect_api, served, trained, root, mlflow_url):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _, dataset = trained
    output = root / "served-predictions"
    config = {"dataset": str(dataset), "output": str(output), "model": f"models:/{MODEL}@champion",
              "tracking_uri": mlflow_url, "tile": 64, "overlap": 0.25, "batch_size": 2, "block_size": 128,
              "threshold": 0.4, "export": "tiff", "n_workers": 1, "split": "all"}
    with temporary_settings({PREFECT_API_URL: prefect_api["PREFECT_API_URL"]}):
        flow_run = run_deployment("infer/infer", parameters={"config": config}, timeout=240, poll_interval=1)
    assert flow_run.state.is_completed(), (flow_run.state, (root / "serve.log").read_text()[-3000:])
    assert flow_run.parameters["config"]["tile"] == 64
    for image_id in ("sample_000", "sample_001", "sample_002"):
        store = zarr.open_group(str(output / f"{image_id}.ome.zarr"), mode="r")
        assert store.attrs["unet"]["complete"] is True and store["labels/prediction/0"].shape == (128, 128)
        assert (output / f"{image_id}_mask.tif").exists()  # export=tiff, not the default png
    keys = artifact_keys(prefect_api, flow_run.id)
    assert {"infer-report", "infer-images", "infer-progress"} <= set(keys)
    assert "3 images" in keys["infer-report"][-1].data
    assert keys["infer-progress"][-1].data == 100.0


# ---------------------------------------------------------------- (d) bounds refused by the server


def test_out_of_bounds_parameter_is_refused_before_any_run(prefect_api, served) -> None:
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def count_runs(client: Any) -> int:
        return len(await client.read_flow_runs())

    before = prefect_client_call(prefect_api, count_runs)
    with temporary_settings({PREFECT_API_URL: prefect_api["PREFECT_API_URL"]}):
        with pytest.raises(PrefectHTTPStatusError, match=r"Validation failed for field 'config\.tile'.*minimum of 16"):
            run_deployment("infer/infer", parameters={"config": {"dataset": "d", "output": "o", "tile": -1}},
                           timeout=0)
    assert prefect_client_call(prefect_api, count_runs) == before

    # The README's command line, with the same mistake: refused the same way, nothing runs.
    done = subprocess.run([str(BIN / "prefect"), "deployment", "run", "infer/infer", "--param",
                           'config={"dataset": "d", "output": "o", "tile": -1}'],
                          env=prefect_api, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "config.tile" in done.stdout + done.stderr, done.stdout + done.stderr
    assert prefect_client_call(prefect_api, count_runs) == before


# ---------------------------------------------------------------- (c) nightly flow on the real API


def test_nightly_flow_twice_then_one_new_image(prefect_api, trained, sample, root, mlflow_url) -> None:
    """Night 1 predicts the two inbox images, night 2 nothing, night 3 exactly the image added; artifacts each night."""
    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.nightly import nightly

    inbox = root / "night-inbox"
    inbox.mkdir()
    for stem in ("sample_000", "sample_001"):
        shutil.copy2(sample / "images" / f"{stem}.png", inbox)
    result, _ = trained
    reports = []
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        cfg = NightlyConfig(images=str(inbox), masks=str(sample / "masks"), dataset=str(root / "night-dataset"),
                            output=str(root / "night-pred"), model_name=MODEL, tracking_uri=mlflow_url,
                            ingest=IngestOptions(chunk_size=128, val_fraction=0.0),
                            predict=InferOptions(tile=64, block_size=128, export="none",
                                                 scheduler_address=cluster.scheduler_address))
        with temporary_settings({PREFECT_API_URL: prefect_api["PREFECT_API_URL"]}):
            for night in range(3):
                if night == 2:
                    shutil.copy2(sample / "images" / "sample_002.png", inbox)
                state = nightly(cfg, return_state=True)
                assert state.is_completed(), state
                reports.append((state.state_details.flow_run_id, state.result()))

    done = [sorted(r["id"] for r in rep["images"] if r["status"] == "predicted") for _, rep in reports]
    assert done == [["sample_000", "sample_001"], [], ["sample_002"]]
    assert [rep["status"] for _, rep in reports] == ["ok", "nothing-new", "ok"]
    assert all(rep["model"]["version"] == result["model_version"] for _, rep in reports)
    for flow_run_id, rep in reports:
        keys = artifact_keys(prefect_api, flow_run_id)
        assert {"nightly-report", "nightly-images", "nightly-model", "nightly-progress"} <= set(keys)
        assert f"version {result['model_version']}" in keys["nightly-report"][-1].data
        assert keys["nightly-model"][-1].data.endswith(f"{mlflow_url}/#/models/{MODEL}/versions/{result['model_version']})")
        assert keys["nightly-progress"][-1].data == 100.0
    quiet_table = artifact_keys(prefect_api, reports[1][0])["nightly-images"][-1].data
    assert "nothing new" in quiet_table


def test_serve_exits_within_10_s_of_sigterm_with_or_without_its_prefect_server(tmp_path: Path) -> None:
    """Supervisors (systemd, `docker stop`, Kubernetes) send SIGTERM: `unet serve` stops in time in every state,
    also after its Prefect server has gone away (where Prefect's own graceful stop waits on API retries)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    serve_env = {**env, "PREFECT_API_URL": api}
    serve_cmd = [str(BIN / "unet"), "serve", "--nightly-images", str(tmp_path / "inbox"),
                 "--nightly-workdir", str(tmp_path / "nightly")]

    def served() -> bool:
        return http_ok(f"{api}/deployments/name/nightly/nightly")

    def stop_seconds(proc: subprocess.Popen) -> float:
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        return time.monotonic() - start

    with background(server_cmd, env, tmp_path / "server.log") as server:
        wait_until(lambda: http_ok(f"{api}/health"), "prefect server", 150, server, tmp_path / "server.log")
        with background(serve_cmd, serve_env, tmp_path / "serve-1.log") as serve:
            wait_until(served, "served deployments", 120, serve, tmp_path / "serve-1.log")
            assert stop_seconds(serve) < 10
        with background(serve_cmd, serve_env, tmp_path / "serve-2.log") as serve:
            wait_until(served, "served deployments", 120, serve, tmp_path / "serve-2.log")
            os.killpg(server.pid, signal.SIGKILL)  # the server goes away under the running `unet serve`
            server.wait()
            time.sleep(2)
            assert stop_seconds(serve) < 10
