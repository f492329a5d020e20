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
    """One router: Linear(fan_in -> num_experts), with a bias when it routes on the centred input."""
    return fan_in * config.num_experts + (config.num_experts if config.router_input == "centered" else 0)


def _mlp_projections(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    hidden, inner = config.hidden_size, config.intermediate_size
    return {"gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}


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

    moe = isinstance(config, ParameterNetLlamaConfig)
    mlp_total = mlp_active = mlp_matmul = 0
    if isinstance(config, MixtralConfig):
        # The peer standard MoE: E whole SwiGLU experts and a bias-free router on the hidden state.
        experts, k, expert = config.num_local_experts, config.num_experts_per_tok, 3 * hidden * config.intermediate_size
        mlp_total, mlp_active = experts * expert + hidden * experts, k * expert + hidden * experts
        mlp_matmul = k * expert + hidden * experts
    elif moe and config.moe_mlp:
        # A standard MoE: E whole SwiGLU experts (3 hidden x inner matrices each) and one router on the hidden state.
        experts, k, expert = config.num_experts, config.top_k, 3 * hidden * config.intermediate_size
        router = router_params(config, hidden)
        mlp_total, mlp_active = experts * expert + router, k * expert + router
        mlp_matmul = k * expert + hidden * experts
    else:
        for name, (fan_in, fan_out) in _mlp_projections(config).items():
            if moe and name in config.moe_projections:
                experts, k = config.num_experts, config.top_k
                bias = fan_out if config.expert_output_bias else 0
                router = router_params(config, fan_in)
                mlp_total += experts * (fan_in * fan_out + bias) + router
                mlp_active += k * (fan_in * fan_out + bias) + router
                mlp_matmul += k * fan_in * fan_out + fan_in * experts
            else:
                bias = fan_out if config.mlp_bias else 0
                mlp_total += fan_in * fan_out + bias
                mlp_active += fan_in * fan_out + bias
                mlp_matmul += fan_in * fan_out

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
