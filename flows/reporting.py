"""Prefect-side helpers shared by the flows: retry policy, failure hook, artifacts, progress artifact."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

from unetcore import progress
from unetcore.errors import ServiceError, UnetError


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """The one retry policy of every task: retry what may pass (an unreachable server, lost workers, I/O), never
    an error the user caused (a bad file, option, name or alias: retrying cannot fix it)."""
    try:
        state.result()
    except ServiceError:
        return True
    except UnetError:
        return False
    except Exception:
        return True
    return False


def log_failure(task: Any, task_run: Any, state: Any) -> None:
    """Failure hook: one clear line in the run's log saying what failed and why."""
    try:
        state.result()
    except Exception as exc:  # the state's exception, re-raised to read it
        get_run_logger().error("%s failed: %s", task.name, exc)


def flow_run_id() -> str:
    """The current Prefect flow-run id ("" outside a flow), for tagging MLflow runs."""
    return str(flow_run.get_id() or "")


@contextlib.contextmanager
def progress_artifact(key: str, description: str) -> Iterator[None]:
    """Mirror progress reports of the library into a Prefect progress artifact (throttled to ~1/s)."""
    artifact_id = create_progress_artifact(0.0, key=key, description=description)
    last = [0.0]

    def on_report(stage: str, done: int, total: int, detail: str = "") -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 1.0:
            return
        last[0] = now
        text = f"{stage}: {done}/{total}" + (f" ({detail})" if detail else "")
        update_progress_artifact(artifact_id, 100.0 * done / max(total, 1), description=text)

    with progress.subscribed(on_report):
        yield


def markdown(key: str, text: str, description: str) -> None:
    create_markdown_artifact(text, key=key, description=description)


def table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    if rows:
        create_table_artifact(rows, key=key, description=description)


def link(key: str, url: str, text: str, description: str) -> None:
    create_link_artifact(url, link_text=text, key=key, description=description)
