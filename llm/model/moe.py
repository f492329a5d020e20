"""The mixture-of-experts layers of ParameterNet-LLaMA, on one routing core (`RoutedExperts`):
- `MoELinear`, ParameterNet's drop-in replacement for `nn.Linear(in_features, out_features)`: the E experts of one
  projection held as one `[E, out, in]` parameter;
- `MoEMLP`, the standard MoE control: E whole SwiGLU MLPs (gate, up, down: three `[E, ...]` parameters).
router Linear(in -> E) -> softmax -> top-k -> output = gate probability x expert_i(x). With aux-loss-free load
balancing (`router_bias_update_rate` > 0, DeepSeek-V3) a per-expert bias is added to the probabilities for the
top-k choice only; the gates stay the unbiased probabilities. Dispatch sorts the
token-expert assignments by expert and runs grouped matmuls (`torch._grouped_mm` where the device has it,
contiguous slices otherwise); no per-expert boolean masks.

Who computes the experts is a dispatcher object (`ExpertDispatcher`): `LocalExperts` (all experts on this rank) by
default, or the all-to-all dispatcher for expert parallelism that llm/parallel/ installs after construction; the
routing, capacity, gating and combine code here does not change. The model package imports no torch.distributed.
This file is saved next to ParameterNet checkpoints and imports only torch.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


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


def router_losses(logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """(aux, z) for one layer: Switch Transformer's load-balancing loss E * sum_e f_e * P_e (f_e = share of the
    assignments to e, P_e = mean router probability of e) and ST-MoE's z-loss, mean logsumexp(logits)^2."""
    num_tokens, num_experts = logits.shape
    fraction = counts.to(probs.dtype) / (num_tokens * k)
    aux = num_experts * torch.sum(fraction * probs.mean(dim=0))
    z = torch.logsumexp(logits, dim=-1).square().mean()
    return aux, z


