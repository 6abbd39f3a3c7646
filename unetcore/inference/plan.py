"""The driver's planning: which images, what each prediction is (its signature), and its output store's life.

:func:`plan_image` checks one image against the model and the output folder without writing anything; the
driver then creates the output (:func:`create_output`), the scratch store of the component passes
(:func:`ensure_scratch`), and marks the output complete when every pass and pyramid is written
(:func:`finish_output`).

Images ``(C, H, W)`` and volumes ``(C, D, H, W)`` take the same path. A volume's output has the input's axes
(``c, z, y, x``), voxel spacing, unit and geometry (the source's affine and NIfTI fields, so an export gives them
back), and a pyramid halving the axes the store helper halves for that spacing. Its chunks are
:func:`~unetcore.store.omezarr.chunk_shape` of ``min(chunk, block_size)``: at most ``block_size**2`` voxels,
shaped into a physical cube (:func:`volume_chunk`), so a block (whole chunks, at most ``block_size**2`` voxels) bounds a task's memory
as it does for an image.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from unetcore.config import InferConfig
from unetcore.errors import ConfigError, InputError, OutputExistsError
from unetcore.inference.layout import (
    INSTANCES_NAME,
    LABELS_NAME,
    SCRATCH,
    output_store,
    record_path,
    records_dir,
)
from unetcore.inference.resample import Resampling, resampling_for
from unetcore.inference.windows import Block
from unetcore.model.packaging import read_config
from unetcore.planning import TaskSignature, model_classes
from unetcore.store import manifest as mf
from unetcore.store import omezarr

if TYPE_CHECKING:
    from unetcore.tracking.mlflow import PinnedModel

SIGNATURE_OPTIONS = ("tile", "overlap", "threshold", "tta", "min_object_size", "save_probabilities",
                     "probability_dtype", "skip_empty", "instances", "skip_background")
"""The options that shape a prediction (with the source and the weights, they make its signature)."""


@dataclass
class ImagePlan:
    """The checked facts about one image's prediction, gathered before anything is written."""

    entry: dict[str, Any]
    src_path: Path
    out_path: Path
    records: Path
    shape: tuple[int, ...]  # (H, W) or (D, H, W)
    classes: int
    chunk: tuple[int, ...]  # the output's chunk shape, one value per spatial axis
    signature: str
    weights: str
    resume: bool
    model_dims: int = 2  # the model's spatial axes (a 2-D model predicts a volume slice by slice)
    geometry: dict[str, Any] | None = None  # a volume's omezarr.geometry, copied into the output; None for images
    resampling: Resampling | None = None  # predicted at the model's spacing, brought back onto the image's grid
    resampling_why: str = ""
    class_names: list[str] | None = None  # the model's task's, when known
    placement: dict[str, Any] | None = None  # the input's level-0 spacing and unit, the output's too
    georef: dict[str, Any] | None = None  # a GeoTIFF's georeferencing (unetcore.io.geotiff), copied into the output

    @property
    def is_volume(self) -> bool:
        """True for a volume (three spatial axes)."""
        return len(self.shape) == 3


def chosen_entries(cfg: InferConfig) -> tuple[Path, list[dict[str, Any]]]:
    """The dataset folder and the manifest entries to predict: one split, or the listed ids of it.

    Raises:
        InputError: the dataset has no manifest, or no image in the split.
        ConfigError: a listed id is not in the split.
    """
    dataset = Path(cfg.dataset)
    manifest = mf.require(dataset)
    chosen = mf.entries(manifest, cfg.split)
    if cfg.images:
        unknown = sorted(set(cfg.images) - {e["id"] for e in chosen})
        if unknown:
            raise ConfigError("images", f"not in the dataset's '{cfg.split}' split: {', '.join(unknown)}")
        chosen = [e for e in chosen if e["id"] in cfg.images]
    if not chosen:
        raise InputError(dataset, f"no images in split '{cfg.split}'", "use --split all")
    return dataset, chosen


