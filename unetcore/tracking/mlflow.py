"""The MLflow face of the pipeline: runs, metrics, previews, the weights-only model, the registry gate.

Models are logged as plain artifacts (``weights.pt`` state dict + ``config.json``) and registered from that
artifact folder; loading downloads the folder and rebuilds the UNet with ``torch.load(weights_only=True)``, so
no code is ever unpickled from an artifact.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from unetcore.errors import ConfigError, InputError, ServiceError
from unetcore.fs import os_error_reason
from unetcore.planning.task import TaskSignature
from unetcore.tracking.pinned import PinnedModel, cache_name, is_complete, is_local, sqlite_path
from unetcore.tracking.strips import preview_strip

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"


def check_tracking_uri(uri: str, timeout_s: float = 3.0) -> None:
    """Fail fast, in one line naming the URI, when the tracking store cannot be reached or created.

    Raises:
        ServiceError: an http(s) server does not answer its health check.
        InputError: a sqlite file's folder cannot be created.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
                if resp.status >= 400:
                    raise ServiceError(uri, f"MLflow health check answered HTTP {resp.status}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServiceError(
                uri, f"MLflow tracking server unreachable ({reason})", "start `mlflow server` or fix --tracking-uri"
            ) from None
    elif parsed.scheme == "sqlite":
        db = sqlite_path(uri)
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(db.parent, f"cannot create the MLflow database folder ({exc.strerror})") from None


def configure(uri: str, experiment: str) -> str:
    """Check ``uri`` (:func:`check_tracking_uri`), then :func:`use_experiment`; return the experiment's id."""
    check_tracking_uri(uri)
    return use_experiment(uri, experiment)


def use_experiment(uri: str, experiment: str) -> str:
    """Point MLflow at an already checked ``uri`` and make sure ``experiment`` exists; return its id.

    With a sqlite store the experiment's artifacts go next to the database (``mlartifacts/``), not into the
    current directory.
    """
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (sqlite_path(uri).resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(experiment, artifact_location=location)


PREVIEW_KEY = "preview/validation"
"""Image key of the validation previews: the ``preview/`` prefix gives them their own section, first on the run's
Model metrics tab, with a step slider over the epochs."""
UI_PORT = 5000
"""Where ``mlflow ui`` serves by default."""
ML_VIEW_QUERY = "workflowType=machine_learning"
"""MLflow 3's UI opens in its GenAI view unless the URL (or the browser's last choice) asks for the classic one."""


def log_preview(image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray, step: int,
                key: str = PREVIEW_KEY) -> None:
    """Log the :func:`preview_strip` as entry ``step`` of the run's image series ``key``.

    The series is what the run page draws: a card with a step slider on the Model metrics tab (stored under
    ``images/`` in the run's artifacts).
    """
    mlflow.log_image(preview_strip(image, truth, pred), key=key, step=step)


def run_page_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's Model metrics tab (curves and preview images) in MLflow's classic "Model training" view.

    For an http(s) server, on that server; for a local store (sqlite file), where :func:`ui_command` serves it.
    """
    base = tracking_uri.rstrip("/") if _is_server(tracking_uri) else f"http://127.0.0.1:{UI_PORT}"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{ML_VIEW_QUERY}"


def ui_command(tracking_uri: str) -> str | None:
    """The ``mlflow ui`` command that serves a local store on :data:`UI_PORT`; None for an http(s) server.

    A relative sqlite path is made absolute so that the command works from any folder.
    """
    if _is_server(tracking_uri):
        return None
    store = tracking_uri
    if tracking_uri.startswith("sqlite:///"):
        store = f"sqlite:///{sqlite_path(tracking_uri).resolve()}"
    here = Path(sys.executable).parent / "mlflow"
    exe = "mlflow"
    if here.exists():
        exe = os.path.relpath(here) if here.is_relative_to(Path.cwd()) else str(here)
    return f"{exe} ui --backend-store-uri {store} --port {UI_PORT}"


def browse_hint(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where a person sees the run: its :func:`run_page_url`, after the :func:`ui_command` for a local store."""
    url = run_page_url(tracking_uri, experiment_id, run_id)
    command = ui_command(tracking_uri)
    return url if command is None else f"{command}  then open {url}"


def _is_server(tracking_uri: str) -> bool:
    return urlparse(tracking_uri).scheme in ("http", "https")


def register(
    name: str,
    run_id: str,
    artifact_uri: str,
    val_dice: float,
    val_set: str,
    evaluate_champion: Callable[[Path], float] | None = None,
    model_config: dict[str, Any] | None = None,
    task: TaskSignature | None = None,
) -> dict[str, Any]:
    """Register the run's model folder as a new version and apply the promotion gate.

    The alias ``champion`` moves to the new version only if its validation Dice beats the champion's on the
    same validation set: the champion's stored figure when its ``val_set`` tag matches, else
    ``evaluate_champion(champion_dir)`` (its Dice measured now on this set). Only models of the same task are
    compared: a champion of other channels, classes, class names or spatial dims (``task``, else what
    ``model_config`` says) keeps its alias. Otherwise the new version becomes ``challenger``. The version's
    ``gate`` tag says why; its task is in its tags (:meth:`TaskSignature.tags`). Training refuses such a
    registration before it starts (:func:`check_same_task`).

    Returns:
        ``{"version", "alias", "champion_dice", "gate"}``.
    """
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="UNet segmentation model (weights-only + config.json)")
    task_tags = task.tags() if task is not None else _task_tags(model_config)
    version = client.create_model_version(
        name, source=artifact_uri, run_id=run_id,
        tags={"val_dice": f"{val_dice:.6f}", "val_set": val_set, **task_tags},
    )
    champion_dice, gate = _champion_dice(client, name, val_set, task_tags, evaluate_champion)
    wins = gate is None and (champion_dice is None or val_dice > champion_dice)
    if gate is None:
        verdict = "beats" if wins else "does not beat"
        gate = ("first model under this name" if champion_dice is None else
                f"val Dice {val_dice:.4f} {verdict} the champion's {champion_dice:.4f} on the same validation set")
    alias = CHAMPION if wins else CHALLENGER
    client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, "gate", gate)
    return {"version": int(version.version), "alias": alias, "champion_dice": champion_dice, "gate": gate}


