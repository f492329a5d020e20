"""Expert-load statistics of the ParameterNet MoE layers, logged with each train record (moe/<layer>/...)."""

from __future__ import annotations

import torch


def expert_load(tokens_per_expert: torch.Tensor, layer_names: list[str]) -> dict[str, float]:
    """Per MoE layer: min and max share of the assignments, coefficient of variation of the counts."""
    out: dict[str, float] = {}
    counts = tokens_per_expert.double()
    shares = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    cv = counts.std(-1, unbiased=False) / counts.mean(-1).clamp(min=1e-9)
    for i, name in enumerate(layer_names):
        out[f"moe/{name}/min_share"] = float(shares[i].min())
        out[f"moe/{name}/max_share"] = float(shares[i].max())
        out[f"moe/{name}/cv"] = float(cv[i])
    return out
