"""What the vision trainer reports: its start-up line and the run's summary.json (runtime.rundir's keys plus top-1,
top-5 and multiply-adds)."""

from __future__ import annotations

import math
from typing import Any

import torch

from vision.build import Prepared
from vision.config import TrainConfig


def describe(
    cfg: TrainConfig, prep: Prepared, module: torch.nn.Module, world: int, device: Any, grad_accum: int
) -> str:
    n_params = sum(p.numel() for p in module.parameters())
    reinit = f", re-initialised {', '.join(prep.reinit)}" if prep.reinit else ""
    return (
        f"{cfg.model} ({n_params / 1e6:.2f}M params, {prep.num_classes} classes{reinit}) on {world} rank(s), "
        f"{device}, {cfg.precision}, ZeRO-{cfg.zero_stage}; {len(prep.train_indices)} train / "
        f"{len(prep.val_indices)} val images, {prep.steps_per_epoch} steps/epoch x {cfg.epochs} epochs, global "
        f"batch {cfg.global_batch_size} = {cfg.micro_batch_size} x {world} x {grad_accum}"
    )


def run_summary(
    cfg: TrainConfig,
    prep: Prepared,
    module: torch.nn.Module,
    iteration: int,
    last_eval: dict[str, Any],
    last_loss: float,
    seconds: float,
    world: int,
) -> dict[str, Any]:
    summary = {
        "task": "vision",
        "model": cfg.model,
        "total_params": sum(p.numel() for p in module.parameters()),
        "macs": prep.macs,
        "img_size": cfg.img_size,
        "num_classes": prep.num_classes,
        "num_experts": getattr(module, "num_experts", None),
        "iterations": iteration,
        "epochs": round(iteration / prep.steps_per_epoch, 4),
        "seed": cfg.seed,
        "world_size": world,
        "final_val_loss": last_eval["val_loss"],
        "top1": last_eval["top1"],
        "top5": last_eval["top5"],
        "train_loss": last_loss if math.isfinite(last_loss) else None,  # None: no step in this process
        "seconds": round(seconds, 1),
    }
    if "ema_top1" in last_eval:
        summary.update(ema_top1=last_eval["ema_top1"], ema_top5=last_eval["ema_top5"])
    return summary
