"""`python -m llm.model.summary PRESET [PRESET ...] [--seq-len N] [--json]`

Total parameters, active parameters per token, forward FLOPs per token and the ratios to the vanilla twin. The model
is also built on the meta device (no memory) and its parameters counted, as a check on the analytic numbers.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import LlamaConfig

from .configuration_parameternet_llama import ParameterNetLlamaConfig
from .flops import account
from .presets import build_model, list_presets, load_model_config

MOE_FIELDS = ("moe_projections", "num_experts", "top_k", "capacity_factor", "router_aux_loss_coef",
              "router_z_loss_coef", "expert_bias")


def vanilla_twin(config: LlamaConfig) -> LlamaConfig:
    """The dense LLaMA with the same dimensions."""
    if not isinstance(config, ParameterNetLlamaConfig):
        return config
    fields = {k: v for k, v in config.to_dict().items() if k not in MOE_FIELDS}
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        fields.pop(key, None)
    return LlamaConfig(**fields)


def count_parameters_on_meta(config: LlamaConfig) -> int:
    with torch.device("meta"):
        model = build_model(config)
    return sum(p.numel() for p in model.parameters())


def summarize(name: str, seq_len: int | None = None) -> dict:
    config = load_model_config(name)
    seq_len = seq_len or config.max_position_embeddings
    acc = account(config, seq_len)
    twin = account(vanilla_twin(config), seq_len)
    counted = count_parameters_on_meta(config)
    if counted != acc.total_params:
        raise RuntimeError(f"{name}: analytic total {acc.total_params} != instantiated {counted} (accounting bug)")
    return {
        "model": name,
        "seq_len": seq_len,
        **acc.as_dict(),
        "counted_params_meta": counted,
        "total_params_vs_vanilla": acc.total_params / twin.total_params,
        "active_params_vs_vanilla": acc.active_params / twin.active_params,
        "flops_vs_vanilla": acc.forward_flops_per_token / twin.forward_flops_per_token,
    }


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=None, help=f"presets or config paths (default: all of {list_presets()})")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length for attention FLOPs (default: max positions)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)
    try:
        rows = [summarize(m, args.seq_len) for m in (args.models or list_presets())]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    header = f"{'model':<26} {'seq':>5} {'total params':>13} {'active params':>14} {'fwd FLOPs/tok':>14} {'x params':>9} {'x FLOPs':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<26} {r['seq_len']:>5} {_human(r['total_params']):>13} {_human(r['active_params']):>14} "
              f"{_human(r['forward_flops_per_token']):>14} {r['total_params_vs_vanilla']:>9.3f} {r['flops_vs_vanilla']:>8.4f}")
    print("x params / x FLOPs: ratio to the vanilla LLaMA with the same dimensions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
