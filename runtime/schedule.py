"""The learning-rate schedule of both trainers: a pure function of the optimizer step, run as a LambdaLR that scales
each parameter group's own initial LR (timm's layer decay gives groups `lr x lr_scale`; the schedule, floor included,
scales with them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

STYLES = ("cosine", "linear", "constant", "wsd")


@dataclass(frozen=True)
class Schedule:
    lr: float  # the peak
    min_lr: float  # the floor of the decay
    warmup_iters: int  # linear warmup steps (0 = none)
    decay_iters: int  # the step at which the decay reaches min_lr
    style: str = "cosine"  # one of STYLES
    wsd_decay_fraction: float = 0.2  # wsd: the final fraction of decay_iters spent decaying

    def lr_at(self, step: int) -> float:
        """LR for optimizer step `step` (0-based): linear warmup, then cosine/linear decay to min_lr, then min_lr.

        wsd (warmup-stable-decay, as MiniCPM's): after warmup the LR stays at lr until the last `wsd_decay_fraction`
        of decay_iters, then falls linearly to min_lr. A checkpoint or validation taken in the stable phase is a
        model trained at constant LR for that many tokens: one run compares arms at many budgets (each budget's own
        decay would start from such a checkpoint)."""
        if self.warmup_iters and step < self.warmup_iters:
            return self.lr * (step + 1) / self.warmup_iters
        if self.style == "constant":
            return self.lr
        decay_start = self.warmup_iters
        if self.style == "wsd":
            # The decay phase: the last ceil(fraction x decay_iters) steps (the 1e-9: 0.55 x 100 is
            # 55.00000000000001 in floating point, not 56 steps), never into the warmup.
            decay_start = max(
                self.decay_iters - math.ceil(self.wsd_decay_fraction * self.decay_iters - 1e-9), self.warmup_iters
            )
        span = max(self.decay_iters - decay_start, 1)
        progress = min(max(step - decay_start, 0) / span, 1.0)
        if self.style in ("linear", "wsd"):
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.lr - self.min_lr) * factor

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """The LambdaLR for deepspeed.initialize(lr_scheduler=...): each group's LR is its initial LR x
        lr_at(step) / lr, so a group at lr follows lr_at and a group at lr x lr_scale follows it scaled."""
        return _LambdaLR(optimizer, [lambda step: self.lr_at(step) / self.lr] * len(optimizer.param_groups))


class _LambdaLR(torch.optim.lr_scheduler.LambdaLR):
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "lr_lambdas" not in state_dict and "last_batch_iteration" in state_dict:
            # A vision checkpoint from DeepSpeed's WarmupCosineLR (before this schedule): it counts the steps taken
            # minus one; this run's groups and schedule stay, and `apply_schedule` sets the LR.
            self.last_epoch = int(state_dict["last_batch_iteration"]) + 1
            return
        super().load_state_dict(state_dict)


def apply_schedule(scheduler: Any, optimizer: Any) -> None:
    """Set the next step's LR from this run's schedule after a resume. The optimizer state restored the LR the saved
    run's schedule gave; the two differ when an allowed schedule setting changed (the LLM's train_iters, min_lr,
    lr_decay_iters; vision's min_lr). The same expression as LambdaLR's, so an unchanged schedule gives the same
    bits."""
    lrs = [base * schedule(scheduler.last_epoch) for base, schedule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
