"""Nightly inference of new images only: ingest what is new or changed, predict it with the current champion.

One night is three steps, each usable on its own (the ``nightly`` Prefect flow wraps each in a task):

1. :func:`ingest_new` looks at an inbox (a folder or a glob), ingests images that are new or whose content changed
   since they were last ingested (size + mtime first, content hash when those differ) into the nightly dataset;
2. :func:`resolve_model` pins ``models:/<name>@<alias>`` to one registered version for the whole night;
3. :func:`predict_new` predicts the images not yet predicted from their current content by that version.

What was predicted, from which content, by which model version, is kept in ``<output>/nightly_state.json``
(image id -> ``{source_hash, model_name, model_version, ...}``), rewritten atomically after every image, so a
crash loses at most the image in flight and running the night twice does nothing the second time. A file that
cannot be ingested or predicted is reported and the others carry on; as it is not recorded in the state, the next
night tries it again.
"""

from __future__ import annotations

import glob
import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from unetcore import progress as progress_bus
from unetcore.atomic import atomic_write_json
from unetcore.config import NightlyConfig
from unetcore.errors import InputError
from unetcore.store import manifest as mf

STATE = "nightly_state.json"
STATE_VERSION = 1
INGEST_STAGE = "nightly ingest"
PREDICT_STAGE = "nightly predict"
_GLOB_CHARS = frozenset("*?[")
Status = Literal["ok", "partial", "failed", "nothing-new"]


@dataclass(frozen=True)
class ModelRef:
    """One registered model version, pinned for the whole night."""

    name: str
    alias: str
    version: int
    run_id: str
    source: str

    @property
    def uri(self) -> str:
        """The version's own URI (``models:/<name>/<version>``), unaffected by later alias moves."""
        return f"models:/{self.name}/{self.version}"


@dataclass
class IngestOutcome:
    """What :func:`ingest_new` found in the inbox: ids ingested, ids unchanged, files that failed."""

    ingested: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- the inbox


def _is_candidate(path: Path) -> bool:
    """A visible file (or ``.zarr`` folder) with a supported suffix."""
    from unetcore.io.readers import SUPPORTED_SUFFIXES

    suffix = path.suffix.lower()
    if path.name.startswith(".") or suffix not in SUPPORTED_SUFFIXES:
        return False
    return path.is_dir() if suffix == ".zarr" else path.is_file()


def list_inputs(location: str) -> list[Path]:
    """The supported images of a folder (not recursive) or of a glob (``**`` recurses), sorted by path.

    An empty inbox is a normal night and gives ``[]``.

    Raises:
        InputError: ``location`` is not a glob and not an existing folder.
    """
    if _GLOB_CHARS & set(location):
        matches = (Path(p) for p in glob.glob(location, recursive=True))
    else:
        folder = Path(location)
        if not folder.is_dir():
            reason = "is not a folder" if folder.exists() else "inbox folder does not exist"
            raise InputError(folder, reason, "create it or set `images` to a folder or glob of images")
        matches = folder.iterdir()
    return sorted(p for p in matches if _is_candidate(p))


def _fingerprint(path: Path | None) -> list[int] | None:
    if path is None:
        return None
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def is_current(entry: dict[str, Any] | None, image: Path, mask: Path | None, dataset: Path) -> bool:
    """True when ``dataset`` already holds this exact image and mask: same size+mtime, else same content hash."""
    if entry is None or not mf.store_path(dataset, entry["id"]).exists():
        return False
    if (entry.get("mask") is None) != (mask is None):
        return False
    if entry.get("source_fingerprint") == _fingerprint(image) and entry.get("mask_fingerprint") == _fingerprint(mask):
        return True
    same_mask = mask is None or entry.get("mask_hash") == mf.file_hash(mask)
    return same_mask and entry.get("source_hash") == mf.file_hash(image)


def _one_line(exc: BaseException) -> str:
    """An exception as one short line (our errors already are; others get their type name)."""
    from unetcore.errors import UnetError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text[:300] if isinstance(exc, UnetError) else f"{type(exc).__name__}: {text[:300]}"


def ingest_new(cfg: NightlyConfig) -> IngestOutcome:
    """Ingest the inbox's new and changed images into ``cfg.dataset``; unchanged ones are only listed.

    Two inbox files with the same image id (same stem in different folders of a glob) are refused, not mixed up.

    Raises:
        InputError: the inbox or the mask folder does not exist.
    """
    from unetcore.ingest import ingest_image
    from unetcore.io.readers import find_mask

    start = time.perf_counter()
    files = list_inputs(cfg.images)
    masks_dir = Path(cfg.masks) if cfg.masks else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise InputError(masks_dir, "mask folder does not exist", "fix `masks` or leave it empty")
    dataset = Path(cfg.dataset)
    dataset.mkdir(parents=True, exist_ok=True)
    known = mf.load(dataset)["images"]
    ingest_cfg = cfg.ingest_config()
    outcome = IngestOutcome()
    seen: dict[str, Path] = {}
    for index, path in enumerate(files):
        progress_bus.report(INGEST_STAGE, index, len(files))
        image_id = mf.image_id(path)
        if image_id in seen:
            outcome.failed.append({"id": image_id, "file": str(path),
                                   "error": f"same image id '{image_id}' as {seen[image_id]}; rename one of them"})
            continue
        seen[image_id] = path
        try:
            mask = find_mask(masks_dir, path) if masks_dir else None
            if is_current(known.get(image_id), path, mask, dataset):
                outcome.unchanged.append(image_id)
                continue
            entry = ingest_image(path, mask, dataset, ingest_cfg, entry_id=image_id)
        except Exception as exc:  # one bad file must not cost the night: report it, try it again tomorrow
            outcome.failed.append({"id": image_id, "file": str(path), "error": _one_line(exc)})
            continue
        old = known.get(image_id)
        entry["split"] = old["split"] if old else mf.split_for(entry["source_hash"], 0.0, 0.0)
        mf.put_entry(dataset, entry)
        outcome.ingested.append(image_id)
    progress_bus.report(INGEST_STAGE, len(files), len(files))
    outcome.seconds = round(time.perf_counter() - start, 3)
    return outcome


