"""ParameterNet-LLaMA: transformers' LLaMA with chosen SwiGLU projections replaced by top-k mixtures of experts.

Attention, RMSNorm, rotary embeddings and the model's forward are transformers' own Llama code; only the MLP differs.
Saved checkpoints carry this file, `configuration_parameternet_llama.py` and `moe.py` (`auto_map`), so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads them with nothing of this project installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin
from transformers import initialization as hf_init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_parameternet_llama import ParameterNetLlamaConfig, validate_parameternet_fields
from .moe import MoELinear, MoEMLP, RoutedExperts
from .router import LearnedRouter, RouterConfig, track_loss_scale

# The KV cache's name in forward arguments and model outputs: transformers 5.2x renamed `past_key_values` to `cache`
# (the old name warns until 5.40). Checkpoints carry this file to machines with other transformers 5.x versions, so
# it asks the installed one rather than picking a name.
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# The forward keyword that carries the input ids to the decoder layers' MLPs, for routers that read them (hash).
ROUTER_TOKEN_IDS = "router_token_ids"


class ParameterNetLlamaMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)), where each projection named in `moe_projections` is a MoELinear; or, with
    `moe_mlp`, a standard MoE whose experts are whole SwiGLU MLPs (`experts`, one router for the layer)."""

    def __init__(self, config: ParameterNetLlamaConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.act_fn = ACT2FN[config.hidden_act]
        router = RouterConfig.from_model_config(config)
        self.experts: MoEMLP | None = None
        if config.moe_mlp:
            self.experts = MoEMLP(hidden, inner, router, act_fn=self.act_fn)
            return
        shapes = {"gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
        for name, (fan_in, fan_out) in shapes.items():
            if name in config.moe_projections:
                layer: nn.Module = MoELinear(fan_in, fan_out, router, bias=config.expert_output_bias)
            else:
                layer = nn.Linear(fan_in, fan_out, bias=config.mlp_bias)
            setattr(self, name, layer)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`positions`: each token's position within its document, under document-masked packing (a centred router's
        causal mean restarts per document; router.LearnedRouter.logits); None: one sequence per row. `token_ids`:
        for routers that read them (router_type 'hash')."""
        if self.experts is not None:
            return self.experts(x, positions, token_ids)
        gate = self._project(self.gate_proj, x, positions, token_ids)
        up = self._project(self.up_proj, x, positions, token_ids)
        return self._project(self.down_proj, self.act_fn(gate) * up, positions, token_ids)

    @staticmethod
    def _project(
        layer: nn.Module, x: torch.Tensor, positions: torch.Tensor | None, token_ids: torch.Tensor | None
    ) -> torch.Tensor:
        return layer(x, positions, token_ids) if isinstance(layer, RoutedExperts) else layer(x)


class ParameterNetLlamaDecoderLayer(GradientCheckpointingLayer):
    """transformers' LlamaDecoderLayer with the MoE MLP."""

    def __init__(self, config: ParameterNetLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = ParameterNetLlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # The KV cache travels in kwargs under whatever name this transformers' LlamaModel passes it (see CACHE):
        # naming it here would hand LlamaAttention both the old and the new name.
        # document_mask=True (a forward keyword, from the trainer's --document_mask): position_ids restart per packed
        # document, and the MLP's centred routers restart their causal mean with them. Not passed on to attention.
        documents = kwargs.pop("document_mask", False)
        token_ids = kwargs.pop(ROUTER_TOKEN_IDS, None)
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        positions = position_ids if documents else None
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), positions, token_ids)


class ParameterNetGenerationConfig(GenerationConfig):
    """The router's `top_k` is not the sampling `top_k`: keep it out of the generation config, where it would turn
    sampling into top-1 (greedy) sampling. A centred router routes each token on the mean of its whole prefix, which
    a KV-cache decoding step does not see: such a model generates without the cache (each step reruns the prefix)."""

    @classmethod
    def from_model_config(cls, model_config) -> GenerationConfig:
        config_dict = model_config if isinstance(model_config, dict) else model_config.to_dict()
        config = super().from_model_config({k: v for k, v in config_dict.items() if k != "top_k"})
        if config_dict.get("router_input") == "centered":
            config.use_cache = False
        return config


class ParameterNetLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = ParameterNetLlamaConfig
    generation_config_class = ParameterNetGenerationConfig
    _no_split_modules = ["ParameterNetLlamaDecoderLayer"]
    _can_record_outputs = {
        "hidden_states": ParameterNetLlamaDecoderLayer,
        "attentions": LlamaAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LearnedRouter):
            hf_init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                hf_init.zeros_(module.bias)
        if isinstance(module, RoutedExperts):
            # transformers' init functions skip tensors already loaded from a checkpoint (_is_hf_initialized).
            for name in module.expert_param_names:
                param = getattr(module, name)
                if param is None:
                    continue
                if name == "bias":
                    hf_init.zeros_(param)
                else:
                    hf_init.normal_(param, mean=0.0, std=self.config.initializer_range)


