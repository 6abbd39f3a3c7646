"""A resolved model (:class:`PinnedModel`) and its cheap path: a model already in the output's cache, found in a
local sqlite registry without importing MLflow.

Importing MLflow and opening its SQLAlchemy store costs seconds (≈ 5 s of an 8 s ``unet predict`` start on 2
cores); a run that predicts again with the same registered version needs neither. :func:`pin_cached` reads the
two registry rows it needs (alias → version, version → source) from the sqlite file, read-only, and returns the
pinned model when that exact version is complete in the cache, or copies it there first when its source is a local
``file://`` folder (the default store: ``mlartifacts/`` beside the database; MLflow's download is such a copy);
anything else (another store, a version not yet
downloaded, a schema it does not know) returns None and :func:`unetcore.tracking.mlflow.pin_model` resolves it
through MLflow as before.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

__all__ = ["PinnedModel", "cache_name", "is_complete", "is_local", "pin_cached", "sqlite_path"]


@dataclass(frozen=True)
class PinnedModel:
    """A model URI resolved once for a whole run: the version it means now, and the local folder of that version.

    Attributes:
        uri: ``models:/<name>/<version>`` for a registry URI (an alias is pinned to its version), else as given.
        directory: the local folder holding ``config.json`` and ``weights.pt``.
        name, alias, version, run_id: the registered model's facts (None where the URI has none).
        source: where the weights were downloaded from (None for a local folder).
    """

    uri: str
    directory: Path
    name: str | None = None
    alias: str | None = None
    version: int | None = None
    run_id: str | None = None
    source: str | None = None


def is_local(uri: str) -> bool:
    """Whether ``uri`` is a plain folder path (no scheme)."""
    return "://" not in uri and ":/" not in uri


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a whole model (``config.json`` and ``weights.pt``)."""
    return (folder / "config.json").is_file() and (folder / "weights.pt").is_file()


def cache_name(name: str | None, version: int | None, source: str) -> str:
    """A cache folder per source (a re-registered version with another source never reuses the old weights)."""
    key = hashlib.blake2b(source.encode(), digest_size=8).hexdigest()
    return f"{name}-v{version}-{key}" if name else key


def sqlite_path(uri: str) -> Path:
    """The file of a ``sqlite:///relative`` or ``sqlite:////absolute`` URI."""
    return Path(re.sub(r"^sqlite:///", "", uri))


def _registry_row(db: Path, name: str, alias: str | None, version: str | None) -> tuple[int, str, str | None] | None:
    """(version, source, run_id) of a live, ready model version in MLflow's sqlite registry; None if not there."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return None
    try:
        with con:
            if alias is not None:
                row = con.execute("SELECT version FROM registered_model_aliases WHERE workspace = 'default' AND "
                                  "name = ? AND alias = ?", (name, alias)).fetchone()
                if row is None:
                    return None
                version = str(row[0])
            row = con.execute("SELECT version, source, run_id FROM model_versions WHERE workspace = 'default' AND "
                              "name = ? AND version = ? AND status = 'READY' AND current_stage != 'Deleted_Internal'",
                              (name, int(str(version)))).fetchone()
    except (sqlite3.Error, ValueError):
        return None  # another schema, a busy file, a non-numeric version: MLflow itself decides
    finally:
        con.close()
    return None if row is None or not row[1] else (int(row[0]), str(row[1]), row[2] or None)


def _copy_local_source(source: str, dst: Path) -> bool:
    """Copy a complete model folder at a ``file://`` ``source`` to ``dst`` (beside it, then renamed into place
    whole, as ``pin_model`` does); False when the source is not such a folder or the copy fails."""
    parsed = urlparse(source)
    folder = Path(unquote(parsed.path))
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not is_complete(folder):
        return False
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    except OSError:
        return False
    try:
        shutil.copytree(folder, tmp / "model")
        shutil.rmtree(dst, ignore_errors=True)  # an incomplete copy left by an interrupted run
        os.replace(tmp / "model", dst)
    except OSError:
        return is_complete(dst)  # another run may have renamed the same version into place first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def pin_cached(uri: str, tracking_uri: str, cache: Path) -> PinnedModel | None:
    """The pinned model of ``uri`` without MLflow: a local folder as it is, or a ``models:/`` version of a local
    sqlite registry, complete in ``cache`` or copied there from a local ``file://`` source; None otherwise (then
    resolve it with ``pin_model``, which also gives the errors)."""
    if is_local(uri):
        return PinnedModel(uri=uri, directory=Path(uri)) if is_complete(Path(uri)) else None
    if not uri.startswith("models:/") or not tracking_uri.startswith("sqlite:"):
        return None
    db = sqlite_path(tracking_uri)
    ref = uri[len("models:/"):]
    if "@" in ref:
        (name, alias), version = ref.split("@", 1), None
    elif "/" in ref:
        (name, version), alias = ref.rsplit("/", 1), None
    else:
        return None
    row = _registry_row(db, name, alias, version) if db.is_file() else None
    if row is None:
        return None
    number, source, run_id = row
    directory = Path(cache) / cache_name(name, number, source)
    if not is_complete(directory) and not _copy_local_source(source, directory):
        return None
    return PinnedModel(uri=f"models:/{name}/{number}", directory=directory, name=name, alias=alias, version=number,
                       run_id=run_id, source=source)
