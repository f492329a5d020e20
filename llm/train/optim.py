"""Optimizer parameter groups and the run's learning-rate schedule (runtime.schedule, a pure function of the step)."""

from __future__ import annotations

from typing import Any

from torch import nn

from runtime.schedule import Schedule

from .config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (and expert tensors) only: never on norms, biases or other vectors."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def schedule(cfg: TrainConfig) -> Schedule:
    """The run's learning-rate schedule (runtime.schedule): warmup, then lr_decay_style over lr_decay_iters (or
    train_iters)."""
    return Schedule(
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        warmup_iters=cfg.warmup_iters,
        decay_iters=cfg.lr_decay_iters or cfg.resolved_train_iters(),
        style=cfg.lr_decay_style,
        wsd_decay_fraction=cfg.wsd_decay_fraction,
    )
