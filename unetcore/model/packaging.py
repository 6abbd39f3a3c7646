"""Save and load a UNet as a folder of plain weights plus JSON, never as pickled code.

Layout::

    <directory>/weights.pt    state_dict written by torch.save, read back with weights_only=True
    <directory>/config.json   {"model": ModelConfig fields, **extra}

Both files are written into a hidden sibling folder that replaces ``<directory>`` only once complete
(:func:`unetcore.store.omezarr.atomic_store`), so a failed save leaves the previous model loadable.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from unetcore.atomic import atomic_write
from unetcore.config import ModelConfig, NormalizationConfig
from unetcore.errors import ConfigError, InputError
from unetcore.store.omezarr import atomic_store

if TYPE_CHECKING:  # torch is imported by the functions that need it: read_config runs without it
    import torch

    from unetcore.model.unet import UNet

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"


def save_model(directory: Path, model: UNet, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``directory`` (created if needed) as ``weights.pt`` + ``config.json``.

    Args:
        directory: target folder; an existing model there is replaced.
        model: the network; its ``config`` is stored so :func:`load_model` can rebuild it.
        extra: more JSON-serialisable entries for ``config.json`` (e.g. normalisation); ``"model"`` is reserved.

    Returns:
        The folder written.
    """
    import torch

    extra = extra or {}
    if "model" in extra:
        raise ConfigError("extra", "the key 'model' is reserved for the architecture")
    config_text = json.dumps({"model": model.config.model_dump(mode="json"), **extra}, indent=2)
    directory = Path(directory)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_store(directory) as tmp:
        tmp.mkdir()
        atomic_write(tmp / WEIGHTS_FILE, lambda f: torch.save(state, f))
        atomic_write(tmp / CONFIG_FILE, lambda f: f.write(config_text.encode()))
    return directory


def read_config(directory: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Parse ``config.json`` into the ModelConfig and the whole dict; InputError on any problem."""
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise InputError(directory, "model folder not found", "give a folder written by save_model")
    if not path.is_file():
        raise InputError(path, "missing: not a saved model, or its save did not finish", "save the model again")
    try:
        config = json.loads(path.read_text())
        if "normalization" in config:  # inference applies it: refuse a tampered recipe here, in one line
            NormalizationConfig(**config["normalization"])
        return ModelConfig(**config["model"]), config
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})", "save the model again") from None
    except (KeyError, TypeError) as exc:
        raise InputError(path, f"no valid 'model' section ({exc!r})", "save the model again") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        section = "model" if "model" in str(exc.title).lower() else "normalization"
        reason = f"{section}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
        raise InputError(path, reason, "save the model again") from None


def _read_weights(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """Load a state_dict with ``weights_only=True``: tensors and plain containers only, never code."""
    import torch

    if not path.is_file():
        raise InputError(path, "missing", "save the model again")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is corrupt or foreign
        raise InputError(path, "not a torch weights file (not a zip archive)", "save the model again")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(
            path, "refused: it holds pickled objects, not only tensors", "only load models from trusted sources"
        ) from None
    except Exception as exc:  # torch raises many types on a truncated or foreign file
        raise InputError(path, f"not a readable weights file ({type(exc).__name__})", "save again") from None
    if not isinstance(state, dict):
        raise InputError(path, f"holds a {type(state).__name__}, not a state_dict", "save with save_model")
    return state


def load_model(directory: Path, map_location: str | torch.device = "cpu") -> tuple[UNet, dict[str, Any]]:
    """Rebuild the UNet saved by :func:`save_model`.

    Args:
        directory: folder holding ``config.json`` and ``weights.pt``.
        map_location: device the weights and the model are placed on.

    Returns:
        ``(model in eval mode, the full config.json dict)``.

    Raises:
        InputError: missing folder or file, corrupt JSON, refused or unreadable weights, or weights that do not
            fit the architecture in ``config.json``.
    """
    from unetcore.model.unet import UNet

    directory = Path(directory)
    model_config, config = read_config(directory)
    state = _read_weights(directory / WEIGHTS_FILE, map_location)
    model = UNet(model_config)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise InputError(
            directory / WEIGHTS_FILE, "weights do not match the architecture in config.json", "save the model again"
        ) from None
    return model.to(map_location).eval(), config
