"""Device choice: `cuda` where no GPU is usable is refused in one line (never a silent CPU run), `auto` falls back,
and a Dask worker's GPU comes from its name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from unetcore.devices import check_device, device_facts, resolve_device, worker_gpu_index
from unetcore.errors import ConfigError

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def test_cuda_without_a_usable_gpu_is_refused_naming_why() -> None:
    with pytest.raises(ConfigError, match=r"parameter 'device': cuda asked for, but torch .* (CPU build|sees no GPU)"):
        check_device("cuda")
    with pytest.raises(ConfigError):
        resolve_device("cuda")


def test_auto_and_cpu_run_on_the_cpu_and_say_so() -> None:
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    facts = device_facts(torch.device("cpu"))
    assert facts["device_used"] == "cpu" and facts["torch_version"] == torch.__version__
    assert facts["torch_cuda"] == str(torch.version.cuda)


@pytest.mark.parametrize("name, index", [(0, 0), (3, 3), ("2", 2), ("gpu-5", 5), ("worker-10", 10),
                                         ("tcp://10.0.0.5:4444-x", 0)])
def test_a_dask_worker_takes_the_gpu_its_name_says(name: object, index: int) -> None:
    assert worker_gpu_index(name) == index


@pytest.mark.parametrize("command", ["train", "predict"])
def test_cli_refuses_device_cuda_before_any_work(tmp_path: Path, command: str) -> None:
    import numpy as np
    from PIL import Image

    from unetcore.config import IngestConfig
    from unetcore.ingest import ingest_folder

    for folder in ("img", "msk"):
        (tmp_path / folder).mkdir()
    for i in range(3):
        Image.fromarray(np.full((64, 64), 40 * i, np.uint8)).save(tmp_path / "img" / f"a{i}.png")
        Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 2).astype(np.uint8)).save(tmp_path / "msk" / f"a{i}.png")
    ingest_folder(IngestConfig(images=str(tmp_path / "img"), masks=str(tmp_path / "msk"), output=str(tmp_path / "ds"),
                               chunk_size=64, val_fraction=0.34))
    extra = ["-o", str(tmp_path / "out"), "--model", str(tmp_path / "m")] if command == "predict" else [
        "--output", str(tmp_path / "out"), "--patch-size", "32"]
    result = CliRunner().invoke(app, [command, str(tmp_path / "ds"), *extra, "--device", "cuda", "--no-prefect",
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 2, result.output
    [line] = [ln for ln in result.output.splitlines() if ln.strip()]
    assert line.startswith("error: option --device: cuda asked for"), line
    assert not (tmp_path / "out").exists()
