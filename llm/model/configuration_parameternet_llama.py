"""Configuration of ParameterNet-LLaMA: a LLaMA whose chosen SwiGLU projections are top-k mixtures of experts.

This file is saved next to the weights by `save_pretrained` and loaded with `trust_remote_code=True`, so it imports
nothing but torch/transformers/huggingface_hub.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

MOE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def validate_parameternet_fields(config: "ParameterNetLlamaConfig") -> None:
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
    if isinstance(projections, str) or not projections:
        raise ValueError(
            f"moe_projections={projections!r} must be a non-empty list drawn from {list(MOE_PROJECTIONS)}, "
            f"e.g. ['down_proj']"
        )
    unknown = [p for p in projections if p not in MOE_PROJECTIONS]
    if unknown or len(set(projections)) != len(projections):
        raise ValueError(
            f"moe_projections={list(projections)!r}: {unknown or 'duplicates'} not allowed; "
            f"use distinct names from {list(MOE_PROJECTIONS)}"
        )
    if config.num_experts < 1:
        raise ValueError(f"num_experts={config.num_experts} must be >= 1")
    if not 1 <= config.top_k <= config.num_experts:
        raise ValueError(
            f"top_k={config.top_k} must be between 1 and num_experts={config.num_experts}"
        )
    if config.capacity_factor is not None and not config.capacity_factor > 0:
        raise ValueError(
            f"capacity_factor={config.capacity_factor} must be > 0, or null for dropless routing"
        )
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
        value = getattr(config, name)
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0 (0 disables the loss)")


@strict
class ParameterNetLlamaConfig(LlamaConfig):
    r"""LLaMA configuration plus the mixture-of-experts fields of ParameterNet.

    moe_projections: which SwiGLU projections become MoE layers (any non-empty subset of gate_proj, up_proj,
        down_proj). The paper's released LLaMA variant uses ["down_proj"].
    num_experts: experts per MoE projection.
    top_k: experts each token is sent to (1 in the paper: same FLOPs per token as the dense twin).
    capacity_factor: None routes every token (dropless, the paper's capacity 99999); a number caps each expert at
        ceil(capacity_factor * tokens * top_k / num_experts) tokens and drops the overflow (output zero), counted.
    router_aux_loss_coef: weight of the Switch-Transformer load-balancing loss.
    router_z_loss_coef: weight of the router z-loss (ST-MoE); 0 disables it.
    expert_bias: whether each expert has a bias vector (LLaMA's projections have none).
    """

    model_type = "parameternet_llama"

    moe_projections: list[str] | tuple[str, ...] = ("down_proj",)
    num_experts: int = 8
    top_k: int = 1
    capacity_factor: float | int | None = None
    router_aux_loss_coef: float | int = 0.01
    router_z_loss_coef: float | int = 0.0
    expert_bias: bool = False

    def __post_init__(self, **kwargs):
        self.moe_projections = list(self.moe_projections) if not isinstance(self.moe_projections, str) else (
            self.moe_projections
        )
        validate_parameternet_fields(self)
        super().__post_init__(**kwargs)


__all__ = ["ParameterNetLlamaConfig", "MOE_PROJECTIONS", "validate_parameternet_fields"]