def signature(entry: dict[str, Any], model_config: dict[str, Any], weights_hash: str, cfg: InferConfig) -> str:
    """What makes two predictions of one image the same: source, model weights and output-shaping options."""
    payload = {"source": entry["source_hash"], "weights": weights_hash, "model": model_config["model"],
               **{k: getattr(cfg, k) for k in SIGNATURE_OPTIONS}}
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=16).hexdigest()


@functools.lru_cache(maxsize=8)
def _weights_hash(path: str, mtime_ns: int, size: int) -> str:
    return mf.file_hash(Path(path))


def weights_hash(model_dir: Path) -> str:
    """Content hash of a model folder's weights (cached by path, size and modification time)."""
    path = Path(model_dir) / "weights.pt"
    st = path.stat()
    return _weights_hash(str(path.resolve()), st.st_mtime_ns, st.st_size)


def _existing_signature(path: Path) -> str | None:
    try:
        return omezarr.unet_attrs(zarr.open_group(store=str(path), mode="r")).get("signature")
    except Exception:  # not a store, or unreadable: treat as a different result
        return None


def check_model_fits(model: PinnedModel, dataset: Path, entries: list[dict[str, Any]]) -> None:
    """Refuse, before any work, a model of another task than the dataset's: spatial dims (of ``entries``) and
    classes (those the dataset's masks hold, when any image has one). Channels are checked per image by
    :func:`plan_image`.

    Raises:
        ConfigError: on ``model``, one line naming both sides.
    """
    _, config = read_config(model.directory)
    task = TaskSignature.of_model(config)
    dims = sorted({int(e.get("spatial_dims", len(e["shape"]))) for e in entries})
    # a recorded task names the data's dims; an older model only its network's (a 2-D one may slice volumes)
    misfit = [d for d in dims if d != task.spatial_dims] if "task" in config else [d for d in dims
                                                                                  if d < task.spatial_dims]
    if misfit:
        raise ConfigError("model", f"{model.uri} was trained on {task.spatial_dims}-D data ({task.describe()}), "
                                   f"this dataset holds {misfit[0]}-D images: predict with a model trained on such "
                                   "data")
    labelled = [e for e in mf.entries(mf.require(dataset)) if e.get("has_mask")]
    if not labelled:
        return
    classes = sorted({int(c) for e in labelled for c in e.get("classes", [])})
    declared = max(int(e.get("options", {}).get("num_classes", 1)) for e in labelled)
    data_classes = model_classes(classes, declared)
    if data_classes != task.num_classes:
        theirs = "binary" if data_classes == 1 else f"{data_classes} classes"
        raise ConfigError("model", f"{model.uri} was trained for another task ({task.describe()}); the masks of this "
                                   f"dataset hold classes {', '.join(map(str, classes))} ({theirs}): predict with "
                                   "a model trained on this dataset")


