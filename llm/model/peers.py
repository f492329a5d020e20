"""Mixtures of experts that someone else wrote, trained by our trainer as the control for our own MoE layers.

`mixtral`: transformers' own `MixtralForCausalLM` (its router: a linear map, softmax, top-k, the chosen
probabilities renormalised, so gate 1 under top-1; its init; its load-balancing loss `load_balancing_loss_func`
weighted by `router_aux_loss_coef`), unchanged. Our `MixtralForCausalLM` subclass only adds what our trainer reads
of every MoE model: the router loss it adds to the LM loss (Mixtral adds it itself when given labels; our trainer
computes the LM loss from the logits), and the routing statistics computed from Mixtral's own router logits (tokens
per expert, top-1 probability, entropy). A preset names the model type (llm/configs/mixtral-micro.json); the
trainer's loop has no case for it.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from .modeling_parameternet_llama import ParameterNetCausalLMOutput


class MixtralForCausalLM(transformers.MixtralForCausalLM):
    """transformers' MixtralForCausalLM whose outputs carry the router loss and statistics our trainer logs. It keeps
    the class name on purpose: `save_pretrained` writes it as the architecture, so an export is a plain Mixtral
    checkpoint that loads anywhere (the weights' names are transformers' own)."""

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> ParameterNetCausalLMOutput:
        kwargs["output_router_logits"] = True
        labels = kwargs.pop("labels", None)
        out = super().forward(input_ids=input_ids, **kwargs)
        logits_per_layer = [logits.float() for logits in out.router_logits]  # [T, E] per MoE layer
        k, e = self.config.num_experts_per_tok, self.config.num_local_experts
        counts, top1, entropy = [], [], []
        with torch.no_grad():
            for logits in logits_per_layer:
                probs = torch.softmax(logits, dim=-1)
                chosen = torch.topk(probs, k, dim=-1).indices.reshape(-1)
                counts.append(torch.bincount(chosen, minlength=e))
                top1.append(probs.amax(dim=-1).mean())
                entropy.append(-(probs * torch.log_softmax(logits, dim=-1)).sum(-1).mean())
        aux = out.aux_loss.float()
        router_loss = self.router_aux_loss_coef * aux  # in the graph: Mixtral's own loss, as with labels
        loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=out.logits, labels=labels, vocab_size=self.config.vocab_size)
            loss = lm_loss + router_loss
        return ParameterNetCausalLMOutput(
            loss=loss,
            logits=out.logits,
            router_loss=router_loss,
            aux_loss=aux.detach(),
            z_loss=torch.zeros_like(aux).detach(),
            tokens_per_expert=torch.stack(counts),
            dropped_tokens=torch.zeros(len(counts), dtype=torch.int64, device=aux.device),
            router_top1_prob=torch.stack(top1),
            router_entropy=torch.stack(entropy),
        )

    def moe_layers(self) -> list[tuple[str, torch.nn.Module]]:
        return [(name, m) for name, m in self.named_modules() if isinstance(m, MixtralSparseMoeBlock)]

    def track_router_loss_scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss  # the router loss is plain autograd here: scaled with the LM loss like any other term

    def update_router_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """Mixtral has no aux-loss-free selection bias: nothing to move."""


PEER_MODELS: dict[type, type] = {MixtralConfig: MixtralForCausalLM}

__all__ = ["PEER_MODELS", "MixtralForCausalLM"]