def _task_tags(model_config: dict[str, Any] | None) -> dict[str, str]:
    """The model's task as version tags: what another model must share to be compared with it."""
    if not model_config:
        return {}
    return {"num_classes": str(model_config["num_classes"]), "in_channels": str(model_config["in_channels"])}


def _champion_dice(
    client: MlflowClient,
    name: str,
    val_set: str,
    task: dict[str, str],
    evaluate: Callable[[Path], float] | None,
) -> tuple[float | None, str | None]:
    """The champion's validation Dice on ``val_set`` (None: no champion), and a gate reason if not comparable."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    for key, value in task.items():
        if key in TaskSignature.COMPARED and champion.tags.get(key, value) != value:
            return float("nan"), (f"not comparable: the champion (v{champion.version}) has {key}="
                                  f"{champion.tags[key]}, this model {value}; promote it by hand if intended")
    if champion.tags.get("val_set") == val_set and "val_dice" in champion.tags:
        return float(champion.tags["val_dice"]), None
    if evaluate is None:
        return float(champion.tags.get("val_dice", "nan")), None
    return float(evaluate(download_model(f"models:/{name}@{CHAMPION}"))), None


def check_same_task(tracking_uri: str, name: str, task: TaskSignature, own_name: str) -> None:
    """Refuse, before any training, a model of ``task`` under ``name`` when ``name``'s champion has another task.

    Models of different tasks are never compared, so the new one could never become champion there; the fix
    names a registered model of its own (``own_name``). Nothing is created: no database, no model.

    Raises:
        ConfigError: on ``registered_model``, naming both tasks and the fix.
    """
    if tracking_uri.startswith("sqlite:") and not sqlite_path(tracking_uri).exists():
        return
    try:
        champion = MlflowClient(tracking_uri).get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return
    if task.differences(champion.tags):
        theirs = TaskSignature.from_tags(champion.tags)
        raise ConfigError("registered_model", f"the champion of '{name}' (v{champion.version}) is {theirs.describe()}, "
                                              f"this model {task.describe()}: models of different tasks are never "
                                              f"compared; register it under its own name: --registered-model "
                                              f"{own_name}")


def code_version_tags() -> dict[str, str]:
    """Which code trained the model: the package version and, in a git checkout, the commit (``-dirty`` if edited)."""
    try:
        version = importlib.metadata.version("unet-pipeline")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    tags = {"package_version": version, "code_version": version}
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return tags
    if commit.returncode == 0 and commit.stdout.strip():
        sha = commit.stdout.strip()
        tags["git_commit"] = sha
        tags["code_version"] = sha[:12] + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    return tags


REGISTRY_PREFIXES = ("models:/", "runs:/")
_UNRESOLVED_HINT = "train a model first or check the name/alias"


def _local_model(uri: str) -> Path:
    local = Path(uri)
    if not (local / "config.json").exists():
        raise InputError(uri, "no model here (config.json missing)", "give a model folder or models:/name@alias")
    return local


def _unresolved(uri: str, exc: Exception) -> InputError:
    return InputError(uri, f"model URI does not resolve ({str(exc).splitlines()[0][:160]})", _UNRESOLVED_HINT)


def _registered_version(client: MlflowClient, uri: str) -> tuple[Any, str, str | None]:
    """(model version, name, alias or None) of ``models:/name@alias`` or ``models:/name/version``.

    Raises:
        InputError: not such a URI, or no such model, alias or version.
    """
    ref = uri[len("models:/"):]
    if "@" in ref:
        name, alias = ref.split("@", 1)
    elif "/" in ref:
        (name, version), alias = ref.rsplit("/", 1), None
    else:
        raise InputError(uri, "not a model URI", "use models:/name@alias or models:/name/version")
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise _unresolved(uri, exc) from None
    return mv, name, alias


def _fetch(uri: str, source: str, dst: Path | None, tracking_uri: str | None) -> Path:
    """Download the model folder at ``source`` (into ``dst`` if given); return the folder holding config.json."""
    try:
        if dst is not None:
            os.makedirs(dst, exist_ok=True)
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst) if dst else None,
                                                        tracking_uri=tracking_uri))
    except MlflowException as exc:
        raise _unresolved(uri, exc) from None
    if not (path / "config.json").exists():
        raise InputError(uri, "resolved artifact holds no config.json", "register models logged by `unet train`")
    return path


def download_model(uri: str, tracking_uri: str | None = None, dst: Path | None = None) -> Path:
    """Resolve a model URI to a local folder holding ``weights.pt`` and ``config.json``.

    Accepts ``models:/name@alias``, ``models:/name/version``, ``runs:/id/path`` and local folders. A run that
    uses one model throughout should call :func:`pin_model` instead (resolved once, downloaded once).

    Raises:
        InputError: the URI does not resolve (no such model, alias, version or folder).
    """
    if is_local(uri):
        return _local_model(uri)
    if tracking_uri:
        check_tracking_uri(tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
    source = _registered_version(MlflowClient(), uri)[0].source if uri.startswith("models:/") else uri
    return _fetch(uri, source, dst, tracking_uri)


def _cached_download(uri: str, source: str, dst: Path, tracking_uri: str) -> Path:
    """``dst`` holding the model at ``source``: downloaded once, beside it, then renamed into place whole."""
    if is_complete(dst):
        return dst
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    except OSError as exc:
        raise InputError(dst.parent, f"cannot write here ({os_error_reason(exc)})",
                         "choose another output folder or fix its permissions") from None
    try:
        got = _fetch(uri, source, tmp, tracking_uri)
        shutil.rmtree(dst, ignore_errors=True)  # an incomplete copy left by an interrupted run
        try:
            os.replace(got, dst)
        except OSError:
            if not is_complete(dst):  # else another run renamed the same version into place first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def pin_model(uri: str, tracking_uri: str, cache: Path) -> PinnedModel:
    """Resolve a model URI once for a whole run: an alias to its version, the version to a local folder.

    The tracking URI is checked once; a registry or remote model is downloaded once into ``cache`` and re-used
    from there by later runs. A local folder is used where it is.

    Args:
        uri: ``models:/name@alias``, ``models:/name/version``, ``runs:/id/path``, another artifact URI, or a folder.
        tracking_uri: the MLflow tracking store that knows the registry.
        cache: folder for downloaded models (one sub-folder per source).

    Raises:
        InputError: the URI does not resolve (no MLflow database, no such model, alias, version or folder) or
            the cache cannot be written; ServiceError: the tracking server does not answer.
    """
    if is_local(uri):
        return PinnedModel(uri=uri, directory=_local_model(uri))
    registry = uri.startswith(REGISTRY_PREFIXES)
    if registry and tracking_uri.startswith("sqlite:") and not sqlite_path(tracking_uri).exists():
        raise InputError(uri, f"model URI does not resolve (no MLflow database at {tracking_uri})",
                         "train a model first or fix --tracking-uri")  # checked first: no empty database is made
    check_tracking_uri(tracking_uri)
    name = alias = version = run_id = None
    pinned, source = uri, uri
    if uri.startswith("models:/"):
        mv, name, alias = _registered_version(MlflowClient(tracking_uri), uri)
        version, run_id, source = int(mv.version), mv.run_id or None, mv.source
        pinned = f"models:/{name}/{version}"
    elif uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].split("/", 1)[0] or None
    directory = _cached_download(uri, source, Path(cache) / cache_name(name, version, source), tracking_uri)
    return PinnedModel(uri=pinned, directory=directory, name=name, alias=alias, version=version, run_id=run_id,
                       source=source)


def log_export(tracking_uri: str, run_id: str, files: list[Path], folder: str, name: str | None,
               version: int | None, fmt: str) -> str:
    """Log an exported model's ``files`` to the run ``run_id`` under ``folder``; tag the model version with it.

    Returns:
        The artifact folder as ``runs:/<run_id>/<folder>`` (the version's ``export.<fmt>`` tag holds the same).

    Raises:
        ServiceError: the tracking store or its artifact store refused the upload.
    """
    client = MlflowClient(tracking_uri)
    location = f"runs:/{run_id}/{folder}"
    try:
        for path in files:
            client.log_artifact(run_id, str(path), folder)
        if name is not None and version is not None:
            client.set_model_version_tag(name, str(version), f"export.{fmt}", location)
    except (MlflowException, OSError) as exc:
        raise ServiceError(tracking_uri, f"logging the export to run {run_id} failed ({str(exc).splitlines()[0][:160]})",
                           "the exported files are written; re-run with --overwrite to log them") from None
    return location
