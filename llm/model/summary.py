"""`python -m llm.model.summary PRESET [PRESET ...] [--seq-len N] [--json]`

Total parameters, active parameters per token, forward FLOPs per token and the ratios to the vanilla twin. The model
is also built on the meta device (no memory) and its parameters counted, as a check on the analytic numbers.

`python -m llm.model.summary PRESET --memory --gpus N --zero S [--micro-batch B] [--seq-len L] [--gpu-memory GiB]
[--activation-checkpointing] [--ep E] [--precision bf16|fp16|fp32] [--json]`

Will it fit? The per-GPU memory of weights, gradients, optimizer state and activations for that training layout on
the DeepSpeed engine, and whether it fits the GPU. The model states follow what DeepSpeed allocates (and equal its own
ZeRO-2 estimator); activations, logits and the headroom are analytic estimates (see llm/model/memory.py).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import LlamaConfig

from runtime.errors import print_error

from .configuration_parameternet_llama import ParameterNetLlamaConfig
from .flops import account
from .memory import GIB, MemoryEstimate, TrainingLayout, estimate, layer_activation_bytes_per_token
from .presets import build_model, list_presets, load_model_config

MOE_FIELDS = (
    "moe_projections",
    "num_experts",
    "top_k",
    "capacity_factor",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "expert_output_bias",
    "router_input",
    "moe_mlp",
    "router_bias_update_rate",
    "router_gate",
)


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


def _sharding(sharded: bool, gpus: int, ep: int) -> str:
    if sharded and gpus > 1:
        return f"/ {gpus} ranks"  # experts: 1/ep of them per rank, sharded over the gpus/ep expert-data ranks
    return f"whole on each rank, experts 1/{ep}" if ep > 1 else "whole on each rank"


def _deepspeed_relation(lay: TrainingLayout) -> str:
    """How the model states relate to DeepSpeed's own estimators (tests/test_model_summary.py checks it)."""
    if lay.precision == "fp32":
        return "DeepSpeed's estimators assume 16-bit training"
    if lay.expert_parallel > 1:
        return "DeepSpeed's estimators know no expert parallelism"
    return {
        0: "= DeepSpeed's ZeRO-2 estimator for 1 GPU (nothing sharded)",
        1: "= DeepSpeed's ZeRO-2 estimator + the 16-bit grads ZeRO-1 keeps whole",
        2: "= DeepSpeed's ZeRO-2 estimator",
        3: "= DeepSpeed's ZeRO-3 estimator + its 16-bit grad partition",
    }[lay.zero_stage]


def format_memory(name: str, config: LlamaConfig, est: MemoryEstimate) -> str:
    lay, st, act, params = est.layout, est.states, est.activations, est.params
    stage, n, ep = lay.zero_stage, lay.gpus, lay.expert_parallel
    b = 4 if lay.precision == "fp32" else 2
    tokens = lay.micro_batch * lay.seq_len
    per_layer = layer_activation_bytes_per_token(config, lay.precision)
    fp32_copies = st.fp32_gradients > 0  # all but a plain fp32 AdamW at ZeRO-0
    rows = [
        ("weights", lay.precision, st.weights, f"{b} B/param, {_sharding(stage >= 3, n, ep)}"),
        ("gradients", lay.precision, st.gradients, f"{b} B/param, {_sharding(stage >= 2, n, ep)}"),
        (
            "gradients",
            "fp32 copy, in the step",
            st.fp32_gradients,
            f"4 B/param, {_sharding(stage >= 1, n, ep)}" if fp32_copies else "none: AdamW steps on the fp32 model",
        ),
        (
            "optimizer state",
            "fp32 master + Adam m, v" if fp32_copies else "Adam m, v",
            st.optimizer,
            f"{12 if fp32_copies else 8} B/param, {_sharding(stage >= 1, n, ep)}",
        ),
    ]
    if stage == 3:
        rows.append(
            (
                "ZeRO-3 gathered",
                "largest module",
                st.zero3_gathered,
                f"weights + grads of {params.largest_module / 1e6:.1f}M params (DeepSpeed's term)",
            )
        )
    rows.append(("model states", "", st.total, _deepspeed_relation(lay)))
    if lay.activation_checkpointing:
        what = f"{config.num_hidden_layers} layer inputs + 1 layer"
        how = f"checkpointing: {b} B x hidden per layer + one layer recomputed ({per_layer} B/token)"
    else:
        what = f"{config.num_hidden_layers} layers"
        how = f"{per_layer} B/token/layer: attention (flash/SDPA, no L^2) + SwiGLU + 2 RMSNorm"
    rows += [
        ("activations *", what, act.layers, how),
        ("head *", "final norm + lm_head in", act.head, f"{tokens} tokens/GPU"),
        (
            "logits + loss *",
            f"B x L x {config.vocab_size}",
            act.logits,
            f"{b + 12} B/token/vocab: logits, fp32 log-probs + 2 grads",
        ),
        ("peak", "", est.peak, "max(backward: states - fp32 grads + activations, step: all states)"),
    ]
    lines = [
        f"{name}: {params.total / 1e6:.1f}M parameters"
        + (f" ({params.dense / 1e6:.1f}M dense + {params.expert / 1e6:.1f}M in experts)" if params.expert else ""),
        f"layout: {n} GPU{'s' if n > 1 else ''}, ZeRO-{stage}, {lay.precision}"
        f"{', expert parallel ' + str(ep) if ep > 1 else ''}, micro-batch {lay.micro_batch} x seq {lay.seq_len}, "
        f"activation checkpointing {'on' if lay.activation_checkpointing else 'off'}",
        f"  {'per GPU':<18} {'':<25} {'GiB':>7}  how",
    ]
    lines += [f"  {what:<18} {detail:<25} {value / GIB:>7.2f}  {how}" for what, detail, value, how in rows]
    lines.append(
        f"  GPU {est.gpu_memory_gib:g} GiB - headroom {est.headroom_gib:.2f} GiB * (CUDA context, "
        f"fragmentation, ZeRO buckets) = {est.usable / GIB:.2f} GiB usable"
    )
    verdict = "FITS" if est.fits else "DOES NOT FIT"
    relation = "<=" if est.fits else ">"
    lines.append(
        f"  {verdict}: peak {est.peak / GIB:.2f} GiB {relation} {est.usable / GIB:.2f} GiB usable; largest "
        f"micro-batch at seq {lay.seq_len}: {est.largest_micro_batch}"
        + (
            ""
            if lay.activation_checkpointing
            else f" (with --activation-checkpointing: {est.largest_micro_batch_checkpointing})"
        )
    )
    lines.append("  * analytic estimate (llm/model/memory.py); the model states are DeepSpeed 0.19's allocations")
    return "\n".join(lines)


