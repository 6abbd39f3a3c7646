"""Look at the pipeline as a person would, and keep pictures of it in docs/.

Starts `prefect server` and `mlflow server` on 127.0.0.1 (free ports, everything in a temporary folder), serves the
deployments with `unet serve`, triggers a small `pipeline` run and one `nightly` run through the Prefect API, then
takes 1400×900 screenshots with headless chromium (Debian: `apt-get install -y chromium`), driven over its DevTools
port so pages can finish drawing and MLflow's assistant panel can be closed:

* docs/prefect-pipeline-run.png: the completed pipeline run (its subflows ingest, train, infer);
* docs/prefect-infer-artifacts.png: the pipeline's infer subflow run with its artifacts;
* docs/prefect-nightly-report.png: the nightly-report artifact of the nightly run;
* docs/mlflow-metrics.png: the training run's loss and Dice curves in the MLflow UI;
* docs/mlflow-previews.png: the run's preview images (one per validation step, a slider over the steps), with the
  card's "Show run parameters" unticked as the README says (MLflow lists every parameter above the picture).

Usage (from the repository root, about 4 minutes on 2 cores)::

    .venv/bin/python scripts/screenshots.py [--keep]    # --keep: leave the servers up until Enter is pressed
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unetcore.tracking import PREVIEW_KEY, run_page_url

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCS = ROOT / "docs"
MAX_BYTES = 300_000
WIDTH, HEIGHT = 1400, 900
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  f"--window-size={WIDTH},{HEIGHT}"]


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    """Wait until ``url`` answers 200; raise with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-2000:]}")


@contextlib.contextmanager
def background(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in its own process group; stop that group on exit."""
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


def chromium() -> str:
    """The chromium binary, or a one-line explanation of how to get it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise SystemExit("chromium not found: apt-get update && apt-get install -y chromium")


class Browser:
    """Headless chromium driven over the DevTools protocol: open a page, tidy it with a little JS, save a PNG.

    Plain ``chromium --screenshot`` cannot close MLflow's assistant panel or wait for charts, hence the protocol.
    """

    def __init__(self, profile: Path) -> None:
        import json

        port = free_port()
        cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
               "--remote-allow-origins=*", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as resp:
                    pages = [t for t in json.load(resp) if t["type"] == "page"]
                    if pages:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.3)
        from websockets.sync.client import connect

        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 2**20)
        self.next_id = 0
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events in between are skipped)."""
        import json

        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def click(self, element: str) -> None:
        """Click, as a mouse does, the element the JS expression ``element`` yields (menus ignore ``el.click()``)."""
        import json

        found = self.call("Runtime.evaluate", returnByValue=True, expression=(
            f"(() => {{ const e = {element}; if (!e) return null; const r = e.getBoundingClientRect(); "
            "return JSON.stringify([r.x + r.width / 2, r.y + r.height / 2]); })()"))["result"].get("value")
        if found is None:
            raise RuntimeError(f"nothing to click: {element}")
        x, y = json.loads(found)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        time.sleep(1.5)

    def shot(self, url: str, dst: Path, settle_s: float = 8.0, script: str = "", clicks: tuple[str, ...] = ()) -> None:
        """Load ``url``, let it render, run ``script``, click ``clicks`` in turn; save the viewport as ``dst``.

        The PNG is kept under 300 KB.
        """
        import base64

        self.call("Page.navigate", url=url)
        time.sleep(settle_s)  # single-page apps keep fetching after load; give them time to draw
        if script:
            self.call("Runtime.evaluate", expression=script)
            time.sleep(2)
        for element in clicks:
            self.click(element)
        if clicks:
            time.sleep(3)
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        dst.write_bytes(png)
        if dst.stat().st_size > MAX_BYTES:
            from PIL import Image

            Image.open(dst).convert("RGB").quantize(colors=128).save(dst, optimize=True)
        print(f"  {dst.relative_to(ROOT)}  ({dst.stat().st_size // 1000} KB)  <- {url}")

    def close(self) -> None:
        self.ws.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=20)


# Close MLflow's assistant side panel so the charts get the width.
CLOSE_MLFLOW_ASSISTANT = """
for (const el of document.querySelectorAll('button, [role=button]')) {
  const label = (el.getAttribute('aria-label') || '') + ' ' + (el.getAttribute('data-component-id') || '');
  if (/assistant/i.test(label) && /close/i.test(label)) { el.click(); }
}
"""
# Show only the loss and Dice curves (the chart search takes a regular expression).
MLFLOW_CHART_FILTER = """
const box = document.querySelector('input[placeholder="Search metric charts"]');
Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(box, 'loss|val_dice');
box.dispatchEvent(new Event('input', {bubbles: true}));
"""
# The preview card's menu, then Configure, untick "Show run parameters", Save: the picture shows; then its step slider.
_CARD_MENU = ('button[data-component-id="codegen_mlflow_app_src_experiment-tracking_components_runs-compare_cards_'
              'chartcard.common.tsx_158"]')
MLFLOW_PREVIEW_WITHOUT_PARAMS = (
    f"[...document.querySelectorAll('{_CARD_MENU}')].find(b => {{ let e = b; "
    f"while (e.parentElement && e.parentElement.querySelectorAll('{_CARD_MENU}').length === 1) e = e.parentElement; "
    f"return e.textContent.includes('{PREVIEW_KEY}'); }})",
    "[...document.querySelectorAll('[role=menuitem]')].find(e => e.textContent === 'Configure')",
    "[...document.querySelectorAll('[role=dialog] label')].find(e => e.textContent === 'Show run parameters')",
    "[...document.querySelectorAll('[role=dialog] button')].find(e => e.textContent === 'Save changes')",
    # the step slider's last mark: the last validation step
    "[...document.querySelector('[role=slider]').closest('span[dir]').querySelectorAll('div[style]')].pop()",
)
# Open the Artifacts tab of a Prefect flow-run page.
PREFECT_ARTIFACTS_TAB = """
for (const el of document.querySelectorAll('li.p-tab')) { if (el.textContent.trim() === 'Artifacts') el.click(); }
"""


def run_and_wait(env: dict[str, str], name: str, parameters: dict[str, Any], timeout_s: float = 900) -> Any:
    """Trigger deployment ``name`` through the API and wait for its final state."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        run = run_deployment(name, parameters=parameters, timeout=timeout_s, poll_interval=2)
    print(f"{name}: {run.state.name} ({run.id})")
    if not run.state.is_completed():
        raise SystemExit(f"{name} ended {run.state.name}: {run.state.message}")
    return run


def wait_for_deployments(env: dict[str, str], proc: subprocess.Popen, log: Path) -> None:
    """Wait until `unet serve` has registered the nightly deployment (the last one it registers)."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def registered() -> bool:
        async with get_client() as client:
            with contextlib.suppress(Exception):
                await client.read_deployment_by_name("nightly/nightly")
                return True
        return False

    deadline = time.monotonic() + 120
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        while time.monotonic() < deadline and proc.poll() is None:
            if anyio.run(registered):
                return
            time.sleep(1)
    raise RuntimeError(f"unet serve did not register its deployments:\n{log.read_text()[-2000:]}")


def latest_artifact(env: dict[str, str], key: str) -> tuple[str, str]:
    """(artifact id, flow-run id) of the newest artifact under ``key``."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def newest() -> Any:
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            return max(found, key=lambda a: a.created)

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        art = anyio.run(newest)
    return str(art.id), str(art.flow_run_id)


def mlflow_run_url(mlflow_url: str, run_id: str) -> str:
    """The MLflow UI page with the run's metric charts (in the "Model training" view, not the GenAI one)."""
    from mlflow import MlflowClient

    experiment = MlflowClient(mlflow_url).get_run(run_id).info.experiment_id
    return run_page_url(mlflow_url, experiment, run_id)


