"""Blended logits → (probabilities, labels) in onnxruntime: the numpy block path's last step, one pass each.

The sigmoid (or softmax), the threshold (or argmax) and the float16 cast of a 2048² block take ≈ 50 ms in numpy
(its float16 cast is a scalar loop) and ≈ 13 ms in onnxruntime's vectorised kernels, on one thread, for the same
float32 formulas (their exp differs from numpy's by an ulp; BENCHMARKS.md). The graphs are tiny and shipped in the package (``graphs/*.onnx``: four of
them, a few hundred bytes each), because building them needs the ``onnx`` package, whose import costs a second;
:func:`build_graph` makes them (``python scripts/make_output_graphs.py`` rewrites the files) and a test checks
that the shipped files are its graphs. Without onnxruntime, :func:`outputs` is None and the caller computes in
numpy (:func:`unetcore.inference.predict.logits_to_outputs`).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any, Literal

import numpy as np

from unetcore.modes import ProbabilityDtype as Stored

__all__ = ["GRAPH_NAMES", "available", "build_graph", "graph_file", "outputs"]

Activation = Literal["sigmoid", "softmax"]
GRAPH_DIR = Path(__file__).parent / "graphs"
GRAPH_NAMES: tuple[tuple[Activation, Stored], ...] = (
    ("sigmoid", "float16"), ("sigmoid", "float32"), ("softmax", "float16"), ("softmax", "float32"))
IR_VERSION, OPSET = 8, 17  # read by every onnxruntime this project allows (>= 1.18)


def graph_file(activation: Activation, stored: Stored) -> Path:
    """The shipped graph of one activation and probability dtype."""
    return GRAPH_DIR / f"outputs-{activation}-{stored}.onnx"


def build_graph(activation: Activation, stored: Stored) -> Any:
    """The ONNX model (``onnx.ModelProto``) of one output step, for logits ``x`` (K, *spatial) float32 of any rank.

    ``sigmoid`` (K = 1): ``p = cast(1 / (1 + exp(-x)))`` as numpy computes it (onnxruntime's own ``Sigmoid`` is
    faster but has an absolute error of ~1e-7, so tiny probabilities come out wrong relative to their size),
    ``l = uint8(sigmoid > h)`` with ``h`` the threshold (a float32 scalar input); ``l`` keeps the class axis. ``softmax``: ``exp(x - max) / sum`` over
    axis 0 (numpy's order of operations), ``l = uint8(argmax(softmax))`` (the first maximum, as numpy's).
    """
    from onnx import TensorProto, helper

    f32, out_type = TensorProto.FLOAT, TensorProto.FLOAT16 if stored == "float16" else TensorProto.FLOAT
    nodes = []
    inputs = [helper.make_tensor_value_info("x", f32, None)]
    if activation == "sigmoid":
        inputs.append(helper.make_tensor_value_info("h", f32, []))
        nodes += [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Exp", ["n"], ["e"]),
                  helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Reciprocal", ["a"], ["s"]),
                  helper.make_node("Greater", ["s", "h"], ["b"]), helper.make_node("Cast", ["b"], ["l"], to=TensorProto.UINT8)]
    else:
        nodes += [helper.make_node("ReduceMax", ["x"], ["m"], axes=[0], keepdims=1),
                  helper.make_node("Sub", ["x", "m"], ["d"]), helper.make_node("Exp", ["d"], ["e"]),
                  helper.make_node("ReduceSum", ["e", "axis"], ["z"], keepdims=1),
                  helper.make_node("Div", ["e", "z"], ["s"]),
                  helper.make_node("ArgMax", ["s"], ["i"], axis=0, keepdims=0),
                  helper.make_node("Cast", ["i"], ["l"], to=TensorProto.UINT8)]
    nodes.append(helper.make_node("Cast", ["s"], ["p"], to=out_type) if stored == "float16"
                 else helper.make_node("Identity", ["s"], ["p"]))
    initializers = ([helper.make_tensor("one", f32, [], [1.0])] if activation == "sigmoid"
                    else [helper.make_tensor("axis", TensorProto.INT64, [1], [0])])
    graph = helper.make_graph(nodes, f"outputs-{activation}-{stored}", inputs,
                              [helper.make_tensor_value_info("p", out_type, None),
                               helper.make_tensor_value_info("l", TensorProto.UINT8, None)], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="unetcore")
    model.ir_version = IR_VERSION
    return model


@functools.cache
def _session(activation: Activation, stored: Stored) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a block task runs on one core of its worker's share
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(graph_file(activation, stored)), options, providers=["CPUExecutionProvider"])


@functools.cache
def available() -> bool:
    """onnxruntime can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("onnxruntime") is not None


def outputs(logits: np.ndarray, num_classes: int, threshold: float, stored: Stored
            ) -> tuple[np.ndarray, np.ndarray] | None:
    """(probabilities (K, *spatial) in ``stored``, labels (*spatial) uint8) of blended logits; None without
    onnxruntime."""
    if not available():
        return None
    x = np.ascontiguousarray(logits, dtype=np.float32)
    if num_classes == 1:
        probs, labels = _session("sigmoid", stored).run(None, {"x": x, "h": np.asarray(threshold, np.float32)})
        return probs, labels[0]
    probs, labels = _session("softmax", stored).run(None, {"x": x})
    return probs, labels
