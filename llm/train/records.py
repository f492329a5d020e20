"""What the LLM trainer reports: expert-load statistics of the ParameterNet MoE layers (moe/<layer>/...) and the console
line of each logged step, and the run's summary.json (runtime.rundir's keys plus the LLM's own)."""

from __future__ import annotations

from typing import Any

import torch


def expert_load(
    tokens_per_expert: torch.Tensor,
    layer_names: list[str],
    top1_prob: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> dict[str, float]:
    """Per MoE layer: min and max share of the assignments, coefficient of variation of the counts (population std
    over mean: 0 is perfect balance, sqrt(E - 1) every token on one expert), and, when given, the mean top-1 router
    probability (1/E: a flat router, 1: a one-hot one) and the mean router entropy in nats (log E: flat, 0: one-hot).
    A collapsed router shows a CV near sqrt(E - 1) whatever its probabilities: a flat router whose tiny shared logit
    offsets pick the same expert for every token has top-1 probability near 1/E and entropy near log E."""
    out: dict[str, float] = {}
    counts = tokens_per_expert.double()
    shares = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    cv = counts.std(-1, unbiased=False) / counts.mean(-1).clamp(min=1e-9)
    for i, name in enumerate(layer_names):
        out[f"moe/{name}/min_share"] = float(shares[i].min())
        out[f"moe/{name}/max_share"] = float(shares[i].max())
        out[f"moe/{name}/cv"] = float(cv[i])
        if top1_prob is not None:
            out[f"moe/{name}/top1_prob"] = float(top1_prob[i])
        if entropy is not None:
            out[f"moe/{name}/entropy"] = float(entropy[i])
    return out


def console_line(r: dict[str, Any], train_iters: int, moe_names: list[str]) -> str:
    loss = "skipped (non-finite)" if r["lm_loss"] is None else f"{r['lm_loss']:.4f}"
    parts = [
        f"iter {r['iteration']}/{train_iters}",
        f"tokens {r['tokens']}",
        f"loss {loss}",
        f"lr {r['lr']:.2e}",
        f"grad_norm {r['grad_norm'] or float('nan'):.3f}",
        f"tok/s {r['tokens_per_s']:.0f}",
    ]
    if "aux_loss" in r:
        shares = [(r[f"moe/{n}/min_share"], r[f"moe/{n}/max_share"]) for n in moe_names]
        parts.append(f"aux {r['aux_loss']:.4f}")
        parts.append(f"expert share min {min(s[0] for s in shares):.3f} max {max(s[1] for s in shares):.3f}")
    if "mfu" in r:
        parts.append(f"TFLOP/s {r['tflops_per_device']:.1f} MFU {100 * r['mfu']:.1f}%")
    mem = r.get("mem_alloc_gib", r.get("max_rss_gib"))
    parts.append(f"mem {mem:.2f} GiB")
    return " | ".join(parts)


def routing_record(model_config: Any) -> dict[str, Any] | str:
    """The routing the model really trained with (RouterConfig's fields, resolved from preset and overrides), or
    'dense': what reports put in their routing column, never inferred from an arm's name."""
    from transformers import MixtralConfig

    from llm.model.configuration_parameternet_llama import ParameterNetLlamaConfig, router_config, routing_recipe
    from llm.model.router import RouterConfig

    if isinstance(model_config, MixtralConfig):  # the peer: its router as transformers wrote it, in our terms
        peer = RouterConfig(
            num_experts=model_config.num_local_experts,
            top_k=model_config.num_experts_per_tok,
            gate="normalized",
            aux_loss_coef=model_config.router_aux_loss_coef,
        )
        return {"recipe": "mixtral", "experts": "mlp", **peer.record()}
    if not isinstance(model_config, ParameterNetLlamaConfig):
        return "dense"
    record = router_config(model_config).record()
    experts = "mlp" if model_config.moe_mlp else "linear"
    return {"recipe": routing_recipe(model_config), "experts": experts, **record}


def run_summary(cfg: Any, accounting: Any, result: dict[str, Any], world: int, model_config: Any) -> dict[str, Any]:
    summary = {
        "task": "llm",
        "model": cfg.model,
        "model_overrides": cfg.model_overrides,
        "total_params": accounting.total_params,
        "active_params": accounting.active_params,
        "flops_per_token": accounting.forward_flops_per_token,
        "seq_len": cfg.seq_len,
        "final_val_loss": result.get("val_loss"),
        "tokens": result["tokens"],
        "iterations": result["iteration"],
        "seed": cfg.seed,
        "world_size": world,
        "expert_parallel_size": cfg.expert_parallel_size,
        "routing": routing_record(model_config),
    }
    if "dense_weights_identical" in result:
        summary["dense_weights_identical_across_ranks"] = result["dense_weights_identical"]
    if cfg.compile:
        from torch._dynamo.utils import counters

        # How many graphs torch.compile produced (MoE grouped GEMMs outside bf16 run between graphs, eagerly).
        summary["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
    return summary