# ---------------------------------------------------------------- the model


def resolve_model(name: str, alias: str, tracking_uri: str) -> ModelRef:
    """Pin ``models:/<name>@<alias>`` to the version it points at now.

    Raises:
        ServiceError: the tracking server does not answer.
        InputError: no such registered model or alias.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from unetcore.tracking.mlflow import check_tracking_uri

    check_tracking_uri(tracking_uri)
    try:
        version = MlflowClient(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise InputError(f"models:/{name}@{alias}", f"does not resolve ({str(exc).splitlines()[0][:160]})",
                         "train and register a model first, or fix model_name / alias") from None
    return ModelRef(name=name, alias=alias, version=int(version.version), run_id=version.run_id or "",
                    source=version.source)


def _model_folder(ref: ModelRef, tracking_uri: str, cache: Path) -> Path:
    """Download the version's weights once; later nights reuse the folder (keyed by the version's source)."""
    from unetcore.tracking.mlflow import download_model

    key = hashlib.blake2b(ref.source.encode(), digest_size=6).hexdigest()
    dst = cache / f"{ref.name}-v{ref.version}-{key}"
    if (dst / "config.json").exists() and (dst / "weights.pt").exists():
        return dst
    return download_model(ref.uri, tracking_uri, dst=dst)


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


def is_done(record: dict[str, Any] | None, entry: dict[str, Any], model: ModelRef, output: Path,
            repredict_on_new_champion: bool) -> bool:
    """True when ``entry``'s current content was already predicted (by this model version, when asked)."""
    if record is None or record.get("source_hash") != entry["source_hash"]:
        return False
    if not (Path(output) / f"{entry['id']}.ome.zarr").exists():
        return False
    if record.get("model_name") != model.name:
        return False
    return record.get("model_version") == model.version or not repredict_on_new_champion


def select_todo(dataset: Path, output: Path, model: ModelRef,
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


def predict_new(cfg: NightlyConfig, model: ModelRef, todo: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Predict ``todo`` with ``model`` on Dask, one image at a time; record each success in the state.

    Returns one row per image: ``status`` "predicted" (with pixels, seconds, MP/s, Dice where ground truth
    exists, output) or "failed" (with the error). Only the set-up (model download, Dask cluster) can raise.
    """
    from unetcore.inference.engine import dask_client, predict_image

    if not todo:
        return []
    output, dataset = Path(cfg.output), Path(cfg.dataset)
    output.mkdir(parents=True, exist_ok=True)
    infer_cfg = cfg.infer_config(model.uri, [e["id"] for e in todo])
    model_dir = _model_folder(model, cfg.tracking_uri, output / ".models")
    rows: list[dict[str, Any]] = []
    progress_bus.report(PREDICT_STAGE, 0, len(todo))
    with dask_client(cfg.scheduler_address, n_workers=cfg.n_workers, threads_per_worker=infer_cfg.threads_per_worker,
                     device=cfg.device) as client:
        for index, entry in enumerate(todo):
            base = {"id": entry["id"], "model_version": model.version}
            try:
                result = predict_image(entry, dataset, infer_cfg, client, model_dir, model.uri)
            except Exception as exc:  # one bad image must not cost the night: report it, try it again tomorrow
                rows.append({**base, "status": "failed", "error": _one_line(exc)})
            else:
                _record(output, entry, model, result.dice)
                rows.append({**base, "status": "predicted", "pixels": result.pixels, "seconds": result.seconds,
                             "megapixels_per_s": result.megapixels_per_s, "dice": _nan_to_none(result.dice),
                             "blocks": result.blocks, "output": result.output, "export": result.export})
            progress_bus.report(PREDICT_STAGE, index + 1, len(todo))
    return rows


def _record(output: Path, entry: dict[str, Any], model: ModelRef, dice: float | None) -> None:
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


def night_report(ingest: IngestOutcome, model: ModelRef, rows: list[dict[str, Any]], skipped: list[str],
                 seconds: float) -> dict[str, Any]:
    """The night as plain JSON: ``{status, model, ingest, images, skipped, seconds}``."""
    return {"status": night_status(ingest, rows), "model": {**asdict(model), "uri": model.uri},
            "ingest": ingest.to_dict(), "images": rows, "skipped": skipped, "seconds": round(seconds, 3)}


def run_nightly(cfg: NightlyConfig) -> dict[str, Any]:
    """One night without Prefect: ingest new images, pin the model, predict what is not done yet.

    Returns ``{status, model, ingest, images, skipped, seconds}`` (``images``: one row per processed image).

    Raises:
        InputError: the inbox, masks or model cannot be used; ServiceError: a server does not answer.
    """
    start = time.perf_counter()
    ingest = ingest_new(cfg)
    model = resolve_model(cfg.model_name, cfg.alias, cfg.tracking_uri)
    todo, skipped = select_todo(Path(cfg.dataset), Path(cfg.output), model, cfg.repredict_on_new_champion)
    rows = predict_new(cfg, model, todo)
    return night_report(ingest, model, rows, skipped, time.perf_counter() - start)
