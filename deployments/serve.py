"""Serve every deployment from one local process (no work pool needed): ``unet serve``.

The same deployments are declared for work pools in ``deployments/prefect.yaml`` (``prefect deploy --all``).
"""

from __future__ import annotations

from prefect import serve

from flows.infer import infer
from flows.ingest import ingest
from flows.pipeline import pipeline
from flows.train import train


def serve_all() -> None:
    """Register the ingest, train, infer and pipeline deployments and run them when triggered."""
    serve(
        ingest.to_deployment(name="ingest", tags=["unet"]),
        train.to_deployment(name="train", tags=["unet"]),
        infer.to_deployment(name="infer", tags=["unet"]),
        pipeline.to_deployment(name="pipeline", tags=["unet"]),
    )


if __name__ == "__main__":
    serve_all()
