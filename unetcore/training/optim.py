"""The optimisation recipe: optimiser and learning-rate schedule of a :class:`TrainConfig`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from unetcore.config import TrainConfig


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Factor of the peak LR at each of ``total`` steps: poly (power 0.9), cosine (5 % warm-up) or constant."""
    warmup = max(1, total // 20) if cfg.schedule == "cosine" else 0

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.schedule == "poly":
            return (1.0 - done) ** 0.9
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum 0.99 (nnU-Net's; give it a larger lr, e.g. 1e-2)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step scheduler of :func:`lr_lambda` over the whole run (``epochs × steps_per_epoch`` steps)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, cfg.epochs * cfg.steps_per_epoch))
