"""The MoE layer: grouped dispatch against a token-by-token reference, capacity drops, aux losses, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from llm.model.moe import MoELinear, MoEMLP, RoutedExperts, grouped_mm
from llm.model.router import RouterConfig


def one_expert(layer: RoutedExperts, e: int, token: torch.Tensor) -> torch.Tensor:
    """Expert e of either layer kind on one token, written out."""
    if isinstance(layer, MoEMLP):
        hidden = layer.act_fn(F.linear(token, layer.gate_weight[e])) * F.linear(token, layer.up_weight[e])
        return F.linear(hidden, layer.down_weight[e])
    return F.linear(token, layer.weight[e], None if layer.bias is None else layer.bias[e])


def make_layer(kind: str, in_features: int, out_features: int, bias: bool = False, **routing) -> RoutedExperts:
    """ParameterNet's MoELinear, or the standard MoE's MoEMLP (hidden in_features, intermediate 2 x out_features);
    `routing`: RouterConfig's fields."""
    if kind == "mlp":
        return MoEMLP(in_features, 2 * out_features, RouterConfig(**routing), act_fn=torch.nn.SiLU())
    return MoELinear(in_features, out_features, RouterConfig(**routing), bias=bias)


def naive_reference(layer: RoutedExperts, x: torch.Tensor) -> torch.Tensor:
    """One token at a time: route, skip assignments past an expert's capacity (first choices first), sum gate x
    expert."""
    tokens = x.reshape(-1, layer.in_features)
    probs = torch.softmax(layer.router.logits(tokens).float(), dim=-1)
    gate, expert = torch.topk(probs, layer.top_k, dim=-1)
    capacity = layer.capacity(tokens.shape[0])
    used = [0] * layer.num_experts
    rows = [tokens.new_zeros(layer.out_features) for _ in range(tokens.shape[0])]
    for choice in range(layer.top_k):
        for t in range(tokens.shape[0]):
            e = int(expert[t, choice])
            if capacity is not None and used[e] >= capacity:
                continue
            used[e] += 1
            rows[t] = rows[t] + gate[t, choice] * one_expert(layer, e, tokens[t])
    return torch.stack(rows).reshape(*x.shape[:-1], layer.out_features)


def _grads(layer: MoELinear, x: torch.Tensor, fn, upstream: torch.Tensor):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = fn(layer, x)
    out.backward(upstream)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return out.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize(
    "kind, bias", [("linear", False), ("linear", True), ("mlp", False)]
)  # ParameterNet's projection experts; the standard MoE's whole SwiGLU experts
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # fp32: torch._grouped_mm; fp64: slice fallback
def test_grouped_dispatch_matches_naive_reference(top_k, capacity_factor, kind, bias, dtype):
    torch.manual_seed(0)
    layer = make_layer(kind, 32, 24, num_experts=8, top_k=top_k, capacity_factor=capacity_factor, bias=bias)
    layer = layer.to(dtype)
    if bias:
        torch.nn.init.normal_(layer.bias)
    out_features = layer.out_features
    x = torch.randn(3, 20, 32, dtype=dtype)
    upstream = torch.randn(3, 20, out_features, dtype=dtype)
    out, gx, g = _grads(layer, x, lambda m, t: m(t), upstream)
    ref, rgx, rg = _grads(layer, x, naive_reference, upstream)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(gx, rgx, **tol)
    for name in rg:
        torch.testing.assert_close(g[name], rg[name], msg=f"gradient of {name}", **tol)
    assert g["router.weight"].abs().sum() > 0  # the gate carries the router's gradient
    stats = layer.last_stats
    assert int(stats.tokens_per_expert.sum()) == 60 * top_k
    if capacity_factor is None:
        assert int(stats.dropped_tokens) == 0


def test_grouped_mm_kernel_equals_slices():
    torch.manual_seed(0)
    weight = torch.randn(4, 16, 32, requires_grad=True)
    counts = torch.tensor([5, 0, 9, 2])
    x = torch.randn(16, 32, requires_grad=True)
    up = torch.randn(16, 16)
    y = grouped_mm(x, weight, counts)
    y.backward(up)
    gx, gw = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    ref = torch.cat([c @ weight[e].t() for e, c in enumerate(torch.split(x, counts.tolist()))])
    ref.backward(up)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, weight.grad, atol=1e-5, rtol=1e-5)


def test_dropped_tokens_on_constructed_routing():
    """Router forced so that 6 tokens pick expert 0 and 2 pick expert 1: capacity ceil(0.5*8/4)=1 drops 5 + 1."""
    layer = MoELinear(4, 4, RouterConfig(num_experts=4, top_k=1, capacity_factor=0.5))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0  # feature 0 -> expert 0
        layer.router.weight[1, 1] = 10.0  # feature 1 -> expert 1
        layer.weight.copy_(torch.eye(4).expand(4, 4, 4))
    x = torch.zeros(8, 4)
    x[:6, 0] = 1.0
    x[6:, 1] = 1.0
    out = layer(x)
    assert layer.capacity(8) == 1
    assert layer.last_stats.tokens_per_expert.tolist() == [6, 2, 0, 0]
    assert int(layer.last_stats.dropped_tokens) == 6
    # First token of each expert is served (priority by token order), every other output is exactly zero.
    served = out.abs().sum(-1) > 0
    assert served.tolist() == [True, False, False, False, False, False, True, False]


