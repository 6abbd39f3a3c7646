"""Which torch device a run uses, checked before any work, and said truly.

``auto`` is CUDA when torch sees a usable GPU, else the CPU. ``cuda`` is a request: it is refused in one line when
no GPU is usable (a CPU build of torch, no driver, no visible device) instead of silently running on the CPU.

Torch is imported only when the answer needs it: on a machine with no NVIDIA device (:func:`gpu_hardware_present`)
``auto`` is the CPU without it, so a CPU prediction on onnxruntime never pays torch's seconds of import.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from typing import TYPE_CHECKING

from unetcore.errors import ConfigError
from unetcore.modes import Device

if TYPE_CHECKING:
    import torch

log = logging.getLogger("unetcore.devices")


def gpu_is_usable() -> bool:
    if not gpu_hardware_present():
        return False
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


@functools.lru_cache(maxsize=1)
def gpu_hardware_present() -> bool:
    """An NVIDIA GPU may be here: a device node ``/dev/nvidia0``… or ``nvidia-smi -L`` lists one. False means no
    torch build can use CUDA on this machine, which is known without importing torch."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or nvidia_gpu_present()


def _why_no_gpu() -> str:
    import torch

    if torch.version.cuda is None:
        hint = (" although `nvidia-smi` sees a GPU: the .venv was built with CPU torch; delete .venv and run "
                "scripts/setup.sh again") if nvidia_gpu_present() else ""
        return f"torch {torch.__version__} is a CPU build{hint}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU" + (
        f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")


@functools.lru_cache(maxsize=1)
def nvidia_gpu_present() -> bool:
    """``nvidia-smi -L`` lists a GPU (the driver sees one, whatever torch was built for); asked once per process."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def cpu_torch_on_gpu_machine() -> bool:
    """torch is a CPU build (``torch.version.cuda is None``) on a machine whose driver sees a GPU: typically a
    ``.venv`` first built on a machine without one."""
    if not nvidia_gpu_present():
        return False
    import torch

    return torch.version.cuda is None


def check_device(name: Device) -> None:
    """Refuse ``cuda`` where no GPU is usable, naming why; for ``auto``, say in one line (a warning) when a GPU is
    there but this torch is a CPU build, so the run's CPU speed is not a surprise.

    Raises:
        ConfigError: ``device`` is ``cuda`` and torch cannot use a GPU here.
    """
    if name == "cpu" or (name == "auto" and not gpu_hardware_present()):
        return  # nothing to refuse or to warn about (and torch stays unimported)
    if name == "cuda" and not gpu_is_usable():
        raise ConfigError("device", f"cuda asked for, but {_why_no_gpu()}; use --device auto or cpu")
    if name == "auto" and not gpu_is_usable() and cpu_torch_on_gpu_machine():
        log.warning("warning: running on the CPU: %s", _why_no_gpu())


def resolve_device(name: Device, index: int = 0) -> torch.device:
    """The device a run uses: ``auto`` → CUDA when usable, else CPU; ``cuda`` → GPU ``index`` (modulo the number
    visible, so worker ``i`` of a local cluster with one worker per GPU runs on GPU ``i``); ``cpu`` → CPU.

    Raises:
        ConfigError: ``cuda`` where no GPU is usable (see :func:`check_device`).
    """
    import torch

    check_device(name)
    if name != "cpu" and gpu_is_usable():
        return torch.device("cuda", index % torch.cuda.device_count())
    return torch.device("cpu")


def device_type(name: Device) -> str:
    """``"cuda"`` or ``"cpu"``: the type of :func:`resolve_device`'s answer, without importing torch where no GPU
    can be used (see :func:`gpu_hardware_present`).

    Raises:
        ConfigError: ``cuda`` where no GPU is usable.
    """
    check_device(name)
    return "cuda" if name != "cpu" and gpu_is_usable() else "cpu"


GPU_RESOURCE = "GPU_INDEX"
"""The Dask worker resource that names a worker's GPU: ``dask worker ADDRESS --resources GPU_INDEX=3``."""


def worker_gpu_index(worker_name: object, resources: Mapping[str, float] | None = None,
                     visible: str | None = None) -> int:
    """The GPU a Dask worker takes, in this order of evidence:

    1. ``CUDA_VISIBLE_DEVICES`` (``visible``; default: this process's) lists one device: that one, GPU 0;
    2. a worker resource :data:`GPU_RESOURCE` (``--resources GPU_INDEX=3``);
    3. the worker's name, when it is a number (a local cluster names them 0, 1, ...) or ends with one after a
       letter or dash (``dask worker --name gpu-3``); never a port of an address-like name
       (``tcp://10.0.0.5:40331``, Dask's default for a remote worker), which says nothing about GPUs;
    4. else 0 (:func:`resolve_device` takes the index modulo the GPUs visible).
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if visible is not None and len([d for d in visible.split(",") if d.strip()]) == 1:
        return 0
    if resources and GPU_RESOURCE in resources:
        return int(resources[GPU_RESOURCE])
    name = str(worker_name)
    if "://" in name or re.search(r":\d+$", name):
        return 0
    match = re.fullmatch(r"(?:.*[A-Za-z_-])?(\d+)", name)
    return int(match.group(1)) if match else 0


def device_facts(device: torch.device) -> dict[str, str]:
    """What a run logs about where it ran: the device used, torch's version and its CUDA build."""
    import torch

    facts = {"device_used": str(device), "torch_version": torch.__version__, "torch_cuda": str(torch.version.cuda)}
    if device.type == "cuda":
        facts["gpu_name"] = torch.cuda.get_device_name(device)
    return facts
