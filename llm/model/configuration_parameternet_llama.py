"""Configuration of ParameterNet-LLaMA: a LLaMA whose chosen SwiGLU projections are top-k mixtures of experts.

This file is saved next to the weights by `save_pretrained` and loaded with `trust_remote_code=True`, so it imports
nothing but torch/transformers/huggingface_hub (and router.py, saved beside it). The router_* fields are the keys of
one `RouterConfig` (`router_config(config)`): the layers take that, never the loose fields.
"""

from __future__ import annotations

import math
import warnings

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from .router import ROUTER_GATES, ROUTER_INPUTS, ROUTER_SCORES, ROUTERS, RouterConfig

MOE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# Named routing recipes: the fields each sets. A report names an arm's recipe with `routing_recipe(config)`; a run
# picks one with the model override {"routing_recipe": NAME} (llm.model.presets.load_model_config expands it).
# - paper: the ParameterNet paper's (Switch load-balancing loss 0.01, no z-loss, a linear router on the raw input).
# - centered: for training small models from scratch. The router input is centred on its causal mean and
#   RMS-normalised (router_input 'centered', see llm/model/moe.py for the measurements behind it), the router
#   z-loss of ST-MoE (0.001), and a load-balancing weight of 0.1: this model averages the aux loss over its MoE
#   layers, so 0.1 over the tiny/small presets' 4 layers is 0.025 per layer, the order of Switch's 0.01 per layer
#   (with a batch-centred router, 0.01 let the language-model gradient through the gates win: load CV 0.5-1.5 at
#   steps 6-8 of 8 x 256-token batches, against 0.2-0.8 with 0.1). The tiny preset's 60 iterations (2026-12-06):
#   load CV 0.44-0.87 at iterations 10-30 and 0.55-1.32 at 40-60, validation loss 6.09 / 6.00 / 5.89 at 20/40/60;
#   the paper's recipe: 1.1-2.65 at 10-30 (every token of three layers on one expert at 10), 0.4-1.79 at 40-60,
#   validation loss 6.25 / 5.99 / 5.83.
ROUTING_RECIPES: dict[str, dict[str, object]] = {
    "paper": {"router_input": "raw", "router_aux_loss_coef": 0.01, "router_z_loss_coef": 0.0},
    "centered": {"router_input": "centered", "router_aux_loss_coef": 0.1, "router_z_loss_coef": 0.001},
}


def router_config(config: ParameterNetLlamaConfig) -> RouterConfig:
    """The one RouterConfig every MoE layer of the model is built with."""
    return RouterConfig.from_model_config(config)


