"""Expert parallelism for ParameterNet-LLaMA, beside the model rather than in it.

llm/model/ knows only the dispatcher interface and the local dispatcher (`ExpertDispatcher`, `LocalExperts` in
llm/model/moe.py) and imports no torch.distributed. Here:
- experts.py: the all-to-all dispatcher, sharding a built model's experts over a group, gathering the full expert
  tensors for checkpoints and loading each rank's slice back (torch.distributed only);
- engine.py: what the DeepSpeed engine needs on top (its expert groups, the MoE marker, optimizer groups).
"""

from .engine import dense_weights_identical, setup_expert_parallel, split_optimizer_groups
from .experts import (
    AllToAllExperts,
    expert_group_name,
    expert_slices,
    gather_experts,
    load_expert_shards,
    shard_experts,
)

__all__ = [
    "AllToAllExperts",
    "dense_weights_identical",
    "expert_group_name",
    "expert_slices",
    "gather_experts",
    "load_expert_shards",
    "setup_expert_parallel",
    "shard_experts",
    "split_optimizer_groups",
]
