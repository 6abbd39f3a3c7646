"""benchmarks/bench_gpu.py runs where the GPU machines' Python runs: without MLflow, Prefect, Dask, pydantic, Zarr
or MONAI (each blocked here as if not installed), and reports every side in its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("mlflow", "prefect", "dask", "distributed", "pydantic", "pydantic_core", "zarr", "numcodecs", "monai")

RUNNER = """
import runpy, sys
blocked = {blocked!r}
for name in blocked:
    sys.modules[name] = None  # `import name` now raises ImportError, as on a machine without it
sys.argv = ["bench_gpu.py", "--device", "cpu", "--quick", "--json", {json_path!r}]
runpy.run_path({bench!r}, run_name="__main__")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in blocked and sys.modules[m] is not None)
print("LOADED", loaded)
"""


def test_the_gpu_bench_quick_mode_runs_with_the_heavy_libraries_missing(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code = RUNNER.format(blocked=BLOCKED, json_path=str(out), bench=str(ROOT / "benchmarks" / "bench_gpu.py"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout
    result = json.loads(out.read_text())
    sides = [r["side"] for r in result["rows"]]
    assert sides == ["train amp=off", "train amp=on", "bare forward", "pipeline block path (numpy in memory)"]
    assert all(r["seconds"] > 0 for r in result["rows"])
    assert all(r["images_per_s"] > 0 for r in result["rows"][:2])
    assert all(r["megapixels_per_s"] > 0 for r in result["rows"][2:])
    assert result["facts"]["device"] == "cpu" and result["ratios"]["pipeline_vs_bare"] > 0
    assert "pipeline block path" in proc.stdout  # the table
