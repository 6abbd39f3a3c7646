"""float32 → float16 on onnxruntime's vectorised ``Cast``: numpy's own cast is a scalar loop.

Casting a 2048² block's probabilities takes 15-19 ms in numpy and about 4 ms in onnxruntime (one thread, no memory
arena: nothing is kept between blocks), with the same bytes: both round to nearest, ties to even (BENCHMARKS.md,
the CPU side alone). The graph (one ``Cast`` node, any shape) is shipped in the package
(``graphs/cast-float16.onnx``, 81 bytes) because building it needs the ``onnx`` package, whose import costs a
second; :func:`build_graph` makes it (``python scripts/make_cast_graph.py`` rewrites the file) and a test checks
the shipped file is its graph. Without onnxruntime, :func:`to_float16` casts in numpy.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GRAPH", "IR_VERSION", "OPSET", "available", "build_graph", "to_float16"]

GRAPH = Path(__file__).parent / "graphs" / "cast-float16.onnx"
IR_VERSION, OPSET = 8, 17  # read by every onnxruntime this project allows (>= 1.18)


def build_graph() -> Any:
    """The ONNX model (``onnx.ModelProto``): ``y = Cast<float16>(x)`` for ``x`` float32 of any shape."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)], "cast-float16",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="unetcore")
    model.ir_version = IR_VERSION
    return model


@functools.cache
def available() -> bool:
    """onnxruntime can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("onnxruntime") is not None


@functools.cache
def _session() -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a block task runs on one core of its worker's share
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False  # an arena would keep a block's output (+16-66 MB a worker) for good
    options.log_severity_level = 3
    return ort.InferenceSession(str(GRAPH), options, providers=["CPUExecutionProvider"])


def to_float16(values: np.ndarray) -> np.ndarray:
    """``values`` as float16, the bytes of ``values.astype(np.float16)``; on onnxruntime where it is installed."""
    if values.dtype == np.float16:
        return values
    if not available():
        return values.astype(np.float16)
    return _session().run(None, {"x": np.ascontiguousarray(values, dtype=np.float32)})[0]
