"""The mixture-of-experts layers of ParameterNet-LLaMA, on one routing core (`RoutedExperts`):
- `MoELinear`, ParameterNet's drop-in replacement for `nn.Linear(in_features, out_features)`: the E experts of one
  projection held as one `[E, out, in]` parameter;
- `MoEMLP`, the standard MoE control: E whole SwiGLU MLPs (gate, up, down: three `[E, ...]` parameters).
The router (router.py, one `RouterConfig`) chooses each token's experts and gates; here: capacity, dispatch (sorted
by expert, grouped matmuls: `torch._grouped_mm` where the device has it, contiguous slices otherwise; no per-expert
boolean masks), the gated combine output = gate x expert_i(x), the router losses and the statistics.

An expert variant is one subclass of `RoutedExperts` (its `[E, ...]` weights, `expert_forward`, and what it costs:
`param_count`, `flops_per_token`) and one entry in `EXPERTS` (docs/moe.md, "Adding an MoE variant").

Who computes the experts is a dispatcher object (`ExpertDispatcher`): `LocalExperts` (all experts on this rank) by
default, or the all-to-all dispatcher for expert parallelism that llm/parallel/ installs after construction; the
routing, capacity, gating and combine code here does not change. Saved next to ParameterNet checkpoints: imports
only torch (and router.py, saved beside it); no torch.distributed.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .router import Router, RouterConfig, RouterLoss, router_losses


@dataclass
class RoutingStats:
    """What one MoE layer saw in its last forward."""

    aux_loss: torch.Tensor  # Switch load-balancing loss (detached: for logging; the gradient goes by RouterLoss)
    z_loss: torch.Tensor  # router z-loss (detached)
    tokens_per_expert: torch.Tensor  # [E] int64: assignments each expert was chosen for (before capacity drops)
    dropped_tokens: torch.Tensor  # [] int64: assignments dropped by the capacity limit
    top1_prob: torch.Tensor  # [] fp32: mean over tokens of the largest router probability (1/E: flat, 1: one-hot)
    entropy: torch.Tensor  # [] fp32: mean over tokens of the router distribution's entropy (log E: flat, 0: one-hot)


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The kernel needs 16-byte aligned strides on both operands.
    align = 16 // x.element_size()
    if x.shape[-1] % align or weight.shape[-2] % align:
        return False
    if x.device.type == "cuda":
        # Hopper (sm90) and newer have the CUTLASS grouped GEMM for bf16; other dtypes/archs use the slice path.
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)


def grouped_mm(x_sorted: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of `x_sorted` [N, in], grouped by expert in order (`counts` [E] rows each), times weight[e].T [in, out]."""
    if torch.compiler.is_compiling() and x_sorted.dtype != torch.bfloat16:
        # torch.compile traces `_grouped_mm` with a meta kernel that accepts only bf16: other dtypes run eagerly.
        return _grouped_mm_eager(x_sorted, weight, counts)
    return _grouped_mm_impl(x_sorted, weight, counts)


