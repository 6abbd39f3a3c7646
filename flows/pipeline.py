"""The ``pipeline`` flow: ingest → train → ingest held-out images → infer, as one run."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.infer import infer
from flows.ingest import ingest
from flows.train import train
from unetcore.config import PipelineConfig
from unetcore.planning import pipeline_training


@flow(name="pipeline", log_prints=True)
def pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Ingest the labelled folder, train and register a UNet, then predict the held-out images with it.

    Training follows the ingested dataset's plan as ``unet train`` does; each option given in ``config.train``
    overrides exactly its field.

    Args:
        config: the labelled and held-out folders, the work folder, and the training and inference options.
    """
    ingested = ingest(config.ingest_config())
    holdout_cfg = config.holdout_config()
    holdout = ingest(holdout_cfg) if holdout_cfg else None
    train_cfg, plan = pipeline_training(config)  # the dataset's plan, the given options on top
    trained = train(train_cfg, plan.to_dict())
    model_uri = f"models:/{trained['model_name']}/{trained['model_version']}"
    predicted = infer(config.infer_config(model_uri))
    return {"ingest": ingested, "holdout": holdout, "train": trained, "infer": predicted}