def plan_image(entry: dict[str, Any], dataset: Path, cfg: InferConfig, model: PinnedModel) -> ImagePlan:
    """Check one image against the model and the output folder, without writing anything.

    Raises:
        InputError: the image's store is missing or not an OME-Zarr image.
        ConfigError: the model expects another number of channels, or is a 3-D model and the image is 2-D; a
            NIfTI export of an image that is not a volume read from NIfTI or DICOM; a GeoJSON export of a volume.
        OutputExistsError: the output holds a different prediction and ``overwrite`` is off.
    """
    src_path = mf.store_path(dataset, entry["id"])
    root = omezarr.open_root(src_path)
    channels, *spatial = omezarr.image_array(root).shape
    shape = tuple(int(n) for n in spatial)
    _, model_config = read_config(model.directory)  # validated: a tampered config.json is one line, here
    if model_config["model"]["in_channels"] != channels:
        raise ConfigError("model", f"{model.uri} expects {model_config['model']['in_channels']} channels, "
                                   f"image '{entry['id']}' has {channels}")
    model_dims = int(model_config["model"].get("spatial_dims", 2))
    if model_dims > len(shape):
        raise ConfigError("model", f"{model.uri} is a {model_dims}-D model and image '{entry['id']}' is "
                                   f"{len(shape)}-D; predict images with a 2-D model")
    where = omezarr.geometry(root)
    geometry = where if len(shape) == 3 else None
    georef = omezarr.unet_attrs(root).get("georef")
    _check_export(cfg, entry["id"], geometry, georef)
    task = TaskSignature.of_model(model_config)
    place = geometry or where
    resampling, resampling_why = resampling_for(shape, place["spacing"], place.get("unit"), task.spacing, task.unit)
    wh = weights_hash(model.directory)
    sig = signature(entry, model_config, wh, cfg)
    if resampling is not None:  # the model's grid shapes the result too (unchanged signatures without it)
        payload = json.dumps([sig, resampling.to_dict()]).encode()
        sig = hashlib.blake2b(payload, digest_size=16).hexdigest()
    out_path = output_store(Path(cfg.output), entry["id"])
    resume = out_path.exists() and _existing_signature(out_path) == sig
    if out_path.exists() and not resume and not cfg.overwrite:
        raise OutputExistsError(out_path, "already holds a prediction made with other inputs, model or options")
    edge = min(int(entry.get("chunk", 1024)), cfg.block_size)
    chunk = volume_chunk(shape, edge, geometry["spacing"]) if geometry else (edge, edge)
    return ImagePlan(entry=entry, src_path=src_path, out_path=out_path, records=records_dir(Path(cfg.output), entry["id"]),
                     shape=shape, classes=int(model_config["model"]["num_classes"]), chunk=tuple(chunk), signature=sig,
                     weights=wh, resume=resume, model_dims=model_dims, geometry=geometry, resampling=resampling,
                     resampling_why=resampling_why,
                     class_names=list(task.class_names) if task.class_names is not None else None,
                     placement={"spacing": tuple(where["spacing"]), "unit": where.get("unit")}, georef=georef)


