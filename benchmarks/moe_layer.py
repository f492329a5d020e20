"""Forward+backward time of the MoE layer against the dense nn.Linear of the same active shape and against a
re-implementation of the paper code's dispatch (a Python loop over experts, boolean masks into a zeros buffer).

Prints one JSON object. Timings are medians of interleaved repeats (A B C A B C ...) in one process, reported as
ratios to the dense layer: compare ratios, not absolute times, on shared machines.

    python benchmarks/moe_layer.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 5] [--shapes NAME ...]

On a Hopper GPU in bf16 the MoE layer runs `torch._grouped_mm` (llm/model/moe.py); elsewhere the slice path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from llm.model.moe import MoELinear  # noqa: E402
from llm.model.router import RouterConfig

SHAPES = {
    # name: (in_features, out_features, num_experts, tokens)
    "tiny_down_proj": (688, 256, 8, 8 * 256),
    "1b_down_proj": (8192, 2048, 8, 4096),
}


class PaperDispatchMoE(nn.Module):
    """The published ParameterNet/Mixtral-style dispatch: experts as separate Linears, one boolean mask per expert."""

    def __init__(self, in_features: int, out_features: int, num_experts: int, top_k: int = 1) -> None:
        super().__init__()
        self.gate = nn.Linear(in_features, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(in_features, out_features, bias=False) for _ in range(num_experts))
        self.top_k = top_k
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, selected = torch.topk(torch.softmax(self.gate(x).float(), dim=-1), self.top_k, dim=-1)
        results = torch.zeros(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for i, expert in enumerate(self.experts):
            token_idx, nth = torch.where(selected == i)
            results[token_idx] += weights[token_idx, nth, None].to(x.dtype) * expert(x[token_idx])
        return results


def moe_uses_grouped_kernel(layer: MoELinear, x: torch.Tensor) -> bool:
    """Whether the layer's experts run as one `torch._grouped_mm` here (else contiguous slices)."""
    from llm.model.moe import _grouped_mm_supported

    return _grouped_mm_supported(x, layer.weight)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_layers(layers: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    upstream = torch.randn(x.shape[0], next(iter(layers.values()))(x).shape[-1], device=x.device, dtype=x.dtype)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for rep in range(repeats + 1):  # the first round warms up
        for name, layer in layers.items():
            inp = x.detach().requires_grad_(True)
            _sync(x.device)
            start = time.perf_counter()
            layer(inp).backward(upstream)
            _sync(x.device)
            if rep:
                times[name].append(time.perf_counter() - start)
            layer.zero_grad(set_to_none=True)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be >= 1")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    result = {
        "benchmark": "moe_layer",
        "date": datetime.date.today().isoformat(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "shapes": {},
    }
    for name in args.shapes:
        fan_in, fan_out, experts, tokens = SHAPES[name]
        layers = {
            "moe_grouped": MoELinear(fan_in, fan_out, RouterConfig(num_experts=experts, top_k=1)),
            "dense": nn.Linear(fan_in, fan_out, bias=False),
            "paper_dispatch": PaperDispatchMoE(fan_in, fan_out, experts),
        }
        layers = {k: v.to(device=device, dtype=dtype) for k, v in layers.items()}
        x = torch.randn(tokens, fan_in, device=device, dtype=dtype)
        med = time_layers(layers, x, args.repeats)
        result["shapes"][name] = {
            "in": fan_in,
            "out": fan_out,
            "experts": experts,
            "tokens": tokens,
            "median_s": {k: round(v, 5) for k, v in med.items()},
            "moe_throughput_vs_dense": round(med["dense"] / med["moe_grouped"], 3),
            "paper_throughput_vs_dense": round(med["dense"] / med["paper_dispatch"], 3),
            "moe_speedup_vs_paper": round(med["paper_dispatch"] / med["moe_grouped"], 3),
            "grouped_mm_kernel": moe_uses_grouped_kernel(layers["moe_grouped"], x),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
