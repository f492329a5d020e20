"""The trained model's weights as a whole: gathered from ZeRO-3 partitions and expert-parallel shards, checked for
non-finite values, written into a checkpoint (model.safetensors, for export) and restored from one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from runtime import collectives

WEIGHTS = "model.safetensors"  # in each checkpoint directory: the full weights, read by llm.export and EP resume


def full_state_dict(module: torch.nn.Module, ep_group: Any, rank: int) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (gathered under ZeRO-3); None on other ranks. Collective."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                tensor = param.detach().cpu().clone()
        else:
            tensor = param.detach().cpu().clone()
        if rank == 0:
            state[name] = tensor
    # Persistent buffers are model state too (none in these models today; a strict load of the export would miss
    # them); ZeRO does not partition buffers. Rank 0's copy.
    for prefix, submodule in module.named_modules():
        for name, buffer in submodule.named_buffers(recurse=False):
            if buffer is not None and name not in submodule._non_persistent_buffers_set and rank == 0:
                state[f"{prefix}.{name}" if prefix else name] = buffer.detach().cpu().clone()
    if ep_group is not None:
        from llm.parallel import gather_experts

        experts = gather_experts(module, ep_group)  # collective over the EP group
        if rank == 0:
            state.update({k: v.detach().cpu() for k, v in experts.items()})
    return state if rank == 0 else None


def save_full_weights(module: torch.nn.Module, ep_group: Any, rank: int, directory: Path) -> None:
    """The checkpoint's extra file (runtime.checkpoint's hook): every rank calls it, rank 0 writes."""
    from safetensors.torch import save_file

    weights = full_state_dict(module, ep_group, rank)
    if rank == 0:
        assert weights is not None
        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / WEIGHTS), metadata={"format": "pt"})


def weights_finite(module: torch.nn.Module) -> bool:
    """True if every weight on every rank is finite. Each rank checks what it holds (its ZeRO-3 partitions, its
    experts); one host sync and one all-reduce."""
    local = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in module.parameters()]
    checks = [torch.isfinite(t.detach()).all() for t in local if t.numel()]
    return collectives.all_ranks(bool(torch.stack(checks).all()) if checks else True)


def restore_expert_shards(module: torch.nn.Module, checkpoint_dir: Path) -> None:
    """DeepSpeed wrote the module weights from rank 0 only: take each rank's experts from the full tensors."""
    from safetensors import safe_open

    from llm.parallel import load_expert_shards

    expert_keys = {
        f"{name}.{attr}"
        for name, layer in module.moe_layers()
        for attr in layer.expert_param_names
        if getattr(layer, attr, None) is not None
    }
    with safe_open(str(checkpoint_dir / WEIGHTS), framework="pt") as f:
        full = {k: f.get_tensor(k) for k in expert_keys}
    load_expert_shards(module, full)
