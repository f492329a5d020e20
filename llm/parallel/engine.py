"""Expert parallelism on the DeepSpeed engine: groups, sharding, optimizer groups, checkpoint gather/restore.

The model code does not change: `shard_experts` (experts.py) keeps each rank's experts and installs the all-to-all
dispatcher. What DeepSpeed needs on top:
- its expert-parallel and expert-data-parallel groups (`deepspeed.utils.groups`), named `ep_size_<ep>`;
- expert parameters tagged (`allreduce=False`, `group_name`) and put in their own optimizer groups
  (`split_params_into_different_moe_groups_for_optimizer`), so ZeRO reduces them over the expert-data-parallel group;
- `engine.has_moe_layers`, which DeepSpeed 0.19 only sets when the model holds a `deepspeed.moe.layer.MoE`. Its own
  MoE layer cannot host ParameterNet's shape-changing experts, so the model gets a parameter-free marker of that
  class with no local experts: the engine then takes its MoE code paths (expert groups in ZeRO, expert gradient
  reduction) and writes no per-expert files of its own.
DeepSpeed writes module weights from one rank only; our checkpoints carry the full gathered experts in
model.safetensors, from which every rank restores its slice on resume (`load_expert_shards`).
"""

from __future__ import annotations

import torch
from torch import nn

from runtime.collectives import all_gather

from .experts import expert_group_name, shard_experts


def make_marker(ep: int, num_experts: int) -> nn.Module:
    from deepspeed.moe.layer import MoE

    class ExpertParallelMarker(MoE):
        """Tells the DeepSpeed engine the model has expert-parallel parameters; holds nothing, never called."""

        def __init__(self) -> None:
            nn.Module.__init__(self)  # not MoE.__init__: there is no DeepSpeed expert here
            self.ep_size, self.num_experts, self.num_local_experts = ep, num_experts, 0
            self.expert_group_name = expert_group_name(ep)
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups are created in setup_expert_parallel

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertParallelMarker is a marker for the DeepSpeed engine; it is never called")

    return ExpertParallelMarker()


def setup_expert_parallel(model: nn.Module, ep: int, world_size: int):
    """Create DeepSpeed's groups, shard the experts, add the marker. Returns the expert-parallel group."""
    from deepspeed.utils import groups

    moe = [m for m in model.modules() if hasattr(m, "dispatcher") and hasattr(m, "num_experts")]
    if not moe:
        raise ValueError(f"expert_parallel_size={ep} needs a ParameterNet model (with MoE projections)")
    if world_size % ep:
        raise ValueError(
            f"expert_parallel_size={ep} does not divide the {world_size} data-parallel ranks; "
            f"choose a divisor of {world_size}"
        )
    groups._create_expert_and_data_parallel(ep)
    ep_group = groups._get_expert_parallel_group(expert_group_name(ep))
    shard_experts(model, ep_group)
    model.add_module("ds_expert_parallel_marker", make_marker(ep, moe[0].num_experts))
    return ep_group


def split_optimizer_groups(param_groups: list[dict]) -> list[dict]:
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(param_groups)


def dense_weights_identical(model: nn.Module) -> bool:
    """Are all non-expert weights and all buffers (the router biases of aux-loss-free balancing among them) bitwise
    equal across ranks? (A cheap consistency check; collective.)"""
    dense = [p.detach().double().flatten() for p in model.parameters() if getattr(p, "allreduce", True)]
    dense += [b.detach().double().flatten() for b in model.buffers() if b.is_floating_point()]
    checksum = torch.stack([torch.cat(dense).sum(), (torch.cat(dense) ** 2).sum()])
    gathered = all_gather(checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)
