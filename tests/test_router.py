"""The router seam (llm/model/router.py): one RouterConfig per layer, the variants built through it (the learned
router with softmax or sigmoid scores, the hash router), the MoE flags of the trainer, the recorded routing, and the
peer MoE (transformers' Mixtral) that the canonical-result study trains as a control."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llm.model import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM, RouterConfig, load_model_config
from llm.model.flops import account
from llm.model.moe import MoELinear, MoEMLP
from llm.model.router import HashRouter, LearnedRouter
from tests.tiny import TINY


def test_every_layer_is_built_from_one_router_config_and_prints_it():
    config = ParameterNetLlamaConfig(
        **TINY, moe_projections=["up_proj", "down_proj"], router_gate="normalized", router_score="sigmoid"
    )
    model = ParameterNetLlamaForCausalLM(config)
    layers = [layer for _, layer in model.moe_layers()]
    assert len(layers) == 4 and all(layer.routing == layers[0].routing for layer in layers)
    assert layers[0].routing.gate == "normalized" and layers[0].routing.score == "sigmoid"
    text = repr(model)
    assert "LearnedRouter(type=learned, num_experts=8, top_k=1, input=raw, score=sigmoid, gate=normalized" in text


def test_router_config_errors_name_the_model_config_key():
    with pytest.raises(ValueError, match="router_gate='half' must be one of"):
        RouterConfig(gate="half")
    with pytest.raises(ValueError, match="router_score='tanh'"):
        ParameterNetLlamaConfig(**TINY, router_score="tanh")
    with pytest.raises(ValueError, match="router_type='random'"):
        ParameterNetLlamaConfig(**TINY, router_type="random")
    with pytest.raises(ValueError, match="router_bias_update_rate=0.001 with router_type='hash'"):
        ParameterNetLlamaConfig(**TINY, router_type="hash", router_bias_update_rate=0.001)


def test_sigmoid_scores_choose_by_score_and_normalized_gate_is_one_under_top1():
    torch.manual_seed(0)
    layer = MoELinear(16, 8, RouterConfig(num_experts=4, score="sigmoid", gate="normalized"))
    x = torch.randn(32, 16)
    routing = layer.router(x)
    logits = layer.router.logits(x)
    assert torch.equal(routing.expert[:, 0], torch.sigmoid(logits).argmax(dim=-1))
    torch.testing.assert_close(routing.gate, torch.ones(32, 1))
    torch.testing.assert_close(routing.probs.sum(dim=-1), torch.ones(32))  # the aux loss reads a distribution
    out = layer(x)
    expected = torch.einsum("ti,toi->to", x, layer.weight[routing.expert[:, 0]])
    torch.testing.assert_close(out, expected)
    # Top-2 with the normalized gate: the two chosen sigmoid scores over their sum (DeepSeek-V3's renormalisation).
    two = LearnedRouter(RouterConfig(num_experts=4, top_k=2, score="sigmoid", gate="normalized"), 16)
    r = two(x)
    scores = torch.sigmoid(two.logits(x)).gather(-1, r.expert)
    torch.testing.assert_close(r.gate, scores / scores.sum(dim=-1, keepdim=True))


def test_hash_router_is_a_fixed_map_of_the_token_id_without_parameters():
    config = RouterConfig(type="hash", num_experts=8, gate="normalized")
    router = config.build(16)
    assert isinstance(router, HashRouter) and not list(router.parameters())
    ids = torch.arange(4000).reshape(8, 500)
    routing = router(torch.randn(8, 500, 16), token_ids=ids)
    again = router(torch.randn(8, 500, 16), token_ids=ids)
    assert torch.equal(routing.expert, again.expert)  # the hidden state plays no part
    assert routing.logits is None and routing.probs is None  # nothing to learn, no router loss
    counts = torch.bincount(routing.expert.reshape(-1), minlength=8)
    assert counts.min() > 0.8 * 500 and counts.max() < 1.2 * 500  # spread over every expert
    with pytest.raises(ValueError, match="routes by token id"):
        router(torch.randn(2, 3, 16))


def test_hash_routed_model_trains_and_routes_each_token_id_to_one_expert():
    config = ParameterNetLlamaConfig(
        **TINY, moe_mlp=True, moe_projections=["gate_proj", "up_proj", "down_proj"], router_type="hash",
        router_gate="normalized", router_aux_loss_coef=0.0,
    )  # fmt: skip
    model = ParameterNetLlamaForCausalLM(config)
    ids = torch.tensor([[5, 5, 5, 5, 5, 5]])
    out = model(input_ids=ids, labels=ids)
    assert out.tokens_per_expert.count_nonzero(dim=-1).tolist() == [1, 1]  # one id, one expert, every layer
    assert out.router_top1_prob.tolist() == [1.0, 1.0] and float(out.aux_loss) == 0.0
    out.loss.backward()
    assert model.model.layers[0].mlp.experts.gate_weight.grad.abs().sum() > 0


def test_moe_with_dense_copies_and_normalized_gate_is_the_dense_model():
    """The mechanics are not the suspect (issue 32): 8 experts that are copies of the dense MLP, gate 1 (normalized),
    give the dense model's logits and gradients, whatever the router chooses."""
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**TINY)).double()
    config = ParameterNetLlamaConfig(
        **TINY, moe_mlp=True, moe_projections=["gate_proj", "up_proj", "down_proj"], router_gate="normalized",
        router_input="centered",
    )  # fmt: skip
    moe = ParameterNetLlamaForCausalLM(config).double()
    state = dense.state_dict()
    for key, value in list(state.items()):
        for name in ("gate", "up", "down"):
            if key.endswith(f"mlp.{name}_proj.weight"):
                prefix = key.removesuffix(f"{name}_proj.weight")
                state[f"{prefix}experts.{name}_weight"] = value.expand(8, *value.shape).clone()
                del state[key]
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected and all(".router." in k for k in missing)  # only the routers are not the dense model's
    ids = torch.randint(0, 64, (2, 12))
    a, b = dense(input_ids=ids, labels=ids), moe(input_ids=ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-10)
    a.loss.backward()
    b.lm_loss.backward()
    dense_grad = dense.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(moe.model.layers[0].self_attn.q_proj.weight.grad, dense_grad, rtol=0, atol=1e-10)


