"""Device choice: `cuda` where no GPU is usable is refused in one line (never a silent CPU run), `auto` falls back,
and a Dask worker's GPU comes from its name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from unetcore.devices import check_device, device_facts, device_type, resolve_device, worker_gpu_index
from unetcore.errors import ConfigError

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def test_cuda_without_a_usable_gpu_is_refused_naming_why() -> None:
    with pytest.raises(ConfigError, match=r"parameter 'device': cuda asked for, but torch .* (CPU build|sees no GPU)"):
        check_device("cuda")
    with pytest.raises(ConfigError):
        resolve_device("cuda")


def test_auto_and_cpu_run_on_the_cpu_and_say_so() -> None:
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    assert device_type("auto") == device_type("cpu") == "cpu"
    facts = device_facts(torch.device("cpu"))
    assert facts["device_used"] == "cpu" and facts["torch_version"] == torch.__version__
    assert facts["torch_cuda"] == str(torch.version.cuda)


@pytest.mark.parametrize("name, index", [(0, 0), (3, 3), ("2", 2), ("gpu-5", 5), ("worker-10", 10), ("gpu7", 7),
                                         ("tcp://10.0.0.5:4444-x", 0), ("tcp://10.0.0.5:40331", 0),
                                         ("10.0.0.5:40331", 0), ("scheduler", 0)])
def test_a_dask_worker_takes_the_gpu_its_name_says_never_its_port(name: object, index: int) -> None:
    assert worker_gpu_index(name, visible="") == index


def test_a_worker_resource_or_a_single_visible_gpu_decides_before_the_name() -> None:
    assert worker_gpu_index("tcp://10.0.0.5:40331", {"GPU_INDEX": 3.0}, visible="") == 3
    assert worker_gpu_index("gpu-3", {"GPU_INDEX": 1.0}, visible="") == 1
    assert worker_gpu_index("gpu-3", {"GPU_INDEX": 1.0}, visible="2") == 0  # it sees one GPU: that one
    assert worker_gpu_index("gpu-3", visible="0,1,2,3") == 3


def test_auto_says_in_one_line_when_a_cpu_torch_runs_on_a_gpu_machine(monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    import unetcore.devices as devices

    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(devices, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(devices, "gpu_hardware_present", lambda: True)
    with caplog.at_level("WARNING", "unetcore.devices"):
        check_device("auto")
    [record] = caplog.records
    assert "\n" not in record.getMessage()
    assert "CPU build" in record.getMessage() and "nvidia-smi" in record.getMessage() and ".venv" in record.getMessage()
    with pytest.raises(ConfigError, match="CPU build although `nvidia-smi` sees a GPU"):
        check_device("cuda")
    caplog.clear()
    monkeypatch.setattr(devices, "nvidia_gpu_present", lambda: False)
    monkeypatch.setattr(devices, "gpu_hardware_present", lambda: False)
    check_device("auto")
    assert caplog.records == []  # a CPU-only machine: nothing to say


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
