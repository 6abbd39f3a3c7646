"""The ``ingest`` flow: a folder of images (and masks) into an OME-Zarr dataset with a manifest."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows.reporting import (
    log_failure,
    markdown,
    progress_artifact,
    retry_unless_user_error,
    table,
)
from unetcore.config import IngestConfig
from unetcore.ingest import ingest_folder


@task(name="ingest-folder", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_user_error,
      on_failure=[log_failure], timeout_seconds=24 * 3600)
def ingest_folder_task(config: IngestConfig) -> dict[str, Any]:
    """Ingest new and changed images; bad files are reported, not fatal."""
    with progress_artifact("ingest-progress", f"Ingesting {config.images}"):
        return ingest_folder(config).to_dict()


def publish_ingest_report(report: dict[str, Any]) -> None:
    """Markdown summary and a table of failed files."""
    markdown(
        "ingest-report",
        f"## Ingestion: {report['status']}\n\n| added | updated | unchanged | failed | megapixels | seconds |\n"
        f"|---|---|---|---|---|---|\n| {len(report['added'])} | {len(report['updated'])} | {len(report['skipped'])} "
        f"| {len(report['failed'])} | {report['pixels'] / 1e6:.1f} | {report['seconds']:.1f} |\n\n"
        f"Dataset: `{report['dataset']}`" + "".join(f"\n\n**Warning:** {w}" for w in report["warnings"]),
        "What the last ingestion did",
    )
    table("ingest-failures", report["failed"], "Files that could not be ingested, with the reason")


@flow(name="ingest", log_prints=True)
def ingest(config: IngestConfig) -> dict[str, Any]:
    """Ingest a folder of images (and masks) into a dataset of OME-Zarr stores.

    Args:
        config: what to ingest, where to write it, chunking, splits and limits.
    """
    report = ingest_folder_task(config)
    publish_ingest_report(report)
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    print(f"ingest {report['status']}: {len(report['added'])} added, {len(report['updated'])} updated, "
          f"{len(report['skipped'])} unchanged, {len(report['failed'])} failed -> {report['dataset']}")
    return report
