"""The router losses in the autograd graph (llm.model.router.RouterLoss, Megatron-Core's MoEAuxLossAutoScaler pattern):
the gradients equal those of the losses added to the training loss, under either kind of activation checkpointing,
under a scaled backward (gradient accumulation, fp16 loss scaling), and through torch.compile of a MoE layer."""

from __future__ import annotations

import pytest
import torch

from llm.model import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM
from llm.model.moe import MoELinear, RoutedExperts
from llm.model.router import RouterConfig, router_losses, track_loss_scale
from tests.tiny import TINY as LLAMA_TINY

TINY = {
    **LLAMA_TINY,
    "moe_projections": ["up_proj", "down_proj"],
    "router_aux_loss_coef": 0.5,  # large, so that a missing or doubled router gradient shows
    "router_z_loss_coef": 0.05,
}


def model(**overrides) -> ParameterNetLlamaForCausalLM:
    torch.manual_seed(0)
    return ParameterNetLlamaForCausalLM(ParameterNetLlamaConfig(**{**TINY, **overrides})).train()


def grads(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("router_input", ["raw", "centered"])
def test_router_gradients_equal_the_router_loss_added_to_the_training_loss(router_input: str) -> None:
    x = torch.randint(0, 256, (2, 16))
    graph = model(router_input=router_input)
    graph(input_ids=x, labels=x).loss.backward()

    # The former form: router losses computed from each layer's input and added to the loss, nothing in the graph.
    added = model(router_input=router_input)
    inputs: list[tuple[RoutedExperts, torch.Tensor]] = []
    for _, layer in added.moe_layers():
        layer.router_loss_weights = None
        layer.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args[0])))
    out = added(input_ids=x, labels=x)
    aux, z = [], []
    for layer, h in inputs:
        logits = layer.router.logits(h)
        probs = torch.softmax(logits, dim=-1)
        counts = torch.bincount(probs.topk(1, dim=-1).indices[:, 0], minlength=layer.num_experts)
        a, b = router_losses(logits, probs, counts, 1)
        aux.append(a)
        z.append(b)
    router = TINY["router_aux_loss_coef"] * torch.stack(aux).mean() + TINY["router_z_loss_coef"] * torch.stack(z).mean()
    torch.testing.assert_close(router.detach(), out.router_loss)  # the logged value is the same loss
    (out.lm_loss + router).backward()

    ref, got = grads(added), grads(graph)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], msg=name)
    assert got["model.layers.0.mlp.down_proj.router.weight"].abs().sum() > 0


def test_reentrant_and_non_reentrant_checkpointing_give_equal_gradients() -> None:
    x = torch.randint(0, 256, (2, 16))
    results = []
    for kwargs in (None, {"use_reentrant": False}, {"use_reentrant": True}):
        m = model()
        if kwargs is not None:
            m.activation_checkpointing_enable(kwargs)
        m(input_ids=x, labels=x).loss.backward()
        results.append(grads(m))
    plain, non_reentrant, reentrant = results
    for name in plain:
        torch.testing.assert_close(non_reentrant[name], plain[name], msg=name)
        torch.testing.assert_close(reentrant[name], plain[name], msg=name)
    # With the aux loss alone (no LM loss reaches a router through an argmax) the router still learns.
    assert plain["model.layers.1.mlp.up_proj.router.weight"].abs().sum() > 0


def test_router_gradient_follows_the_scale_of_the_training_loss() -> None:
    """Gradient accumulation divides the loss, fp16 multiplies it: the router losses' gradient is scaled alike."""
    x = torch.randint(0, 256, (2, 16))
    full, quarter = model(), model()
    full(input_ids=x, labels=x).loss.backward()
    (quarter(input_ids=x, labels=x).loss * 0.25).backward()
    for name, g in grads(full).items():
        torch.testing.assert_close(grads(quarter)[name], 0.25 * g, msg=name)
    # The router-only part: the aux loss's share of a router's gradient is scaled too, not added at full weight.
    lm_only = model(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    (lm_only(input_ids=x, labels=x).loss * 0.25).backward()
    name = "model.layers.0.mlp.down_proj.router.weight"
    assert not torch.allclose(grads(lm_only)[name], grads(quarter)[name])


def test_compiled_moe_layer_has_one_graph_and_the_eager_gradients() -> None:
    torch.manual_seed(0)
    eager = MoELinear(32, 16, RouterConfig(num_experts=4, input="centered"))
    eager.router_loss_weights = (0.1, 0.01)
    compiled_layer = MoELinear(32, 16, RouterConfig(num_experts=4, input="centered"))
    compiled_layer.load_state_dict(eager.state_dict())
    compiled_layer.router_loss_weights = (0.1, 0.01)
    x = torch.randn(2, 8, 32)
    explanation = torch._dynamo.explain(compiled_layer)(x)
    # bincount (data-dependent shape) and the grouped matmul (run eagerly in fp32) break the graph already; the
    # router losses and the statistics kept for logging add no break.
    ours = [r for r in explanation.break_reasons if any(f.name in ("backward", "apply") for f in r.user_stack)]
    assert not ours and explanation.graph_break_count <= 2, explanation.break_reasons
    compiled = torch.compile(compiled_layer)
    for layer in (eager, compiled):
        (track_loss_scale(layer(x).square().mean(), [eager, compiled_layer]) * 0.5).backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_layer.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    torch.testing.assert_close(compiled_layer.last_stats.aux_loss, eager.last_stats.aux_loss)
