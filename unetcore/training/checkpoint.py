"""Checkpoints of a training run: what ``last.pt`` holds, how it is written and read, when it may be resumed.

``last.pt`` holds the model, optimiser and scheduler state dicts, the RNG states, the loop's progress
(:class:`LoopState`), the epoch's metrics and the recipe it was trained with; after registration it also
holds the registered version. It is written atomically and read with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from unetcore.atomic import atomic_write
from unetcore.config import TrainConfig
from unetcore.errors import ConfigError, InputError

CHECKPOINT = "last.pt"
BEST = "best"  # folder of the best model so far (weights-only, see unetcore.model)
# Options that may change between a run and its resumption; any other change makes the checkpoint foreign.
RESUMABLE_CHANGES = frozenset(
    {"epochs", "time_budget_s", "patience", "resume", "num_workers", "device", "compile", "hd95", "preview_every",
     "output", "tracking_uri"}
)


@dataclass
class LoopState:
    """The loop state a checkpoint carries besides the tensors."""

    epoch: int = -1  # last finished epoch
    best: float = -1.0  # best EMA of validation Dice so far
    ema: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    run_id: str | None = None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` under a temporary name, fsync it, then rename it over ``path`` (never half-written)."""
    atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (tensors and plain containers, never code).

    Raises:
        InputError: the file is truncated or not a checkpoint.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise InputError(path, f"unreadable checkpoint ({type(exc).__name__})", "delete it or drop --resume") from None


def recipe(cfg: TrainConfig) -> dict[str, Any]:
    """The options a checkpoint must share with the run that resumes it."""
    return {k: v for k, v in cfg.flat_params().items() if k not in RESUMABLE_CHANGES}


def is_finished(state: dict[str, Any]) -> bool:
    """The checkpoint's run registered its model: nothing of it is lost by starting a new run over it."""
    return bool(state.get("registered"))


def check_resumable(cfg: TrainConfig, state: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint written with another recipe, or one whose run already finished.

    Raises:
        ConfigError: a recipe option differs, or the run finished all ``cfg.epochs`` and registered.
    """
    now = recipe(cfg)
    for key, value in state["recipe"].items():
        if now.get(key) != value:
            raise ConfigError("resume", f"{path} holds an unfinished run trained with {key}={value!r}, not "
                                        f"{now.get(key)!r}; pass --restart to start over (it is replaced), or "
                                        "choose another --output")
    if state["progress"]["epoch"] + 1 >= cfg.epochs and state.get("registered"):
        raise ConfigError("resume", f"the run in {path.parent} finished all {cfg.epochs} epochs and registered "
                                    f"version {state['registered']['version']}; raise --epochs to train longer")


def rng_state(device: torch.device) -> dict[str, Any]:
    """The CPU generator's state and, when training on CUDA, the training device's (not every visible GPU's)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state`'s output; the CUDA state only when ``device`` is a GPU that exists here."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # older checkpoints held every visible GPU's state
        cuda = cuda[device.index or 0] if len(cuda) > (device.index or 0) else None
    if cuda is not None and _cuda_device_exists(device):
        torch.cuda.set_rng_state(cuda, device)


def _cuda_device_exists(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()


def checkpoint_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loop: LoopState,
    metrics: dict[str, float],
    cfg: TrainConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Everything ``last.pt`` holds after an epoch (see the module docstring)."""
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": rng_state(device), "progress": asdict(loop), "metrics": metrics, "recipe": recipe(cfg),
    }


def restore(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> LoopState:
    """Load a checkpoint's tensors and RNG states in place; return its loop state."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"], device)
    return LoopState(**state["progress"])


def mark_registered(path: Path, registered: dict[str, Any]) -> None:
    """Record the registered version in ``path`` (if any): resuming it again then needs more epochs."""
    if path.exists():
        save_checkpoint(path, {**load_checkpoint(path), "registered": registered})