def _memory_main(args: argparse.Namespace, models: list[str]) -> int:
    blocks = []
    try:
        for name in models:
            config = load_model_config(name)
            layout = TrainingLayout(
                gpus=args.gpus,
                zero_stage=args.zero,
                expert_parallel=args.ep,
                precision=args.precision,
                micro_batch=args.micro_batch,
                seq_len=args.seq_len,
                activation_checkpointing=args.activation_checkpointing,
            )
            est = estimate(config, layout, args.gpu_memory, args.headroom)
            blocks.append(
                json.dumps({"model": name, **est.as_dict()}) if args.json else format_memory(name, config, est)
            )
    except ValueError as err:
        print_error(str(err))
        return 2
    print(("\n" if args.json else "\n\n").join(blocks))
    return 0


MEMORY_DEFAULTS = {
    "gpus": 1,
    "zero": 1,
    "ep": 1,
    "micro_batch": 1,
    "precision": "bf16",
    "gpu_memory": 80.0,
    "headroom": None,
    "activation_checkpointing": False,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "models", nargs="*", default=None, help=f"presets or config paths (default: all of {list_presets()})"
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="sequence length for attention FLOPs and activations (default: max positions)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    mem = parser.add_argument_group("memory (with --memory)")
    mem.add_argument("--memory", action="store_true", help="per-GPU training memory and whether it fits")
    mem.add_argument("--gpus", type=int, help="data-parallel GPUs in all, nodes x GPUs per node (default 1)")
    mem.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (default 1, as llm/configs/1b.yaml)")
    mem.add_argument("--micro-batch", type=int, help="sequences per GPU per micro-step (default 1)")
    mem.add_argument("--ep", type=int, help="expert-parallel size, ParameterNet only, ZeRO 0-2 (default 1)")
    mem.add_argument(
        "--precision",
        choices=("bf16", "fp16", "fp32"),
        help="bf16 (default, as the 1B runs: fp32 master weights + Adam) or fp16 (same bytes) or fp32",
    )
    mem.add_argument(
        "--activation-checkpointing",
        action="store_true",
        default=None,
        help="keep only each layer's input; recompute the layer in the backward",
    )
    mem.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GiB",
        help="GPU memory in GiB (default 80: an H100/A100 80GB, nvidia-smi 81559 MiB; an H200 141GB "
        "is 140, nvidia-smi 143771 MiB)",
    )
    mem.add_argument(
        "--headroom",
        type=float,
        metavar="GiB",
        help="memory kept free for the CUDA context, NCCL, allocator fragmentation and ZeRO buckets "
        "(default 1 GiB + 10%% of --gpu-memory)",
    )
    args = parser.parse_args(argv)
    given = [k for k in MEMORY_DEFAULTS if getattr(args, k) is not None]
    if not args.memory and given:
        parser.error(f"--{given[0].replace('_', '-')} needs --memory")
    for key, default in MEMORY_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    models = args.models or list_presets()
    if args.memory:
        return _memory_main(args, models)
    try:
        rows = [summarize(m, args.seq_len) for m in models]
    except ValueError as err:
        print_error(str(err))
        return 2
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    header = (
        f"{'model':<26} {'seq':>5} {'total params':>13} {'active params':>14} {'fwd FLOPs/tok':>14} {'x params':>9} "
        f"{'x FLOPs':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<26} {r['seq_len']:>5} {_human(r['total_params']):>13} {_human(r['active_params']):>14} "
            f"{_human(r['forward_flops_per_token']):>14} {r['total_params_vs_vanilla']:>9.3f} "
            f"{r['flops_vs_vanilla']:>8.4f}"
        )
    print("x params / x FLOPs: ratio to the vanilla LLaMA with the same dimensions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
