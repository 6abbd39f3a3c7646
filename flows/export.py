"""The ``export`` flow: one model written as a self-contained ONNX or TorchScript file, checked against torch.

Trivial on purpose (an export takes seconds and needs no retries or cluster): it gives the export a flow run and
a report; ``unet export --no-prefect`` calls :func:`unetcore.model.export_model` directly.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows.reporting import log_failure, markdown
from unetcore.config import ExportConfig
from unetcore.model import export_model


@task(name="export-model", on_failure=[log_failure])
def export_task(config: ExportConfig) -> dict[str, Any]:
    """Export, check against torch, describe, log to the model's MLflow run."""
    return export_model(config).as_dict()


@flow(name="export", log_prints=True)
def export(config: ExportConfig) -> dict[str, Any]:
    """Export ``config.model`` to ``config.output`` (ONNX or TorchScript)."""
    result = export_task(config)
    diffs = ", ".join(f"{v:.2g} at {k}" for k, v in result["max_abs_diff"].items())
    where = f"logged to `{result['logged']}`" if result["logged"] else f"not logged to MLflow: {result['not_logged']}"
    markdown("export-report", f"## Export\n\n`{config.model}` → `{result['path']}` ({result['format']}); max |export "
             f"− torch| {diffs}; described in `{result['description']}`; {where}", "Model export")
    print(f"exported {config.model} -> {result['path']}")
    return result