class ParameterNetLlamaModel(ParameterNetLlamaPreTrainedModel):
    """LlamaModel with ParameterNet decoder layers; the forward is transformers' LlamaModel.forward."""

    def __init__(self, config: ParameterNetLlamaConfig) -> None:
        super().__init__(config)
        validate_parameternet_fields(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [ParameterNetLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    forward = LlamaModel.forward


@dataclass
class ParameterNetCausalLMOutput(CausalLMOutputWithPast):
    """`loss` = lm_loss + router_loss. Aux losses are averaged over the MoE layers; statistics are per layer."""

    lm_loss: torch.FloatTensor | None = None
    router_loss: torch.FloatTensor | None = None  # router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    tokens_per_expert: torch.LongTensor | None = None  # [num_moe_layers, num_experts]
    dropped_tokens: torch.LongTensor | None = None  # [num_moe_layers]
    router_top1_prob: torch.FloatTensor | None = None  # [num_moe_layers] mean largest router probability
    router_entropy: torch.FloatTensor | None = None  # [num_moe_layers] mean router entropy (nats)


class ParameterNetLlamaForCausalLM(ParameterNetLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ParameterNetLlamaConfig) -> None:
        super().__init__(config)
        self.model = ParameterNetLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # Each layer adds its router losses to the graph (router.RouterLoss), weighted so that together they are
        # router_aux_loss_coef * mean aux + router_z_loss_coef * mean z over the MoE layers.
        layers = self.moe_layers()
        for _, layer in layers:
            layer.router_loss_weights = (
                config.router_aux_loss_coef / len(layers),
                config.router_z_loss_coef / len(layers),
            )

    def track_router_loss_scale(self, loss: torch.Tensor) -> torch.Tensor:
        """Mark `loss` as the training loss: however a backward scales it (gradient accumulation, fp16), the router
        losses' gradients are scaled alike (router.RouterLoss). The forward does it for its own loss (labels given); a
        loss computed outside the model needs this call before its backward, or the router losses count at scale 1."""
        return track_loss_scale(loss, [layer for _, layer in self.moe_layers()])

    @torch.no_grad()
    def update_router_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """Aux-loss-free load balancing after an optimizer step (config.router_bias_update_rate > 0; a no-op at 0):
        `tokens_per_expert` [num_moe_layers, num_experts] are the step's loads in moe_layers() order (the outputs'
        `tokens_per_expert`), summed over its micro-batches and over every data-parallel rank, so that all ranks
        move their copies of the biases alike."""
        layers = self.moe_layers()
        if tokens_per_expert.shape[0] != len(layers):
            raise ValueError(
                f"tokens_per_expert has {tokens_per_expert.shape[0]} rows for {len(layers)} MoE layers; pass the "
                f"summed tokens_per_expert of the model's outputs"
            )
        for (_, layer), load in zip(layers, tokens_per_expert):
            layer.update_router_bias(load)

    def moe_layers(self) -> list[tuple[str, RoutedExperts]]:
        """(qualified name, layer) of every MoE layer (projections, or MLPs with moe_mlp), in forward order."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, RoutedExperts)]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> ParameterNetCausalLMOutput:
        # The KV cache arrives in kwargs under this transformers' name (CACHE; generate passes it so) and goes on to
        # the model, but not to the loss function.
        cache = kwargs.pop(CACHE, None)
        if self.config.router_input == "centered" and cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                "router_input='centered' routes each token on the mean of its whole prefix, which a KV-cache step "
                "does not see; run without the cache (generate(..., use_cache=False), the default of this model)"
            )
        if torch.is_grad_enabled():  # scale 1 until a tracked loss's backward says otherwise (router.RouterLoss)
            for _, layer in self.moe_layers():
                layer.router_loss_scale.fill_(1.0)
        # A hash router reads the token ids in every layer (not the loss function: hence not in kwargs).
        routed_by_id = {ROUTER_TOKEN_IDS: input_ids} if self.config.router_type == "hash" else {}
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{CACHE: cache},
            **routed_by_id,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)

        # The statistics of this forward, for logging: the router losses' gradients are already in the graph.
        stats = [m.last_stats for _, m in self.moe_layers() if m.last_stats is not None]
        aux_loss = torch.stack([s.aux_loss for s in stats]).mean()
        z_loss = torch.stack([s.z_loss for s in stats]).mean()
        router_loss = self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss

        lm_loss = loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = self.track_router_loss_scale(lm_loss + router_loss.to(lm_loss.dtype))

        return ParameterNetCausalLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE: getattr(outputs, CACHE)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            lm_loss=lm_loss,
            router_loss=router_loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            tokens_per_expert=torch.stack([s.tokens_per_expert for s in stats]),
            dropped_tokens=torch.stack([s.dropped_tokens for s in stats]),
            router_top1_prob=torch.stack([s.top1_prob for s in stats]),
            router_entropy=torch.stack([s.entropy for s in stats]),
        )


__all__ = [
    "ParameterNetLlamaForCausalLM",
    "ParameterNetLlamaModel",
    "ParameterNetLlamaPreTrainedModel",
    "ParameterNetCausalLMOutput",
]
