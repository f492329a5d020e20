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
from vision.models import MODEL_NAMES, STATIC_TWINS, DynamicConv, check_input_size
from vision.summary import count_macs, count_params, macs_breakdown

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
    small = timm.create_model("ghostnet_tiny_os4", num_classes=3, in_chans=1)
    assert small.total_stride == 4 and small.pretrained_cfg["min_input_size"] == (3, 4, 4)
    assert small(torch.randn(2, 1, 4, 4)).shape == (2, 3)
    check_input_size(4, "parameternet_tiny_os4")
    with pytest.raises(ValueError, match="img_size=3 is below the minimum 4 of parameternet_tiny_os4"):
        check_input_size(3, "parameternet_tiny_os4")
    with pytest.raises(ValueError, match="static twin"):
        timm.create_model("ghostnet_tiny", num_experts=4)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("parameternet_600m", pretrained=True)


def test_summary_lists_every_registered_model_by_default() -> None:
    """The default is every model our package registers in timm (timm's registry is the oracle, not MODEL_NAMES),
    each ParameterNet beside its static twin."""
    ours = [name for name in timm.list_models() if timm.models.model_entrypoint(name).__module__.startswith("vision.")]
    default = summary.build_parser().parse_args([]).models
    assert sorted(default) == sorted(ours) and len(default) == len(set(default)) == 8
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


def test_summary_breakdown_separates_the_mixing_and_adds_up(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--img-size", "32", "--in-chans", "1", "--num-classes", "10", "--json", "--breakdown"]
    assert summary.main([*args, "--models", "parameternet_tiny", "ghostnet_tiny"]) == 0
    rows = {r["model"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    static = rows["ghostnet_tiny"]["breakdown"]
    assert static["dynamic_conv"] == static["mixing"] == static["routing"] == 0
    assert static["other"] == rows["ghostnet_tiny"]["macs"]
    parts = rows["parameternet_tiny"]["breakdown"]
    assert sum(parts.values()) == rows["parameternet_tiny"]["macs"]
    model = timm.create_model("parameternet_tiny", num_classes=10, in_chans=1)
    assert rows["parameternet_tiny"]["macs"] == count_macs(model, 32, in_chans=1)
    assert parts["mixing"] + parts["routing"] == hand_count_over_twin(model)[1]
    # Why parameternet_tiny is not the demo's model: at 32 px its last stage runs on 1x1 maps, where mixing 4 kernels
    # costs 4x the convolution, so the mixing outweighs every dynamic convolution together.
    assert parts["mixing"] > parts["dynamic_conv"]


def _tiny_os4(num_experts: int) -> torch.nn.Module:
    """The demo's ParameterNet as the demo builds it: grayscale, 10 classes."""
    if num_experts == 0:
        return timm.create_model("ghostnet_tiny_os4", num_classes=10, in_chans=1)
    return timm.create_model("parameternet_tiny_os4", num_classes=10, in_chans=1, num_experts=num_experts)


@pytest.mark.parametrize("img_size", [28, 32])
@pytest.mark.parametrize("num_experts", [1, 2, 4])
def test_tiny_os4_pair_costs_within_10_percent_of_its_static_twin(num_experts: int, img_size: int) -> None:
    """The paper's premise at Fashion-MNIST's resolution (28 px, resized to 32 px by the demo): more parameters at
    (almost) the same multiply-adds."""
    torch.manual_seed(0)
    model, twin = _tiny_os4(num_experts), _tiny_os4(0)
    macs, twin_macs = count_macs(model, img_size, in_chans=1), count_macs(twin, img_size, in_chans=1)
    extra_params, extra_macs = hand_count_over_twin(model)
    assert macs - twin_macs == extra_macs > 0  # the mixing and routing are counted
    assert count_params(model) - count_params(twin) == extra_params
    assert macs / twin_macs < 1.10, (num_experts, img_size, macs / twin_macs)
    # Each extra expert adds about 20% of the twin's parameters (a third of them sit in the static 1280-wide head).
    assert count_params(model) > (1 + 0.15 * (num_experts - 1)) * count_params(twin)


def test_tiny_os4_last_dynamic_conv_by_hand() -> None:
    """One layer counted by hand: the final 1x1 conv (56 -> 336 channels at width 0.35) on the 8x8 map of 32 px."""
    model = _tiny_os4(4)
    final = model.blocks[-1][0].conv
    assert isinstance(final, DynamicConv) and (final.in_channels, final.out_channels) == (56, 336)
    conv = 56 * 336 * 8 * 8  # one kernel of 56 x 336 at each of the 64 output pixels
    mixing = 4 * 56 * 336  # the 4 expert kernels weighted and summed, once per image
    routing = 56 * 4  # Linear(56, 4) on the pooled input (its bias add is no multiply-add)
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        final(torch.zeros(1, 56, 8, 8))
    counts = {str(op): flops // 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    assert counts == {"aten.convolution": conv, "aten.mm": mixing, "aten.addmm": routing}
    # The whole network at 32 px: mixing and routing are the hand count of every DynamicConv (hand_count_over_twin),
    # and the dynamic convolutions plus the rest cost exactly what the static twin costs.
    parts = macs_breakdown(model, 32, in_chans=1)
    assert parts.mixing + parts.routing == hand_count_over_twin(model)[1]
    assert parts.total == count_macs(model, 32, in_chans=1)
    assert parts.dynamic_conv + parts.other == count_macs(_tiny_os4(0), 32, in_chans=1)