def routing_recipe(config: ParameterNetLlamaConfig) -> str:
    """The name of the routing recipe whose fields the config has, 'hash', or 'custom'."""
    if config.router_type == "hash":
        return "hash"
    for name, fields in ROUTING_RECIPES.items():
        if all(getattr(config, key) == value for key, value in fields.items()):
            return name
    return "custom"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_parameternet_fields(config: ParameterNetLlamaConfig) -> None:
    """Raise ValueError naming the field, the value and the fix. Called at construction and again by the model."""
    if config.num_attention_heads < 1 or config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size={config.hidden_size} is not divisible by num_attention_heads={config.num_attention_heads}; "
            f"choose a hidden_size that is a multiple of the number of heads"
        )
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    if kv_heads < 1 or config.num_attention_heads % kv_heads:
        raise ValueError(
            f"num_key_value_heads={config.num_key_value_heads} does not divide num_attention_heads="
            f"{config.num_attention_heads}; choose a divisor (equal for multi-head attention)"
        )
    projections = config.moe_projections
    if not isinstance(projections, (list, tuple)) or not projections:
        raise ValueError(
            f"moe_projections={projections!r} must be a non-empty list drawn from {list(MOE_PROJECTIONS)}, "
            f"e.g. ['down_proj']"
        )
    unknown = [p for p in projections if not isinstance(p, str) or p not in MOE_PROJECTIONS]
    if unknown or len(set(projections)) != len(projections):
        raise ValueError(
            f"moe_projections={list(projections)!r}: {unknown or 'duplicates'} not allowed; "
            f"use distinct names from {list(MOE_PROJECTIONS)}"
        )
    if not _is_int(config.num_experts) or config.num_experts < 1:
        raise ValueError(f"num_experts={config.num_experts!r} must be an integer >= 1")
    if not _is_int(config.top_k) or not 1 <= config.top_k <= config.num_experts:
        raise ValueError(f"top_k={config.top_k!r} must be an integer between 1 and num_experts={config.num_experts}")
    capacity = config.capacity_factor
    if capacity is not None and not (_is_finite_number(capacity) and capacity > 0):
        raise ValueError(f"capacity_factor={capacity!r} must be a number > 0, or null for dropless routing")
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
        value = getattr(config, name)
        if not _is_finite_number(value) or value < 0:
            raise ValueError(f"{name}={value!r} must be a number >= 0 (0 disables the loss)")
    rate = config.router_bias_update_rate
    if not _is_finite_number(rate) or rate < 0:
        raise ValueError(
            f"router_bias_update_rate={rate!r} must be a finite number >= 0 (0 disables aux-loss-free load "
            f"balancing; DeepSeek-V3 used 0.001)"
        )
    for name in ("expert_output_bias", "moe_mlp"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name}={getattr(config, name)!r} must be true or false")
    if config.moe_mlp:
        if sorted(projections) != sorted(MOE_PROJECTIONS):
            raise ValueError(
                f"moe_mlp={config.moe_mlp!r} with moe_projections={list(projections)!r}: an MLP expert holds all three "
                f"projections; set moe_projections to {list(MOE_PROJECTIONS)} (or moe_mlp false for ParameterNet)"
            )
        if config.expert_output_bias:
            raise ValueError(
                f"expert_output_bias={config.expert_output_bias!r} with moe_mlp={config.moe_mlp!r}: MLP experts have "
                f"no biases; set expert_output_bias false"
            )
    if config.router_gate not in ROUTER_GATES:
        raise ValueError(
            f"router_gate={config.router_gate!r} must be one of {list(ROUTER_GATES)} ('softmax': the gate is the "
            f"router probability, as in Switch; 'normalized': divided by the chosen experts' sum, unattenuated)"
        )
    if config.router_score not in ROUTER_SCORES:
        raise ValueError(
            f"router_score={config.router_score!r} must be one of {list(ROUTER_SCORES)} ('softmax' over the experts, "
            f"as Switch and the paper; 'sigmoid' per expert, as DeepSeek-V3, best with router_gate 'normalized')"
        )
    if config.router_type not in ROUTERS:
        raise ValueError(
            f"router_type={config.router_type!r} must be one of {list(ROUTERS)} ('learned': a linear router; "
            f"'hash': a fixed hash of the token id, no learned router, the Hash Layers control)"
        )
    if config.router_type == "hash" and config.router_bias_update_rate:
        raise ValueError(
            f"router_bias_update_rate={config.router_bias_update_rate!r} with router_type='hash': a hash router has "
            f"no selection bias to move; set router_bias_update_rate to 0"
        )
    if config.router_input not in ROUTER_INPUTS:
        raise ValueError(
            f"router_input={config.router_input!r} must be one of {list(ROUTER_INPUTS)} ('raw': the paper's linear "
            f"router on the projection's input; 'centered': centred and normalised, for training from scratch)"
        )


# The experts' output bias was the field `expert_bias` until Megatron-Core's and DeepSeek's name for the router's
# selection bias (here: router_bias_update_rate's buffer) made it ambiguous; existing configs are read with a warning.
LEGACY_EXPERT_BIAS = "expert_bias"


def _read_legacy_expert_bias(config: ParameterNetLlamaConfig, value: object) -> None:
    if config.expert_output_bias is True and value is not True:
        raise ValueError(
            f"expert_bias={value!r} and expert_output_bias=True disagree: expert_bias is the old name of "
            f"expert_output_bias; keep only expert_output_bias"
        )
    warnings.warn(
        f"model config: 'expert_bias' (={value!r}) is the old name of 'expert_output_bias' (the experts' output "
        f"bias); read as expert_output_bias={value!r}. Rename the key: saving this config writes the new name",
        UserWarning,
        stacklevel=4,
    )
    config.expert_output_bias = value