def take_all(work: Path, keep: bool) -> None:
    """Start the servers, run a small pipeline and one night through them, and photograph the UIs."""
    from unetcore.data.synthetic import write_sample

    write_sample(work / "train", n_images=6, size=256, large_size=0, seed=0)
    write_sample(work / "holdout", n_images=2, size=384, large_size=0, seed=1)
    prefect_port, mlflow_port = free_port(), free_port()
    home = work / "prefect-home"
    home.mkdir()
    api, mlflow_url = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
    # PREFECT_UI_API_URL: the UI's browser code calls this API (it would assume port 4200 otherwise).
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "true", "PREFECT_UI_API_URL": api, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("PREFECT_API_URL", None)
    ui = api.removesuffix("/api")
    prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    mlflow_cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                  "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--serve-artifacts",
                  "--artifacts-destination", str(work / "mlartifacts")]
    with background(prefect_cmd, env, work / "prefect.log") as prefect_proc, \
            background(mlflow_cmd, env, work / "mlflow.log") as mlflow_proc:
        wait_http(f"{api}/health", prefect_proc, work / "prefect.log")
        wait_http(f"{mlflow_url}/health", mlflow_proc, work / "mlflow.log")
        print(f"Prefect UI {ui}, MLflow UI {mlflow_url}")
        env["PREFECT_API_URL"] = api
        serve_cmd = [str(BIN / "unet"), "serve", "--nightly-images", str(work / "holdout" / "images"),
                     "--nightly-workdir", str(work / "nightly"), "--tracking-uri", mlflow_url]
        with background(serve_cmd, env, work / "serve.log") as serve_proc:
            wait_for_deployments(env, serve_proc, work / "serve.log")
            pipeline = run_and_wait(env, "pipeline/pipeline", {"config": {
                "images": str(work / "train" / "images"), "masks": str(work / "train" / "masks"),
                "predict_images": str(work / "holdout" / "images"), "predict_masks": str(work / "holdout" / "masks"),
                "workdir": str(work / "pipeline"), "epochs": 6, "steps_per_epoch": 10, "patch_size": 128,
                "batch_size": 4, "model": {"base_channels": 8, "depth": 3}, "tracking_uri": mlflow_url,
                "tile": 128, "n_workers": 1}})
            run_and_wait(env, "nightly/nightly", {"config": {
                "images": str(work / "holdout" / "images"), "masks": str(work / "holdout" / "masks"),
                "dataset": str(work / "nightly" / "dataset"), "output": str(work / "nightly" / "predictions"),
                "tracking_uri": mlflow_url, "tile": 128, "n_workers": 1}})
            from mlflow import MlflowClient

            train_run_id = MlflowClient(mlflow_url).get_model_version_by_alias("unet", "champion").run_id
            DOCS.mkdir(exist_ok=True)
            _, infer_run = latest_artifact(env, "infer-report")
            nightly_report, _ = latest_artifact(env, "nightly-report")
            browser = Browser(work / "chromium-profile")
            try:
                browser.shot(f"{ui}/runs/flow-run/{pipeline.id}", DOCS / "prefect-pipeline-run.png")
                browser.shot(f"{ui}/runs/flow-run/{infer_run}", DOCS / "prefect-infer-artifacts.png",
                             script=PREFECT_ARTIFACTS_TAB)
                browser.shot(f"{ui}/artifacts/artifact/{nightly_report}", DOCS / "prefect-nightly-report.png")
                browser.shot(mlflow_run_url(mlflow_url, train_run_id), DOCS / "mlflow-metrics.png",
                             script=CLOSE_MLFLOW_ASSISTANT + MLFLOW_CHART_FILTER)
                browser.shot(mlflow_run_url(mlflow_url, train_run_id), DOCS / "mlflow-previews.png",
                             script=CLOSE_MLFLOW_ASSISTANT, clicks=MLFLOW_PREVIEW_WITHOUT_PARAMS)
            finally:
                browser.close()
            if keep:
                with contextlib.suppress(EOFError):
                    input(f"servers still up (Prefect {ui}, MLflow {mlflow_url}); press Enter to stop them ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the servers up until Enter is pressed")
    args = parser.parse_args()
    chromium()
    with tempfile.TemporaryDirectory(prefix="unet-screenshots-") as work:
        take_all(Path(work), args.keep)


if __name__ == "__main__":
    main()
