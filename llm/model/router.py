"""The router of every mixture-of-experts layer here: one `RouterConfig` says how tokens choose experts, and
`RouterConfig.build` makes the `Router` module that does it (as OLMo-core's `MoERouterConfig.build()` and
Megatron-Core's `TopKRouter`). The expert layers (moe.py) take the routing as given: which experts, with which gates.

Routers (`ROUTERS`, one class and one entry per variant):
- `learned` (`LearnedRouter`): a linear map in_features -> E, scored by a softmax (Switch, the paper) or a sigmoid
  (DeepSeek-V3, Megatron-Core's `moe_router_score_function: sigmoid`), top-k on the scores (plus the aux-loss-free
  selection bias when its update rate is > 0), gates from the chosen scores. Its input is the projection's input
  (`raw`, the paper's) or that input centred on its causal mean and RMS-normalised (`centered`, see below).
- `hash` (`HashRouter`): a fixed hash of the token id chooses the expert (Hash Layers, Roller et al. 2021): no
  learned router, no router loss, gate 1. The control that says what a learned router adds.

This file is saved next to ParameterNet checkpoints (moe.py imports it) and imports only torch.
"""

from __future__ import annotations

import abc
import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

ROUTER_INPUTS = ("raw", "centered")
ROUTER_SCORES = ("softmax", "sigmoid")
ROUTER_GATES = ("softmax", "normalized")
# Each field's key in the model config (config.json, --model_overrides, the MoE flags): what an error names.
CONFIG_KEYS = {
    "type": "router_type",
    "num_experts": "num_experts",
    "top_k": "top_k",
    "input": "router_input",
    "score": "router_score",
    "gate": "router_gate",
    "capacity_factor": "capacity_factor",
    "aux_loss_coef": "router_aux_loss_coef",
    "z_loss_coef": "router_z_loss_coef",
    "bias_update_rate": "router_bias_update_rate",
}


@dataclass(frozen=True)
class RouterConfig:
    """How one MoE layer routes. Field by field (the model config's key in brackets):

    type [router_type]: 'learned' or 'hash' (ROUTERS).
    num_experts [num_experts], top_k [top_k]: experts per layer, experts per token.
    input [router_input]: 'raw' (the projection's input) or 'centered' (its causal-mean-centred, RMS-normalised
        version, through a router with a bias).
    score [router_score]: 'softmax' over the experts, or an independent 'sigmoid' per expert.
    gate [router_gate]: what multiplies a chosen expert's output: 'softmax' (its score itself, Switch's and the
        paper's; the name of the default since before sigmoid scores) or 'normalized' (the score over the chosen
        experts' sum, a constant in the backward: 1 under top-1, the output unattenuated; Mixtral, Megatron-Core's
        softmax after top-k, DeepSeek-V3's renormalisation).
    capacity_factor [capacity_factor]: None routes every token; a number caps each expert at
        ceil(capacity_factor * tokens * top_k / num_experts) assignments and drops the rest (counted).
    aux_loss_coef, z_loss_coef [router_aux_loss_coef, router_z_loss_coef]: the model's weights of the Switch
        load-balancing loss and the ST-MoE z-loss, averaged over its MoE layers (the model gives each layer its share).
    bias_update_rate [router_bias_update_rate]: > 0: aux-loss-free balancing (DeepSeek-V3), a per-expert selection
        bias moved by this rate after each optimizer step.
    init_std: None (nn.Linear's init) or the std of a normal init (the model's initializer_range).
    """

    type: str = "learned"
    num_experts: int = 8
    top_k: int = 1
    input: str = "raw"
    score: str = "softmax"
    gate: str = "softmax"
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    init_std: float | None = None

    def __post_init__(self) -> None:
        choices = {"type": tuple(ROUTERS), "input": ROUTER_INPUTS, "score": ROUTER_SCORES, "gate": ROUTER_GATES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{CONFIG_KEYS[name]}={getattr(self, name)!r} must be one of {list(allowed)}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0, or None for dropless routing")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{CONFIG_KEYS[name]}={value} must be a finite number >= 0 (0: off)")
        if self.type == "hash" and self.bias_update_rate > 0:
            raise ValueError("a hash router has no selection bias: set router_bias_update_rate to 0")

    @classmethod
    def from_model_config(cls, config: Any) -> RouterConfig:
        """The routing of a ParameterNetLlamaConfig, whose router_* fields are the keys of its config.json."""
        return cls(
            type=getattr(config, "router_type", "learned"),
            num_experts=config.num_experts,
            top_k=config.top_k,
            input=config.router_input,
            score=getattr(config, "router_score", "softmax"),
            gate=config.router_gate,
            capacity_factor=config.capacity_factor,
            aux_loss_coef=float(config.router_aux_loss_coef),
            z_loss_coef=float(config.router_z_loss_coef),
            bias_update_rate=float(config.router_bias_update_rate),
            init_std=config.initializer_range,
        )

    def record(self) -> dict[str, Any]:
        """What a run directory records of the routing (config.yaml, summary.json, the reports' tables)."""
        return {k: v for k, v in asdict(self).items() if k != "init_std"}

    def build(self, in_features: int, device: Any = None, dtype: torch.dtype | None = None) -> Router:
        return ROUTERS[self.type](self, in_features, device=device, dtype=dtype)


