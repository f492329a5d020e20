"""Complete a DeepSpeed JSON from the top-level `ds_configs/` with the numbers that live in the training config.

The JSON files only say *how* to shard (ZeRO stage, buckets, offload). Batch sizes, precision, clipping, the optimizer
and the LR schedule come from the training config, so there is exactly one place to edit each number. A base file that
already sets one of those keys is refused rather than silently overridden.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

# The top-level ds_configs/ next to this package: in a checkout the repository root, in an install site-packages (the
# wheel ships it as package data of a namespace package, pyproject.toml), so one expression finds it in both.
DS_CONFIG_ROOT = Path(__file__).resolve().parents[1]
DS_CONFIG_DIR = DS_CONFIG_ROOT / "ds_configs"

# Keys owned by the training config; a ds_config that sets them would be a second source of truth.
OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
)

PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_ds_config_path(name_or_path: str) -> Path:
    """`zero2` -> ds_configs/zero2.json; an existing path is taken as is, and `ds_configs/zero2.json` is also found
    relative to the repository root (or site-packages) from any working directory."""
    path = Path(name_or_path)
    candidates = [path, DS_CONFIG_DIR / f"{name_or_path}.json"]
    if not path.is_absolute() and path.parts[:1] == (DS_CONFIG_DIR.name,):
        candidates.insert(1, DS_CONFIG_ROOT / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
    raise ValueError(f"ds_config: {name_or_path!r} is neither a file nor one of ds_configs/{{{','.join(known)}}}.json")


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, data_parallel_size: int) -> int:
    per_step = micro_batch_size * data_parallel_size
    if micro_batch_size < 1 or global_batch_size < 1:
        raise ValueError(
            f"global_batch_size={global_batch_size}, micro_batch_size={micro_batch_size}: both must be >= 1"
        )
    if global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by micro_batch_size x data-parallel ranks "
            f"= {micro_batch_size} x {data_parallel_size} = {per_step}; choose a global batch that is a multiple "
            f"of {per_step}"
        )
    return global_batch_size // per_step


def complete_ds_config(
    base: str | Path | dict[str, Any],
    *,
    micro_batch_size: int,
    global_batch_size: int,
    data_parallel_size: int,
    precision: str = "fp32",
    gradient_clipping: float = 1.0,
    optimizer: dict[str, Any] | None = None,
    zero_stage: int | None = None,
) -> dict[str, Any]:
    """Return a full DeepSpeed config dict.

    `optimizer` is DeepSpeed's own {"type": ..., "params": {...}} block, built by the trainer from its config (the LR
    schedule is runtime.schedule's, given to deepspeed.initialize); `zero_stage`, when given, overrides the file's
    stage (the training config's `zero_stage` field).
    """
    if isinstance(base, dict):
        cfg = copy.deepcopy(base)
        source = "<dict>"
    else:
        path = resolve_ds_config_path(str(base))
        source = str(path)
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"ds_config {source}: not valid JSON ({err})") from err
    clashes = [k for k in OWNED_KEYS if k in cfg]
    if clashes:
        raise ValueError(
            f"ds_config {source} sets {clashes}: these come from the training config (one source of truth); "
            f"remove them from the JSON and set them as training-config fields instead"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = gradient_accumulation_steps(
        global_batch_size, micro_batch_size, data_parallel_size
    )
    cfg["train_batch_size"] = global_batch_size
    cfg["gradient_clipping"] = float(gradient_clipping)
    cfg["bf16"] = {"enabled": precision == "bf16"}
    cfg["fp16"] = {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    if zero_stage is not None:
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={zero_stage} must be 0, 1, 2 or 3")
        cfg.setdefault("zero_optimization", {})["stage"] = zero_stage
    if optimizer is not None:
        cfg["optimizer"] = optimizer
    return cfg


def adamw_block(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> dict[str, Any]:
    """DeepSpeed's optimizer block for AdamW, the same for every trainer.

    torch_adam: torch.optim.AdamW instead of JIT-compiling DeepSpeed's fused Adam; its fused kernel (CPU and CUDA)
    updates ZeRO's flat fp32 partitions in one pass, without the temporaries of the per-tensor loop."""
    return {
        "type": "AdamW",
        "params": {
            "lr": lr,
            "betas": [beta1, beta2],
            "eps": eps,
            "weight_decay": weight_decay,
            "torch_adam": True,
            "fused": True,
        },
    }
