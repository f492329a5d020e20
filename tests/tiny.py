"""The one tiny LLaMA shape the model tests share: small enough for a CPU test in a second, with grouped-query
attention (4 heads, 2 KV heads) and two layers, so that every code path (attention, MoE projections, routers,
export) runs. Tests add what they vary: `ParameterNetLlamaConfig(**TINY, moe_projections=[...])`."""

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=64,
)
