"""ParameterNet CNNs: the dynamic convolution's maths, the registered models, and the released model's size."""

from __future__ import annotations

import functools
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import vision
from vision import summary
from vision.models import MODEL_NAMES, STATIC_TWINS, DynamicConv
from vision.summary import count_macs, count_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_one_expert_with_unit_routing_is_a_plain_convolution() -> None:
    torch.manual_seed(0)
    conv = DynamicConv(6, 10, kernel_size=3, stride=2, padding=1, num_experts=1)
    # Routing weight exactly 1: sigmoid(+inf); zero weights so the input cannot change it.
    with torch.no_grad():
        conv.routing.weight.zero_()
        conv.routing.bias.fill_(float("inf"))
    x = torch.randn(3, 6, 9, 9)
    assert torch.equal(conv.routing_weights(x), torch.ones(3, 1))
    expected = F.conv2d(x, conv.expert_kernels()[0], stride=2, padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 4])
def test_condconv_mixing_equals_a_per_sample_convolution_with_the_mixed_kernel(groups: int) -> None:
    torch.manual_seed(1)
    conv = DynamicConv(8, 12, kernel_size=3, stride=1, padding=1, groups=groups, num_experts=4)
    x = torch.randn(5, 8, 7, 7)
    routing = conv.routing_weights(x)
    assert routing.shape == (5, 4) and bool(((routing > 0) & (routing < 1)).all())
    kernels = conv.expert_kernels()  # [E, out, in/groups, 3, 3]
    per_sample = []
    for b in range(x.shape[0]):
        mixed = torch.einsum("e,eoikl->oikl", routing[b], kernels)
        per_sample.append(F.conv2d(x[b : b + 1], mixed, padding=1, groups=groups))
    torch.testing.assert_close(conv(x), torch.cat(per_sample), rtol=1e-4, atol=1e-5)
    # Samples really get different kernels: sample 0 under sample 1's routing gives another output.
    swapped = F.conv2d(x[0:1], torch.einsum("e,eoikl->oikl", routing[1], kernels), padding=1, groups=groups)
    assert not torch.allclose(per_sample[0], swapped)


def test_dynamic_conv_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_experts=0"):
        DynamicConv(4, 4, num_experts=0)
    with pytest.raises(ValueError, match="groups=3"):
        DynamicConv(4, 4, groups=3)


