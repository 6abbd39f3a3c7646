"""The ``infer`` flow: tiled, blended inference of an ingested dataset on Dask, streamed into OME-Zarr."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from prefect import flow, get_run_logger, task

from flows.reporting import (
    log_failure,
    markdown,
    progress_artifact,
    retry_unless_user_error,
    table,
)
from unetcore.config import InferConfig
from unetcore.inference import logs_to, predict_dataset, provenance_lines, results_to_dicts


@contextlib.contextmanager
def engine_logs_in_run() -> Iterator[None]:
    """Forward the engine's INFO lines (the Dask dashboard link, the cluster's shape) to the run's log."""
    run_logger = get_run_logger()

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            run_logger.log(record.levelno, record.getMessage())

    with logs_to(Forward(logging.INFO)):
        yield


@task(name="predict-images", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error,
      on_failure=[log_failure], timeout_seconds=7 * 24 * 3600)
def predict_task(config: InferConfig) -> list[dict[str, Any]]:
    """Predict every chosen image; completed blocks are skipped on a retry."""
    with progress_artifact("infer-progress", f"Predicting {config.dataset}"), engine_logs_in_run():
        return results_to_dicts(predict_dataset(config))


def publish_infer_report(results: list[dict[str, Any]], model: str) -> None:
    pixels = sum(r["pixels"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    dices = [r["dice"] for r in results if r["dice"] is not None]
    dice = f"{sum(dices) / len(dices):.4f}" if dices else "n/a"
    provenance = next((r["provenance"] for r in results if r.get("provenance")), None)
    made_by = "".join(f"\n- {line}" for line in provenance_lines(provenance)) if provenance else ""
    markdown("infer-report",
             f"## Inference\n\nModel `{model}`: {len(results)} images, {pixels / 1e6:.1f} MP in {seconds:.1f} s "
             f"({pixels / 1e6 / max(seconds, 1e-9):.2f} MP/s); mean Dice where ground truth exists: {dice}"
             + (f"\n\nProvenance (also in each store and export):{made_by}" if made_by else ""),
             "Summary of the inference run")
    keys = ("id", "pixels", "blocks", "blocks_skipped", "tile_evaluations", "grid_tiles", "instances", "seconds",
            "megapixels_per_s", "dice", "output")
    table("infer-images", [{k: r.get(k) for k in keys} for r in results],
          "Per-image results")


@flow(name="infer", log_prints=True)
def infer(config: InferConfig) -> list[dict[str, Any]]:
    """Predict an ingested dataset with a registered model (default models:/unet@champion)."""
    results = predict_task(config)
    publish_infer_report(results, config.model)
    for r in results:
        dice = f"{r['dice']:.4f}" if r["dice"] is not None else "n/a"
        print(f"predicted {r['id']}: {r['pixels'] / 1e6:.1f} MP, {r['megapixels_per_s']:.2f} MP/s, Dice {dice} "
              f"-> {r['output']}")
    return results
