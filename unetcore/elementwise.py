"""Element-wise steps of a block on onnxruntime's vectorised kernels: numpy's are scalar loops or slower passes.

* :func:`to_float16`, the float16 cast: a 2048² block's probabilities take 15-19 ms in numpy and about 4 ms here,
  with the same bytes: both round to nearest, ties to even.
* :func:`to_float32`, float16 back to float32 (exact both ways): 12-13 ms in numpy for 2048², 1.6-2 ms here; the
  pyramid's level 1 of the probabilities (:func:`unetcore.store.omezarr.halve`) starts with it.
* :func:`sigmoid`: numpy's ``1 / (1 + exp(-x))`` is four passes over the block (13-23 ms for 2048²), onnxruntime's
  ``Sigmoid`` one (2-3 ms). Its values differ from numpy's formula by at most 2.4e-7, absolute: a float32 ulp or
  two near 1 (far under float16's step of 4.9e-4 there), but small probabilities lose their relative precision
  (0 for logits below about -15.8, where the formula gives up to 1.4e-7; up to 3 float16 steps off below 2.4e-4;
  not monotone in the tails). On one machine it gives the same value wherever it lies in the array (so block-wise
  equals whole-image); MLAS picks its code by CPU, so machines of different CPUs may differ within the bound. A
  label differs from the formula's only where the probability is within 2.4e-7 of the threshold (at 0.5: for
  logits within 2e-7 of 0, where float32 rounding decides in the formula too). Inference uses it on the plain
  block path where probabilities are stored as float16 (the default) or not at all; float32 probabilities, the
  resampling and background-skipping paths and validation keep numpy's formula (``exact``), torch's kernel its
  own sigmoid.

All three run on one thread without a memory arena (nothing is kept between blocks; BENCHMARKS.md, the CPU side
alone) and write into an array numpy allocates (an IO binding): numpy asks for transparent huge pages for large
arrays, where onnxruntime's own output buffers were faulted in 4 KiB at a time, 2-3.6x the kernel's time once a
worker had mmapped and returned them (BENCHMARKS.md, eleventh session). :func:`to_float32` also fills a buffer the
caller reuses (the pyramid's halving, slab by slab). The graphs (one node each, any shape) are shipped in the
package (``unetcore/graphs/*.onnx``, 68-81 bytes) because building them needs the ``onnx`` package, whose import
costs a second; :func:`build_graph` makes them (``python scripts/make_graphs.py`` rewrites the files) and a test
checks the shipped files are its graphs. Without onnxruntime, numpy computes all three.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = ["GRAPHS", "IR_VERSION", "OPSET", "Step", "available", "build_graph", "sigmoid", "to_float16", "to_float32"]

Step = Literal["cast-float16", "cast-float32", "sigmoid"]
GRAPHS: dict[Step, Path] = {name: Path(__file__).parent / "graphs" / f"{name}.onnx"
                            for name in ("cast-float16", "cast-float32", "sigmoid")}
IR_VERSION, OPSET = 8, 17  # read by every onnxruntime this project allows (>= 1.18)


def build_graph(step: Step) -> Any:
    """The ONNX model (``onnx.ModelProto``) of one step, for ``x`` of any shape: ``y = Cast<float16>(x)`` and
    ``y = Sigmoid(x)`` of float32, ``y = Cast<float>(x)`` of float16."""
    from onnx import TensorProto, helper

    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    node, in_type, out_type = {
        "cast-float16": (helper.make_node("Cast", ["x"], ["y"], to=f16), f32, f16),
        "cast-float32": (helper.make_node("Cast", ["x"], ["y"], to=f32), f16, f32),
        "sigmoid": (helper.make_node("Sigmoid", ["x"], ["y"]), f32, f32),
    }[step]
    graph = helper.make_graph([node], step, [helper.make_tensor_value_info("x", in_type, None)],
                              [helper.make_tensor_value_info("y", out_type, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="unetcore")
    model.ir_version = IR_VERSION
    return model


@functools.cache
def available() -> bool:
    """onnxruntime can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("onnxruntime") is not None


@functools.cache
def _session(step: Step) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a block task runs on one core of its worker's share
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False  # an arena would keep a block's output (+16-66 MB a worker) for good
    options.log_severity_level = 3
    return ort.InferenceSession(str(GRAPHS[step]), options, providers=["CPUExecutionProvider"])


_IN_OUT: dict[Step, tuple[type[np.generic], type[np.generic]]] = {
    "cast-float16": (np.float32, np.float16), "cast-float32": (np.float16, np.float32),
    "sigmoid": (np.float32, np.float32)}


def _checked_out(step: Step, shape: tuple[int, ...], out: np.ndarray) -> np.ndarray:
    """``out`` when it can take ``step``'s output of ``shape``; else ValueError."""
    dtype = _IN_OUT[step][1]
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"{step}: out must be a C-contiguous {np.dtype(dtype)} array of shape {shape}")
    return out


def _run(step: Step, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``step`` of ``values`` written into ``out`` (a new array when None): numpy allocates it, so a block's output
    gets the transparent huge pages numpy asks for, where onnxruntime's own allocation was faulted in 4 KiB at a
    time (2-3.6x the kernel's time in a worker; BENCHMARKS.md, eleventh session)."""
    in_dtype, out_dtype = _IN_OUT[step]
    x = np.ascontiguousarray(values, dtype=in_dtype)
    out = np.empty(x.shape, out_dtype) if out is None else _checked_out(step, x.shape, out)
    session = _session(step)
    binding = session.io_binding()
    binding.bind_cpu_input("x", x)
    binding.bind_output("y", "cpu", 0, out_dtype, out.shape, out.ctypes.data)
    session.run_with_iobinding(binding)
    return out


def to_float16(values: np.ndarray) -> np.ndarray:
    """``values`` as float16, the bytes of ``values.astype(np.float16)``; float32 on onnxruntime where it is
    installed, anything else in numpy (a float64 through float32 would round twice)."""
    if values.dtype == np.float16:
        return values
    if not available() or values.dtype != np.float32 or values.ndim == 0 or values.size == 0:
        return values.astype(np.float16)
    return _run("cast-float16", values)


def to_float32(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float16 ``values`` as float32 (exact: the values of ``values.astype(np.float32)``), in ``out`` (a
    C-contiguous float32 array of their shape, reused from call to call) or a new array; on onnxruntime where it is
    installed; anything but float16 in numpy."""
    if not available() or values.dtype != np.float16 or values.ndim == 0 or values.size == 0:
        if out is None:
            return values.astype(np.float32)
        _checked_out("cast-float32", values.shape, out)[...] = values
        return out
    return _run("cast-float32", values, out)


def sigmoid(values: np.ndarray, exact: bool = False) -> np.ndarray:
    """``1 / (1 + exp(-values))`` as a new float32 array: on onnxruntime where it is installed (within 2.4e-7 of
    numpy's formula, absolute), else, or when ``exact``, numpy's formula in place on one new array (float32's
    relative precision down to the smallest probabilities)."""
    if available() and not exact and values.ndim > 0 and values.size > 0:
        return _run("sigmoid", values)
    probs = np.asarray(np.negative(values, dtype=np.float32))  # 0-d too (a ufunc gives it back as a scalar)
    np.exp(probs, out=probs)
    probs += 1.0
    np.reciprocal(probs, out=probs)
    return probs
