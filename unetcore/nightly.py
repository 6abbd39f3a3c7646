"""Nightly inference of new images only: ingest what is new or changed, predict it with the current champion.

One night is three steps, each usable on its own (the ``nightly`` Prefect flow wraps each in a task):

1. :func:`ingest_new` asks ingestion's own front door (:func:`unetcore.ingest.ingest_folder`) to ingest the inbox (a
   folder or a glob) into the nightly dataset: new images, images whose content changed (size + mtime first, content
   hash when those differ) and images ingested with other options are (re-)ingested, the rest left alone;
2. :func:`resolve_model` pins ``models:/<name>@<alias>`` to one registered version for the whole night
   (:func:`unetcore.tracking.pin_model`, as ``unet predict`` does);
3. :func:`predict_new` predicts the images not yet predicted from their current content by that version through the
   engine's front door (:func:`unetcore.inference.predict_entries`), which holds the same output lock as
   ``unet predict``.

What was predicted, from which content, by which model version, is kept in ``<output>/nightly_state.json``
(image id -> ``{source_hash, model_name, model_version, ...}``), rewritten atomically after every image, so a
crash loses at most the image in flight and running the night twice does nothing the second time. A file that
cannot be ingested or predicted is reported and the others carry on; as it is not recorded in the state, the next
night tries it again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from unetcore import progress as progress_bus
from unetcore.atomic import atomic_write_json
from unetcore.config import NightlyConfig
from unetcore.errors import InputError
from unetcore.io import readers
from unetcore.locks import LockedError
from unetcore.store import manifest as mf
from unetcore.tracking import PinnedModel, pin_model

STATE = "nightly_state.json"
STATE_VERSION = 1
INGEST_STAGE = "nightly ingest"
PREDICT_STAGE = "nightly predict"
Status = Literal["ok", "partial", "failed", "nothing-new"]


@dataclass
class IngestOutcome:
    """What :func:`ingest_new` found in the inbox: ids ingested, ids unchanged, files that failed."""

    ingested: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- the inbox and the model


def _one_line(exc: BaseException) -> str:
    """An exception as one short line (our errors already are; others get their type name)."""
    from unetcore.errors import UnetError, first_line

    text = first_line(exc, 300) if str(exc).strip() else ""
    return text if isinstance(exc, UnetError) else f"{type(exc).__name__}: {text}"


def ingest_new(cfg: NightlyConfig) -> IngestOutcome:
    """Ingest the inbox's new and changed images into ``cfg.dataset`` with ingestion's own change test.

    An empty inbox is a normal night. Two inbox files with the same image id are refused, not mixed up.

    Raises:
        InputError: the inbox or the mask folder does not exist.
    """
    from unetcore.ingest import ingest_folder

    inbox = Path(cfg.images)
    if not readers.GLOB_CHARS & set(cfg.images) and not inbox.exists():
        raise InputError(inbox, "inbox folder does not exist",
                         "create it or set `images` to a folder or glob of images")
    progress_bus.report(INGEST_STAGE, 0, 1)
    report = ingest_folder(cfg.ingest_config(), empty_ok=True)
    progress_bus.report(INGEST_STAGE, 1, 1)
    failed = [{"id": mf.image_id(Path(f["file"])), **f} for f in report.failed]
    return IngestOutcome(ingested=report.added + report.updated, unchanged=report.skipped, failed=failed,
                         seconds=report.seconds)


def resolve_model(name: str, alias: str, tracking_uri: str, cache: Path) -> PinnedModel:
    """Pin ``models:/<name>@<alias>`` to the version it points at now (downloaded once into ``cache``).

    Raises:
        ServiceError: the tracking server does not answer.
        InputError: no such registered model or alias.
    """
    return pin_model(f"models:/{name}@{alias}", tracking_uri, cache)


def model_summary(model: PinnedModel) -> dict[str, Any]:
    """The pinned version as plain JSON (for the report and the state)."""
    return {"name": model.name, "alias": model.alias, "version": model.version, "run_id": model.run_id or "",
            "source": model.source or "", "uri": model.uri}


# ---------------------------------------------------------------- the state


def load_state(output: Path) -> dict[str, Any]:
    """``<output>/nightly_state.json`` (an empty state on the first night).

    Raises:
        InputError: the file exists but is not a nightly state.
    """
    import json

    path = Path(output) / STATE
    if not path.exists():
        return {"version": STATE_VERSION, "images": {}}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable nightly state ({type(exc).__name__})",
                         "delete it to re-predict everything") from None
    if not isinstance(state, dict) or not isinstance(state.get("images"), dict):
        raise InputError(path, "not a nightly state file", "delete it to re-predict everything")
    return state


def save_state(output: Path, state: dict[str, Any]) -> None:
    """Write the state atomically (temporary file + rename)."""
    atomic_write_json(Path(output) / STATE, state)


def is_done(record: dict[str, Any] | None, entry: dict[str, Any], model: PinnedModel, output: Path,
            repredict_on_new_champion: bool) -> bool:
    """True when ``entry``'s current content was already predicted (by this model version, when asked)."""
    if record is None or record.get("source_hash") != entry["source_hash"]:
        return False
    if not (Path(output) / f"{entry['id']}.ome.zarr").exists():
        return False
    if record.get("model_name") != model.name:
        return False
    return record.get("model_version") == model.version or not repredict_on_new_champion


