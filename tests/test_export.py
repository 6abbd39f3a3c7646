"""Model export: ONNX and TorchScript files that equal the torch model at sizes never traced, run without this
package, describe themselves, and are logged to the model's MLflow run.

Oracles: the torch model's own ``forward``; the exported files are read back by other libraries (onnxruntime,
``onnx``'s graph reader, ``torch.jit.load`` in a process where ``unetcore`` cannot be imported).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

import unetcore.model.export as export_module
from app.cli import app
from unetcore.config import ExportConfig, ModelConfig
from unetcore.errors import UnetError
from unetcore.model import (
    ExportableUNet,
    build_model,
    description_path,
    export_model,
    min_sizes,
    run_without_package,
    save_model,
    size_multiple,
)
from unetcore.tracking import mlflow as tracking

TWO_D = {"in_channels": 2, "num_classes": 3, "depth": 2, "base_channels": 4}
THREE_D = {"in_channels": 1, "num_classes": 1, "depth": 2, "base_channels": 4, "spatial_dims": 3,
           "pool": [[1, 2, 2], [2, 2, 2]], "norm": "instance", "upsample": "bilinear"}
RECIPE = {"mode": "zscore", "low_percentile": 1.0, "high_percentile": 99.0}
TASK = {"in_channels": 2, "num_classes": 3, "spatial_dims": 2, "spacing": [0.5, 0.5],
        "class_names": ["background", "nucleus", "border"]}


def _saved(folder: Path, arch: dict, seed: int = 0, extra: dict | None = None) -> tuple[Path, torch.nn.Module]:
    """A saved, randomly initialised model with non-trivial batch-norm statistics (as a trained one has)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**arch))
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return save_model(folder, model, extra), model.eval()


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _torch(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def onnx_2d(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, Path]:
    """A 2-D model with a stored recipe and task, exported to ONNX: (model folder, torch model, export)."""
    tmp = tmp_path_factory.mktemp("onnx2d")
    folder, model = _saved(tmp / "model", TWO_D, extra={"normalization": RECIPE, "task": TASK})
    result = export_model(ExportConfig(model=str(folder), output=str(tmp / "unet.onnx")))
    return folder, model, result.path


# Sizes never traced (the trace is 2x the multiple): the smallest valid one, odd ones, non-square, a large one.
@pytest.mark.parametrize("size", [(4, 4), (5, 7), (13, 31), (64, 40), (97, 101)])
def test_onnx_export_equals_torch_at_sizes_it_was_not_traced_at(onnx_2d, size) -> None:
    _, model, path = onnx_2d
    x = np.random.default_rng(1).standard_normal((3, 2, *size)).astype(np.float32)
    got = _ort(path, x)
    assert got.shape == (3, 3, *size)
    assert np.abs(got - _torch(model, x)).max() <= 1e-4


def test_onnx_graph_has_dynamic_batch_and_spatial_axes_and_fixed_channels(onnx_2d) -> None:
    graph = onnx.load(str(onnx_2d[2])).graph
    (inp,), (out,) = graph.input, graph.output
    in_dims, out_dims = inp.type.tensor_type.shape.dim, out.type.tensor_type.shape.dim
    assert [d.dim_value for d in in_dims][1] == 2 and [d.dim_value for d in out_dims][1] == 3
    for dims in (in_dims, out_dims):
        assert all(dims[i].dim_param and not dims[i].dim_value for i in (0, 2, 3)), dims


def test_description_says_how_to_feed_the_export_with_the_stored_recipe(onnx_2d) -> None:
    folder, _, path = onnx_2d
    info = json.loads(description_path(path).read_text())
    assert (info["in_channels"], info["num_classes"], info["spatial_dims"]) == (2, 3, 2)
    assert info["input"] == {"name": "input", "dtype": "float32", "layout": "NCHW", "channels": 2,
                             "dynamic_axes": ["N", "H", "W"]}
    assert info["output"]["name"] == "logits" and "softmax over axis 1" in info["output"]["meaning"]
    assert info["class_names"] == TASK["class_names"] and info["spacing"] == TASK["spacing"]
    assert {k: info["normalization"][k] for k in RECIPE} == RECIPE  # the recipe stored with the model
    assert "mean and std of channel c over the whole image" in info["normalization"]["formula"]
    assert info["sizes"]["min"] == [4, 4] and info["sizes"]["multiple"] == [4, 4]
    assert info["provenance"]["model_uri"] == str(folder) and info["provenance"]["run_id"] is None
    assert all(v <= 1e-4 for v in info["check"]["max_abs_diff"].values()) and len(info["check"]["max_abs_diff"]) == 2
    import hashlib
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_3d_anisotropic_export_equals_torch_and_runs_without_this_package(tmp_path: Path, fmt: str) -> None:
    folder, model = _saved(tmp_path / "model", THREE_D)
    result = export_model(ExportConfig(model=str(folder), output=str(tmp_path / f"unet.{fmt}"), format=fmt))
    info = json.loads(result.description.read_text())
    assert info["sizes"]["min"] == [2, 4, 4] == list(min_sizes(ModelConfig(**THREE_D)))
    assert info["input"]["layout"] == "NCDHW" and "sigmoid" in info["output"]["meaning"]
    for size in [(2, 4, 4), (3, 9, 7), (11, 16, 21)]:  # odd depth works: that axis pools only once
        x = np.random.default_rng(2).standard_normal((2, 1, *size)).astype(np.float32)
        got = _ort(result.path, x) if fmt == "onnx" else _torch(torch.jit.load(str(result.path)), x)
        assert np.abs(got - _torch(model, x)).max() <= 1e-4, size
    assert run_without_package(result.path, fmt, (1, 1, 5, 13, 11), sys.executable) == "(1, 1, 5, 13, 11)"


def test_2d_torchscript_export_equals_torch_at_other_sizes(tmp_path: Path) -> None:
    folder, model = _saved(tmp_path / "model", TWO_D, seed=3)
    result = export_model(ExportConfig(model=str(folder), output=str(tmp_path / "unet.pt"), format="torchscript"))
    loaded = torch.jit.load(str(result.path))
    for size in [(4, 5), (37, 29)]:
        x = np.random.default_rng(3).standard_normal((2, 2, *size)).astype(np.float32)
        assert np.abs(_torch(loaded, x) - _torch(model, x)).max() <= 1e-4, size


def test_2d_onnx_runs_without_this_package(onnx_2d) -> None:
    assert run_without_package(onnx_2d[2], "onnx", (2, 2, 19, 23), sys.executable) == "(2, 3, 19, 23)"


@pytest.mark.parametrize("arch", [TWO_D, THREE_D, {**TWO_D, "depth": 3, "upsample": "bilinear", "norm": "group"}])
def test_exportable_unet_is_forward_from_its_min_size_on(arch: dict) -> None:
    """The traced module is the model's own forward (same padding, same crop) for every valid size."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**arch)).eval()
    config, wrapped = ModelConfig(**arch), ExportableUNet(model).eval()
    lows = min_sizes(config)
    sizes = [lows, tuple(n + 1 for n in lows), tuple(2 * m + 3 for m in size_multiple(config))]
    for size in sizes:
        x = torch.randn(1, arch["in_channels"], *size)
        with torch.no_grad():
            assert torch.equal(wrapped(x), model(x)), size


def test_an_export_beyond_the_tolerance_is_refused_and_not_written(tmp_path: Path, monkeypatch) -> None:
    folder, _ = _saved(tmp_path / "model", TWO_D)
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # every difference, even 0, is then too large
    out = tmp_path / "unet.onnx"
    with pytest.raises(UnetError, match="differs from torch by .* nothing written"):
        export_model(ExportConfig(model=str(folder), output=str(out)))
    assert not out.exists() and not description_path(out).exists() and list(tmp_path.iterdir()) == [folder]


def test_export_of_a_registered_model_is_logged_to_its_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.configure(uri, "export")
    folder, model = _saved(tmp_path / "model", TWO_D)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), tracking.MODEL_ARTIFACT)
        artifact = mlflow.get_artifact_uri(tracking.MODEL_ARTIFACT)
    tracking.register("exp", run.info.run_id, artifact, 0.5, "A", model_config=TWO_D)
    result = export_model(ExportConfig(model="models:/exp@champion", output=str(tmp_path / "out" / "unet.onnx"),
                                       tracking_uri=uri))
    run_id = run.info.run_id
    assert result.logged == f"runs:/{run_id}/export/onnx" and result.not_logged is None
    client = MlflowClient(uri)
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "export/onnx")}
    assert logged == {"unet.onnx", "unet.onnx.json"}
    assert client.get_model_version("exp", "1").tags["export.onnx"] == result.logged
    info = json.loads(result.description.read_text())["provenance"]
    assert (info["pinned_uri"], info["version"], info["alias"], info["run_id"]) == ("models:/exp/1", 1, "champion",
                                                                                   run_id)
    # What was logged is the checked file, byte for byte, and it runs.
    copy = Path(mlflow.artifacts.download_artifacts(f"{result.logged}/unet.onnx", dst_path=str(tmp_path / "dl"),
                                                    tracking_uri=uri))
    assert copy.read_bytes() == result.path.read_bytes()
    x = np.random.default_rng(4).standard_normal((1, 2, 21, 18)).astype(np.float32)
    assert np.abs(_ort(copy, x) - _torch(model, x)).max() <= 1e-4
    # runs:/ names the run itself; a TorchScript export goes beside the ONNX one.
    by_run = export_model(ExportConfig(model=f"runs:/{run_id}/model", output=str(tmp_path / "out" / "unet.pt"),
                                       format="torchscript", tracking_uri=uri))
    assert by_run.logged == f"runs:/{run_id}/export/torchscript"


runner = CliRunner()


def test_cli_export_without_prefect_writes_checks_and_reports(tmp_path: Path) -> None:
    folder, model = _saved(tmp_path / "model", TWO_D)
    out = tmp_path / "unet.onnx"
    result = runner.invoke(app, ["export", str(folder), "-o", str(out), "--no-prefect"])
    assert result.exit_code == 0, result.output
    assert f"-> {out} (onnx)" in result.output and "not logged to MLflow: a local model folder" in result.output
    x = np.random.default_rng(5).standard_normal((1, 2, 15, 9)).astype(np.float32)
    assert np.abs(_ort(out, x) - _torch(model, x)).max() <= 1e-4


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def saved_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _saved(tmp_path_factory.mktemp("cli") / "model", TWO_D)[0]


def test_cli_unknown_model_folder_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(tmp_path / "nope"), "-o", str(tmp_path / "u.onnx"), "--no-prefect"])
    _one_line_error(result, "nope", "no model here")


def test_cli_unknown_registered_model_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", "models:/nope@champion", "-o", str(tmp_path / "u.onnx"), "--no-prefect",
                                 "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"])
    _one_line_error(result, "models:/nope@champion", "does not resolve")
    assert not (tmp_path / "none.db").exists()


def test_cli_unwritable_output_is_one_line(tmp_path: Path, saved_2d: Path) -> None:
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["export", str(saved_2d), "-o", str(tmp_path / "file" / "u.onnx"), "--no-prefect"])
    _one_line_error(result, "file", "cannot write here")


def test_cli_unknown_format_lists_the_valid_ones(tmp_path: Path, saved_2d: Path) -> None:
    result = runner.invoke(app, ["export", str(saved_2d), "-o", str(tmp_path / "u.x"), "--format", "tflite",
                                 "--no-prefect"])
    _one_line_error(result, "--format", "'onnx'", "'torchscript'")


def test_cli_an_op_the_exporter_refuses_is_named(tmp_path: Path, saved_2d: Path) -> None:
    out = tmp_path / "u.onnx"
    result = runner.invoke(app, ["export", str(saved_2d), "-o", str(out), "--opset", "10", "--no-prefect"])
    _one_line_error(result, "failed at op Pad (opset 10)", "--opset 17")
    assert not out.exists()


def test_cli_existing_output_needs_overwrite(tmp_path: Path, saved_2d: Path) -> None:
    out = tmp_path / "u.onnx"
    out.write_bytes(b"old")
    _one_line_error(runner.invoke(app, ["export", str(saved_2d), "-o", str(out), "--no-prefect"]), "--overwrite")
    assert out.read_bytes() == b"old"
