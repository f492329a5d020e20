"""The MoE layer's `torch._grouped_mm` path against the contiguous-slice path in bf16, at the 1B `down_proj` shape,
on Hopper or newer (where llm/model/moe.py takes the grouped kernel on CUDA). Mirrors tests/test_moe_layer.py."""

from __future__ import annotations

import pytest
import torch

from llm.model import moe
from llm.model.moe import MoELinear
from llm.model.router import RouterConfig
from tests.gpu.target import TARGET, gpu, needs_device

pytestmark = [gpu, needs_device]

needs_hopper = pytest.mark.skipif(
    TARGET.device == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
    reason="torch._grouped_mm runs for bf16 on CUDA capability >= 9.0 (Hopper) only; other GPUs take the slice path",
)

# The 1B ParameterNet down_proj (8192 -> 2048, 8 experts) on 4096 tokens, as benchmarks/moe_layer.py times it; the CPU
# check uses a small shape with the same properties (16-byte aligned widths).
SHAPE = (512, 128, 8, 256) if TARGET.check_mode else (8192, 2048, 8, 4096)  # in, out, experts, tokens


def _slices(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([chunk @ weight[e].t() for e, chunk in enumerate(torch.split(x, counts.tolist()))])


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def _check(grouped: torch.Tensor, sliced: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """Both bf16 paths accumulate in fp32 and round once: each is within bf16 rounding of the fp32 reference, and the
    grouped kernel is no less accurate than the slices."""
    err_grouped, err_sliced = _rel_err(grouped, exact), _rel_err(sliced, exact)
    assert err_grouped < 1e-2 and err_sliced < 1e-2, (what, err_grouped, err_sliced)
    assert err_grouped <= 1.5 * err_sliced + 1e-3, (what, err_grouped, err_sliced)
    torch.testing.assert_close(
        grouped.float(),
        sliced.float(),
        rtol=1.6e-2,
        atol=1e-2 * float(exact.abs().max()),
        msg=f"{what}: grouped vs slices",
    )


@needs_hopper
def test_grouped_mm_kernel_matches_slices_in_bf16_at_the_1b_shape():
    fan_in, fan_out, experts, tokens = SHAPE
    device = torch.device(TARGET.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Uneven groups with an empty one, as routing produces them.
    shares = torch.tensor([3, 0, 1, 2, 5, 1, 2, 2], dtype=torch.float64)
    counts = (shares / shares.sum() * tokens).floor().long()
    counts[0] += tokens - counts.sum()
    x32 = torch.randn(tokens, fan_in, generator=gen).to(device)
    w32 = (torch.randn(experts, fan_out, fan_in, generator=gen) / fan_in**0.5).to(device)
    up32 = torch.randn(tokens, fan_out, generator=gen).to(device)
    counts = counts.to(device)

    x, w, up = (t.to(torch.bfloat16) for t in (x32, w32, up32))
    assert moe._grouped_mm_supported(x, w)  # the kernel path is the one under test

    def run(fn, *args):
        xi, wi = args[0].detach().clone().requires_grad_(True), args[1].detach().clone().requires_grad_(True)
        y = fn(xi, wi, counts)
        y.backward(args[2])
        return y.detach(), xi.grad, wi.grad

    grouped = run(moe.grouped_mm, x, w, up)
    sliced = run(_slices, x, w, up)
    exact = run(_slices, x.double(), w.double(), up.double())  # the bf16 inputs, computed in fp64
    for name, g, s, e in zip(("output", "input grad", "weight grad"), grouped, sliced, exact):
        assert g.dtype == torch.bfloat16 and g.device.type == device.type
        _check(g, s, e, name)


@needs_hopper
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_layer_grouped_path_matches_slice_path_in_bf16(monkeypatch, top_k: int):
    """The whole layer (routing, permutation, experts, gate, combine) forward and backward, the grouped kernel
    against the same layer forced onto the slice path."""
    fan_in, fan_out, experts, tokens = SHAPE
    device = torch.device(TARGET.device)
    torch.manual_seed(0)
    layer = MoELinear(fan_in, fan_out, RouterConfig(num_experts=experts, top_k=top_k)).to(
        device=device, dtype=torch.bfloat16
    )
    x = torch.randn(tokens, fan_in, device=device, dtype=torch.bfloat16)
    up = torch.randn(tokens, fan_out, device=device, dtype=torch.bfloat16)

    def run() -> tuple[torch.Tensor, ...]:
        layer.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        y = layer(xi)
        y.backward(up)
        return y.detach(), xi.grad, layer.weight.grad, layer.router.weight.grad

    assert moe._grouped_mm_supported(x, layer.weight)
    grouped = run()
    counts = layer.last_stats.tokens_per_expert
    assert int(counts.sum()) == tokens * top_k and int((counts > 0).sum()) > 1
    monkeypatch.setattr(moe, "_grouped_mm_supported", lambda *args: False)
    sliced = run()
    # Same routing on both paths (the router runs before dispatch, identically): only the expert GEMMs differ, so
    # the two agree to bf16 rounding. (An fp64 reference would route some near-tied tokens elsewhere.)
    assert torch.equal(layer.last_stats.tokens_per_expert, counts)
    for name, g, s in zip(("output", "input grad", "expert weight grad", "router grad"), grouped, sliced):
        assert g.dtype == torch.bfloat16 and g.device.type == device.type
        assert _rel_err(g, s) < 1e-2, (name, _rel_err(g, s))
        torch.testing.assert_close(
            g.float(), s.float(), rtol=1.6e-2, atol=1e-2 * float(s.abs().max()), msg=f"{name}: grouped vs slices"
        )