def test_checkpoints_from_before_the_router_module_load_their_selection_bias():
    layer = MoELinear(8, 8, RouterConfig(num_experts=4, bias_update_rate=0.01))
    old = {k.replace("router.score_correction_bias", "score_correction_bias"): v for k, v in layer.state_dict().items()}
    old["score_correction_bias"] = torch.tensor([0.1, -0.1, 0.2, 0.0])
    fresh = MoELinear(8, 8, RouterConfig(num_experts=4, bias_update_rate=0.01))
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.score_correction_bias, torch.tensor([0.1, -0.1, 0.2, 0.0]))


def test_experts_report_their_own_parameters_and_flops():
    config = RouterConfig(num_experts=4, top_k=2, input="centered")
    linear = MoELinear(16, 8, config, bias=True)
    assert linear.param_count() == (sum(p.numel() for p in linear.parameters()), 2 * (16 * 8 + 8) + 4 * 16 + 4)
    mlp = MoEMLP(16, 24, config, act_fn=torch.nn.SiLU())
    assert mlp.param_count()[0] == sum(p.numel() for p in mlp.parameters())
    assert mlp.flops_per_token() == 2 * 2 * 3 * 16 * 24 + 2 * 16 * 4  # top-2 experts and the router matmul


def test_moe_flags_fold_into_model_overrides_and_may_not_disagree():
    from llm.train.config import load_config

    cfg = load_config(
        "tiny",
        cli_overrides=["--model", "parameternet-llama-tiny", "--num_experts", "4", "--router_gate", "normalized"],
    )
    assert cfg.model_overrides == {"num_experts": 4, "router_gate": "normalized"}
    with pytest.raises(ValueError, match="num_experts=4 and model_overrides"):
        load_config("tiny", cli_overrides=["--num_experts", "4", "--model_overrides", '{"num_experts": 2}'])
    with pytest.raises(ValueError, match="router_gate='half' is not one of"):
        load_config("tiny", cli_overrides=["--router_gate", "half"])
    with pytest.raises(ValueError, match="top_k=0 must be >= 1"):
        load_config("tiny", cli_overrides=["--top_k", "0"])


def test_peer_mixtral_preset_has_the_standard_moe_shapes_and_reports_routing():
    from llm.model import build_model
    from llm.train.records import routing_record

    peer, ours = load_model_config("mixtral-micro"), load_model_config("moe-mlp-llama-micro")
    # The same experts; ours has a centred router with a bias (8 per layer), Mixtral's has none.
    assert account(ours).total_params - account(peer).total_params == 4 * 8
    assert account(ours).forward_flops_per_token == account(peer).forward_flops_per_token
    record = routing_record(peer)
    assert record["recipe"] == "mixtral" and record["gate"] == "normalized" and record["aux_loss_coef"] == 0.01
    torch.manual_seed(0)
    model = build_model(peer)
    assert sum(p.numel() for p in model.parameters()) == account(peer).total_params
    ids = torch.randint(0, 8000, (2, 16))
    out = model(input_ids=ids)
    assert out.tokens_per_expert.shape == (4, 8) and int(out.tokens_per_expert.sum()) == 4 * 32
    assert out.router_loss.requires_grad  # Mixtral's own load-balancing loss, in the graph
    out.router_loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_current_state_key_names_a_legacy_router_bias_as_the_model_does():
    from llm.model.moe import current_state_key

    model = ParameterNetLlamaForCausalLM(ParameterNetLlamaConfig(**TINY, router_bias_update_rate=0.01))
    names = {name for name, _ in model.named_buffers() if name.endswith("score_correction_bias")}
    legacy = {name.replace(".router.score_correction_bias", ".score_correction_bias") for name in names}
    assert names and {current_state_key(k) for k in legacy} == names
    assert {current_state_key(k) for k in names} == names  # current names stay
    assert current_state_key("model.embed_tokens.weight") == "model.embed_tokens.weight"