def select_todo(dataset: Path, output: Path, model: PinnedModel,
                repredict_on_new_champion: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """Split the dataset's images into (entries to predict, ids already done)."""
    state = load_state(output)["images"]
    todo, done = [], []
    for entry in mf.entries(mf.load(dataset)):
        if is_done(state.get(entry["id"]), entry, model, output, repredict_on_new_champion):
            done.append(entry["id"])
        else:
            todo.append(entry)
    return todo, done


# ---------------------------------------------------------------- prediction


def _nan_to_none(value: float | None) -> float | None:
    return None if value is None or value != value else round(float(value), 4)


def predict_new(cfg: NightlyConfig, model: PinnedModel, todo: list[mf.ManifestEntry]) -> list[dict[str, Any]]:
    """Predict ``todo`` with ``model`` on one Dask cluster, one image at a time; record each success in the state.

    The images go through :func:`unetcore.inference.predict_entries`, which holds the output lock of
    ``unet predict`` for the whole night.
    Returns one row per image: ``status`` "predicted" (with pixels, seconds, MP/s, Dice where ground truth
    exists, output) or "failed" (with the error). Only the set-up (the Dask cluster, the lock) can raise.
    """
    from unetcore.cluster import dask_cluster
    from unetcore.inference import predict_entries

    if not todo:
        return []
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    infer_cfg = cfg.infer_config(model.uri, [e["id"] for e in todo])
    opts = cfg.predict
    rows: list[dict[str, Any]] = []
    progress_bus.report(PREDICT_STAGE, 0, len(todo))
    def failed(entry: mf.ManifestEntry, exc: BaseException) -> None:
        # one bad image must not cost the night: report it, try it again tomorrow
        rows.append({"id": entry["id"], "model_version": model.version, "status": "failed", "error": _one_line(exc)})
        progress_bus.report(PREDICT_STAGE, len(rows), len(todo))

    def predicted(entry: mf.ManifestEntry, result: Any) -> None:
        _record(output, entry, model, result.dice)
        rows.append({"id": entry["id"], "model_version": model.version, "status": "predicted",
                     "pixels": result.pixels, "seconds": result.seconds, "megapixels_per_s": result.megapixels_per_s,
                     "dice": _nan_to_none(result.dice), "blocks": result.blocks, "output": result.output,
                     "export": result.export})
        progress_bus.report(PREDICT_STAGE, len(rows), len(todo))

    try:
        with dask_cluster(opts.scheduler_address, opts.n_workers, opts.threads_per_worker, opts.device) as cluster:
            predict_entries(infer_cfg, todo, model, cluster=cluster, on_error=failed, on_result=predicted)
    except LockedError as exc:  # another run writes there: nothing of tonight's was predicted, all are retried
        for entry in todo:
            failed(entry, exc)
    return rows


def _record(output: Path, entry: dict[str, Any], model: PinnedModel, dice: float | None) -> None:
    """Note in the state that ``entry``'s current content is predicted by ``model`` (atomic rewrite)."""
    state = load_state(output)
    state["images"][entry["id"]] = {
        "source_hash": entry["source_hash"], "model_name": model.name, "model_version": model.version,
        "model_uri": model.uri, "dice": _nan_to_none(dice), "predicted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_state(output, state)


# ---------------------------------------------------------------- one night


def night_status(ingest: IngestOutcome, rows: list[dict[str, Any]]) -> Status:
    """ok: all new work done; partial: some files failed; failed: nothing succeeded; nothing-new: idle night."""
    failures = len(ingest.failed) + sum(r["status"] == "failed" for r in rows)
    successes = sum(r["status"] == "predicted" for r in rows)
    if not failures:
        return "ok" if successes else "nothing-new"
    return "partial" if successes else "failed"


def night_report(ingest: IngestOutcome, model: PinnedModel, rows: list[dict[str, Any]], skipped: list[str],
                 seconds: float) -> dict[str, Any]:
    """The night as plain JSON: ``{status, model, ingest, images, skipped, seconds}``."""
    return {"status": night_status(ingest, rows), "model": model_summary(model),
            "ingest": ingest.to_dict(), "images": rows, "skipped": skipped, "seconds": round(seconds, 3)}


def run_nightly(cfg: NightlyConfig) -> dict[str, Any]:
    """One night without Prefect: ingest new images, pin the model, predict what is not done yet.

    Returns ``{status, model, ingest, images, skipped, seconds}`` (``images``: one row per processed image).

    Raises:
        InputError: the inbox, masks or model cannot be used; ServiceError: a server does not answer.
    """
    start = time.perf_counter()
    ingest = ingest_new(cfg)
    model = resolve_model(cfg.model_name, cfg.alias, cfg.tracking_uri, Path(cfg.output) / ".models")
    todo, skipped = select_todo(Path(cfg.dataset), Path(cfg.output), model, cfg.repredict_on_new_champion)
    rows = predict_new(cfg, model, todo)
    return night_report(ingest, model, rows, skipped, time.perf_counter() - start)
