"""What the LLM trainer builds before its loop: the model (with expert parallelism), the DeepSpeed config and engine."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from runtime.ds_config import adamw_block, complete_ds_config, resolve_ds_config_path
from runtime.errors import TrainingError

from .config import TrainConfig
from .optim import parameter_groups, schedule


def build_model(
    cfg: TrainConfig, model_config: Any, world: int, rank: int, device: str | None = None
) -> tuple[torch.nn.Module, Any, list[str]]:
    """(model, expert-parallel group or None, MoE layer names for the logs). Every rank builds the same initial
    weights (same seed); expert parallelism then keeps each rank's share of the experts.

    With `device`, every tensor is created and initialised there (torch's default-device context): no fp32 copy of
    the whole model in host memory first, which for a 1B ParameterNet is 9.4 GB and ~40 s of CPU init. Not the meta
    device + `to_empty`: that leaves buffers the init functions do not know (the MoE layers' `router_loss_scale`)
    uninitialised."""
    from llm.model import build_model as build

    torch.manual_seed(cfg.seed)
    if device is None:
        model = build(model_config, attn_implementation=cfg.attn_implementation)
    else:
        with torch.device(device):
            model = build(model_config, attn_implementation=cfg.attn_implementation)
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable()
    model.config.use_cache = False
    ep_group = None
    if cfg.expert_parallel_size > 1:
        from llm.parallel import setup_expert_parallel

        try:
            ep_group = setup_expert_parallel(model, cfg.expert_parallel_size, world)
        except ValueError as err:
            raise TrainingError(str(err)) from err
        layer = next(m for _, m in model.moe_layers())
        lo = layer.dispatcher.first_expert
        print(
            f"expert parallel: rank {rank} holds experts {lo}..{lo + layer.dispatcher.num_local_experts - 1} of "
            f"{layer.num_experts} in every MoE layer",
            file=sys.stderr,
        )
    moe_names = [
        name.removeprefix("model.").replace(".mlp", "") for name, _ in getattr(model, "moe_layers", lambda: [])()
    ]
    return model, ep_group, moe_names


def ds_config(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """ds_configs/<ds_config or zero<stage>>.json completed from the training config."""
    ds_path = resolve_ds_config_path(cfg.ds_config or f"zero{cfg.zero_stage}")
    file_stage = json.loads(ds_path.read_text()).get("zero_optimization", {}).get("stage", 0)
    if cfg.ds_config is not None and file_stage != cfg.zero_stage:
        raise TrainingError(
            f"ds_config {ds_path} has ZeRO stage {file_stage} but zero_stage={cfg.zero_stage}; "
            f"make them agree (or drop --ds_config to use ds_configs/zero{cfg.zero_stage}.json)"
        )
    return complete_ds_config(
        ds_path,
        micro_batch_size=cfg.micro_batch_size,
        global_batch_size=cfg.global_batch_size,
        data_parallel_size=world,
        precision=cfg.precision,
        gradient_clipping=cfg.grad_clip,
        optimizer=adamw_block(cfg.lr, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, cfg.weight_decay),
    )


def build_engine(cfg: TrainConfig, model: torch.nn.Module, ep_group: Any, world: int) -> tuple[Any, Any, Any]:
    """(engine, optimizer, LR scheduler): DeepSpeed around the model, AdamW with weight decay on matrices only, the
    LR schedule of optim.schedule as a LambdaLR."""
    import deepspeed

    groups = parameter_groups(model, cfg.weight_decay)
    if ep_group is not None:
        from llm.parallel import split_optimizer_groups

        groups = split_optimizer_groups(groups)

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=groups, config=ds_config(cfg, world), lr_scheduler=schedule(cfg).scheduler
    )
    if cfg.compile:
        engine.compile()
    return engine, optimizer, scheduler
