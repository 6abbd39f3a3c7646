"""The output step on onnxruntime (unetcore.inference.postops) and the block task's cached stores."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import zarr

from unetcore.inference import postops
from unetcore.inference.layout import LABELS_NAME
from unetcore.inference.predict import logits_to_outputs
from unetcore.inference.tasks import ImageJob, ModelSpec, block_stores
from unetcore.store import omezarr


@pytest.mark.parametrize(("activation", "stored"), postops.GRAPH_NAMES)
def test_the_shipped_graphs_are_the_builders_graphs(activation: str, stored: str) -> None:
    shipped = onnx.load(str(postops.graph_file(activation, stored)))
    built = postops.build_graph(activation, stored)
    assert shipped.graph == built.graph, "re-run scripts/make_output_graphs.py"
    assert shipped.ir_version == built.ir_version == postops.IR_VERSION
    assert [(o.domain, o.version) for o in shipped.opset_import] == [("", postops.OPSET)]


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_sigmoid_is_accurate_even_for_tiny_probabilities(threshold: float) -> None:
    # onnxruntime's own Sigmoid has an absolute error of ~1e-7: a logit of -20 would come out 70x too large
    logits = np.random.default_rng(0).uniform(-25, 25, (1, 64, 80)).astype(np.float32)
    probs, labels = postops.outputs(logits, 1, threshold, "float32")
    exact = 1 / (1 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_allclose(probs, exact, rtol=1e-6)
    np.testing.assert_array_equal(labels, (probs[0] > np.float32(threshold)).astype(np.uint8))
    assert labels.shape == (64, 80) and labels.dtype == np.uint8 and 0 < labels.mean() < 1


@pytest.mark.parametrize("classes", [1, 3])
def test_float16_probabilities_are_the_float32_ones_rounded(classes: int) -> None:
    logits = np.random.default_rng(1).normal(0, 6, (classes, 3, 40, 50)).astype(np.float32)  # a volume
    p32, l32 = postops.outputs(logits, classes, 0.5, "float32")
    p16, l16 = postops.outputs(logits, classes, 0.5, "float16")
    assert p16.dtype == np.float16 and p16.shape == logits.shape
    np.testing.assert_array_equal(p16.view(np.uint16), p32.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(l16, l32)


def test_softmax_and_first_maximum() -> None:
    logits = np.random.default_rng(2).normal(0, 3, (4, 30, 20)).astype(np.float32)
    logits[:, 0, 0] = 1.5  # a tie: numpy's argmax takes the first class
    logits[2:, 0, 1] = 9.0
    probs, labels = postops.outputs(logits, 4, 0.5, "float32")
    e = np.exp(logits.astype(np.float64) - logits.max(axis=0))
    exact = e / e.sum(axis=0)
    np.testing.assert_allclose(probs, exact, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(labels, probs.argmax(axis=0))
    assert labels[0, 0] == 0 and labels[0, 1] == 2
    assert set(np.unique(labels)) == {0, 1, 2, 3}


def test_without_onnxruntime_numpy_gives_the_same_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = np.random.default_rng(3).normal(0, 4, (1, 50, 60)).astype(np.float32)
    fast_p, fast_l = logits_to_outputs(logits, 1, 0.5, "float16")
    monkeypatch.setattr(postops, "available", lambda: False)
    assert postops.outputs(logits, 1, 0.5, "float16") is None
    slow_p, slow_l = logits_to_outputs(logits, 1, 0.5, "float16")
    assert slow_p.dtype == fast_p.dtype == np.float16
    np.testing.assert_allclose(slow_p.astype(np.float32), fast_p.astype(np.float32), atol=2 ** -11)
    differ = slow_l != fast_l
    assert np.all(np.abs(logits[0][differ]) < 1e-6)  # labels differ at most where the logit is 0 to rounding


def _output(path: Path, shape: tuple[int, int]) -> None:
    root = omezarr.create_image(path, (1, *shape), "float16", 64, n_levels=2, codec="lz4")
    omezarr.create_labels(root, LABELS_NAME, shape, np.uint8, 64, n_levels=2)


def test_block_stores_are_reused_until_the_output_is_written_anew(tmp_path: Path) -> None:
    source, output = tmp_path / "in.ome.zarr", tmp_path / "out.ome.zarr"
    omezarr.create_image(source, (1, 128, 128), "uint8", 64, n_levels=1)
    _output(output, (128, 128))
    spec = ModelSpec("m", "h", "cpu", 64, 0.5, 1, 0.5, False, False, 1)
    job = ImageJob(str(source), str(output), str(tmp_path / "rec"), {}, spec, True, "float16", "none", False)
    first = block_stores(job)
    assert block_stores(job) is first  # opened once
    assert first.truth is None and len(first.labels) == 2 and len(first.probabilities) == 2
    first.labels[0][0:64, 0:64] = np.zeros((64, 64), np.uint8)  # an empty chunk is written all the same
    assert (output / "labels" / LABELS_NAME / "0" / "c" / "0" / "0").is_file()
    time.sleep(0.01)
    _output(output, (192, 128))  # --overwrite with another shape
    again = block_stores(job)
    assert again is not first and again.labels[0].shape == (192, 128)
    assert zarr.open_group(str(output), mode="r")["labels"][LABELS_NAME]["0"].shape == (192, 128)
