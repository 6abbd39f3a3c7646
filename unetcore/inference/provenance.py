"""Where a prediction came from, in one record that the store and every export carry.

:func:`prediction_provenance` builds it once per image when the output is created: the model (URI, name,
version, alias, MLflow run id, weights hash), the code (package version, git commit when the code is a git
checkout), the input (id and the manifest's ``source_hash``) and every option that changes the result. The
store keeps it in ``attributes.unet.provenance``; each export embeds :func:`provenance_json` of the stored record
(PNG text chunk, TIFF ImageDescription or ImageJ Info, NIfTI comment extension, GeoJSON top-level properties), so a
mask found on its own still names what made it. ``unet predict`` prints :func:`provenance_lines`.
"""

from __future__ import annotations

import functools
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zarr

from unetcore.config import InferConfig
from unetcore.inference.plan import SIGNATURE_OPTIONS
from unetcore.inference.runtime import job_runtime
from unetcore.store import omezarr

if TYPE_CHECKING:
    from unetcore.tracking.mlflow import PinnedModel

PACKAGE = "unet-pipeline"
"""The distribution name of this code (``pyproject.toml``)."""

RESULT_OPTIONS = (*SIGNATURE_OPTIONS, "device", "runtime")
"""The inference options recorded: those that shape the prediction, and the device and runtime that ran it."""


def _git(args: list[str], where: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=5,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(folder: Path) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout whose top folder is ``folder``; ``(None, None)`` when it is not one
    (no git, not a repository, or ``folder`` only lies inside some other repository)."""
    folder = Path(folder).resolve()
    top = _git(["rev-parse", "--show-toplevel"], folder)
    if top is None or Path(top).resolve() != folder:
        return None, None
    commit = _git(["rev-parse", "HEAD"], folder)
    status = _git(["status", "--porcelain", "--untracked-files=no"], folder)
    return commit, None if status is None or commit is None else bool(status)


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """``{"package", "version", "git_commit", "git_dirty"}`` of the running code.

    The commit is that of the git checkout holding this package (None when the code is not one: an installed
    wheel, a copied folder, no git); ``git_dirty`` says tracked files differ from it.
    """
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = None
    commit, dirty = git_commit(Path(__file__).resolve().parents[2])  # the folder holding unetcore/
    return {"package": PACKAGE, "version": version, "git_commit": commit, "git_dirty": dirty}


def _device_used(cfg: InferConfig) -> str | None:
    """The device ``cfg.device`` means on this machine (None with a remote scheduler: its workers decide)."""
    if cfg.scheduler_address:
        return None
    from unetcore.devices import device_type

    return device_type(cfg.device)


def prediction_provenance(cfg: InferConfig, model: PinnedModel, entry: dict[str, Any], weights_hash: str,
                          signature: str, resampling: dict[str, Any] | None = None,
                          runtime_used: str | None = None) -> dict[str, Any]:
    """The provenance record of one image's prediction (JSON-able; no clock time, so a re-run writes the same).

    ``resampling`` is the plan's resampling to the model's grid (None: predicted on the image's own grid);
    ``runtime_used`` the runtime that runs it (None: :func:`~unetcore.inference.runtime.job_runtime`'s choice).
    """
    used = _device_used(cfg)
    options = {k: getattr(cfg, k) for k in RESULT_OPTIONS}
    options["device_used"] = used
    options["compute_dtype"] = None if used is None else "bfloat16 autocast" if used == "cuda" else "float32"
    options["runtime_used"] = runtime_used or job_runtime(cfg)
    options["resampling"] = resampling
    return {
        "model": {"uri": model.uri, "name": model.name, "version": model.version, "alias": model.alias,
                  "run_id": model.run_id, "weights_hash": weights_hash},
        "code": code_version(),
        "input": {"id": entry["id"], "source_hash": entry.get("source_hash")},
        "options": options,
        "signature": signature,
    }


def stored_provenance(root: zarr.Group) -> dict[str, Any] | None:
    """The provenance a prediction store keeps (None for one written before provenance was recorded)."""
    return omezarr.unet_attrs(root).get("provenance")


def provenance_json(provenance: dict[str, Any] | None) -> str | None:
    """The one text every export embeds: compact, key-sorted JSON of the record (None stays None)."""
    if provenance is None:
        return None
    return json.dumps(provenance, sort_keys=True, separators=(",", ":"))


def software_name(provenance: dict[str, Any] | None = None) -> str:
    """``unet-pipeline 0.1.0 (git abc1234)``: the writing software, for a file's Software tag."""
    code = (provenance or {}).get("code") or code_version()
    commit = f" (git {code['git_commit'][:12]}{'+dirty' if code.get('git_dirty') else ''})" if code.get(
        "git_commit") else ""
    return f"{code['package']} {code.get('version') or 'unknown'}{commit}"


def provenance_lines(provenance: dict[str, Any]) -> list[str]:
    """A short human block: model, code, options (the input's hash is printed with each image)."""
    m, o = provenance["model"], provenance["options"]
    model = m["uri"] + (f" (version {m['version']}" + (f", alias {m['alias']}" if m.get("alias") else "") + ")"
                        if m.get("version") is not None else "")
    run = f", MLflow run {m['run_id']}" if m.get("run_id") else ""
    device = o["device"] + (f" -> {o['device_used']} {o['compute_dtype']}" if o.get("device_used") else "")
    if o.get("runtime_used"):
        device += f", runtime {o.get('runtime', 'auto')} -> {o['runtime_used']}"
    shown = ", ".join(f"{k} {v}" for k, v in o.items()
                      if k not in ("device", "device_used", "compute_dtype", "resampling", "runtime", "runtime_used"))
    if o.get("resampling"):
        shown += ", resampled to the model's grid"
    return [f"model: {model}{run}, weights {m['weights_hash'][:12]}",
            f"code: {software_name(provenance)}",
            f"options: {shown}, device {device}"]
