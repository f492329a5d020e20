"""ParameterNet-LLaMA against vanilla LLaMA, the HF integration, generation, checkpointing and config validation."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llm.model import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM, build_model, load_model_config
from llm.model.configuration_parameternet_llama import routing_recipe
from tests.tiny import TINY


def tiny_parameternet(**overrides) -> ParameterNetLlamaForCausalLM:
    torch.manual_seed(0)
    return ParameterNetLlamaForCausalLM(ParameterNetLlamaConfig(**{**TINY, **overrides})).eval()


def test_one_expert_with_vanilla_weights_gives_vanilla_logits_and_loss():
    torch.manual_seed(0)
    vanilla = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    moe = tiny_parameternet(
        moe_projections=["gate_proj", "up_proj", "down_proj"], num_experts=1, router_aux_loss_coef=0.0
    )
    state = vanilla.state_dict()
    for key in list(state):
        if any(f"mlp.{p}.weight" in key for p in ("gate_proj", "up_proj", "down_proj")):
            state[key] = state[key].unsqueeze(0)  # [out, in] -> [1 expert, out, in]
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected and all("router" in k for k in missing)
    x = torch.randint(0, 256, (2, 16))
    ref = vanilla(input_ids=x, labels=x)
    out = moe(input_ids=x, labels=x)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.lm_loss, ref.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)  # aux coef 0
    assert out.tokens_per_expert.shape == (2 * 3, 1)


def test_output_carries_losses_and_routing_statistics():
    model = tiny_parameternet(
        moe_projections=["up_proj", "down_proj"], num_experts=4, top_k=2, capacity_factor=0.5, router_z_loss_coef=0.001
    )
    x = torch.randint(0, 256, (2, 16))
    out = model(input_ids=x, labels=x)
    assert out.tokens_per_expert.shape == (4, 4)  # 2 layers x 2 MoE projections, 4 experts
    assert (out.tokens_per_expert.sum(-1) == 32 * 2).all()
    assert (out.dropped_tokens > 0).all()  # capacity 0.5 must drop some of the 64 assignments
    expected = out.lm_loss + 0.01 * out.aux_loss + 0.001 * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.router_loss, 0.01 * out.aux_loss + 0.001 * out.z_loss)


ALL_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]
STANDARD_MOE = dict(moe_mlp=True, moe_projections=ALL_PROJECTIONS)  # the control: whole SwiGLU MLPs as experts


def test_moe_projection_is_one_line_of_config():
    for projections in (["gate_proj"], ["up_proj"], ALL_PROJECTIONS):
        model = tiny_parameternet(moe_projections=projections)
        names = {name.split(".")[-1] for name, _ in model.moe_layers()}
        assert names == set(projections)
    # The standard MoE: one router per layer over whole MLPs, no per-projection routers.
    model = tiny_parameternet(**STANDARD_MOE)
    assert [name for name, _ in model.moe_layers()] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    layer = model.model.layers[0].mlp.experts
    assert (layer.gate_weight.shape, layer.down_weight.shape) == ((8, 128, 64), (8, 64, 128))
    assert not hasattr(model.model.layers[0].mlp, "down_proj")


def test_standard_moe_with_one_expert_is_the_vanilla_mlp():
    """moe_mlp with one expert holding the vanilla MLP's weights: the vanilla logits, times the gate (1 here)."""
    torch.manual_seed(0)
    vanilla = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    moe = tiny_parameternet(**STANDARD_MOE, num_experts=1, router_aux_loss_coef=0.0)
    state = vanilla.state_dict()
    for key in list(state):
        for proj, name in (("gate_proj", "gate_weight"), ("up_proj", "up_weight"), ("down_proj", "down_weight")):
            if f"mlp.{proj}.weight" in key:
                state[key.replace(f"mlp.{proj}.weight", f"mlp.experts.{name}")] = state.pop(key).unsqueeze(0)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected and all("router" in k for k in missing)
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(moe(input_ids=x).logits, vanilla(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_generate_with_kv_cache_equals_without():
    model = tiny_parameternet()
    x = torch.randint(3, 256, (1, 6))
    with_cache = model.generate(x, max_new_tokens=10, do_sample=False, use_cache=True)
    without = model.generate(x, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    assert model.generation_config.top_k != 1  # the router's top_k does not leak into sampling


@pytest.mark.parametrize("experts", [{}, STANDARD_MOE])
def test_centered_router_generates_without_the_cache_and_refuses_it(experts):
    """A centred router routes on the mean of the whole prefix: generation reruns the prefix (the model's default),
    each step's routing then equals the full forward's; a KV-cache step is refused with the fix."""
    model = tiny_parameternet(**experts, router_input="centered")
    assert model.generation_config.use_cache is False
    x = torch.randint(3, 256, (1, 6))
    tokens = model.generate(x, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        greedy = model(input_ids=tokens[:, :-1]).logits.argmax(-1)[0, 5:]
    assert torch.equal(greedy, tokens[0, 6:])  # every generated token is the full forward's argmax
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(x, max_new_tokens=3, do_sample=False, use_cache=True)


FRESH_LOAD = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class BlockProject(importlib.abc.MetaPathFinder):
        # The saved directory must be self-contained: refuse any import of this project's packages.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("llm", "vision", "evals"):
                raise ImportError(f"blocked import of {name}")
            return None
    sys.meta_path.insert(0, BlockProject())
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    x = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = model(input_ids=x).logits
        tokens = model.generate(x, max_new_tokens=8, do_sample=False)
    print(json.dumps({"cls": type(model).__name__, "logits": logits.flatten().tolist(), "tokens": tokens.tolist()}))
    """
)


@pytest.mark.parametrize(
    "router_input, experts",
    [("raw", {"moe_projections": ["gate_proj", "down_proj"]}), ("centered", {"moe_projections": ["gate_proj"]})]
    + [("centered", STANDARD_MOE)],
)
def test_save_load_round_trip_and_fresh_process_remote_code_load(tmp_path, router_input, experts):
    model = tiny_parameternet(**experts, num_experts=4, router_input=router_input)
    x = torch.randint(3, 256, (1, 8))
    if router_input == "centered":  # routed by the bias at position 0: make it matter
        with torch.no_grad():
            for _, layer in model.moe_layers():
                layer.router.bias.normal_()
    with torch.no_grad():
        logits = model(input_ids=x).logits
        tokens = model.generate(x, max_new_tokens=8, do_sample=False)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_parameternet_llama.ParameterNetLlamaForCausalLM"
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "moe.py").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    with torch.no_grad():
        # Loaded tensors sit in differently aligned memory; CPU GEMM kernels may round differently by ~1e-7.
        torch.testing.assert_close(reloaded(input_ids=x).logits, logits, atol=1e-5, rtol=0)
        assert torch.equal(reloaded.generate(x, max_new_tokens=8, do_sample=False), tokens)

    proc = subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, str(tmp_path), json.dumps(x.tolist())],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cls"] == "ParameterNetLlamaForCausalLM"
    torch.testing.assert_close(torch.tensor(result["logits"]).view_as(logits), logits, atol=1e-5, rtol=0)
    assert result["tokens"] == tokens.tolist()


def test_presets_build_the_right_classes():
    assert type(build_model(load_model_config("llama-tiny"))) is LlamaForCausalLM
    config = load_model_config("parameternet-llama-tiny")
    assert isinstance(config, ParameterNetLlamaConfig)
    assert (config.moe_projections, config.num_experts, config.top_k) == (["down_proj"], 8, 1)
    assert config.capacity_factor is None
    # The small presets train from scratch with the centred router; the paper's routing stays one override away.
    assert routing_recipe(config) == "centered" and config.router_input == "centered"
    paper = load_model_config("parameternet-llama-tiny", routing_recipe="paper")
    assert routing_recipe(paper) == "paper"
    assert (paper.router_input, paper.router_aux_loss_coef, paper.router_z_loss_coef) == ("raw", 0.01, 0.0)
    assert load_model_config("parameternet-llama-tiny", routing_recipe="paper", router_z_loss_coef=0.001)
    assert routing_recipe(load_model_config("parameternet-llama-1b")) == "paper"  # the released model's
    with pytest.raises(ValueError, match="routing_recipe='nope'"):
        load_model_config("parameternet-llama-tiny", routing_recipe="nope")
    with pytest.raises(ValueError, match="routing_recipe.*only to ParameterNet"):
        load_model_config("llama-tiny", routing_recipe="paper")
    one_line = load_model_config("parameternet-llama-tiny", moe_projections=["up_proj"])
    assert one_line.moe_projections == ["up_proj"]
    big = load_model_config("parameternet-llama-1b")
    assert (
        big.hidden_size,
        big.num_hidden_layers,
        big.num_attention_heads,
        big.intermediate_size,
        big.vocab_size,
        big.max_position_embeddings,
        big.rms_norm_eps,
        big.tie_word_embeddings,
        big.hidden_act,
    ) == (2048, 12, 16, 8192, 32000, 2048, 1e-6, False, "silu")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(moe_projections=["fc1"]), "moe_projections"),
        (dict(moe_projections=[]), "moe_projections"),
        (dict(hidden_size=66), "hidden_size"),
        (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
        (dict(router_z_loss_coef=-1.0), "router_z_loss_coef"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(router_input="sinkhorn"), "router_input"),
        (dict(moe_mlp=True), "moe_mlp=True with moe_projections=\\['down_proj'\\]"),
        (dict(moe_mlp="yes"), "moe_mlp"),
        (dict(expert_output_bias=True, **STANDARD_MOE), "expert_output_bias=True with moe_mlp=True"),
        (dict(router_bias_update_rate=-0.5), "router_bias_update_rate"),
    ],
)
def test_bad_configs_raise_value_error_naming_field_and_value(overrides, field):
    with pytest.raises(ValueError, match=field) as info:
        ParameterNetLlamaConfig(**{**TINY, **overrides})
    value = next(iter(overrides.values()))
    assert str(value) in str(info.value)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="llama-7b"):
        load_model_config("llama-7b")


def test_old_expert_bias_key_is_read_as_expert_output_bias_with_a_warning(tmp_path):
    """`expert_bias` (the experts' output bias) was renamed `expert_output_bias`: configs and checkpoints written
    before the rename still load, with a warning, and what is saved again carries only the new name."""
    with pytest.warns(UserWarning, match="'expert_bias'.*old name of 'expert_output_bias'"):
        config = ParameterNetLlamaConfig(**TINY, expert_bias=True)
    assert config.expert_output_bias is True and "expert_bias" not in config.to_dict()
    assert ParameterNetLlamaConfig(**TINY).expert_output_bias is False

    # An HF directory written before the rename (its config.json names expert_bias), read by our loader and by
    # transformers: the model has the experts' output biases.
    old = {**ParameterNetLlamaConfig(**TINY, moe_projections=["down_proj"]).to_dict(), "expert_bias": True}
    old.pop("expert_output_bias")
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="expert_bias"):
        loaded = load_model_config(tmp_path)
    assert loaded.expert_output_bias is True
    build_model(loaded).save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert reloaded.model.layers[0].mlp.down_proj.bias is not None
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["expert_output_bias"] is True and "expert_bias" not in saved
    # ...and as a model override (an old run's command line).
    with pytest.warns(UserWarning, match="expert_bias"):
        assert load_model_config("parameternet-llama-tiny", expert_bias=True).expert_output_bias is True
    with pytest.raises(ValueError, match="expert_bias=False and expert_output_bias=True disagree"):
        ParameterNetLlamaConfig(**TINY, expert_bias=False, expert_output_bias=True)
