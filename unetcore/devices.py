"""Which torch device a run uses, checked before any work, and said truly.

``auto`` is CUDA when torch sees a usable GPU, else the CPU. ``cuda`` is a request: it is refused in one line when
no GPU is usable (a CPU build of torch, no driver, no visible device) instead of silently running on the CPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import torch

from unetcore.errors import ConfigError
from unetcore.modes import Device


def gpu_is_usable() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def _why_no_gpu() -> str:
    if torch.version.cuda is None:
        hint = (" although `nvidia-smi` sees a GPU: the .venv was built with CPU torch; delete .venv and run "
                "scripts/setup.sh again") if nvidia_gpu_present() else ""
        return f"torch {torch.__version__} is a CPU build{hint}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU" + (
        f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")


def nvidia_gpu_present() -> bool:
    """``nvidia-smi -L`` lists a GPU (the driver sees one, whatever torch was built for)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def check_device(name: Device) -> None:
    """Refuse ``cuda`` where no GPU is usable, naming why.

    Raises:
        ConfigError: ``device`` is ``cuda`` and torch cannot use a GPU here.
    """
    if name == "cuda" and not gpu_is_usable():
        raise ConfigError("device", f"cuda asked for, but {_why_no_gpu()}; use --device auto or cpu")


def resolve_device(name: Device, index: int = 0) -> torch.device:
    """The device a run uses: ``auto`` → CUDA when usable, else CPU; ``cuda`` → GPU ``index`` (modulo the number
    visible, so worker ``i`` of a local cluster with one worker per GPU runs on GPU ``i``); ``cpu`` → CPU.

    Raises:
        ConfigError: ``cuda`` where no GPU is usable (see :func:`check_device`).
    """
    check_device(name)
    if name != "cpu" and gpu_is_usable():
        return torch.device("cuda", index % torch.cuda.device_count())
    return torch.device("cpu")


def worker_gpu_index(worker_name: object) -> int:
    """The GPU a Dask worker takes: its name if it is a number (a local cluster names them 0, 1, ...), else the
    number it ends with (``dask worker --name gpu-3``), else 0 — give each remote worker its own
    ``CUDA_VISIBLE_DEVICES`` (one GPU, which is then GPU 0) or such a name."""
    match = re.search(r"(\d+)$", str(worker_name))
    return int(match.group(1)) if match else 0


def device_facts(device: torch.device) -> dict[str, str]:
    """What a run logs about where it ran: the device used, torch's version and its CUDA build."""
    facts = {"device_used": str(device), "torch_version": torch.__version__, "torch_cuda": str(torch.version.cuda)}
    if device.type == "cuda":
        facts["gpu_name"] = torch.cuda.get_device_name(device)
    return facts
