"""What a GPU run does differently, checked on the CPU: the training step leaves its loss on the device (no host
sync per step), GPU runs get DataLoader workers when none were asked for, an unset tile batch (sized from GPU memory)
is told apart from a given one, and a checkpoint restores where fewer GPUs are visible."""

from __future__ import annotations

import os

import pytest
import torch

from unetcore.config import InferConfig, ModelConfig, TrainConfig
from unetcore.model import build_model
from unetcore.training import SegmentationLoss, train_step
from unetcore.training.checkpoint import rng_state, set_rng_state
from unetcore.training.loop import loader_workers


def test_a_training_step_returns_its_loss_as_a_device_tensor_without_reading_it() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=1, base_channels=4)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, targets = torch.rand(2, 1, 16, 16), (torch.rand(2, 16, 16) > 0.5).long()
    with torch.no_grad():
        before = SegmentationLoss("dice_ce", 1)(model(images), targets)
    loss = train_step(model, list(model.parameters()), (images, targets), SegmentationLoss("dice_ce", 1), optimizer,
                      torch.device("cpu"), 12.0)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and not loss.requires_grad
    assert loss.dtype == torch.float64 and loss.device.type == "cpu"
    assert float(loss) == pytest.approx(float(before), rel=1e-5)  # the loss of the step's forward pass


@pytest.mark.parametrize(("given", "on_gpu", "want"), [
    (None, False, 0), (2, False, 2), (None, True, max(0, min(4, (os.cpu_count() or 1) - 1))), (0, True, 0),
    (3, True, 3),
])
def test_gpu_training_gets_loader_workers_unless_told(given: int | None, on_gpu: bool, want: int) -> None:
    cfg = TrainConfig(dataset="x", **({} if given is None else {"num_workers": given}))
    assert loader_workers(cfg, on_gpu) == want


def test_precision_is_a_checked_option_and_an_unset_batch_is_told_apart() -> None:
    unset = InferConfig(dataset="d", output="o")
    given = InferConfig(dataset="d", output="o", batch_size=4, precision="fp32")
    assert "batch_size" not in unset.model_fields_set and unset.precision == "auto"
    assert "batch_size" in given.model_fields_set and given.precision == "fp32"
    with pytest.raises(ValueError):
        InferConfig(dataset="d", output="o", precision="fp16")


def test_a_checkpoints_rng_state_holds_the_training_device_only_and_restores_anywhere() -> None:
    state = rng_state(torch.device("cpu"))
    assert set(state) == {"torch"}
    torch.manual_seed(3)
    saved = rng_state(torch.device("cpu"))
    a = torch.rand(3)
    # an old checkpoint's list of every GPU's state, restored where no (or fewer) GPUs are visible: no IndexError
    set_rng_state({**saved, "cuda": [torch.zeros(8, dtype=torch.uint8)] * 2}, torch.device("cuda", 5))
    assert torch.equal(torch.rand(3), a)
    set_rng_state({**saved, "cuda": torch.zeros(8, dtype=torch.uint8)}, torch.device("cuda", 0))
    assert torch.equal(torch.rand(3), a)
