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
``unet export``'s tolerance), written once per weights into the output's model cache,
``<output>/.models/onnx/<weights hash>.onnx``: only the run that writes it imports torch, and later runs into the same
output (a nightly schedule, a re-run, a resume) load it directly. Blocks then take the numpy block path
(:meth:`unetcore.inference.predict.BlockPredictor.from_forward`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from unetcore.config import InferConfig
from unetcore.errors import ConfigError
from unetcore.modes import Precision, Runtime

Chosen = Literal["torch", "onnxruntime"]
GRAPH_DIR = "onnx"
"""The model cache's folder of ONNX graphs, one per weights hash."""


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


def cached_graph(model_dir: Path, weights_hash: str, cache: Path, uri: str) -> Path:
    """The ONNX graph of the model in ``model_dir``: from the cache, else exported and checked into it first (the
    only step of an onnxruntime run that imports torch).

    Raises:
        UnetError: the export failed or differs from torch (nothing is cached then).
    """
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
