"""The forward passes' runtime: onnxruntime on the CPU by default, the same probabilities as torch (within the
export's tolerance), its graph exported once into the output's model cache, and later runs without importing torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from tests.test_engine import config, make_dataset, make_model, outputs, random_image
from unetcore.errors import ConfigError
from unetcore.inference import predict_dataset
from unetcore.inference import runtime as rt
from unetcore.inference.layout import MODEL_CACHE

REPO = Path(__file__).resolve().parents[1]


def decisive_model(path: Path, classes: int) -> Path:
    """A random 3-level UNet whose head is scaled up, so its labels vary over the image (a plain random one
    predicts one class everywhere)."""
    from unetcore.model import load_model, save_model

    model, config = load_model(make_model(path, classes=classes, depth=3))
    with torch.no_grad():
        model.head.weight.mul_(200.0)
        model.head.bias.copy_(torch.linspace(0.3, -0.3, classes))  # no exact ties where the features are zero
        if classes == 1:  # centre the logits of a test-like image on the threshold
            probe = torch.from_numpy(random_image((200, 170)).astype(np.float32) / 255)[None, None]
            model.head.bias.sub_(model(probe).median())
    return save_model(path, model, {k: v for k, v in config.items() if k != "model"})


@pytest.mark.parametrize("asked, device, precision, chosen", [
    ("auto", "cpu", "auto", "onnxruntime"), ("auto", "cpu", "fp32", "onnxruntime"), ("auto", "cuda", "auto", "torch"),
    ("auto", None, "auto", "torch"), ("auto", "cpu", "bf16", "torch"), ("torch", "cpu", "auto", "torch"),
    ("onnxruntime", "cpu", "auto", "onnxruntime"),
])
def test_auto_takes_onnxruntime_on_the_cpu_only(asked: str, device: str | None, precision: str, chosen: str) -> None:
    assert rt.chosen_runtime(asked, device, precision) == chosen  # type: ignore[arg-type]


@pytest.mark.parametrize("device, precision, why", [("cuda", "auto", "the run is on cuda"),
                                                    (None, "auto", "remote scheduler"),
                                                    ("cpu", "bf16", "--precision bf16")])
def test_onnxruntime_where_it_cannot_run_is_refused_naming_why(device: str | None, precision: str, why: str) -> None:
    with pytest.raises(ConfigError, match=f"onnxruntime asked for, but .*{why}.*; use --runtime auto or torch"):
        rt.chosen_runtime("onnxruntime", device, precision)  # type: ignore[arg-type]


def test_without_onnxruntime_auto_is_torch_and_asking_for_it_says_how_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rt, "onnxruntime_installed", lambda: False)
    assert rt.chosen_runtime("auto", "cpu", "auto") == "torch"
    with pytest.raises(ConfigError, match=r"pip install onnxruntime"):
        rt.chosen_runtime("onnxruntime", "cpu", "auto")


@pytest.mark.parametrize("classes", [1, 3])
def test_onnxruntime_predicts_what_torch_predicts(tmp_path: Path, classes: int) -> None:
    """The same image, model and blocks (several, with seams) on both runtimes: float32 probabilities within the
    export's tolerance, labels equal wherever the decision is not within that of a tie."""
    dataset = make_dataset(tmp_path, random_image((200, 170)), 64)
    model = decisive_model(tmp_path / "model", classes)
    common = dict(probability_dtype="float32", skip_empty=False)
    predict_dataset(config(dataset, tmp_path / "ort", model, runtime="onnxruntime", **common))
    predict_dataset(config(dataset, tmp_path / "torch", model, runtime="torch", **common))
    ort, ref = outputs(tmp_path / "ort"), outputs(tmp_path / "torch")
    p_ort, p_ref = np.asarray(ort["0"][:]), np.asarray(ref["0"][:])
    assert np.abs(p_ort - p_ref).max() <= 1e-4
    margin = np.abs(p_ref - 0.5)[0] if classes == 1 else np.diff(np.sort(p_ref, axis=0)[-2:], axis=0)[0]
    decided = margin > 1e-4
    labels_ort, labels_ref = np.asarray(ort["labels/prediction/0"][:]), np.asarray(ref["labels/prediction/0"][:])
    assert decided.mean() > 0.99 and len(np.unique(labels_ref)) > 1  # a real decision, not a constant mask
    assert np.array_equal(labels_ort[decided], labels_ref[decided])
    [graph] = (tmp_path / "ort" / MODEL_CACHE / rt.GRAPH_DIR).glob("*.onnx")
    assert not (tmp_path / "torch" / MODEL_CACHE / rt.GRAPH_DIR).exists()
    options = dict(ort.attrs)["unet"]["provenance"]["options"]
    assert (options["runtime"], options["runtime_used"]) == ("onnxruntime", "onnxruntime")
    assert dict(ref.attrs)["unet"]["provenance"]["options"]["runtime_used"] == "torch"