def test_top2_first_choices_have_capacity_priority():
    layer = MoELinear(2, 2, RouterConfig(num_experts=2, top_k=2, capacity_factor=0.5))  # capacity ceil(0.5*2*2/2) = 1
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[5.0, 0.0], [0.0, 5.0]]))
        layer.weight.copy_(torch.eye(2).expand(2, 2, 2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # token 0 prefers expert 0, token 1 prefers expert 1
    out = layer(x)
    probs = torch.softmax(layer.router.logits(x), -1)
    # Each expert's single slot goes to the token whose FIRST choice it is; both second choices are dropped.
    torch.testing.assert_close(out, probs.max(-1).values[:, None] * x)
    assert int(layer.last_stats.dropped_tokens) == 2


def test_aux_loss_equals_switch_formula_by_hand():
    """4 tokens, 2 experts. Router logits chosen so probabilities are known exactly."""
    layer = MoELinear(2, 2, RouterConfig(num_experts=2, top_k=1))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    a = math.log(3.0)  # logits (log 3, 0) -> probs (3/4, 1/4)
    x = torch.tensor([[a, 0.0], [a, 0.0], [a, 0.0], [0.0, a]])
    layer(x)
    # f = (3/4, 1/4) tokens per expert share; P = mean probs = ((3*.75+.25)/4, (3*.25+.75)/4) = (0.625, 0.375)
    expected = 2 * (0.75 * 0.625 + 0.25 * 0.375)
    torch.testing.assert_close(layer.last_stats.aux_loss, torch.tensor(expected))
    # z-loss: mean over tokens of logsumexp(logits)^2 = log(4)^2 for every token here (log(3+1)).
    torch.testing.assert_close(layer.last_stats.z_loss, torch.tensor(math.log(4.0) ** 2))


def test_aux_loss_is_one_for_perfect_balance_and_uniform_router():
    layer = MoELinear(8, 8, RouterConfig(num_experts=4, top_k=1))
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(16, 8))
    # Uniform probabilities: P_e = 1/4; whatever topk picks, sum_e f_e = 1 -> E * sum f_e / E = 1.
    torch.testing.assert_close(layer.last_stats.aux_loss, torch.tensor(1.0))


def test_router_statistics_of_a_flat_router():
    layer = MoELinear(8, 8, RouterConfig(num_experts=4, top_k=1))
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(16, 8))
    torch.testing.assert_close(layer.last_stats.top1_prob, torch.tensor(0.25))
    torch.testing.assert_close(layer.last_stats.entropy, torch.tensor(math.log(4.0)))


def test_centered_router_ignores_a_shift_shared_by_all_tokens():
    """The collapse the centred router input prevents: a large direction common to all tokens sends every token of a
    raw router to one expert; the centred router routes the shifted tokens as the unshifted ones, causally."""
    torch.manual_seed(0)
    x = torch.randn(4, 64, 16)  # 4 sequences of 64 tokens
    shared = 20.0 * torch.randn(16)
    raw = MoELinear(16, 8, RouterConfig(num_experts=8))
    raw(x + shared)
    assert int(raw.last_stats.tokens_per_expert.max()) == 256  # all on one expert
    centered = MoELinear(16, 8, RouterConfig(num_experts=8, input="centered"))
    with torch.no_grad():
        centered.router.weight.copy_(raw.router.weight)
    torch.testing.assert_close(centered.router.logits(x + shared), centered.router.logits(x), atol=1e-3, rtol=1e-3)
    centered(x + shared)
    assert int(centered.last_stats.tokens_per_expert.max()) < 256 / 4
    # Causal: a token's logits do not depend on later tokens or other sequences (a prefix alone gives the same).
    full = centered.router.logits(x).view(4, 64, 8)
    torch.testing.assert_close(centered.router.logits(x[1:2, :10]).view(10, 8), full[1, :10])
    torch.testing.assert_close(full[:, 0], centered.router.bias.detach().expand(4, 8))  # position 0: the bias


def test_centered_router_balancing_gradient_reaches_its_bias():
    """Centring zeroes the aux loss's gradient on the router weight's shared part; the bias carries it instead, with
    the sign that moves tokens off the overloaded experts."""
    torch.manual_seed(0)
    layer = MoELinear(16, 8, RouterConfig(num_experts=4, input="centered")).train()
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # expert 0 overloaded
    layer.router_loss_weights = (1.0, 0.0)  # the aux loss alone, through the graph
    (0.0 * layer(torch.randn(128, 16))).sum().backward()
    grad = layer.router.bias.grad
    assert grad[0] > 0 and (grad[1:] < 0).all()  # gradient descent lowers expert 0's offset, raises the others'


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=2, top_k=3), "top_k"),
        (dict(num_experts=2, capacity_factor=-1.0), "capacity_factor"),
    ],
)
def test_layer_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoELinear(4, 4, RouterConfig(**kwargs))


def test_normalized_gate_passes_the_expert_output_unattenuated_and_the_router_still_learns():
    """router_gate 'normalized': top-1's gate is 1 in the forward (the output equals the chosen expert's), while the
    router's gradient from the output is that of p / p.detach() (non-zero); 'softmax' scales by p < 1."""
    torch.manual_seed(0)
    softmax_gate = MoELinear(16, 8, RouterConfig(num_experts=4))
    x = torch.randn(32, 16)
    soft = softmax_gate(x)
    layer = MoELinear(16, 8, RouterConfig(num_experts=4, gate="normalized"))
    layer.load_state_dict(softmax_gate.state_dict())
    out = layer(x)
    chosen = layer.router.logits(x).argmax(dim=-1)
    expected = torch.einsum("ti,toi->to", x, layer.weight[chosen])
    torch.testing.assert_close(out, expected)
    assert (soft.norm(dim=-1) < out.norm(dim=-1)).all()  # p < 1 attenuates
    out.square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