class Routing(NamedTuple):
    """One forward's routing of T tokens: what the expert layer dispatches and what its losses read. A NamedTuple,
    not a dataclass: ZeRO-3 hooks the tensors of a module's output to gather the module's parameters again for the
    backward, and it looks inside tuples, lists and dicts only (a dataclass output left the router's weight
    partitioned in the backward: "size of tensor a (0) must match")."""

    expert: torch.Tensor  # [T, k] int64: the chosen experts, best first
    gate: torch.Tensor  # [T, k] fp32: what multiplies each chosen expert's output
    logits: torch.Tensor | None  # [T, E] fp32 (None: the router learns nothing, no router loss)
    probs: torch.Tensor | None  # [T, E] fp32 scores summing to 1 per token: the aux loss's and the statistics' P


class Router(nn.Module, abc.ABC):
    """Hidden states (and token ids, for routers that read them) -> Routing."""

    def __init__(self, config: RouterConfig, in_features: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.config = config
        self.in_features = in_features

    @abc.abstractmethod
    def forward(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, token_ids: torch.Tensor | None = None
    ) -> Routing:
        """x [..., seq, in_features]; positions: each token's position in its document (packed documents);
        token_ids [..., seq] for routers that read them."""

    def reset_parameters(self) -> None:
        """Fresh weights (a router with none has nothing to do)."""

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Aux-loss-free balancing after an optimizer step (a router without a selection bias ignores it)."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.record().items())


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


def _gates(config: RouterConfig, chosen: torch.Tensor) -> torch.Tensor:
    if config.gate == "normalized":
        return chosen / chosen.sum(dim=-1, keepdim=True).detach()
    return chosen


class LearnedRouter(Router):
    """A linear router: logits = W x (+ b with the centred input), scores by softmax or sigmoid, top-k.

    The centred input: route on the input minus its causal mean (over this and the earlier positions of its
    sequence), RMS-normalised per token, through a router with a bias. Measured on the tiny preset: within 4 steps
    every token's router input is 97-100% one direction shared by all tokens (the model first learns the unigram
    distribution) and its scale grows 5x in 8 steps; a linear router then gives all tokens the same top-1 expert.
    Centring removes the shared part; the prefix mean reads no later token and no other sequence, so training,
    validation and scoring route alike. (A mean over the micro-batch did as well in training, but nothing stands in
    for it at evaluation: the mean of the latest training batch routed every validation token of three layers to
    one expert at step 8.) Normalising keeps the logit spread independent of the growing input scale. Centring also
    removes what the load-balancing loss steers (its gradient on the router weight is the load imbalance times the
    mean input, now zero): the bias gives back per-expert offsets for it to move. The first position of a sequence
    has nothing to be centred on: the bias routes it."""

    def __init__(self, config: RouterConfig, in_features: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__(config, in_features, device, dtype)
        factory = {"device": device, "dtype": dtype}
        e = config.num_experts
        self.weight = nn.Parameter(torch.empty(e, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(e, **factory)) if config.input == "centered" else None
        # Aux-loss-free load balancing (DeepSeek-V3; Megatron-Core's `expert_bias`, DeepSeek's
        # `e_score_correction_bias`): a per-expert bias added to the scores to choose the top-k, not to the gates; no
        # gradient, moved after each optimizer step by `update_bias`. Model state (persistent: checkpoints, exports),
        # kept in fp32 whatever the model's dtype (`_apply`): steps of 1e-3 vanish in bf16. None when the rate is 0,
        # so models without it keep the state dict they always had.
        bias = torch.zeros(e, device=device, dtype=torch.float32) if config.bias_update_rate > 0 else None
        self.register_buffer("score_correction_bias", bias, persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.config.init_std is None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.weight, mean=0.0, std=self.config.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)  # no expert preferred at the start

    def logits(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[T, E] fp32 logits for x [..., seq, in_features] (a 2-D x is one sequence). The raw router multiplies in
        the compute dtype; the centred one runs in fp32 (or the input's wider dtype) from its input on, as ST-MoE's
        selective precision: a 16-bit subtraction of the shared part would round away the token-to-token part.
        `positions` (under document-masked packing only): the centred router's causal mean restarts at every
        position 0, so that each document of a packed sequence routes as it would alone."""
        if self.config.input == "raw":
            return nn.functional.linear(x.reshape(-1, self.in_features), self.weight).float()
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
        assert self.bias is not None
        logits = nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))
        return logits.reshape(-1, self.config.num_experts).float()

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, token_ids: torch.Tensor | None = None
    ) -> Routing:
        logits = self.logits(x, positions)
        if self.config.score == "softmax":
            scores = torch.softmax(logits, dim=-1)
            probs = scores
        else:
            scores = torch.sigmoid(logits)
            # The aux loss and the statistics read a distribution: the sigmoid scores over their sum (DeepSeek-V3's).
            probs = scores / scores.sum(dim=-1, keepdim=True)
        if self.score_correction_bias is None:
            chosen, expert = torch.topk(scores, self.config.top_k, dim=-1)
        else:
            # The bias chooses the experts; the gates stay the router's own scores (no gradient to the bias).
            _, expert = torch.topk(scores + self.score_correction_bias, self.config.top_k, dim=-1)
            chosen = scores.gather(-1, expert)
        return Routing(expert, _gates(self.config, chosen), logits, probs)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """bias += rate * sign(mean load - load), where `load` [E] is how many assignments each expert got in the
        step, summed over the micro-batches of every data-parallel rank (so every rank makes the same update)."""
        bias = self.score_correction_bias
        if bias is None:
            return
        load = load.to(device=bias.device, dtype=torch.float32)
        bias.add_(torch.sign(load.mean() - load), alpha=self.config.bias_update_rate)

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


# Knuth's multiplicative hash (2^32 / golden ratio); the high bits of the product spread consecutive ids.
_HASH_MULTIPLIER = 2654435761


class HashRouter(Router):
    """Hash Layers (Roller et al. 2021): expert = a fixed hash of the token id, the same in every layer and at every
    step; top-k takes the k experts after it. No parameters, no router loss; gates 1 (1/k each with 'normalized')."""

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, token_ids: torch.Tensor | None = None
    ) -> Routing:
        if token_ids is None:
            raise ValueError(
                "router_type='hash' routes by token id: call the model with input_ids (not inputs_embeds only)"
            )
        e, k = self.config.num_experts, self.config.top_k
        ids = token_ids.reshape(-1).to(device=x.device, dtype=torch.int64)
        first = ((ids * _HASH_MULTIPLIER) % 2**32 >> 16) % e
        expert = (first.unsqueeze(-1) + torch.arange(k, device=x.device)) % e
        gate = _gates(self.config, torch.ones(expert.shape, device=x.device, dtype=torch.float32))
        return Routing(expert, gate, None, None)


def router_losses(logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """(aux, z) for one layer: Switch Transformer's load-balancing loss E * sum_e f_e * P_e (f_e = share of the
    assignments to e, P_e = mean router probability of e) and ST-MoE's z-loss, mean logsumexp(logits)^2."""
    num_tokens, num_experts = logits.shape
    fraction = counts.to(probs.dtype) / (num_tokens * k)
    aux = num_experts * torch.sum(fraction * probs.mean(dim=0))
    z = torch.logsumexp(logits, dim=-1).square().mean()
    return aux, z


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


def track_loss_scale(loss: torch.Tensor, layers: list[Any]) -> torch.Tensor:
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


ROUTERS: dict[str, type[Router]] = {"learned": LearnedRouter, "hash": HashRouter}

__all__ = [
    "ROUTERS",
    "RouterLoss",
    "router_losses",
    "track_loss_scale",
    "ROUTER_GATES",
    "ROUTER_INPUTS",
    "ROUTER_SCORES",
    "HashRouter",
    "LearnedRouter",
    "Router",
    "RouterConfig",
    "Routing",
]
