"""Skipping a step whose loss is not finite, without a host sync per micro-batch."""

from __future__ import annotations

import torch


class NonFiniteGradGuard:
    """Drops this rank's gradients of a micro-batch whose loss is non-finite, decided on the device.

    A hook on every trainable parameter returns `grad.masked_fill(drop, 0)`, where `drop` is a 0-dim bool tensor on
    the device that the loop sets before each backward. The decision never goes through the host, so the loop does
    not wait for the forward to finish before queueing the backward. Selecting (not multiplying by 0) is what makes
    it work: the gradients of a NaN loss are NaN all the way down, and 0 * NaN is NaN. Parameter hooks run before
    autograd accumulates into .grad and before DeepSpeed's own post-accumulation hooks (ZeRO reductions), so what
    the engine accumulates, reduces and clips is exactly what it would be had the micro-batch contributed zeros.
    With `drop` false the hook returns the gradient bitwise unchanged."""

    def __init__(self, params, device: torch.device) -> None:
        self.drop = torch.zeros((), dtype=torch.bool, device=device)
        for p in params:
            if p.requires_grad:
                p.register_hook(self._hook)

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        drop = self.drop if self.drop.device == grad.device else self.drop.to(grad.device)
        return grad.masked_fill(drop, 0)
