"""Model export: time to export and check, file size, and the exported model's forward speed against torch's.

The README's 2-D UNet (depth 4, base 16, batch norm) and a 3-D one (depth 3, base 16, instance norm, the first
pooling in-plane only), randomly initialised (the export does not depend on the weights' values), are saved as a
model folder and exported with :func:`unetcore.model.export_model` to ONNX and TorchScript. Then each file and
the torch model predict the same inputs (2-D: 4 tiles of 256²; 3-D: 2 tiles of 32 x 96 x 96), alternating, the
median of ``--repeats`` forwards each, all on the CPU with torch's default threads and onnxruntime's defaults.

    .venv/bin/python benchmarks/bench_export.py [--repeats 5]

Writes ``benchmarks/results/export.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

from unetcore.config import ExportConfig, ModelConfig
from unetcore.model import build_model, export_model, save_model

MODELS = {
    "2d-depth4-base16": (ModelConfig(depth=4, base_channels=16), (4, 1, 256, 256)),
    "3d-depth3-base16": (ModelConfig(depth=3, base_channels=16, spatial_dims=3, norm="instance",
                                     pool=[[1, 2, 2], [2, 2, 2], [2, 2, 2]]), (2, 1, 32, 96, 96)),
}


def median_seconds(fn: Any, x: np.ndarray, repeats: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(name: str, config: ModelConfig, shape: tuple[int, ...], repeats: int, tmp: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(config).eval()
    folder = save_model(tmp / name, model)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    def torch_forward(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(a)).numpy()

    row: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in model.parameters()), "input": list(shape),
                           "torch_forward_s": median_seconds(torch_forward, x, repeats)}
    for fmt, suffix in (("onnx", "onnx"), ("torchscript", "pt")):
        start = time.perf_counter()
        result = export_model(ExportConfig(model=str(folder), output=str(tmp / f"{name}.{suffix}"), format=fmt))
        row[f"{fmt}_export_and_check_s"] = time.perf_counter() - start
        row[f"{fmt}_mb"] = result.path.stat().st_size / 1e6
        row[f"{fmt}_max_abs_diff"] = max(result.max_abs_diff.values())
        if fmt == "onnx":
            session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
            run = lambda a: session.run(None, {"input": a})[0]  # noqa: E731
        else:
            module = torch.jit.load(str(result.path))

            def run(a: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    return module(torch.from_numpy(a)).numpy()
        row[f"{fmt}_forward_s"] = median_seconds(run, x, repeats)
        row[f"{fmt}_vs_torch"] = row["torch_forward_s"] / row[f"{fmt}_forward_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        rows = [bench_model(name, cfg, shape, args.repeats, Path(tmp)) for name, (cfg, shape) in MODELS.items()]
    out = Path(__file__).parent / "results" / "export.json"
    out.write_text(json.dumps({"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "rows": rows},
                              indent=2))
    for row in rows:
        print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
