"""The ``train`` flow: train a UNet on an ingested dataset, tracked in MLflow, behind the promotion gate."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows.reporting import flow_run_id, link, log_failure, markdown, progress_artifact
from unetcore.config import TrainConfig
from unetcore.planning import Plan, planned_training
from unetcore.tracking import run_page_url, ui_command
from unetcore.training import train as train_model


@task(name="train-unet", on_failure=[log_failure], timeout_seconds=7 * 24 * 3600)
def train_task(config: TrainConfig, prefect_flow_run: str, plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (resuming from the last checkpoint when asked) and register the model."""
    with progress_artifact("train-progress", f"Training on {config.dataset}"):
        return train_model(config, tags={"prefect_flow_run_id": prefect_flow_run},
                           plan=Plan.from_dict(plan) if plan else None).to_dict()


@task(name="plan-training", on_failure=[log_failure])
def plan_task(config: TrainConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """Plan a run started without ``unet train`` (the UI, a schedule, the API): its given fields over the plan."""
    planned, plan = planned_training(config)
    return planned, plan.to_dict()


def plan_markdown(plan: Plan) -> str:
    """The plan as a markdown table (field, value, why), overridden fields marked."""
    rows = "\n".join(f"| `{f}` | {v} | {w} |" for f, v, w in plan.rows())
    overridden = ", ".join(f"`{f}`" for f in plan.overridden) or "none"
    return f"## Plan\n\n| field | value | why |\n|---|---|---|\n{rows}\n\nOverridden by options: {overridden}"


@flow(name="train", log_prints=True)
def train(config: TrainConfig, plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train a UNet on an ingested dataset and register it in MLflow.

    ``plan``: the dataset's plan that ``config`` was made from (``unet train`` passes it), logged with the run.
    Without it (a run from the UI, a schedule or the API), the dataset is planned here and the fields given in
    ``config`` override their choice, as ``unet train``'s options do.
    """
    if not plan:
        config, plan = plan_task(config)
    markdown("train-plan", plan_markdown(Plan.from_dict(plan)), "The training plan and why each choice was made")
    result = train_task(config, flow_run_id(), plan)
    markdown("train-report",
             f"## Training\n\n| run | best val Dice | epoch | epochs run | stopped | model | alias | seconds |\n"
             f"|---|---|---|---|---|---|---|---|\n"
             f"| `{result['run_id']}` | {result['best_val_dice']:.4f} | {result['best_epoch']} | "
             f"{result['epochs_run']} | {result['stop_reason']} | {result['model_name']} v{result['model_version']} | "
             f"{result['alias']} | {result['seconds']:.0f} |\n\nPromotion gate: {result['gate']}",
             "Summary of the training run")
    url = run_page_url(config.tracking_uri, result["experiment_id"], result["run_id"])
    serve = ui_command(config.tracking_uri)
    link("train-mlflow-run", url, "MLflow run",
         "The run's curves and preview images in MLflow" + (f" (serve them first: `{serve}`)" if serve else ""))
    print(f"trained: val Dice {result['best_val_dice']:.4f}, {result['model_name']} v{result['model_version']} "
          f"({result['alias']}), MLflow run {result['run_id']}")
    return result
