"""Validation of an image classifier over all ranks: top-1, top-5 and loss, summed exactly; BatchNorm statistics
made the same on every rank first."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from runtime import collectives


def sync_batchnorm(modules: list[torch.nn.Module], world_size: int) -> None:
    """Average the BatchNorm running statistics over the ranks.

    Each rank's statistics come from its own batches (no SyncBN on gloo). Averaging them before evaluation and
    checkpoints makes every rank evaluate the same network and lets the checkpoint (written from rank 0's module)
    restore every rank exactly."""
    from timm.utils import distribute_bn

    if world_size > 1:
        for module in modules:
            distribute_bn(module, world_size, reduce=True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """{"top1", "top5" (percent), "val_loss", "images"} over the whole validation split, every rank's share summed."""
    was_training = model.training
    model.eval()
    # Summed on the device (no host sync per batch), reduced once, read once. float64: the counts stay exact.
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, targets in loader:
        logits = model(images.to(device=device, dtype=dtype, non_blocking=True)).float()
        targets = targets.to(device, non_blocking=True)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        totals[0] += hits[:, 0].sum()
        totals[1] += hits.any(dim=1).sum()
        totals[2] += F.cross_entropy(logits, targets, reduction="sum").double()
        totals[3] += targets.numel()
    correct1, correct5, loss_sum, count = collectives.all_reduce(totals).tolist()
    model.train(was_training)
    n = max(1.0, count)
    return {"val_loss": loss_sum / n, "top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "images": int(count)}
