"""The ParameterNet mixture-of-experts layer: a drop-in replacement for `nn.Linear(in_features, out_features)`.

router Linear(in -> E) -> softmax -> top-k -> output = gate probability x expert_i(x), with the E experts held as one
`[E, out, in]` parameter. Dispatch sorts the token-expert assignments by expert and runs one grouped matmul
(`torch._grouped_mm` where the device has it, contiguous slices otherwise); no per-expert boolean masks.

Who computes the experts is a dispatcher object (`ExpertDispatcher`): `LocalExperts` (all experts on this rank) by
default, or the all-to-all dispatcher for expert parallelism that llm/parallel/ installs after construction; the
routing, capacity, gating and combine code here does not change. The model package imports no torch.distributed.
This file is saved next to ParameterNet checkpoints and imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass
class RoutingStats:
    """What one MoE layer saw in its last forward."""

    aux_loss: torch.Tensor  # Switch load-balancing loss, differentiable
    z_loss: torch.Tensor  # router z-loss, differentiable
    tokens_per_expert: torch.Tensor  # [E] int64: assignments each expert was chosen for (before capacity drops)
    dropped_tokens: torch.Tensor  # [] int64: assignments dropped by the capacity limit


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

    def __call__(self, layer: MoELinear, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor: ...


class LocalExperts:
    """Every expert lives on this rank: one grouped matmul."""

    def __call__(self, layer: MoELinear, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return layer.expert_forward(x_sorted, counts)

    def __repr__(self) -> str:
        return "LocalExperts()"


class MoELinear(nn.Module):
    """Top-k mixture of `num_experts` linear maps in_features -> out_features, with a learned softmax router."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        top_k: int = 1,
        capacity_factor: float | None = None,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be >= 1")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be > 0, or None for dropless routing")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(in_features, num_experts, bias=False, **factory)
        # Under expert parallelism this holds only this rank's experts: [num_local_experts, out, in].
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features, **factory)) if bias else None
        self.dispatcher: ExpertDispatcher = LocalExperts()
        self.last_stats: RoutingStats | None = None
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        # Each expert starts like the nn.Linear it replaces (or from N(0, std) when the model gives one).
        for expert in self.weight.data:
            if std is None:
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            else:
                nn.init.normal_(expert, mean=0.0, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if std is None:
            self.router.reset_parameters()
        else:
            nn.init.normal_(self.router.weight, mean=0.0, std=std)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, capacity_factor={self.capacity_factor}, bias={self.bias is not None}, "
            f"dispatcher={self.dispatcher!r}"
        )

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def expert_forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The local experts on rows grouped by local expert (`counts` has one entry per local expert)."""
        y = grouped_mm(x_sorted, self.weight, counts)
        if self.bias is not None:
            y = y + torch.repeat_interleave(self.bias, counts, dim=0, output_size=x_sorted.shape[0])
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        tokens = x.reshape(-1, self.in_features)
        num_tokens = tokens.shape[0]
        k, num_experts = self.top_k, self.num_experts

        logits = self.router(tokens).float()  # routing in fp32 whatever the compute dtype
        probs = torch.softmax(logits, dim=-1)
        gate, expert = torch.topk(probs, k, dim=-1)  # [T, k]

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

        # Switch Transformer: E * sum_e f_e * P_e, f_e = share of assignments to e, P_e = mean router probability.
        fraction = counts.to(probs.dtype) / (num_tokens * k)
        aux_loss = num_experts * torch.sum(fraction * probs.mean(dim=0))
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        self.last_stats = RoutingStats(aux_loss, z_loss, counts.detach(), dropped.detach())
        return out.reshape(*leading, self.out_features)


__all__ = ["MoELinear", "RoutingStats", "LocalExperts", "ExpertDispatcher", "gather_rows", "grouped_mm"]
