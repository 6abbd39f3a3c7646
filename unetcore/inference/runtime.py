"""Which runtime runs a model's forward passes in inference: torch, or onnxruntime on the CPU without torch.

``import torch`` alone costs about 2 s of every ``unet predict`` on a 2-core machine (BENCHMARKS.md), more than a
small image's forward passes. onnxruntime imports in a fraction of that, and on the CPU it runs the same graph at
least as fast, so ``auto`` (the default) picks it wherever it can be used:

* the run is on the CPU (``--device cpu``, or ``auto`` on a machine without a usable GPU);
* onnxruntime is installed;
* the precision is not ``bf16`` (onnxruntime runs the graph in float32, torch's CPU precision);
* no remote scheduler: its workers pick their own devices, so they keep torch.

Elsewhere it is torch. ``--runtime onnxruntime`` where it cannot be used is refused in one line; ``--runtime torch``
keeps torch everywhere.

The graph is the model's own export (:func:`unetcore.model.export.export_onnx_graph`, checked against torch within
``unet export``'s tolerance). Training ships it in the model's folder (:func:`ship_graph`: ``model.onnx`` beside
``weights.pt``, and ``model.onnx.json`` naming the weights' hash), so it travels with a registered model's artifacts
and a prediction never needs to import torch. A model without one (trained before, or another folder) has it
exported once per weights into the output's model cache, ``<output>/.models/onnx/<weights hash>.onnx``: only the
run that writes it imports torch, and later runs into the same output (a nightly schedule, a re-run, a resume) load
it directly. Blocks then take the numpy block path
(:meth:`unetcore.inference.predict.BlockPredictor.from_forward`).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from unetcore.config import InferConfig
from unetcore.errors import ConfigError, UnetError
from unetcore.modes import Precision, Runtime

log = logging.getLogger("unetcore.inference")

Chosen = Literal["torch", "onnxruntime"]
GRAPH_DIR = "onnx"
"""The model cache's folder of ONNX graphs, one per weights hash."""
SHIPPED_GRAPH = "model.onnx"
"""The graph training writes into a model's folder; ``model.onnx.json`` beside it names the weights it was made from."""


def onnxruntime_installed() -> bool:
    """onnxruntime can be imported (checked without importing it)."""
    return importlib.util.find_spec("onnxruntime") is not None


def why_not_onnxruntime(device_type: str | None, precision: Precision) -> str | None:
    """Why onnxruntime cannot run this job (None: it can). ``device_type`` is the run's device (``cpu``/``cuda``;
    None: a remote scheduler's workers decide)."""
    if device_type is None:
        return "a remote scheduler's workers choose their own devices"
    if device_type != "cpu":
        return f"the run is on {device_type} (onnxruntime runs on the CPU here)"
    if precision == "bf16":
        return "--precision bf16 is a torch autocast (onnxruntime runs float32)"
    if not onnxruntime_installed():
        return "onnxruntime is not installed (pip install onnxruntime)"
    return None


def chosen_runtime(runtime: Runtime, device_type: str | None, precision: Precision) -> Chosen:
    """The runtime a job runs on: ``runtime`` as asked, ``auto`` resolved (see the module's rules).

    Raises:
        ConfigError: ``onnxruntime`` asked for where it cannot run the job (naming why).
    """
    if runtime == "torch":
        return "torch"
    why = why_not_onnxruntime(device_type, precision)
    if why is None:
        return "onnxruntime"
    if runtime == "onnxruntime":
        raise ConfigError("runtime", f"onnxruntime asked for, but {why}; use --runtime auto or torch")
    return "torch"


def graph_path(cache: Path, weights_hash: str) -> Path:
    """Where the model cache keeps the ONNX graph of the weights with this hash."""
    return Path(cache) / GRAPH_DIR / f"{weights_hash[:32]}.onnx"


def ship_graph(model_dir: Path, weights_hash: str, uri: str) -> Path:
    """Export the model in ``model_dir`` into that folder as :data:`SHIPPED_GRAPH`, with the weights' hash beside it.

    Raises:
        UnetError: the export failed or differs from torch (no graph is written then).
    """
    from unetcore.atomic import atomic_write_json
    from unetcore.model.export import export_onnx_graph  # imports torch

    path = Path(model_dir) / SHIPPED_GRAPH
    diffs = export_onnx_graph(Path(model_dir), path, uri)
    atomic_write_json(_shipped_description(path), {"weights_hash": weights_hash, "max_abs_diff": diffs})
    return path


def _shipped_description(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def shipped_graph(model_dir: Path, weights_hash: str) -> Path | None:
    """The graph shipped in ``model_dir`` when it was made from these weights (None: none, or another's)."""
    import json

    path = Path(model_dir) / SHIPPED_GRAPH
    try:
        made_from = json.loads(_shipped_description(path).read_text()).get("weights_hash")
    except (OSError, ValueError, AttributeError):
        return None
    return path if made_from == weights_hash and path.is_file() else None


def cached_graph(model_dir: Path, weights_hash: str, cache: Path, uri: str) -> Path:
    """The ONNX graph of the model in ``model_dir``: the one shipped with it, else the cache's, else exported and
    checked into the cache first (the only step of an onnxruntime run that imports torch).

    Raises:
        UnetError: the export failed or differs from torch (nothing is cached then).
    """
    shipped = shipped_graph(model_dir, weights_hash)
    if shipped is not None:
        return shipped
    path = graph_path(cache, weights_hash)
    if not path.is_file():
        from unetcore.model.export import export_onnx_graph  # imports torch

        export_onnx_graph(Path(model_dir), path, uri)
    return path


def onnx_forward(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """A numpy batch ``(B, C, *tile)`` → logits function running the graph at ``path`` on onnxruntime's CPU
    provider with ``threads`` intra-op threads (one inter-op thread: the graph is a chain)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are no news
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    return forward


def job_runtime(cfg: InferConfig) -> Chosen:
    """The runtime of an inference run (:func:`chosen_runtime` on its device; a remote scheduler keeps torch).

    Raises:
        ConfigError: ``--runtime onnxruntime`` where it cannot run the job, or ``--device cuda`` without a GPU.
    """
    from unetcore.devices import device_type

    return chosen_runtime(cfg.runtime, None if cfg.scheduler_address else device_type(cfg.device), cfg.precision)


def runtime_and_graph(cfg: InferConfig, model_dir: Path, weights_hash: str, cache: Path, uri: str
                      ) -> tuple[Chosen, str]:
    """The runtime an image is predicted on and the graph onnxruntime runs (``""`` on torch).

    Under ``auto`` a model whose graph cannot be made falls back to torch with one warning line.

    Raises:
        ConfigError: as :func:`job_runtime`; UnetError: ``--runtime onnxruntime`` and the graph cannot be made.
    """
    chosen = job_runtime(cfg)
    if chosen == "torch":
        return chosen, ""
    try:
        return chosen, str(cached_graph(model_dir, weights_hash, cache, uri))
    except UnetError as exc:
        if cfg.runtime == "onnxruntime":
            raise
        log.warning("warning: running torch: the model's ONNX graph cannot be made (%s)", exc)
        return "torch", ""
