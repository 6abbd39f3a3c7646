"""Export a UNet as one file that runs without this package: ONNX (onnxruntime, any ONNX runtime) or TorchScript.

The exported graph is :class:`ExportableUNet`: the UNet's own layers (:meth:`UNet.forward_padded`) between a
reflect padding and a crop computed from the input's own sizes, so batch and spatial sizes stay dynamic (channels
are fixed). It equals ``UNet.forward`` for every size of at least :func:`min_sizes` per axis (there ``forward``
pads by reflection too); a smaller input is refused by the runtime's pad op (pad it yourself, replicating the
edge, up to that size). Sizes that are multiples of :func:`unetcore.model.size_multiple` and at least twice it
take no padding at all.

Both formats are written by tracing (``torch.onnx.export(..., dynamo=False)``, ``torch.jit.trace``): the
padding is plain arithmetic on the traced sizes, which tracing records instead of freezing. Every export is
checked against the torch model on two random inputs of other sizes than the traced one (one of them odd on
every axis) before it replaces the output, and described beside it in ``<file>.json``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unetcore.atomic import atomic_write_json, replacing
from unetcore.config import ExportConfig, ModelConfig, NormalizationConfig
from unetcore.errors import ConfigError, InputError, OutputExistsError, UnetError, first_line
from unetcore.fs import check_writable
from unetcore.model.packaging import load_model, read_config
from unetcore.model.unet import UNet, padded_size, size_multiple
from unetcore.modes import ModelFormat, check_mode

if TYPE_CHECKING:  # imported lazily at run time: tracking imports the planner, which imports this package
    from unetcore.tracking import PinnedModel

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
TOLERANCE = 1e-4
"""Largest absolute difference between the export's and torch's logits that an export may show."""
EXPORT_ARTIFACT = "export"
"""Run artifact folder of exports: ``export/<format>/<file>`` and its ``.json``."""
DESCRIPTION_SUFFIX = ".json"
MIN_OPSET = 11
"""Older opsets cannot pad by an amount computed in the graph: the exporter fails at op Pad (measured, torch 2.13)."""


class ExportableUNet(nn.Module):
    """``UNet.forward`` in a form that tracing keeps dynamic: ``(N, C, *spatial)`` -> logits ``(N, K, *spatial)``.

    Pads each spatial axis by reflection to :func:`unetcore.model.padded_size` (computed from ``x.shape``, so a
    traced graph computes it for every input), runs :meth:`UNet.forward_padded`, crops back. Unlike ``forward`` it
    never switches to replicate padding, so it needs each size to be at least :func:`min_sizes`.
    """

    def __init__(self, model: UNet) -> None:
        super().__init__()
        self.model = model
        self.multiple = tuple(model.multiple)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(N, in_channels, [D,] H, W)``. Returns logits ``(N, num_classes, [D,] H, W)``."""
        sizes = [x.shape[2 + axis] for axis in range(len(self.multiple))]
        pads = [padded_size(n, m) - n for n, m in zip(sizes, self.multiple)]
        low = [p // 2 for p in pads]
        torch_pad = [v for p, lo in zip(reversed(pads), reversed(low)) for v in (lo, p - lo)]  # last axis first
        logits = self.model.forward_padded(F.pad(x, torch_pad, mode="reflect"))
        return logits[(slice(None), slice(None), *(slice(lo, lo + n) for lo, n in zip(low, sizes)))]


def min_sizes(config: ModelConfig) -> tuple[int, ...]:
    """Per spatial axis, the smallest size the exported model takes: its size multiple, and at least 2.

    From there on the reflect padding to :func:`padded_size` is shorter than the axis (hence valid).
    """
    return tuple(max(m, 2) for m in size_multiple(config))


def check_sizes(config: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The traced example's spatial size, and the two sizes an export is checked at.

    Example: twice the multiple (no padding). Checks: three times it (another size, also no padding) and
    ``2 * multiple + 1 + 2 * axis`` (odd on every axis, a different size per axis, padded).
    """
    multiple = size_multiple(config)
    return (tuple(2 * m for m in multiple), tuple(3 * m for m in multiple),
            tuple(2 * m + 1 + 2 * axis for axis, m in enumerate(multiple)))


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def _tracing_quietly() -> Iterator[None]:
    """The exporters' notices that are no news here (legacy exporter chosen on purpose, see BENCHMARKS.md)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        # Instance norm without running statistics normalises by the input's own statistics in eval mode too:
        # the exporter's "train=True" is that, as the check against torch confirms.
        warnings.filterwarnings("ignore", message=".*operator 'instance_norm' is set to train=True.*")
        # torch.nn's own checks of the channel count and of "more than one value per channel" become constants in
        # a trace; channels are fixed and the sizes are checked, so they hold for every input the export takes.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.nn\..*")
        yield


@contextlib.contextmanager
def _native_stdout_muted() -> Iterator[None]:
    """Send file descriptor 1 to a scratch file meanwhile: torch 2.13's legacy exporter always enables its C++ log
    (it tests a function object for truth), which prints the whole graph to stdout when an op fails."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            try:
                yield
            finally:
                sys.stdout.flush()
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def failed_op(exc: BaseException) -> str:
    """The op an exporter error names (``Pad``, ``aten::foo``), or ``an op`` if it names none."""
    text = str(exc)
    for pattern in (r"operator '([\w:.]+)'", r"ONNX export of ([\w:.]+)", r"(aten::\w+)"):
        found = re.search(pattern, text)
        if found:
            return found.group(1)
    return "an op"


def write_onnx(module: nn.Module, example: torch.Tensor, path: Path, opset: int, uri: str) -> None:
    """Trace ``module`` on ``example`` into an ONNX file at ``path``, batch and spatial axes dynamic.

    Raises:
        UnetError: the exporter refused an op (named, with the opset and the fix).
    """
    axes = {0: "batch", **{2 + i: name for i, name in enumerate("DHW"[3 - (example.ndim - 2):])}}
    try:
        with _tracing_quietly(), _native_stdout_muted():
            torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, opset_version=opset,
                              dynamo=False, do_constant_folding=True)
    except Exception as exc:  # the exporter raises SymbolicValueError, UnsupportedOperatorError, RuntimeError ...
        reason = first_line(exc, 400).split("[Caused by")[0].strip()[:160]
        raise UnetError(f"{uri}: ONNX export failed at op {failed_op(exc)} (opset {opset}): {reason} (use --opset "
                        f"{ExportConfig.model_fields['opset'].default}, at least {MIN_OPSET} for the dynamic padding, "
                        "or --format torchscript)") from None


def write_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Trace ``module`` on ``example`` into a TorchScript file at ``path`` (``torch.jit.load`` runs it).

    ``torch.jit.script`` cannot compile the UNet (its pydantic config, per-dims layer choice); tracing records the
    sizes' arithmetic, and the module has no branch on them, so nothing is frozen but the weights.
    """
    with torch.no_grad(), _tracing_quietly():
        traced = torch.jit.trace(module, example, check_trace=False)
    torch.jit.save(traced, str(path))


# ---------------------------------------------------------------- checking


def onnx_runner(path: Path) -> Any:
    """``run(array) -> array`` through onnxruntime's CPU provider.

    Raises:
        ConfigError: onnxruntime is not installed (``pip install onnxruntime``).
    """
    session = _onnxruntime().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def torchscript_runner(path: Path) -> Any:
    """``run(array) -> array`` through ``torch.jit.load``."""
    module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def compare(model: UNet, run: Any, shapes: Sequence[tuple[int, ...]], seed: int = 0) -> list[float]:
    """Max absolute difference between ``run`` and ``model`` on a random normal input of each shape."""
    generator = torch.Generator().manual_seed(seed)
    diffs = []
    for shape in shapes:
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        got = run(x.numpy())
        if got.shape != expected.shape:
            diffs.append(float("inf"))
            continue
        diffs.append(float(np.abs(got - expected).max()))
    return diffs


# ---------------------------------------------------------------- describing


def normalization_formula(recipe: NormalizationConfig) -> str:
    """In words, per channel, what turns raw intensities into the network's input."""
    if recipe.mode == "percentile":
        return (f"per channel c: (x - p_low) / (p_high - p_low), clipped to [0, 1], with p_low and p_high the "
                f"{recipe.low_percentile:g}th and {recipe.high_percentile:g}th percentiles of channel c over the "
                "whole image (never per tile)")
    if recipe.mode == "zscore":
        return "per channel c: (x - mean) / std, with the mean and std of channel c over the whole image"
    return ("per channel c: clip x to [foreground[c].low, foreground[c].high], then (x - foreground[c].mean) / "
            "foreground[c].std (values fitted on the training set, in this file)")


def output_meaning(num_classes: int) -> str:
    """What the output tensor holds and how to turn it into labels."""
    if num_classes == 1:
        return ("logits (N, 1, ...): sigmoid gives the foreground probability; foreground where it is above 0.5 "
                "(logit > 0; `unet predict --threshold` moves that)")
    return (f"logits (N, {num_classes}, ...): softmax over axis 1 gives the class probabilities; argmax over axis 1 "
            "gives the label, 0 being background")


def describe(cfg: ExportConfig, config: dict[str, Any], model: PinnedModel, path: Path, diffs: dict[str, float],
             name: str) -> dict[str, Any]:
    """The JSON written beside the export ``name`` (its bytes at ``path``): how to run it, and where it came from."""
    from unetcore.tracking import code_version_tags

    arch = ModelConfig(**config["model"])
    spatial = "HW" if arch.spatial_dims == 2 else "DHW"
    task = config.get("task") or {}
    recipe = NormalizationConfig(**config.get("normalization", {}))
    return {
        "file": name,
        "format": cfg.format,
        **({"opset": cfg.opset} if cfg.format == "onnx" else {}),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "input": {"name": INPUT_NAME, "dtype": "float32", "layout": f"NC{spatial}", "channels": arch.in_channels,
                  "dynamic_axes": ["N", *spatial]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "layout": f"NK{spatial}", "classes": arch.num_classes,
                   "meaning": output_meaning(arch.num_classes)},
        "in_channels": arch.in_channels,
        "num_classes": arch.num_classes,
        "class_names": task.get("class_names"),
        "spatial_dims": arch.spatial_dims,
        "spacing": task.get("spacing"),
        "sizes": {"min": list(min_sizes(arch)), "multiple": list(size_multiple(arch)),
                  "rule": "each spatial size at least `min` (pad a smaller input yourself, replicating the edge); "
                          "sizes that are multiples of `multiple` and at least twice it need no internal padding"},
        "normalization": {**recipe.model_dump(mode="json"), "formula": normalization_formula(recipe)},
        "check": {"tolerance": TOLERANCE, "max_abs_diff": diffs,
                  "runtime": _runtime(cfg.format), "against": f"torch {torch.__version__}"},
        "provenance": {"model_uri": cfg.model, "pinned_uri": model.uri, "name": model.name, "version": model.version,
                       "alias": model.alias, "run_id": model.run_id, "source": model.source,
                       "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "exported_by": code_version_tags()["code_version"]},
    }


def _runtime(fmt: str) -> str:
    if fmt == "torchscript":
        return f"torch.jit {torch.__version__}"
    try:
        return f"onnxruntime {importlib.metadata.version('onnxruntime')}"
    except importlib.metadata.PackageNotFoundError:
        return "onnxruntime"


# ---------------------------------------------------------------- front door


@dataclass(frozen=True)
class ExportCheck:
    """What :func:`check_exportable` found: the pinned model and the files to write."""

    model: PinnedModel
    output: Path
    description: Path


@dataclass(frozen=True)
class ExportResult:
    """One written export.

    Attributes:
        path: the exported model file; description: the JSON beside it.
        max_abs_diff: per checked input shape (``"2x1x48x48"``), the largest |export - torch| logit difference.
        logged: the run artifact folder the export was logged to (``runs:/<id>/export/onnx``), or None.
        not_logged: why it was not logged (a local model folder has no run), or None.
    """

    path: Path
    description: Path
    format: str
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    logged: str | None = None
    not_logged: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (a flow's result)."""
        return {"path": str(self.path), "description": str(self.description), "format": self.format,
                "max_abs_diff": dict(self.max_abs_diff), "logged": self.logged, "not_logged": self.not_logged}


def description_path(output: Path) -> Path:
    """``unet.onnx`` -> ``unet.onnx.json``."""
    return output.with_name(output.name + DESCRIPTION_SUFFIX)


def check_exportable(cfg: ExportConfig, cache: Path | None = None) -> ExportCheck:
    """Everything that can fail before the export: format, opset, output file, the model URI and its config.

    Writes nothing but a registry model's download into ``cache`` (without one, into a temporary folder removed
    again before returning: a pre-flight check only, whose ``model.directory`` is then gone).

    Raises:
        ConfigError: unknown format, onnxruntime missing (an opset too old for the dynamic padding is the
            exporter's own error, naming op Pad: see :func:`write_onnx`).
        InputError: the output is a folder or cannot be written; the model URI does not resolve or its folder is
            not a saved model. OutputExistsError: the output exists (without ``overwrite``). ServiceError: the
            tracking server does not answer.
    """
    from unetcore.tracking import pin_model

    check_mode(ModelFormat, cfg.format, "format")
    if cfg.format == "onnx":
        _onnxruntime()
    output = Path(cfg.output)
    if output.is_dir():
        raise InputError(output, "is a folder", f"give a file path, e.g. {output / ('unet.' + _suffix(cfg.format))}")
    for path in (output, description_path(output)):
        if path.exists() and not cfg.overwrite:
            raise OutputExistsError(path, "already exists")
    check_writable(output.parent)
    with contextlib.ExitStack() as stack:
        if cache is None:
            cache = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="unet-export-check-")))
        model = pin_model(cfg.model, cfg.tracking_uri, cache)
        read_config(model.directory)
    return ExportCheck(model=model, output=output, description=description_path(output))


def _onnxruntime() -> Any:
    """The onnxruntime module; ConfigError (one line, with the fix) where it is not installed."""
    try:
        import onnxruntime

        return onnxruntime
    except ImportError:
        raise ConfigError("format", "checking an ONNX export needs onnxruntime (pip install onnxruntime), or "
                          "use --format torchscript") from None


def _suffix(fmt: str) -> str:
    return "onnx" if fmt == "onnx" else "pt"


def export_model(cfg: ExportConfig) -> ExportResult:
    """Export ``cfg.model`` to ``cfg.output``, check it against torch, describe it, log it to the model's run.

    The file is traced on a ``(1, C, *2·multiple)`` input, then run by its own runtime (onnxruntime or
    ``torch.jit.load``) on a batch of 2 at three times the multiple and on an odd size, and compared with the
    torch model; only an export within :data:`TOLERANCE` replaces the output. The JSON beside it
    (:func:`describe`) says how to feed it. With an MLflow URI both files are logged to the model version's run
    under ``export/<format>/`` and the version is tagged ``export.<format>`` with that location.

    Raises:
        everything :func:`check_exportable` raises; UnetError: the exporter refused an op (named), or the export
        differs from torch by more than the tolerance; ServiceError: logging to MLflow failed (the files are
        written).
    """
    with tempfile.TemporaryDirectory(prefix="unet-export-") as cache:
        check = check_exportable(cfg, Path(cache))
        model, config = load_model(check.model.directory)
        with replacing(check.output) as tmp:
            diffs = write_checked(model, cfg.format, tmp, cfg.opset, cfg.model)
            description = describe(cfg, config, check.model, tmp, diffs, check.output.name)
        atomic_write_json(check.description, description)
        logged, why = _log_export(cfg, check)
    return ExportResult(path=check.output, description=check.description, format=cfg.format, max_abs_diff=diffs,
                        logged=logged, not_logged=why)


def write_checked(model: UNet, fmt: ModelFormat, path: Path, opset: int, uri: str) -> dict[str, float]:
    """Trace ``model`` into ``path`` as ``fmt`` and check it against torch; the largest difference per checked shape.

    Traced on a ``(1, C, *2·multiple)`` input, run by its own runtime on a batch of 2 at three times the multiple
    and on an odd size.

    Raises:
        UnetError: the exporter refused an op, or the export differs from torch by more than :data:`TOLERANCE`.
    """
    module = ExportableUNet(model).eval()
    arch = model.config
    example, other, odd = check_sizes(arch)
    shapes = [(2, arch.in_channels, *other), (1, arch.in_channels, *odd)]
    x = torch.randn((1, arch.in_channels, *example), generator=torch.Generator().manual_seed(0))
    if fmt == "onnx":
        write_onnx(module, x, path, opset, uri)
        run = onnx_runner(path)
    else:
        write_torchscript(module, x, path)
        run = torchscript_runner(path)
    diffs = dict(zip(("x".join(map(str, s)) for s in shapes), compare(model, run, shapes)))
    worst = max(diffs.values())
    if not worst <= TOLERANCE:
        raise UnetError(f"{uri}: the {fmt} export differs from torch by {worst:.3g} (> {TOLERANCE:g}) on {diffs}; "
                        "nothing written (report it with the model's config.json)")
    return diffs


def export_onnx_graph(model_dir: Path, path: Path, uri: str) -> dict[str, float]:
    """The model saved in ``model_dir`` as a checked ONNX graph at ``path`` (replaced only once checked), at
    ``unet export``'s default opset; the differences from torch (see :func:`write_checked`)."""
    model, _ = load_model(model_dir)
    with replacing(path) as tmp:
        return write_checked(model, "onnx", tmp, ExportConfig.model_fields["opset"].default, uri)


def _log_export(cfg: ExportConfig, check: ExportCheck) -> tuple[str | None, str | None]:
    """Log the export to the model's run (and tag its version); ``(artifact URI, None)`` or ``(None, why not)``."""
    from unetcore.tracking import log_export

    model = check.model
    if model.run_id is None:
        reason = "a local model folder has no MLflow run" if model.source is None else "the model URI names no run"
        return None, reason
    folder = f"{EXPORT_ARTIFACT}/{cfg.format}"
    uri = log_export(cfg.tracking_uri, model.run_id, [check.output, check.description], folder, model.name,
                     model.version, cfg.format)
    return uri, None


def run_without_package(path: Path, fmt: ModelFormat, shape: Sequence[int], python: str) -> str:
    """Run an export in a fresh ``python`` in which importing ``unetcore`` fails; its stdout (the output shape).

    The proof that an export needs nothing of this package: used by the tests and by anyone doubting it.
    """
    code = (
        "import sys; sys.modules['unetcore'] = None\n"
        "import numpy as np\n"
        f"x = np.random.default_rng(0).standard_normal({tuple(shape)!r}).astype(np.float32)\n"
        + ("import onnxruntime as ort\n"
           f"y = ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider']).run(None, {{'input': x}})[0]\n"
           if fmt == "onnx" else
           "import torch\n"
           f"y = torch.jit.load({str(path)!r})(torch.from_numpy(x)).detach().numpy()\n")
        + "print(tuple(y.shape))\n"
    )
    done = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the export did not run on its own: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout.strip()