def _grouped_mm_impl(x_sorted: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    if x_sorted.shape[0] == 0:
        return x_sorted.new_zeros(0, weight.shape[1]) + 0 * weight.sum()  # keeps weight in the graph
    if _grouped_mm_supported(x_sorted, weight):
        offsets = torch.cumsum(counts, dim=0).to(torch.int32)
        return torch._grouped_mm(x_sorted, weight.transpose(-2, -1), offs=offsets)
    chunks = torch.split(x_sorted, counts.tolist())
    return torch.cat([chunk @ weight[e].t() for e, chunk in enumerate(chunks)], dim=0)


_grouped_mm_eager = torch.compiler.disable(_grouped_mm_impl)


class _GatherRows(torch.autograd.Function):
    """`x.index_select(0, index)` whose backward scatters through a known inverse instead of a zero-filled index_add.

    Dropless routing makes the sort a permutation of the T*k assignments, so the gradient of each assignment row is
    `grad[inverse]` and a token's gradient is the sum of its k assignment rows: one gather and a reshape-sum, no
    zero-filled [T, in] buffer, no scatter-add (atomics on GPUs, hence non-deterministic there).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, fold: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.fold = fold
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse)
        if ctx.fold > 1:
            g = g.view(ctx.fold, -1, g.shape[-1]).sum(dim=0)
        return g, None, None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, fold: int = 1) -> torch.Tensor:
    """Rows `x[index]`, where `index` is `inverse`'s inverse permutation over `fold` stacked copies of x's rows."""
    return _GatherRows.apply(x, index, inverse, fold)


class ExpertDispatcher(Protocol):
    """Computes the experts for assignments already sorted by (global) expert id."""

    def __call__(self, layer: RoutedExperts, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor: ...


class LocalExperts:
    """Every expert lives on this rank: one grouped matmul per expert weight."""

    def __call__(self, layer: RoutedExperts, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return layer.expert_forward(x_sorted, counts)

    def __repr__(self) -> str:
        return "LocalExperts()"


class RoutedExperts(nn.Module, abc.ABC):
    """What every mixture of experts here shares: a router (`RouterConfig.build`) over `num_experts` experts that map
    in_features -> out_features, the capacity limit, sort-by-expert dispatch through the dispatcher, the gated
    combine and the routing losses and statistics. A subclass holds the expert weights, each one `[E, ...]`
    parameter named in `expert_param_names` (what expert parallelism shards), computes `expert_forward` on rows
    grouped by expert, and answers what it costs (`param_count`, `flops_per_token`): `MoELinear` (ParameterNet: one
    projection) or `MoEMLP` (a standard MoE: whole SwiGLU MLPs)."""

    expert_param_names: tuple[str, ...] = ()

    def __init__(
        self,
        in_features: int,
        out_features: int,
        router: RouterConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.routing = router
        self.router: Router = router.build(in_features, device=device, dtype=dtype)
        self.dispatcher: ExpertDispatcher = LocalExperts()
        # The weights of this layer's aux and z losses in the training loss (the model sets them: its coefficients
        # over its number of MoE layers); None: the layer adds no router loss (a bare layer in a test).
        self.router_loss_weights: tuple[float, float] | None = None
        self.register_buffer("router_loss_scale", torch.ones((), device=device), persistent=False)
        self.last_stats: RoutingStats | None = None  # for logging only: the last forward's statistics, detached
        # Checkpoints written before the router was its own module hold the selection bias at the layer's level.
        self._register_load_state_dict_pre_hook(_move_legacy_router_bias)

    @property
    def num_experts(self) -> int:
        return self.routing.num_experts

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @property
    def capacity_factor(self) -> float | None:
        return self.routing.capacity_factor

    @property
    def score_correction_bias(self) -> torch.Tensor | None:
        return getattr(self.router, "score_correction_bias", None)

    def routing_repr(self) -> str:
        return f"dispatcher={self.dispatcher!r}"

    @torch.no_grad()
    def update_router_bias(self, load: torch.Tensor) -> None:
        """One step of aux-loss-free balancing (the router's selection bias; nothing to do without one)."""
        self.router.update_bias(load)

    @abc.abstractmethod
    def expert_forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The local experts on rows grouped by local expert (`counts` has one entry per local expert)."""

    @abc.abstractmethod
    def param_count(self) -> tuple[int, int]:
        """(total, active per token) parameters of the layer, its router included, whatever is sharded."""

    @abc.abstractmethod
    def flops_per_token(self) -> int:
        """Forward FLOPs (2 per multiply-add) per token: top_k experts and the router."""

    def router_params(self) -> int:
        return sum(p.numel() for p in self.router.parameters())

    def router_flops(self) -> int:
        # The router's matmul (its bias and the softmax are not counted, as norms and activations are not).
        return 2 * self.in_features * self.num_experts if self.routing.type != "hash" else 0

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [..., in_features]; `positions`: each token's position in its document (packed documents, for the
        centred router); `token_ids` [...]: for routers that read them (hash)."""
        leading = x.shape[:-1]
        tokens = x.reshape(-1, self.in_features)
        num_tokens = tokens.shape[0]
        k, num_experts = self.top_k, self.num_experts
        routing = self.router(x, positions, token_ids)
        expert, gate = routing.expert, routing.gate

        # Assignments choice-major, so that with a capacity limit every token's first choice is served before any
        # token's second choice (GShard/Switch priority), then token order within a choice.
        flat_expert = expert.t().reshape(-1)
        flat_gate = gate.t().reshape(-1)
        flat_token = torch.arange(num_tokens, device=x.device).repeat(k)
        counts = torch.bincount(flat_expert, minlength=num_experts)
        order = torch.argsort(flat_expert, stable=True)

        capacity = self.capacity(num_tokens)
        if capacity is None:
            kept_counts = counts
            dropped = counts.new_zeros(())
        else:
            starts = torch.cumsum(counts, dim=0) - counts
            rank_in_expert = torch.arange(order.numel(), device=x.device) - starts[flat_expert[order]]
            order = order[rank_in_expert < capacity]
            kept_counts = counts.clamp(max=capacity)
            dropped = counts.sum() - kept_counts.sum()

        token_index = flat_token[order]
        if capacity is None:
            # Dropless: `order` permutes the T*k assignments; gather and combine through it and its inverse.
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=x.device)
            y = self.dispatcher(self, gather_rows(tokens, token_index, inverse, fold=k), kept_counts)
            y = gather_rows(y, inverse, order)  # back to assignment order (choice-major)
            y = y * flat_gate.unsqueeze(-1).to(y.dtype)
            out = y.view(k, num_tokens, self.out_features).sum(dim=0) if k > 1 else y
        else:
            y = self.dispatcher(self, tokens[token_index], kept_counts)
            y = y * flat_gate[order].unsqueeze(-1).to(y.dtype)
            out = y.new_zeros(num_tokens, self.out_features).index_add_(0, token_index, y)

        logits, probs = routing.logits, routing.probs
        if logits is None or probs is None:  # a router that learns nothing (hash): no loss, one-hot statistics
            aux_loss = z_loss = out.new_zeros((), dtype=torch.float32)
            top1, entropy = out.new_ones((), dtype=torch.float32), out.new_zeros((), dtype=torch.float32)
        else:
            aux_loss, z_loss = router_losses(logits, probs, counts, k)
            weights = self.router_loss_weights
            if weights is not None and torch.is_grad_enabled() and logits.requires_grad:
                out = RouterLoss.apply(out, weights[0] * aux_loss + weights[1] * z_loss, self.router_loss_scale)
            with torch.no_grad():
                top1 = probs.amax(dim=-1).mean()  # the router's own largest probability, whatever the gate
                entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1).mean()
        self.last_stats = RoutingStats(
            aux_loss.detach(), z_loss.detach(), counts.detach(), dropped.detach(), top1, entropy
        )
        return out.reshape(*leading, self.out_features)


