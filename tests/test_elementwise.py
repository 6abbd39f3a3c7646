"""The element-wise steps on onnxruntime (unetcore.elementwise), the output step, and the block task's
stores."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import zarr

from unetcore import elementwise
from unetcore.inference.layout import LABELS_NAME
from unetcore.inference.predict import logits_to_outputs
from unetcore.inference.tasks import ImageJob, ModelSpec, block_stores
from unetcore.store import omezarr


@pytest.mark.parametrize("step", list(elementwise.GRAPHS))
def test_the_shipped_graphs_are_the_builders_graphs(step: elementwise.Step) -> None:
    shipped, built = onnx.load(str(elementwise.GRAPHS[step])), elementwise.build_graph(step)
    assert shipped.graph == built.graph, "re-run scripts/make_graphs.py"
    assert shipped.ir_version == built.ir_version == elementwise.IR_VERSION
    assert [(o.domain, o.version) for o in shipped.opset_import] == [("", elementwise.OPSET)]


def test_the_cast_gives_numpys_bytes_everywhere() -> None:
    rng = np.random.default_rng(0)
    edges = np.array([0.0, -0.0, 1.0, 65504.0, 65520.0, 1e6, -1e6, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 1e-30,
                      np.inf, -np.inf, np.nan], np.float32)
    halfway = (np.arange(4096, dtype=np.float32) + 0.5) * np.float32(2.0 ** -11) + 1  # ties: round to even
    values = np.concatenate([edges, halfway, rng.normal(0, 3, 50_000).astype(np.float32),
                             rng.random(50_000).astype(np.float32)]).reshape(1, -1, 2)
    got = elementwise.to_float16(values)
    assert got.dtype == np.float16 and got.shape == values.shape
    np.testing.assert_array_equal(got.view(np.uint16), values.astype(np.float16).view(np.uint16))
    strided = rng.random((3, 40, 60)).astype(np.float32)[:, ::2, 1::3]  # not contiguous
    np.testing.assert_array_equal(elementwise.to_float16(strided), strided.astype(np.float16))


def test_other_dtypes_are_cast_in_numpy() -> None:
    doubles = np.array([1 + 2.0 ** -11 + 2.0 ** -40, np.pi])  # through float32 the first would round twice
    np.testing.assert_array_equal(elementwise.to_float16(doubles).view(np.uint16),
                                  doubles.astype(np.float16).view(np.uint16))
    singles = np.array([np.pi], np.float32)
    np.testing.assert_array_equal(elementwise.to_float32(singles), singles)
    assert elementwise.to_float16(np.float32(0.5)).shape == elementwise.sigmoid(np.float32(0.0)).shape == ()


def test_the_float32_cast_of_every_float16_is_exact() -> None:
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(1, 256, 256)
    got, expected = elementwise.to_float32(every), every.astype(np.float32)
    assert got.dtype == np.float32 and got.shape == every.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))  # -0.0 too


@pytest.mark.parametrize("onnx", [True, False])
def test_the_float32_cast_fills_the_buffer_it_is_given(monkeypatch: pytest.MonkeyPatch, onnx: bool) -> None:
    if not onnx:
        monkeypatch.setattr(elementwise, "available", lambda: False)
    values = np.random.default_rng(2).random((3, 17, 29)).astype(np.float16)
    buffer = np.full(values.shape, np.nan, np.float32)  # stale contents must not show
    assert elementwise.to_float32(values, buffer) is buffer
    np.testing.assert_array_equal(buffer, values.astype(np.float32))
    assert elementwise.to_float32(values[:, ::2], buffer[:, :9].copy()).shape == (3, 9, 29)  # a view's copy in


@pytest.mark.parametrize("onnx", [True, False])
def test_a_buffer_of_another_shape_or_dtype_is_refused(monkeypatch: pytest.MonkeyPatch, onnx: bool) -> None:
    if not onnx:
        monkeypatch.setattr(elementwise, "available", lambda: False)
    values = np.zeros((4, 6), np.float16)
    for wrong in (np.empty((4, 5), np.float32), np.empty((4, 6), np.float64), np.empty((6, 4), np.float32).T):
        with pytest.raises(ValueError, match="cast-float32: out must be a C-contiguous float32 array"):
            elementwise.to_float32(values, wrong)


@pytest.mark.parametrize("factors", [(2, 2), (1, 2, 2), (2, 2, 2)])
def test_halving_float16_gives_the_same_bytes_with_and_without_onnxruntime(monkeypatch: pytest.MonkeyPatch,
                                                                          factors: tuple[int, ...]) -> None:
    values = np.random.default_rng(4).random((2, 9, 33, 47)).astype(np.float16)[..., 1:]  # odd edges, a view
    values = values[0] if len(factors) == 2 else values
    expected = omezarr.halve(values.astype(np.float32), "image", factors).astype(np.float16)  # float32's own path
    results = [omezarr.halve(values, "image", factors)]
    for slab in (1000, 23_552, 70_656):  # slabs of the least rows, and of several with a partial last one
        monkeypatch.setattr(omezarr, "HALVE_SLAB_BYTES", slab)
        results.append(omezarr.halve(values, "image", factors))
    monkeypatch.setattr(elementwise, "available", lambda: False)
    results.append(omezarr.halve(values, "image", factors))  # numpy only
    for got in results:
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))


def _formula(logits: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (1 / (1 + np.exp(-logits.astype(np.float32)))).astype(np.float32)


def test_without_onnxruntime_numpy_casts_and_computes_the_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(elementwise, "available", lambda: False)
    monkeypatch.setattr(elementwise, "_session", lambda step: pytest.fail("onnxruntime used"))
    values = np.random.default_rng(1).random((2, 5, 7)).astype(np.float32)
    np.testing.assert_array_equal(elementwise.to_float16(values), values.astype(np.float16))
    logits = np.random.default_rng(1).normal(0, 8, (2, 5, 7)).astype(np.float32)
    np.testing.assert_array_equal(elementwise.sigmoid(logits), _formula(logits))


def test_the_sigmoid_is_the_formula_within_its_bound_everywhere_and_decides_as_it_does() -> None:
    rng = np.random.default_rng(3)
    near_zero = np.linspace(-1e-5, 1e-5, 20_001, dtype=np.float32)  # where a label's side of 0.5 is decided
    edges = np.array([0.0, -0.0, 16.6, 17.0, 18.0, 30.0, 88.0, 89.0, -17.0, -88.0, -89.0, -200.0, np.inf, -np.inf],
                     np.float32)
    logits = np.concatenate([near_zero, edges, rng.normal(0, 6, 200_000).astype(np.float32),
                             np.linspace(-40, 40, 100_004, dtype=np.float32)]).reshape(1, -1, 7)
    got, expected = elementwise.sigmoid(logits), _formula(logits)
    assert got.dtype == np.float32 and got.shape == logits.shape
    assert np.abs(got - expected).max() <= 2.4e-7
    decided = np.abs(logits) > 2e-7  # closer to 0, float32 rounding decides the side (the formula's too)
    np.testing.assert_array_equal((got > 0.5)[decided], (logits > 0)[decided])
    np.testing.assert_array_equal((expected > 0.5)[decided], (logits > 0)[decided])
    assert np.isnan(elementwise.sigmoid(np.array([np.nan], np.float32)))[0]
    flat, whole = logits.ravel(), got.ravel()
    for start, stop in [(1, 1000), (7, 8), (333, 100_333), (whole.size - 5, whole.size)]:  # any position, any length
        np.testing.assert_array_equal(elementwise.sigmoid(flat[start:stop]), whole[start:stop])
    strided = logits[:, ::3, 1::2]
    np.testing.assert_array_equal(elementwise.sigmoid(strided), got[:, ::3, 1::2])


@pytest.mark.parametrize("classes", [1, 3])
def test_the_output_step_leaves_the_logits_and_stores_float16_of_its_sigmoid(classes: int) -> None:
    logits = np.random.default_rng(2).normal(0, 6, (classes, 3, 40, 50)).astype(np.float32)  # a volume
    before = logits.copy()
    p32, l32 = logits_to_outputs(logits, classes, 0.5)
    p16, l16 = logits_to_outputs(logits, classes, 0.5, "float16")
    np.testing.assert_array_equal(logits, before)  # computed in place on its own array, not the caller's
    assert p32.dtype == np.float32 and p16.dtype == np.float16 and l16.dtype == np.uint8
    if classes > 1:
        np.testing.assert_array_equal(p16.view(np.uint16), p32.astype(np.float16).view(np.uint16))
    decided = np.abs(logits[0]) > 2e-7 if classes == 1 else np.ones(l16.shape, bool)
    np.testing.assert_array_equal(l16[decided], l32[decided])
    if classes == 1:
        np.testing.assert_array_equal(p32, _formula(logits))  # float32 probabilities: numpy's formula, bit for bit
        np.testing.assert_array_equal(p16, elementwise.sigmoid(logits).astype(np.float16))  # float16: the kernel's
        np.testing.assert_array_equal(l32, (p32[0] > 0.5).astype(np.uint8))
    else:
        np.testing.assert_array_equal(l32, p32.argmax(axis=0))


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
