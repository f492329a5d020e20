"""Optimizer parameter groups and the learning-rate schedule (a pure function of the optimizer step)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine/linear decay to min_lr, then min_lr.

    wsd (warmup-stable-decay, as MiniCPM's): after warmup the LR stays at lr until the last `wsd_decay_fraction` of
    the decay span (lr_decay_iters, or train_iters), then falls linearly to min_lr. A checkpoint or validation
    taken in the stable phase is a model trained at constant LR for that many tokens: one run compares arms at
    many budgets (each budget's own decay would start from such a checkpoint)."""
    if cfg.warmup_iters and step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    decay_iters = cfg.lr_decay_iters or cfg.resolved_train_iters()
    decay_start = cfg.warmup_iters
    if cfg.lr_decay_style == "wsd":
        # The decay phase: the last ceil(fraction x decay_iters) steps (the 1e-9: 0.55 x 100 is 55.00000000000001 in
        # floating point, not 56 steps), never into the warmup.
        decay_start = max(decay_iters - math.ceil(cfg.wsd_decay_fraction * decay_iters - 1e-9), cfg.warmup_iters)
    span = max(decay_iters - decay_start, 1)
    progress = min(max(step - decay_start, 0) / span, 1.0)
    if cfg.lr_decay_style in ("linear", "wsd"):
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor
