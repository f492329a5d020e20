"""Expert parallelism for the MoE layers: experts sharded over a process group, tokens exchanged with all-to-all.

The MoE layers (`MoELinear`, `MoEMLP`: llm/model/moe.py's `RoutedExperts`) route, apply the capacity limit and sort
their assignments by global expert id; a dispatcher then computes the experts. The model only knows the dispatcher
interface and its local default (`ExpertDispatcher`, `LocalExperts`); this file holds the distributed one.
`AllToAllExperts` sends each block of rows to the rank that owns its expert, runs that rank's local experts (grouped
matmuls: one for a projection, three for an MLP), and sends the results back.
`shard_experts` turns a model built identically on every rank into its expert-parallel shard; `gather_experts`
rebuilds the full expert tensors (for checkpoints) and `load_expert_shards` puts each rank's slice of them back (for
resuming, at any expert-parallel size).

Layout, as in DeepSpeed/Megatron: rank r of an expert-parallel group of size `ep` owns the contiguous experts
[r * E / ep, (r + 1) * E / ep). Expert parameters are tagged the way DeepSpeed recognises expert parameters
(`allreduce = False`, `group_name = "ep_size_<ep>"`) so that their gradients are reduced over the
expert-data-parallel group rather than over all ranks. The tags are necessary, not sufficient: DeepSpeed 0.19 runs
those code paths only when the model also contains a `deepspeed.moe.layer.MoE` module (`engine.has_moe_layers`) and
the optimizer's parameter groups are split into MoE groups; engine.py sees to that.

The all-to-alls of the dispatcher are the project's only raw torch.distributed collectives outside
runtime/collectives.py (allow-listed, with this reason, in tests/test_collectives.py): they run on the model's own
tensors - the routing counts and token rows of the forward and their gradients - which live on the device the engine
placed the model on, the device an NCCL group serves (CPU under gloo), and they need the autograd-aware
`torch.distributed.nn` form that the wrappers do not offer. Nothing here makes a tensor on the host for a collective.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from runtime.collectives import all_gather

# torch >= 2.10 marks the autograd collectives of torch.distributed.nn as deprecated in favour of the private
# _functional_collectives module; they remain the public, autograd-correct all-to-all that works on gloo and NCCL.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed\.nn\.functional\.all_to_all_single is deprecated", category=FutureWarning
)


def expert_group_name(ep: int) -> str:
    """DeepSpeed's name for the expert(-data)-parallel groups of size `ep` (deepspeed.utils.groups)."""
    return f"ep_size_{ep}"


def _group_size_and_rank(ep_group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "expert parallelism needs torch.distributed: call torch.distributed.init_process_group (the deepspeed "
            "or torchrun launcher sets the environment) before building the expert-parallel group"
        )
    rank = dist.get_rank(ep_group)
    if rank < 0:
        raise ValueError("this rank is not a member of the given ep_group; pass the expert-parallel group it is in")
    return dist.get_world_size(ep_group), rank


def _check_divisible(num_experts: int, ep: int) -> None:
    if num_experts % ep:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(
            f"expert-parallel size ep={ep} does not divide num_experts={num_experts}; choose an "
            f"expert_parallel_size among {divisors}, or a num_experts that is a multiple of {ep}"
        )


class _Exchange:
    """What the combine step needs to undo a dispatch."""

    __slots__ = ("send_splits", "recv_splits", "inverse", "num_sent")

    def __init__(self, send_splits: list[int], recv_splits: list[int], inverse: torch.Tensor, num_sent: int) -> None:
        self.send_splits = send_splits
        self.recv_splits = recv_splits
        self.inverse = inverse
        self.num_sent = num_sent


