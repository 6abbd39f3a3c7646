"""Serve every deployment from one local process (no work pool needed): ``unet serve``.

The same deployments are declared for work pools in ``deployments/prefect.yaml`` (``prefect deploy --all``);
``tests/test_deployments.py`` checks that the two agree.
"""

from __future__ import annotations

from typing import Any

from prefect import serve
from prefect.schedules import Cron

from flows.infer import infer
from flows.ingest import ingest
from flows.nightly import nightly
from flows.pipeline import pipeline
from flows.train import train
from unetcore.config import NightlyConfig
from unetcore.errors import ConfigError

NIGHTLY_CRON = "0 2 * * *"
NIGHTLY_TIMEZONE = "Europe/Berlin"
NIGHTLY_SLUG = "nightly"


def nightly_schedule(cron: str = NIGHTLY_CRON, timezone: str = NIGHTLY_TIMEZONE) -> Any:
    """The nightly cron schedule, checked: a bad cron string or time zone is refused with the option named.

    Raises:
        ConfigError: ``cron`` is not a cron expression or ``timezone`` is not an IANA time zone name.
    """
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        field = str(exc.errors()[0]["loc"][0])
        example = "'0 2 * * *'" if field == "cron" else "'Europe/Berlin' or 'UTC'"
        value = cron if field == "cron" else timezone
        raise ConfigError(field, f"'{value}' is not valid (for example {example})") from None
    return Cron(cron, timezone=timezone, slug=NIGHTLY_SLUG)


def build_deployments(
    nightly_config: NightlyConfig | None = None, cron: str = NIGHTLY_CRON, timezone: str = NIGHTLY_TIMEZONE
) -> list[Any]:
    """The ingest, train, infer and pipeline deployments (run on demand) and nightly (on its cron schedule)."""
    # only what was given: an unset option keeps its meaning "default" (a 3-D model's own tile, for one)
    nightly_params = {"config": (nightly_config or NightlyConfig()).model_dump(mode="json", exclude_unset=True)}
    return [
        ingest.to_deployment(name="ingest", tags=["unet"]),
        train.to_deployment(name="train", tags=["unet"]),
        infer.to_deployment(name="infer", tags=["unet"]),
        pipeline.to_deployment(name="pipeline", tags=["unet"]),
        nightly.to_deployment(name="nightly", tags=["unet", "nightly"], parameters=nightly_params,
                              schedules=[nightly_schedule(cron, timezone)], concurrency_limit=1),
    ]


def serve_all(
    nightly_config: NightlyConfig | None = None, cron: str = NIGHTLY_CRON, timezone: str = NIGHTLY_TIMEZONE
) -> None:
    """Register the five deployments and run them when triggered (from the UI, the API or the schedule)."""
    serve(*build_deployments(nightly_config, cron, timezone))


if __name__ == "__main__":
    serve_all()
