"""Test settings: Prefect and MLflow state in temporary folders, never in the user's home."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_HOME = Path(tempfile.mkdtemp(prefix="unet-tests-prefect-"))
os.environ["PREFECT_HOME"] = str(_HOME)
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# The suite's exactness checks are CPU (float32) figures: pin it to the CPU also on a GPU machine, where `auto`
# would pick CUDA and bf16. GPU runs set UNET_TEST_DEVICE=cuda and use benchmarks/bench_gpu.py's tolerances.
if os.environ.get("UNET_TEST_DEVICE") != "cuda":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