class AllToAllExperts:
    """Dispatcher for experts sharded over `ep_group`: all-to-all out, grouped matmul, all-to-all back.

    Expects the rows of `x_sorted` grouped by global expert id in order, `counts[e]` rows for expert e (what
    the MoE layers pass). Autograd flows through both exchanges, so the backward pass runs the reverse all-to-alls:
    every rank of `ep_group` must call each MoE layer the same number of times, as with any collective.
    """

    def __init__(self, ep_group: dist.ProcessGroup | None, num_experts: int) -> None:
        self.ep_group = ep_group
        self.ep, self.rank = _group_size_and_rank(ep_group)
        _check_divisible(num_experts, self.ep)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep
        self.first_expert = self.rank * self.num_local_experts

    def __repr__(self) -> str:
        last = self.first_expert + self.num_local_experts
        return f"AllToAllExperts(ep={self.ep}, rank={self.rank}, experts=[{self.first_expert}, {last}))"

    def dispatch(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, _Exchange]:
        """Send rows to their experts' owners. Returns (rows grouped by local expert, rows per local expert, state)."""
        ep, n_local = self.ep, self.num_local_experts
        if counts.shape != (self.num_experts,):
            raise ValueError(f"counts has shape {tuple(counts.shape)}; expected ({self.num_experts},), one per expert")
        counts = counts.to(torch.int64).contiguous()
        # recv[p, e]: rows peer p sends to my local expert e. Equal splits (n_local entries per peer).
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.ep_group)
        recv = recv.view(ep, n_local)
        # One device->host copy for all split sizes (a sync point either way: the collective needs them on host).
        splits = torch.cat([counts.view(ep, n_local).sum(1), recv.sum(1)]).tolist()
        send_splits, recv_splits = splits[:ep], splits[ep:]
        num_recv = sum(recv_splits)

        received = x_sorted.new_empty(num_recv, x_sorted.shape[1])
        received = dist_fn.all_to_all_single(received, x_sorted.contiguous(), recv_splits, send_splits, self.ep_group)

        # Rows arrive peer-major ([peer 0: expert 0..n-1], [peer 1: ...]); the experts want expert-major blocks.
        # Block (p, e) starts at src_start[p, e]; in expert-major order the blocks are (e, p), of lengths recv[p, e].
        src_start = (torch.cumsum(recv.view(-1), 0) - recv.view(-1)).view(ep, n_local)
        lengths = recv.t().reshape(-1)
        dst_start = torch.cumsum(lengths, 0) - lengths
        shift = torch.repeat_interleave(src_start.t().reshape(-1) - dst_start, lengths, output_size=num_recv)
        perm = shift + torch.arange(num_recv, device=shift.device)  # expert-major row i = received row perm[i]
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(num_recv, device=perm.device)
        state = _Exchange(send_splits, recv_splits, inverse, x_sorted.shape[0])
        return received.index_select(0, perm), recv.sum(0), state

    def combine(self, y_local: torch.Tensor, state: _Exchange) -> torch.Tensor:
        """Send expert outputs (grouped by local expert, as `dispatch` returned them) back to the tokens' ranks."""
        y_received_order = y_local.index_select(0, state.inverse)
        out = y_local.new_empty(state.num_sent, y_local.shape[1])
        return dist_fn.all_to_all_single(out, y_received_order, state.send_splits, state.recv_splits, self.ep_group)

    def __call__(self, layer: nn.Module, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.ep == 1:
            return layer.expert_forward(x_sorted, counts)
        rows, local_counts, state = self.dispatch(x_sorted, counts)
        y = layer.expert_forward(rows, local_counts)
        if rows.shape[0] == 0:
            # No rows for my experts. grouped_mm keeps the weights in the graph (zero gradient, not None), but its
            # empty output is not connected to `rows`: without this term autograd would skip the dispatch
            # all-to-all's backward on this rank only, and the peers would wait for it forever.
            y = y + 0 * rows.sum()
        return self.combine(y, state)


def _moe_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    # Duck-typed on RoutedExperts' interface, so that this file needs no import of moe.py.
    for name, module in model.named_modules():
        if (
            hasattr(module, "expert_forward")
            and hasattr(module, "expert_param_names")
            and hasattr(module, "dispatcher")
        ):
            yield name, module


def _expert_params(layer: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    # The layer names its [E, ...] expert tensors (MoELinear: weight, bias; MoEMLP: gate/up/down weights).
    for name in layer.expert_param_names:
        param = getattr(layer, name, None)
        if param is not None:
            yield name, param


def shard_experts(model: nn.Module, ep_group: dist.ProcessGroup | None) -> None:
    """Keep only this rank's experts of every MoE layer and install the all-to-all dispatcher.

    Call on every rank after building the full model with the same seed (so all ranks agree on every expert) and
    before creating the optimizer / DeepSpeed engine. Router and all other parameters stay replicated.
    """
    ep, rank = _group_size_and_rank(ep_group)
    layers = list(_moe_layers(model))
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no MoE layers to shard; expert parallelism needs a model with "
            f"MoE projections (ParameterNet's moe_projections)"
        )
    for name, layer in layers:
        _check_divisible(layer.num_experts, ep)
        attr, first = next(_expert_params(layer))
        if first.shape[0] != layer.num_experts:
            raise ValueError(
                f"{name or type(layer).__name__}: {attr} holds {first.shape[0]} of {layer.num_experts} "
                f"experts, already sharded; call shard_experts once, on the full model"
            )
    for _, layer in layers:
        n_local = layer.num_experts // ep
        lo, hi = rank * n_local, (rank + 1) * n_local
        for attr, param in list(_expert_params(layer)):
            # clone: let the full tensor be freed rather than kept alive by a view.
            shard = nn.Parameter(param.detach()[lo:hi].clone(), requires_grad=param.requires_grad)
            shard.allreduce = False  # DeepSpeed's is_moe_param: reduce over the expert-data-parallel group
            shard.group_name = expert_group_name(ep)
            setattr(layer, attr, shard)
        layer.dispatcher = AllToAllExperts(ep_group, num_experts=layer.num_experts)


def gather_experts(model: nn.Module, ep_group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """{state-dict name: full expert tensor [E, ...]} for every expert parameter of a sharded model.

    A collective: every rank of `ep_group` must call it. Merge the result over `model.state_dict()` to write one
    checkpoint that loads at any expert-parallel size.
    """
    ep, _ = _group_size_and_rank(ep_group)
    full: dict[str, torch.Tensor] = {}
    for name, layer in _moe_layers(model):
        if not isinstance(layer.dispatcher, AllToAllExperts):
            raise ValueError(f"{name}: not sharded (dispatcher {layer.dispatcher!r}); nothing to gather")
        if layer.dispatcher.ep != ep:
            raise ValueError(
                f"{name} is sharded over ep={layer.dispatcher.ep} ranks but ep_group has {ep}; "
                f"pass the group given to shard_experts"
            )
        for attr, param in _expert_params(layer):
            full[f"{name}.{attr}" if name else attr] = torch.cat(all_gather(param.detach(), group=ep_group), dim=0)
    return full


def load_expert_shards(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's slice of each full expert tensor (`gather_experts` names) into a sharded model, in place.

    For resuming: DeepSpeed's engine checkpoint writes the module weights from one rank only, so after
    `engine.load_checkpoint` every rank holds rank 0's experts; restore them from the full tensors saved with the
    checkpoint. Also loads a checkpoint written at any other expert-parallel size. Not a collective.
    """
    for name, layer in _moe_layers(model):
        dispatcher = layer.dispatcher
        if not isinstance(dispatcher, AllToAllExperts):
            raise ValueError(f"{name}: not sharded (dispatcher {dispatcher!r}); load full tensors with load_state_dict")
        lo, hi = dispatcher.first_expert, dispatcher.first_expert + dispatcher.num_local_experts
        for attr, param in _expert_params(layer):
            key = f"{name}.{attr}" if name else attr
            if key not in full:
                raise ValueError(
                    f"no full expert tensor {key!r} to load (have {len(full)} keys); pass the dict that "
                    f"gather_experts returned for this model"
                )
            expected = (layer.num_experts, *param.shape[1:])
            if tuple(full[key].shape) != expected:
                raise ValueError(
                    f"{key}: full tensor has shape {tuple(full[key].shape)}, expected {expected} "
                    f"(num_experts={layer.num_experts}); the checkpoint is of a different model"
                )
            with torch.no_grad():
                param.copy_(full[key][lo:hi])


def expert_slices(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """{parameter name: (experts in all, first expert this rank holds, one past its last)} of every expert tensor;
    (E, 0, E) where the experts are not sharded. What runtime.reshard needs to place the experts of a checkpoint."""
    slices = {}
    for name, layer in _moe_layers(model):
        dispatcher = layer.dispatcher
        sharded = isinstance(dispatcher, AllToAllExperts)
        lo = dispatcher.first_expert if sharded else 0
        hi = lo + dispatcher.num_local_experts if sharded else layer.num_experts
        for attr, _ in _expert_params(layer):
            slices[f"{name}.{attr}" if name else attr] = (layer.num_experts, lo, hi)
    return slices


__all__ = [
    "AllToAllExperts",
    "expert_group_name",
    "expert_slices",
    "gather_experts",
    "load_expert_shards",
    "shard_experts",
]
