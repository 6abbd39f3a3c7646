"""Where a prediction lives on disk: the output store, its label groups, the per-block records and scratch data.

``<output>/<id>.ome.zarr`` holds the result; ``<output>/<id>.blocks/`` holds one completion record per block
(``<stem>.json``, ``<stem>.post.json``), the side files of the component passes (``<stem>.<stage>.npz``,
``<stem>.post.npy``, ``<stem>.inst.npy``) and the scratch store of component ids (``scratch.zarr``).
"""

from __future__ import annotations

from pathlib import Path

from unetcore.inference.windows import AXIS_NAMES, Block

LABELS_NAME = "prediction"
INSTANCES_NAME = "instances"
SCRATCH = "scratch.zarr"
KEEP_MASK = "background_keep.npy"
"""The tile keep mask of the background skip (one bool per grid tile), in the records folder."""
MODEL_CACHE = ".models"
"""Folder of the output where registry models are downloaded (one sub-folder per pinned version)."""


def output_store(out_dir: Path, image_id: str) -> Path:
    """The OME-Zarr store of one image's prediction."""
    return Path(out_dir) / f"{image_id}.ome.zarr"


def records_dir(out_dir: Path, image_id: str) -> Path:
    """The folder of one image's block records and scratch data."""
    return Path(out_dir) / f"{image_id}.blocks"


def block_stem(block: Block) -> str:
    """The name shared by a block's files: ``y<y0>-<y1>_x<x0>-<x1>``, with ``z<z0>-<z1>_`` first in a volume."""
    names = AXIS_NAMES[len(AXIS_NAMES) - block.ndim :]
    return "_".join(f"{n}{a}-{b}" for n, a, b in zip(names, block.start, block.stop))


def record_path(records: Path, block: Block, kind: str = "") -> Path:
    """A block's completion record: ``<stem>.json`` (prediction done) or ``<stem>.<kind>.json`` (a later pass)."""
    return Path(records) / f"{block_stem(block)}{'.' + kind if kind else ''}.json"


def side_path(records: Path, block: Block, suffix: str) -> Path:
    """A block's side file ``<stem>.<suffix>`` (component summaries, lookup tables)."""
    return Path(records) / f"{block_stem(block)}.{suffix}"