def current_state_key(key: str) -> str:
    """A state-dict key as this code names it. Before the router was its own module the selection bias was
    `<layer>.score_correction_bias`; it is `<layer>.router.score_correction_bias` now."""
    if key.endswith(".score_correction_bias") and not key.endswith(".router.score_correction_bias"):
        return key.removesuffix("score_correction_bias") + "router.score_correction_bias"
    return key


def _move_legacy_router_bias(state_dict: dict, prefix: str, *args: object) -> None:
    """Checkpoints written before the router module: their selection bias under its current name."""
    old = prefix + "score_correction_bias"
    if old in state_dict:
        state_dict.setdefault(current_state_key("." + old).removeprefix("."), state_dict.pop(old))


def _init_experts(weights: list[torch.Tensor], std: float | None) -> None:  # each as nn.Linear, or N(0, std)
    for weight in weights:
        for expert in weight.data:
            if std is None:
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            else:
                nn.init.normal_(expert, mean=0.0, std=std)


class MoELinear(RoutedExperts):
    """ParameterNet's layer: a top-k mixture of `num_experts` linear maps in_features -> out_features."""

    expert_param_names = ("weight", "bias")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        router: RouterConfig,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, router, device, dtype)
        factory = {"device": device, "dtype": dtype}
        e = router.num_experts
        # Under expert parallelism this holds only this rank's experts: [num_local_experts, out, in].
        self.weight = nn.Parameter(torch.empty(e, out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(e, out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        _init_experts([self.weight], std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.router.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            + self.routing_repr()
        )

    def param_count(self) -> tuple[int, int]:
        per_expert = self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)
        router = self.router_params()
        return self.num_experts * per_expert + router, self.top_k * per_expert + router

    def flops_per_token(self) -> int:
        return 2 * self.top_k * self.in_features * self.out_features + self.router_flops()

    def expert_forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        y = grouped_mm(x_sorted, self.weight, counts)
        if self.bias is not None:
            y = y + torch.repeat_interleave(self.bias, counts, dim=0, output_size=x_sorted.shape[0])
        return y


class MoEMLP(RoutedExperts):
    """A standard MoE layer: one router chooses, per token, top-k whole SwiGLU MLPs hidden -> hidden,
    down(act(gate(x)) * up(x)), each expert with its own gate, up and down weights (the control that tells
    ParameterNet's one-projection experts from an MoE whose experts are complete MLPs)."""

    expert_param_names = ("gate_weight", "up_weight", "down_weight")

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        router: RouterConfig,
        act_fn: nn.Module,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(hidden_size, hidden_size, router, device, dtype)
        factory = {"device": device, "dtype": dtype}
        e = router.num_experts
        self.intermediate_size = intermediate_size
        self.act_fn = act_fn
        # [E, out, in] each, as nn.Linear's weight per expert; sharded along dim 0 under expert parallelism.
        self.gate_weight = nn.Parameter(torch.empty(e, intermediate_size, hidden_size, **factory))
        self.up_weight = nn.Parameter(torch.empty(e, intermediate_size, hidden_size, **factory))
        self.down_weight = nn.Parameter(torch.empty(e, hidden_size, intermediate_size, **factory))
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        _init_experts([getattr(self, name) for name in self.expert_param_names], std)
        self.router.reset_parameters()

    def extra_repr(self) -> str:
        return f"hidden_size={self.in_features}, intermediate_size={self.intermediate_size}, " + self.routing_repr()

    def param_count(self) -> tuple[int, int]:
        per_expert = 3 * self.in_features * self.intermediate_size
        router = self.router_params()
        return self.num_experts * per_expert + router, self.top_k * per_expert + router

    def flops_per_token(self) -> int:
        return 2 * self.top_k * 3 * self.in_features * self.intermediate_size + self.router_flops()

    def expert_forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate = grouped_mm(x_sorted, self.gate_weight, counts)
        up = grouped_mm(x_sorted, self.up_weight, counts)
        return grouped_mm(self.act_fn(gate) * up, self.down_weight, counts)


# The expert variants: the model config's `moe_mlp` picks "mlp" (whole SwiGLU experts) or "linear" (ParameterNet).
EXPERTS: dict[str, type[RoutedExperts]] = {"linear": MoELinear, "mlp": MoEMLP}

__all__ = [
    "EXPERTS",
    "current_state_key",
    "ExpertDispatcher",
    "LocalExperts",
    "MoELinear",
    "MoEMLP",
    "RoutedExperts",
    "RoutingStats",
    "gather_rows",
    "grouped_mm",
]
