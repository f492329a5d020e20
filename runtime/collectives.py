"""Device-correct collectives: every torch.distributed collective of the project goes through here.

A process group serves only the device types its backends were registered for. Under the `deepspeed` launcher on
CUDA the default group is `init_process_group("nccl")`, whose device map is `{"cuda": nccl}`: a collective on a CPU
tensor raises `No backend type associated with device type cpu`. Under gloo (CPU runs, the tests) CPU tensors are
the only kind. So the rule, in one place: a tensor whose device the group serves is reduced where it is (no copy,
no host sync); any other tensor is moved to the group's device for the collective and the result is copied back.
New tensors made for a collective (flags, scalars) are created on `group_device(group)` directly.

tests/test_collectives.py checks the rule on a group whose device map has no cpu (`cuda:gloo`, which is what an
NCCL group looks like to this code) and fails if a module of llm/, vision/ or evals/ calls a torch.distributed
collective anywhere but here (llm/parallel/experts.py's all-to-alls are allow-listed there, with the reason).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def device_types(group: dist.ProcessGroup | None = None) -> list[str]:
    """The device types ("cpu", "cuda", ...) whose tensors `group`'s collectives accept."""
    group = group if group is not None else dist.group.WORLD
    types = [d.type for d in getattr(group, "_device_types", [])]
    if types:
        return types
    # Older torch, or no backend registered yet: read the device map from the backend string, which is either one
    # backend name ("nccl", "gloo") or "device:backend" pairs ("cpu:gloo,cuda:nccl").
    backend = str(dist.get_backend(group))
    if ":" in backend:
        return [pair.split(":", 1)[0] for pair in backend.split(",")]
    return list(dist.Backend.backend_capability.get(backend.lower(), ["cpu"]))


def _device_of_type(device_type: str) -> torch.device:
    if device_type == "cuda":
        # The rank's own GPU (DeepSpeed set it from LOCAL_RANK). Without a usable GPU (a `cuda:gloo` group in a CPU
        # test) there is no index to ask for: the type alone says where the tensors would have to be.
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cuda")
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        current = accelerator.current_accelerator()
        if current is not None and current.type == device_type:
            return torch.device(device_type, accelerator.current_device_index())
    return torch.device(device_type)


def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device new tensors for a collective on `group` go to: cpu when the group takes CPU tensors (no copy from
    host memory needed), else the group's first device type on this rank's current device (cuda:LOCAL_RANK under
    NCCL). Without torch.distributed (a world of one, nothing to reduce) it is cpu."""
    if not _initialized():
        return torch.device("cpu")
    types = device_types(group)
    if "cpu" in types or not types:
        return torch.device("cpu")
    return _device_of_type(types[0])


def serves(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> bool:
    """Can `group`'s collectives take `tensor` where it is?"""
    return not _initialized() or tensor.device.type in device_types(group)


def _placed(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    # contiguous: the backends reduce flat buffers (NCCL/gloo refuse or silently copy non-contiguous inputs).
    if serves(tensor, group):
        return tensor if tensor.is_contiguous() else tensor.contiguous()
    return tensor.to(group_device(group)).contiguous()


def all_reduce(
    tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """`dist.all_reduce` in place on `tensor`, wherever it lives; returns `tensor`. A no-op without a process group
    (one rank: the reduction of one value is itself)."""
    if not _initialized():
        return tensor
    work = _placed(tensor, group)
    dist.all_reduce(work, op=op, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_values(
    values: Sequence[float],
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
    group: dist.ProcessGroup | None = None,
    dtype: torch.dtype = torch.float64,
) -> list[float]:
    """Reduce a few Python numbers over the ranks with one collective; returns them as Python numbers."""
    t = torch.tensor(list(values), dtype=dtype, device=group_device(group))
    return all_reduce(t, op=op, group=group).tolist()


def any_rank(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """True if `flag` is true on any rank (a collective: every rank calls it)."""
    return bool(all_reduce_values([1 if flag else 0], dist.ReduceOp.MAX, group, dtype=torch.int64)[0])


def all_ranks(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """True only if `flag` is true on every rank (a collective; no barrier besides the reduction itself)."""
    return not any_rank(not flag, group)


def rank0_ints(values: Sequence[int], group: dist.ProcessGroup | None = None) -> list[int]:
    """Rank 0's `values` on every rank (a collective; other ranks' `values` are ignored): what rank 0 saw of a
    shared directory, for ranks that must act on the same list (another node may see new files late)."""
    if not _initialized():
        return list(values)
    mine = list(values) if dist.get_rank(group) == 0 else []
    count = int(all_reduce_values([len(mine)], dist.ReduceOp.MAX, group, dtype=torch.int64)[0])
    if count == 0:
        return []
    return [int(v) for v in all_reduce_values(mine or [0] * count, dist.ReduceOp.SUM, group, dtype=torch.int64)]


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape and dtype on all ranks), in rank order, on `tensor`'s device."""
    if not _initialized():
        return [tensor.clone()]
    work = _placed(tensor, group)
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, work, group=group)
    return [p.to(tensor.device) for p in parts]


__all__ = [
    "all_gather",
    "all_ranks",
    "all_reduce",
    "all_reduce_values",
    "any_rank",
    "device_types",
    "group_device",
    "rank0_ints",
    "serves",
]