def _document_causal_mean(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The mean of x [..., seq, d] over this and the earlier positions of the same document, where `positions`
    [..., seq] counts from 0 at each document's first token: a prefix sum minus the prefix sum before the document's
    start. A document's first token is its own mean exactly (as when the document runs alone)."""
    positions = positions.to(x.device).expand(x.shape[:-1])
    sums = x.cumsum(dim=-2)
    before = torch.cat([torch.zeros_like(sums[..., :1, :]), sums], dim=-2)  # before[i] = sum of x[:i]
    index = torch.arange(x.shape[-2], device=x.device) - positions  # each token's document start
    start_sums = before.gather(-2, index.unsqueeze(-1).expand_as(x))
    mean = (sums - start_sums) / (positions + 1).unsqueeze(-1).to(x.dtype)
    return torch.where((positions == 0).unsqueeze(-1), x, mean)


class RouterLoss(torch.autograd.Function):
    """Megatron-Core's MoEAuxLossAutoScaler pattern: the identity on a layer's output in the forward; in the backward
    the gradient of `loss` arrives as if `loss` had been added to the training loss. The router losses so live in the
    autograd graph, not in module state read after the forward: a reentrant checkpoint's recompute re-attaches them,
    and nothing depends on what an earlier forward left behind.

    The backward cannot see how the training loss was scaled before its backward (divided by the gradient
    accumulation steps, times an fp16 loss scale). `scale` is the layer's 0-dim buffer that holds that factor:
    `track_loss_scale` hooks the training loss so that its backward first writes d(backward root)/d(loss) into it, in
    place, on the device (no host sync), before any RouterLoss.backward reads it."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Only the loss's dtype and device are needed: saving the tensor would keep one more activation per layer.
        ctx.loss_dtype, ctx.loss_device = loss.dtype, loss.device
        ctx.scale = scale  # not saved for backward: it is written in place after this forward, on purpose
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        return grad_output, ctx.scale.to(device=ctx.loss_device, dtype=ctx.loss_dtype).clone(), None


def track_loss_scale(loss: torch.Tensor, layers: list[RoutedExperts]) -> torch.Tensor:
    """Reset the layers' router-loss scale to 1 and hook `loss`, the training loss before anything scales it, so
    that its backward records the scale first (the loss is the root's only path to every router loss). Returns
    `loss`. Call it once per forward, on the loss that will be backpropagated."""
    for layer in layers:
        layer.router_loss_scale.fill_(1.0)
    if loss.requires_grad and layers:

        def record(grad: torch.Tensor) -> None:
            for layer in layers:
                layer.router_loss_scale.copy_(grad.detach())

        loss.register_hook(record)
    return loss


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
    """What every mixture of experts here shares: a learned softmax router over `num_experts` experts that map
    in_features -> out_features, top-k routing, the capacity limit, sort-by-expert dispatch through the dispatcher,
    the gated combine and the routing losses and statistics. A subclass holds the expert weights, each one
    `[E, ...]` parameter named in `expert_param_names` (what expert parallelism shards), and computes
    `expert_forward` on rows grouped by expert: `MoELinear` (ParameterNet: one projection) or `MoEMLP` (a standard
    MoE: whole SwiGLU MLPs)."""

    expert_param_names: tuple[str, ...] = ()
    # False: the gate is the chosen experts' router probability (Switch Transformer), about 1/E while the router is
    # near uniform, so the layer's output starts attenuated. True: the probabilities are divided by their sum over
    # the chosen experts, a constant in the backward: the output is unattenuated (the gate is 1 for top-1) and the
    # router still learns from the LM loss. The model sets it from its config's router_gate.
    normalize_gate: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        top_k: int = 1,
        capacity_factor: float | None = None,
        center_router_input: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        router_bias_update_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be >= 1")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be > 0, or None for dropless routing")
        if not (math.isfinite(router_bias_update_rate) and router_bias_update_rate >= 0):
            raise ValueError(f"router_bias_update_rate={router_bias_update_rate} must be a finite number >= 0 (0: off)")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        # center_router_input: route on the input minus its causal mean (over this and the earlier positions of its
        # sequence), RMS-normalised per token, through a router with a bias. Measured on the tiny preset: within 4
        # steps every token's router input is 97-100% one direction shared by all tokens (the model first learns the
        # unigram distribution) and its scale grows 5x in 8 steps; a linear router then gives all tokens the same
        # top-1 expert. Centring removes the shared part; the prefix mean reads no later token and no other
        # sequence, so training, validation and scoring route alike. (A mean over the micro-batch did as well in
        # training, but nothing stands in for it at evaluation: the shared direction is 10-100x the token-to-token
        # spread, and the mean of the latest training batch, one optimizer step old, routed every validation token
        # of three layers to one expert at step 8.) Normalising keeps the token-to-token logit spread independent
        # of the growing input scale. Centring also removes what the load-balancing loss steers (its gradient on
        # the router weight is the load imbalance times the mean input, now zero): the bias gives back per-expert
        # offsets for it to move. The first position of a sequence has nothing to be centred on: the bias routes it.
        self.center_router_input = center_router_input
        self.router = nn.Linear(in_features, num_experts, bias=center_router_input, **factory)
        self.dispatcher: ExpertDispatcher = LocalExperts()
        # The weights of this layer's aux and z losses in the training loss (the model sets them: its coefficients
        # over its number of MoE layers); None: the layer adds no router loss (a bare layer in a test).
        self.router_loss_weights: tuple[float, float] | None = None
        self.register_buffer("router_loss_scale", torch.ones((), device=device), persistent=False)
        # Aux-loss-free load balancing (DeepSeek-V3; Megatron-Core's `expert_bias`, DeepSeek's
        # `e_score_correction_bias`): a per-expert bias added to the router probabilities to choose the top-k, not to
        # the gates; no gradient, moved after each optimizer step by `update_router_bias`. Model state (persistent:
        # checkpoints, exports), kept in fp32 whatever the model's dtype (`_apply`): steps of 1e-3 vanish in bf16.
        # None when the rate is 0, so models without it keep the state dict they always had.
        self.router_bias_update_rate = float(router_bias_update_rate)
        bias = torch.zeros(num_experts, device=device, dtype=torch.float32) if router_bias_update_rate > 0 else None
        self.register_buffer("score_correction_bias", bias, persistent=True)
        self.last_stats: RoutingStats | None = None  # for logging only: the last forward's statistics, detached

    def reset_router(self, std: float | None = None) -> None:
        if std is None:
            self.router.reset_parameters()
        else:
            nn.init.normal_(self.router.weight, mean=0.0, std=std)
        if self.router.bias is not None:
            nn.init.zeros_(self.router.bias)  # no expert preferred at the start

    def routing_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
            f"center_router_input={self.center_router_input}, router_bias_update_rate={self.router_bias_update_rate}, "
            f"dispatcher={self.dispatcher!r}"
        )

    @torch.no_grad()
    def update_router_bias(self, load: torch.Tensor) -> None:
        """One step of aux-loss-free balancing: bias += rate * sign(mean load - load), where `load` [E] is how many
        assignments each expert got in the step, summed over the micro-batches of every data-parallel rank (so
        every rank makes the same update). Experts above the mean load become less likely to be chosen, those below
        more. Nothing to do without the bias (rate 0)."""
        bias = self.score_correction_bias
        if bias is None:
            return
        load = load.to(device=bias.device, dtype=torch.float32)
        bias.add_(torch.sign(load.mean() - load), alpha=self.router_bias_update_rate)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # `.to(dtype)`, `.half()`, `.bfloat16()` (DeepSpeed's engine) would round the bias to 16 bits, where steps of
        # the update rate vanish; it follows the module to its device and stays fp32.
        bias = self._buffers.get("score_correction_bias")
        super()._apply(fn, recurse)
        moved = self._buffers.get("score_correction_bias")
        if bias is not None and moved is not None and moved.dtype != torch.float32:
            source = moved if bias.is_meta or moved.is_meta else bias
            self._buffers["score_correction_bias"] = source.to(device=moved.device, dtype=torch.float32)
        return self

    @abc.abstractmethod
    def expert_forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The local experts on rows grouped by local expert (`counts` has one entry per local expert)."""

    def router_logits(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[T, E] fp32 router logits for x [..., seq, in_features] (a 2-D x is one sequence). The raw router (the
        paper's) multiplies in the compute dtype and takes its softmax in fp32; the centred one runs in fp32 (or the
        input's wider dtype) from its input on, as ST-MoE's selective precision: a 16-bit subtraction of the shared
        part would round away the token-to-token part.

        `positions` ([..., seq] int, the token's position within its document; given under document-masked packing
        only): the centred router's causal mean restarts at every position 0, so that each document of a packed
        sequence routes as it would alone. The raw router reads each token alone and ignores it."""
        tokens = x.reshape(-1, self.in_features)
        if not self.center_router_input:
            return self.router(tokens).float()
        # The router learns from a statistic of the hidden states, not into them: with gradient, the normalisation
        # of a near-zero centred vector (always the first position) multiplies it by up to 1/sqrt(eps), and the
        # global gradient norm of the tiny preset reached 1e5-1e8 by step 20 (clipped to 1: the LM stopped learning).
        x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
        if positions is None:
            counts = torch.arange(1, x.shape[-2] + 1, device=x.device, dtype=x.dtype).unsqueeze(-1)
            x = x - x.cumsum(dim=-2) / counts  # minus the causal mean
        else:
            x = x - _document_causal_mean(x, positions)
        x = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + 1e-6)
        logits = nn.functional.linear(x, self.router.weight.to(x.dtype), self.router.bias.to(x.dtype))
        return logits.reshape(-1, self.num_experts).float()

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in_features]; `positions`: see router_logits (None: today's routing)."""
        leading = x.shape[:-1]
        tokens = x.reshape(-1, self.in_features)
        num_tokens = tokens.shape[0]
        k, num_experts = self.top_k, self.num_experts

        logits = self.router_logits(x, positions)
        probs = torch.softmax(logits, dim=-1)
        if self.score_correction_bias is None:
            gate, expert = torch.topk(probs, k, dim=-1)  # [T, k]
        else:
            # The bias chooses the experts; the gates stay the router's own probabilities (no gradient to the bias).
            _, expert = torch.topk(probs + self.score_correction_bias, k, dim=-1)
            gate = probs.gather(-1, expert)
        if self.normalize_gate:
            gate = gate / gate.sum(dim=-1, keepdim=True).detach()

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

        aux_loss, z_loss = router_losses(logits, probs, counts, k)
        weights = self.router_loss_weights
        if weights is not None and torch.is_grad_enabled() and logits.requires_grad:
            out = RouterLoss.apply(out, weights[0] * aux_loss + weights[1] * z_loss, self.router_loss_scale)
        with torch.no_grad():
            top1 = probs.amax(dim=-1).mean()  # the router's own largest probability, whatever the gate
            entropy = -(probs * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
        self.last_stats = RoutingStats(
            aux_loss.detach(), z_loss.detach(), counts.detach(), dropped.detach(), top1, entropy
        )
        return out.reshape(*leading, self.out_features)


class MoELinear(RoutedExperts):
    """ParameterNet's layer: a top-k mixture of `num_experts` linear maps in_features -> out_features."""

    expert_param_names = ("weight", "bias")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        top_k: int = 1,
        capacity_factor: float | None = None,
        bias: bool = False,
        center_router_input: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        router_bias_update_rate: float = 0.0,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            num_experts,
            top_k,
            capacity_factor,
            center_router_input,
            device,
            dtype,
            router_bias_update_rate,
        )
        factory = {"device": device, "dtype": dtype}
        # Under expert parallelism this holds only this rank's experts: [num_local_experts, out, in].
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features, **factory)) if bias else None
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
        self.reset_router(std)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            + self.routing_repr()
        )

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
        num_experts: int,
        act_fn: nn.Module,
        top_k: int = 1,
        capacity_factor: float | None = None,
        center_router_input: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        router_bias_update_rate: float = 0.0,
    ) -> None:
        super().__init__(
            hidden_size,
            hidden_size,
            num_experts,
            top_k,
            capacity_factor,
            center_router_input,
            device,
            dtype,
            router_bias_update_rate,
        )
        factory = {"device": device, "dtype": dtype}
        self.intermediate_size = intermediate_size
        self.act_fn = act_fn
        # [E, out, in] each, as nn.Linear's weight per expert; sharded along dim 0 under expert parallelism.
        self.gate_weight = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size, **factory))
        self.up_weight = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size, **factory))
        self.down_weight = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        for name in self.expert_param_names:
            for expert in getattr(self, name).data:
                if std is None:
                    nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
                else:
                    nn.init.normal_(expert, mean=0.0, std=std)
        self.reset_router(std)

    def extra_repr(self) -> str:
        return f"hidden_size={self.in_features}, intermediate_size={self.intermediate_size}, " + self.routing_repr()

    def expert_forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate = grouped_mm(x_sorted, self.gate_weight, counts)
        up = grouped_mm(x_sorted, self.up_weight, counts)
        return grouped_mm(self.act_fn(gate) * up, self.down_weight, counts)


__all__ = [
    "ExpertDispatcher",
    "LocalExperts",
    "MoELinear",
    "MoEMLP",
    "RoutedExperts",
    "RoutingStats",
    "gather_rows",
    "grouped_mm",
]