def test_a_run_with_the_graph_cached_imports_no_torch(tmp_path: Path) -> None:
    """`unet predict` on the CPU: the first run into an output exports the graph (and imports torch to do so); a
    re-run into the same output (its prediction removed) loads the cached graph and never imports torch, with the
    same bytes out."""
    dataset = make_dataset(tmp_path, random_image((128, 128)), 64)
    model = make_model(tmp_path / "model")
    code = ("import sys, runpy; sys.argv = ['unet', 'predict', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('app.cli', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print(__import__('json').dumps('torch' in sys.modules))")
    args = [sys.executable, "-c", code, str(dataset), "-o", str(tmp_path / "out"), "--model", str(model),
            "--no-prefect", "--export", "none"]
    runs = []
    for _ in range(2):
        shutil.rmtree(tmp_path / "out" / "img.ome.zarr", ignore_errors=True)
        shutil.rmtree(tmp_path / "out" / "img.blocks", ignore_errors=True)
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        runs.append((json.loads(done.stdout.strip().splitlines()[-1]),
                     np.asarray(outputs(tmp_path / "out")["labels/prediction/0"][:]),
                     np.asarray(outputs(tmp_path / "out")["0"][:])))
        assert "onnxruntime threads, no Dask cluster" in done.stderr, done.stderr
    (first_torch, labels_1, probs_1), (second_torch, labels_2, probs_2) = runs
    assert first_torch is True and second_torch is False
    assert np.array_equal(labels_1, labels_2) and np.array_equal(probs_1, probs_2)


def test_the_cli_refuses_onnxruntime_with_bf16_in_one_line_before_any_work(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path, random_image((64, 64)), 64)
    model = make_model(tmp_path / "model")
    result = CliRunner().invoke(app, ["predict", str(dataset), "-o", str(tmp_path / "out"), "--model", str(model),
                                      "--runtime", "onnxruntime", "--precision", "bf16", "--no-prefect"])
    assert result.exit_code == 2, result.output
    [line] = [ln for ln in result.output.splitlines() if ln.strip()]
    assert line.startswith("error: option --runtime: onnxruntime asked for, but --precision bf16"), line
    assert not (tmp_path / "out").exists()


def test_the_cached_graph_is_the_models_checked_export(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path / "model", depth=3)
    path = rt.cached_graph(model_dir, "ab" * 32, tmp_path / "cache", "test-model")
    assert path == rt.graph_path(tmp_path / "cache", "ab" * 32) and path.is_file()
    from unetcore.model import load_model

    model, _ = load_model(model_dir)
    x = np.random.default_rng(0).normal(size=(2, 1, 48, 40)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert np.abs(rt.onnx_forward(path, 1)(x) - expected).max() <= 1e-4
    mtime = path.stat().st_mtime_ns
    assert rt.cached_graph(model_dir, "ab" * 32, tmp_path / "cache", "test-model").stat().st_mtime_ns == mtime


def test_a_graph_shipped_with_the_weights_it_was_made_from_is_used_as_it_is(tmp_path: Path) -> None:
    from unetcore.store import manifest as mf

    model_dir = make_model(tmp_path / "model")
    weights = mf.file_hash(model_dir / "weights.pt")
    shipped = rt.ship_graph(model_dir, weights, "test-model")
    assert shipped == model_dir / rt.SHIPPED_GRAPH
    assert rt.cached_graph(model_dir, weights, tmp_path / "cache", "test-model") == shipped
    assert not (tmp_path / "cache").exists()  # nothing exported
    # other weights (a folder whose weights.pt was replaced): the shipped graph is not theirs
    assert rt.shipped_graph(model_dir, "0" * 64) is None
    assert rt.cached_graph(model_dir, "0" * 64, tmp_path / "cache", "test-model") == rt.graph_path(
        tmp_path / "cache", "0" * 64)


def test_under_auto_a_model_whose_graph_cannot_be_made_runs_torch_with_one_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from unetcore.errors import UnetError

    def refuse(*_: object) -> Path:
        raise UnetError("m: ONNX export failed at op Foo (opset 17)")

    monkeypatch.setattr(rt, "cached_graph", refuse)
    dataset = make_dataset(tmp_path, random_image((64, 64)), 64)
    model = make_model(tmp_path / "model")
    with caplog.at_level("WARNING", "unetcore.inference"):
        predict_dataset(config(dataset, tmp_path / "out", model))
    assert [r.getMessage() for r in caplog.records if "ONNX graph" in r.getMessage()] == [
        "warning: running torch: the model's ONNX graph cannot be made (m: ONNX export failed at op Foo (opset 17))"]
    assert dict(outputs(tmp_path / "out").attrs)["unet"]["provenance"]["options"]["runtime_used"] == "torch"
    with pytest.raises(UnetError, match="op Foo"):
        predict_dataset(config(dataset, tmp_path / "out2", model, runtime="onnxruntime"))


def test_a_finished_output_is_not_touched_and_exports_no_graph(tmp_path: Path) -> None:
    """A re-run over a finished prediction (made on torch, say by an earlier version) does no work, so it makes no
    graph either: the nightly run that has nothing to do stays free."""
    dataset = make_dataset(tmp_path, random_image((64, 64)), 64)
    model = make_model(tmp_path / "model")
    predict_dataset(config(dataset, tmp_path / "out", model, runtime="torch"))
    before = np.asarray(outputs(tmp_path / "out")["labels/prediction/0"][:])
    predict_dataset(config(dataset, tmp_path / "out", model))
    assert not (tmp_path / "out" / MODEL_CACHE / rt.GRAPH_DIR).exists()
    assert np.array_equal(np.asarray(outputs(tmp_path / "out")["labels/prediction/0"][:]), before)
