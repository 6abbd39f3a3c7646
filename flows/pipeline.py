"""The ``pipeline`` flow: ingest → train → ingest held-out images → infer, as one run."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.infer import infer
from flows.ingest import ingest
from flows.train import train
from unetcore.config import PipelineConfig


@flow(name="pipeline", log_prints=True)
def pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Ingest the labelled folder, train and register a UNet, then predict the held-out images with it.

    Args:
        config: the labelled and held-out folders, the work folder, and the training and inference options.
    """
    ingested = ingest(config.ingest_config())
    holdout_cfg = config.holdout_config()
    holdout = ingest(holdout_cfg) if holdout_cfg else None
    trained = train(config.train_config())
    model_uri = f"models:/{trained['model_name']}/{trained['model_version']}"
    predicted = infer(config.infer_config(model_uri))
    return {"ingest": ingested, "holdout": holdout, "train": trained, "infer": predicted}