def volume_chunk(shape: tuple[int, ...], edge: int, spacing: Sequence[float]) -> tuple[int, ...]:
    """A volume output's chunk: :func:`~unetcore.store.omezarr.chunk_shape` of ``edge``, at most ``edge**2`` voxels.

    ``chunk_shape`` doubles sides and may overshoot its ``edge**2`` target when an axis is clipped to the volume (or
    ``edge`` is not a power of two); the physically longest side is then cut so that one chunk, hence the smallest
    block, stays within the budget of an image's ``(edge, edge)`` chunk.
    """
    chunk = list(omezarr.chunk_shape(shape, edge, spacing))
    if math.prod(chunk) > edge * edge:
        longest = max(range(len(chunk)), key=lambda a: (chunk[a] * float(spacing[a]), -a))
        others = math.prod(chunk) // chunk[longest]
        chunk[longest] = max(1, edge * edge // others)
    return tuple(chunk)


def _check_export(cfg: InferConfig, image_id: str, geometry: dict[str, Any] | None,
                  georef: dict[str, Any] | None = None) -> None:
    """Refuse, before any work, an export the image cannot have: NIfTI needs a volume that came with an affine
    (NIfTI or DICOM), GeoTIFF a 2-D image read from a GeoTIFF."""
    if cfg.export == "geotiff" and (geometry is not None or not georef):
        what = "a volume" if geometry is not None else "not read from a GeoTIFF (no georeferencing)"
        raise ConfigError("export", f"geotiff needs a 2-D image read from a GeoTIFF; image '{image_id}' is {what}; "
                                    "use --export tiff")
    if cfg.export == "geojson" and geometry is not None:
        raise ConfigError("export", f"geojson is 2-D only; image '{image_id}' is a volume: use --export tiff or "
                                    "nifti (labels/instances holds its 3-D instances)")
    if cfg.export != "nifti" or (geometry is not None and geometry.get("affine") is not None):
        return
    what = "a 2-D image" if geometry is None else "a volume without a source affine"
    raise ConfigError("export", f"nifti needs a volume read from NIfTI or DICOM; image '{image_id}' is {what}; "
                                f"use --export tiff")


def create_output(plan: ImagePlan, cfg: InferConfig, block_shape: tuple[int, ...], info: dict[str, Any]) -> None:
    """Create the output store and records folder (replacing a different prediction: checked by plan_image).

    The output gets the input's spacing and unit (level 0's scale, and the pyramid they imply; an image without a
    pixel size stays in pixels), a volume's geometry and a GeoTIFF's georeferencing in ``attributes.unet``
    (:func:`unetcore.store.omezarr.geometry` reads the geometry back).
    """
    if plan.out_path.exists():
        shutil.rmtree(plan.out_path)
    shutil.rmtree(plan.records, ignore_errors=True)
    plan.records.mkdir(parents=True, exist_ok=True)
    place: dict[str, Any] = {}
    if plan.placement is not None:  # the input's spacing and unit (1 per axis and None: pixels, as before)
        place = {"spacing": tuple(plan.placement["spacing"]), "unit": plan.placement.get("unit")}
    elif info.get("mpp"):  # a slide ingested at an mpp: the prediction has its pixel size
        place = {"spacing": tuple(info["mpp"]), "unit": "micrometer"}
    # Probabilities are the store's image (K, [D,] H, W); left unwritten (empty chunks, one level) when not asked for.
    levels = None if cfg.save_probabilities else 1
    root = omezarr.create_image(plan.out_path, (plan.classes, *plan.shape), cfg.probability_dtype, plan.chunk,
                                name=f"{info['id']}-probabilities", n_levels=levels, codec="lz4", **place)
    omezarr.create_labels(root, LABELS_NAME, plan.shape, np.uint8, plan.chunk, **place)
    if cfg.instances:
        omezarr.create_labels(root, INSTANCES_NAME, plan.shape, np.uint32, plan.chunk, **place)
    attrs = {**info, "signature": plan.signature, "block_shape": list(block_shape), "complete": False,
             "class_names": plan.class_names, "resampling": plan.resampling.to_dict() if plan.resampling else None,
             "resampling_why": plan.resampling_why}
    if plan.geometry is not None:
        attrs["geometry"] = plan.geometry
    if plan.georef is not None:
        attrs["georef"] = plan.georef
    omezarr.set_unet_attrs(root, attrs)


def ensure_scratch(plan: ImagePlan, cfg: InferConfig) -> None:
    """Create the scratch store of component ids when a pass needs it and it is not there yet."""
    path = plan.records / SCRATCH
    if not (cfg.instances or cfg.min_object_size) or path.exists():
        return
    plan.records.mkdir(parents=True, exist_ok=True)
    for stale in plan.records.glob("*.json"):  # records without their component ids cannot be resumed
        stale.unlink()
    scratch = zarr.open_group(store=str(path), mode="w", zarr_format=3)
    for stage in ("raw", "final"):
        scratch.create_array(stage, shape=plan.shape, dtype=np.uint32, chunks=plan.chunk,
                             compressors=omezarr.compressor(), fill_value=0)


def _first_level_to_build(records: Path, blocks: list[Block], name: str) -> int:
    """2 when every block's record says its task wrote its part of level 1 of ``name``'s pyramid, else 1."""
    for block in blocks:
        try:
            if not json.loads(record_path(records, block).read_text()).get("level1", {}).get(name):
                return 1
        except (OSError, ValueError):
            return 1
    return 2


def finish_output(plan: ImagePlan, cfg: InferConfig, blocks: list[Block]) -> None:
    """Build the asked pyramids (from level 2 where the block tasks wrote level 1), mark the output complete and
    drop the scratch store."""
    root = zarr.open_group(store=str(plan.out_path), mode="r+")
    omezarr.build_pyramid(root[f"labels/{LABELS_NAME}"], "label",
                          first=_first_level_to_build(plan.records, blocks, "labels"))
    if cfg.instances:
        omezarr.build_pyramid(root[f"labels/{INSTANCES_NAME}"], "label")
    if cfg.save_probabilities:
        omezarr.build_pyramid(root, "image", first=_first_level_to_build(plan.records, blocks, "probabilities"))
    omezarr.set_unet_attrs(root, {"complete": True})
    shutil.rmtree(plan.records / SCRATCH, ignore_errors=True)