def hand_count_over_twin(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, multiply-adds at batch 1) a ParameterNet has beyond its static twin, counted by hand: each
    DynamicConv holds E kernels (and biases) where the twin's conv holds one, plus its router Linear(in, E); it runs
    the router and the [E] x [E, kernel] mixing once per image, then one convolution as the twin does (GAP and the
    sigmoid are no multiply-adds)."""
    params = macs = 0
    for m in model.modules():
        if isinstance(m, DynamicConv):
            conv, experts = m.cond_conv, m.num_experts
            kernel = conv.out_channels * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
            bias = conv.out_channels if conv.bias is not None else 0
            router = m.in_channels * experts + experts
            params += (experts - 1) * (kernel + bias) + router
            macs += m.in_channels * experts + experts * (kernel + bias)
    return params, macs


@functools.cache
def _model(name: str) -> torch.nn.Module:
    """One default instance per registered model, shared by the tests below (building the 600M ones takes seconds)."""
    torch.manual_seed(0)
    return timm.create_model(name)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_registered_model_runs_forward_and_backward(name: str) -> None:
    model = _model(name)
    model.zero_grad(set_to_none=True)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1000)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads), f"{name}: some parameters got no gradient"
    assert any(g.abs().sum() > 0 for g in grads)
    dynamic = [m for m in model.modules() if isinstance(m, DynamicConv)]
    assert (len(dynamic) > 0) == name.startswith("parameternet"), name


def test_parameternet_600m_matches_the_released_size() -> None:
    model = _model("parameternet_600m")
    params = count_params(model)
    macs = count_macs(model, 224)
    assert abs(params - 34.5e6) / 34.5e6 < 0.01, params
    assert abs(macs - 0.59e9) / 0.59e9 < 0.05, macs
    # The paper's point: the static twin has the same FLOPs (within the routing overhead) and far fewer parameters.
    twin = _model("ghostnet_600m")
    twin_macs = count_macs(twin, 224)
    extra_params, extra_macs = hand_count_over_twin(model)
    assert params - count_params(twin) == extra_params
    assert macs - twin_macs == extra_macs
    assert 1.0 < macs / twin_macs < 1.06
    assert count_params(twin) < 0.6 * params
    # Dynamic wherever the release is: stem, ghost primary+cheap convs, shortcut convs, final 1x1 conv.
    assert isinstance(model.conv_stem, DynamicConv)
    assert isinstance(model.blocks[-1][0].conv, DynamicConv)
    block = model.blocks[1][0]
    assert isinstance(block.ghost1.primary_conv[0], DynamicConv)
    assert isinstance(block.ghost1.cheap_operation[0], DynamicConv)
    assert isinstance(block.shortcut[0], DynamicConv) and isinstance(block.shortcut[2], DynamicConv)
    assert all(m.num_experts == 4 for m in model.modules() if isinstance(m, DynamicConv))


def test_parameternet_300m_is_about_300m_macs() -> None:
    macs = count_macs(_model("parameternet_300m"), 224)
    assert abs(macs - 0.30e9) / 0.30e9 < 0.05, macs


def test_registry_create_model_arguments_and_reset_classifier() -> None:
    assert set(MODEL_NAMES) <= set(timm.list_models("parameternet_*") + timm.list_models("ghostnet_*"))
    assert set(vision.STATIC_TWINS) == set(STATIC_TWINS)
    model = timm.create_model("parameternet_tiny", num_classes=5, in_chans=1, num_experts=2)
    assert model.num_classes == 5 and model.num_experts == 2
    assert model.conv_stem.cond_conv.weight.shape[0] == 2
    x = torch.randn(2, 1, 40, 40)
    assert model(x).shape == (2, 5)
    model.reset_classifier(11)
    assert model(x).shape == (2, 11) and model.get_classifier().out_features == 11
    model.reset_classifier(0)
    assert model(x).shape == (2, 1280)
    assert model.pretrained_cfg["min_input_size"] == (3, 32, 32)
    with pytest.raises(ValueError, match="static twin"):
        timm.create_model("ghostnet_tiny", num_experts=4)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("parameternet_600m", pretrained=True)


def test_summary_lists_every_registered_model_by_default() -> None:
    """The default is every model our package registers in timm (timm's registry is the oracle, not MODEL_NAMES),
    each ParameterNet beside its static twin."""
    ours = [name for name in timm.list_models() if timm.models.model_entrypoint(name).__module__.startswith("vision.")]
    default = summary.build_parser().parse_args([]).models
    assert sorted(default) == sorted(ours) and len(default) == len(set(default)) == 6
    assert [(default[i], default[i + 1]) for i in range(0, len(default), 2)] == list(STATIC_TWINS.items())
    assert all(dynamic.replace("parameternet_", "ghostnet_") == static for dynamic, static in STATIC_TWINS.items())


def test_summary_cli_prints_params_and_macs(capsys: pytest.CaptureFixture[str]) -> None:
    assert summary.main(["--img-size", "32", "--json", "--models", "parameternet_tiny", "ghostnet_tiny"]) == 0
    rows = {r["model"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    extra_params, extra_macs = hand_count_over_twin(_model("parameternet_tiny"))
    assert rows["parameternet_tiny"]["params"] - rows["ghostnet_tiny"]["params"] == extra_params
    assert rows["parameternet_tiny"]["macs"] - rows["ghostnet_tiny"]["macs"] == extra_macs
    assert rows["ghostnet_tiny"]["params"] == count_params(_model("ghostnet_tiny"))
    assert rows["parameternet_tiny"]["macs"] == count_macs(timm.create_model("parameternet_tiny"), 32)
    assert summary.main(["--img-size", "16"]) == 2
    assert "img_size=16 is below the minimum 32" in capsys.readouterr().err
