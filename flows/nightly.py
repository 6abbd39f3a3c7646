"""The ``nightly`` flow: ingest what is new in the inbox and predict only that, with the current champion.

Deployed with a cron schedule (``deployments/prefect.yaml``, ``unet serve``). Running it twice in a row does nothing
the second time; when the champion moves, the next night re-predicts (unless ``repredict_on_new_champion`` is off).
A file that fails is reported in the ``nightly-images`` table and the night goes on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff

from flows.reporting import link, log_failure, markdown, retry_unless_user_error
from unetcore import nightly as lib
from unetcore import progress
from unetcore.config import NightlyConfig
from unetcore.tracking import PinnedModel

# Share of the progress bar per stage: (start %, span %).
_STAGES = {lib.INGEST_STAGE: (0.0, 20.0), lib.PREDICT_STAGE: (20.0, 80.0)}


@task(name="ingest-new-images", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=10),
      retry_jitter_factor=0.5, retry_condition_fn=retry_unless_user_error, on_failure=[log_failure],
      timeout_seconds=6 * 3600)
def ingest_task(config: NightlyConfig) -> lib.IngestOutcome:
    """Ingest new and changed inbox images; a bad file is reported, not fatal."""
    return lib.ingest_new(config)


@task(name="resolve-model", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5),
      retry_jitter_factor=0.5, retry_condition_fn=retry_unless_user_error, on_failure=[log_failure], timeout_seconds=300)
def resolve_task(config: NightlyConfig) -> PinnedModel:
    """Pin models:/<name>@<alias> to one version for the whole night."""
    return lib.resolve_model(config.model_name, config.alias, config.tracking_uri, Path(config.output) / ".models")


@task(name="predict-new-images", retries=1, retry_delay_seconds=60, retry_condition_fn=retry_unless_user_error,
      on_failure=[log_failure], timeout_seconds=12 * 3600)
def predict_task(config: NightlyConfig, model: PinnedModel) -> tuple[list[dict[str, Any]], list[str]]:
    """Predict the images not yet predicted by this model version; return (rows, ids skipped as done)."""
    todo, skipped = lib.select_todo(Path(config.dataset), Path(config.output), model,
                                    config.repredict_on_new_champion)
    return lib.predict_new(config, model, todo), skipped


@contextlib.contextmanager
def night_progress(key: str = "nightly-progress") -> Iterator[None]:
    """One progress artifact for the night: ingestion fills the first 20 %, prediction the rest (~1 update/s)."""
    artifact_id = create_progress_artifact(0.0, key=key, description="Nightly: looking for new images")
    last = [0.0]

    def on_report(stage: str, done: int, total: int, detail: str = "") -> None:
        now = time.monotonic()
        if stage not in _STAGES or (done < total and now - last[0] < 1.0):
            return
        last[0] = now
        start, span = _STAGES[stage]
        update_progress_artifact(artifact_id, start + span * done / max(total, 1), description=f"{stage}: {done}/{total}")

    with progress.subscribed(on_report):
        yield
    update_progress_artifact(artifact_id, 100.0, description="Nightly: done")


def model_url(tracking_uri: str, model: PinnedModel) -> str:
    """Where a person finds the model version: the MLflow server's page, or the sqlite URI (open with `mlflow ui`)."""
    if tracking_uri.startswith("http"):
        return f"{tracking_uri.rstrip('/')}/#/models/{model.name}/versions/{model.version}"
    return f"{tracking_uri}#models/{model.name}/versions/{model.version}"


def image_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the per-image table: predictions and failures (ingest failures included); one row if idle."""
    keys = ("id", "status", "model_version", "pixels", "seconds", "megapixels_per_s", "dice", "output", "error")
    rows = [{k: r.get(k) for k in keys} for r in report["images"]]
    rows += [{**dict.fromkeys(keys), "id": f["id"], "status": "failed (ingest)", "error": f["error"]}
             for f in report["ingest"]["failed"]]
    return rows or [{**dict.fromkeys(keys), "id": "-", "status": "nothing new",
                     "model_version": report["model"]["version"]}]


def summary_markdown(report: dict[str, Any]) -> str:
    """The night in a few lines: counts, timing, throughput, model version, Dice where ground truth exists."""
    done = [r for r in report["images"] if r["status"] == "predicted"]
    failed = [r for r in report["images"] if r["status"] == "failed"] + report["ingest"]["failed"]
    pixels = sum(r["pixels"] for r in done)
    seconds = sum(r["seconds"] for r in done)
    dices = [r["dice"] for r in done if r["dice"] is not None]
    model, ingest = report["model"], report["ingest"]
    dice = f"{sum(dices) / len(dices):.4f}" if dices else "n/a"
    lines = [
        f"## Nightly inference: {report['status']}",
        "",
        "| new or changed | unchanged | predicted | already done | failed | megapixels | predict s | MP/s | mean Dice |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {len(ingest['ingested'])} | {len(ingest['unchanged'])} | {len(done)} | {len(report['skipped'])} | "
        f"{len(failed)} | {pixels / 1e6:.2f} | {seconds:.1f} | {pixels / 1e6 / max(seconds, 1e-9):.2f} | {dice} |",
        "",
        f"Model `models:/{model['name']}@{model['alias']}` = **version {model['version']}** "
        f"(MLflow run `{model['run_id']}`). Ingestion {ingest['seconds']:.1f} s, whole night {report['seconds']:.1f} s.",
    ]
    if failed:
        lines += ["", "Failed (tried again next night):", ""] + [f"- `{f['id']}`: {f['error']}" for f in failed]
    return "\n".join(lines)


def publish_night(report: dict[str, Any], tracking_uri: str, model: PinnedModel) -> None:
    """The nightly-report, nightly-images and nightly-model artifacts (stable keys: each night adds a version)."""
    from prefect.artifacts import create_table_artifact

    markdown("nightly-report", summary_markdown(report), "What the last night processed")
    create_table_artifact(image_rows(report), key="nightly-images", description="Per-image results of the last night")
    link("nightly-model", model_url(tracking_uri, model), f"{model.name} v{model.version} in MLflow",
         "The model version the last night predicted with")


@flow(name="nightly", log_prints=True, timeout_seconds=23 * 3600)
def nightly(config: NightlyConfig = NightlyConfig()) -> dict[str, Any]:
    """Ingest the inbox's new or changed images and predict them with the current champion; skip what is done.

    Args:
        config: The inbox (folder or glob), the nightly dataset and predictions folders, the registered model and
            alias to predict with, and the inference options.
    """
    start = time.perf_counter()
    with night_progress():
        ingest = ingest_task(config)
        model = resolve_task(config)
        rows, skipped = predict_task(config, model)
    report = lib.night_report(ingest, model, rows, skipped, time.perf_counter() - start)
    publish_night(report, config.tracking_uri, model)
    print(f"nightly {report['status']}: {len(ingest.ingested)} new or changed, "
          f"{sum(r['status'] == 'predicted' for r in rows)} predicted with {model.uri}, {len(skipped)} already done, "
          f"{len(ingest.failed) + sum(r['status'] == 'failed' for r in rows)} failed")
    return report