@strict
class ParameterNetLlamaConfig(LlamaConfig):
    r"""LLaMA configuration plus the mixture-of-experts fields of ParameterNet.

    moe_projections: which SwiGLU projections become MoE layers (any non-empty subset of gate_proj, up_proj,
        down_proj). The paper's released LLaMA variant uses ["down_proj"].
    num_experts: experts per MoE layer (per projection; per MLP with moe_mlp).
    top_k: experts each token is sent to (1 in the paper: same FLOPs per token as the dense twin).
    capacity_factor: None routes every token (dropless, the paper's capacity 99999); a number caps each expert at
        ceil(capacity_factor * tokens * top_k / num_experts) tokens and drops the overflow (output zero), counted.
    router_aux_loss_coef: weight of the Switch-Transformer load-balancing loss.
    router_z_loss_coef: weight of the router z-loss (ST-MoE); 0 disables it.
    expert_output_bias: whether each expert has an output bias vector (LLaMA's projections have none). Configs and
        checkpoints written before the rename name it `expert_bias`: read as this field, with a warning (in
        Megatron-Core and DeepSeek `expert_bias` is the router's selection bias, ours is router_bias_update_rate's).
    router_bias_update_rate: aux-loss-free load balancing (DeepSeek-V3): > 0 gives every MoE layer a per-expert
        bias (a persistent buffer, no gradient) added to the router probabilities only to choose the top-k experts,
        never to the gate values; after each optimizer step the trainer moves it by this rate times
        sign(mean load - expert load), the loads of the step summed over all ranks. 0 (the default): no bias.
    moe_mlp: false (ParameterNet): each projection in moe_projections is its own MoE layer with its own router.
        true (a standard MoE, the control): one router per layer chooses whole SwiGLU MLP experts, each with its
        own gate, up and down weights; moe_projections must then name all three.
    router_input: what the router reads. 'raw' (the paper's, and that of checkpoints saved before this field): a
        linear router on the projection's input. 'centered': the input minus its causal mean (over this and the
        earlier positions of the sequence), RMS-normalised per token, through a router with a bias; such a model
        generates without the KV cache. Without it the routers
        of a small model trained from scratch send every token to one expert within a few steps: the hidden states
        are then dominated by one direction shared by all tokens, so a linear router gives all of them the same
        top-1 (see llm/model/moe.py). ROUTING_RECIPES names the combinations in use.
    router_gate: what multiplies an expert's output. 'softmax' (the paper's and Switch's): its router probability.
        'normalized': the probability over the sum of the chosen experts' (a constant in the backward): 1 for top-1.
    router_score: 'softmax' over the experts (the default) or 'sigmoid' per expert (DeepSeek-V3; Megatron-Core's
        moe_router_score_function 'sigmoid'), its top-k renormalised with router_gate 'normalized'.
    router_type: 'learned' (the default: a linear router) or 'hash' (Hash Layers, Roller et al. 2021: a fixed hash
        of the token id chooses the expert; no router weights, no router loss; the control for a learned router).
    """

    model_type = "parameternet_llama"

    moe_projections: list[str] | tuple[str, ...] = ("down_proj",)
    num_experts: int = 8
    top_k: int = 1
    capacity_factor: float | int | None = None
    router_aux_loss_coef: float | int = 0.01
    router_z_loss_coef: float | int = 0.0
    expert_output_bias: bool = False
    router_input: str = "raw"
    moe_mlp: bool = False
    router_bias_update_rate: float | int = 0.0
    router_gate: str = "softmax"
    router_score: str = "softmax"
    router_type: str = "learned"

    def __post_init__(self, **kwargs):
        if LEGACY_EXPERT_BIAS in kwargs:
            _read_legacy_expert_bias(self, kwargs.pop(LEGACY_EXPERT_BIAS))
        if isinstance(self.moe_projections, tuple):  # anything else is left for the validation to name
            self.moe_projections = list(self.moe_projections)
        validate_parameternet_fields(self)
        super().__post_init__(**kwargs)


__all__ = [
    "LEGACY_EXPERT_BIAS",
    "MOE_PROJECTIONS",
    "ROUTER_INPUTS",
    "ROUTING_RECIPES",
    "ParameterNetLlamaConfig",
    "router_config",
    "routing_recipe",
    "validate_parameternet_fields",
]
