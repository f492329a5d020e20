"""Analytic parameter and FLOP accounting for LLaMA and ParameterNet-LLaMA (no weights allocated).

Conventions (PaLM appendix B / Megatron): a matmul of an [m, k] by a [k, n] costs 2mkn FLOPs; attention scores and the
weighted sum cost 2 x 2 x seq_len x hidden per token per layer, counted over the full (non-causal) square as
PaLM's MFU does; training costs 3x the forward. Embedding lookups, norms, activations and softmax are not counted.
A MoE projection costs top_k experts plus its router per token: with top_k = 1 that is the dense projection plus
2 x in x num_experts FLOPs, which is ParameterNet's point. A standard MoE layer (moe_mlp) likewise costs top_k whole
SwiGLU MLPs plus its router (2 x hidden x num_experts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import LlamaConfig, MixtralConfig

from .configuration_parameternet_llama import ParameterNetLlamaConfig


@dataclass(frozen=True)
class ModelAccounting:
    total_params: int
    active_params: int  # parameters a token touches in one forward (all dense ones + top_k experts + routers)
    embedding_params: int  # input embedding table (a lookup, no FLOPs)
    forward_flops_per_token: int
    seq_len: int

    @property
    def train_flops_per_token(self) -> int:
        return 3 * self.forward_flops_per_token

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "train_flops_per_token": self.train_flops_per_token}


def router_params(config: ParameterNetLlamaConfig, fan_in: int) -> int:
    """One router: Linear(fan_in -> num_experts), with a bias when it routes on the centred input; none when hashed."""
    if config.router_type == "hash":
        return 0
    return fan_in * config.num_experts + (config.num_experts if config.router_input == "centered" else 0)


def _mlp_projections(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    hidden, inner = config.hidden_size, config.intermediate_size
    return {"gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}


def _mlp_cost(config: LlamaConfig) -> tuple[int, int, int]:
    """(total params, active params, forward multiply-adds per token) of one decoder layer's MLP. ParameterNet's MLP
    is built on the meta device and each of its layers answers for itself (an expert layer knows its experts, top-k
    and router; a dense projection is its matrix): no branch here on what the variant is."""
    if isinstance(config, MixtralConfig):
        # The peer standard MoE (transformers' code, not ours to ask): E whole SwiGLU experts, a bias-free router.
        hidden, experts, k = config.hidden_size, config.num_local_experts, config.num_experts_per_tok
        expert = 3 * hidden * config.intermediate_size
        return experts * expert + hidden * experts, k * expert + hidden * experts, k * expert + hidden * experts
    if not isinstance(config, ParameterNetLlamaConfig):
        total = sum(i * o + (o if config.mlp_bias else 0) for i, o in _mlp_projections(config).values())
        return total, total, sum(i * o for i, o in _mlp_projections(config).values())
    from .modeling_parameternet_llama import ParameterNetLlamaMLP
    from .moe import RoutedExperts

    with torch.device("meta"):
        mlp = ParameterNetLlamaMLP(config)
    total = active = flops = 0
    for layer in mlp.children():
        if isinstance(layer, RoutedExperts):
            layer_total, layer_active = layer.param_count()
            total, active, flops = total + layer_total, active + layer_active, flops + layer.flops_per_token()
        elif isinstance(layer, nn.Linear):
            n = sum(p.numel() for p in layer.parameters())
            total, active, flops = total + n, active + n, flops + 2 * layer.in_features * layer.out_features
    return total, active, flops // 2


def account(config: LlamaConfig, seq_len: int | None = None) -> ModelAccounting:
    """Parameters and forward FLOPs per token at `seq_len` (default: max_position_embeddings)."""
    seq_len = seq_len or config.max_position_embeddings
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim

    attn_weights = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
    attn_bias = (q_width + 2 * kv_width + hidden) if getattr(config, "attention_bias", False) else 0
    norms = 2 * hidden

    mlp_total, mlp_active, mlp_matmul = _mlp_cost(config)

    embedding = vocab * hidden
    lm_head = 0 if config.tie_word_embeddings else vocab * hidden
    per_layer_total = attn_weights + attn_bias + norms + mlp_total
    per_layer_active = attn_weights + attn_bias + norms + mlp_active
    total = embedding + lm_head + layers * per_layer_total + hidden
    active = embedding + lm_head + layers * per_layer_active + hidden

    per_layer_flops = 2 * (attn_weights + mlp_matmul) + 4 * seq_len * q_width
    forward_flops = layers * per_layer_flops + 2 * vocab * hidden
    return ModelAccounting(total, active, embedding, forward_flops, seq_len)


__all__ = ["ModelAccounting", "account", "router_params"]
