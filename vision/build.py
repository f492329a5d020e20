"""What a vision run is built from, settled before the engine starts: the data and its order, the model (and the
previous stage's weights), the optimizer groups, the DeepSpeed config, Mixup and the loss, and the seeds.

`prepare` refuses bad input (missing data, a checkpoint of another kind of run, weights that do not fit) before any
process group exists or anything is written.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

import vision  # noqa: F401  (registers the ParameterNet models in timm)
from runtime.ds_config import adamw_block, complete_ds_config, gradient_accumulation_steps
from runtime.resume import check_resume_settings, refuse_to_start_over, resume_differences
from runtime.rundir import CHECKPOINTS
from runtime.schedule import Schedule
from vision.config import RESUME_POLICY, TrainConfig, ds_config_name, to_dict, validate
from vision.data import (
    EvalBatchSampler,
    SeededTransformDataset,
    Splits,
    build_datasets,
    build_transforms,
    make_loader,
    resolve_mean_std,
    subset_indices,
)
from vision.summary import count_macs
from vision.weights import load_init_weights, resolve_init_weights

# --- seeds ---------------------------------------------------------------------------------------------------------


def derived_seed(*parts: int) -> int:
    """A seed that is a pure function of `parts` (e.g. seed, epoch, step, micro-step, rank)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- model, optimizer, engine, loss --------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    kwargs: dict[str, Any] = dict(
        num_classes=num_classes, in_chans=cfg.in_chans, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate
    )
    if cfg.num_experts is not None:
        kwargs["num_experts"] = cfg.num_experts
    return timm.create_model(cfg.model, **kwargs)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """timm's weight-decay / layer-decay groups, with each group's LR made explicit for the schedule.

    runtime.schedule scales every group's initial LR by the same factor, so `lr * lr_scale` per group gives
    layer-wise decay under warmup + cosine (the floor scales too).
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    no_decay = getattr(model, "no_weight_decay", lambda: set())()
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(model, cfg.weight_decay, no_decay, layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_decay)
    for group in groups:
        group["lr"] = cfg.lr * group.get("lr_scale", 1.0)
    return groups


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
    """Linear warmup over warmup_epochs, then cosine to min_lr at the end of the configured epochs (train_iters stops
    early, on this schedule)."""
    return Schedule(
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        warmup_iters=int(round(cfg.warmup_epochs * steps_per_epoch)),
        decay_iters=max(1, cfg.epochs * steps_per_epoch),
    )


def ds_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config, completed from the training config: batches, precision, AdamW (the LR schedule is
    `lr_schedule`'s, given to deepspeed.initialize)."""
    config = complete_ds_config(
        ds_config_name(cfg),
        micro_batch_size=cfg.micro_batch_size,
        global_batch_size=cfg.global_batch_size,
        data_parallel_size=world_size,
        precision=cfg.precision,
        gradient_clipping=cfg.grad_clip,
        zero_stage=cfg.zero_stage,
        optimizer=adamw_block(cfg.lr, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, cfg.weight_decay),
    )
    if cfg.precision == "bf16":
        # DeepSpeed casts parameters only; BatchNorm then sees bf16 weights beside fp32 running statistics, which
        # batch_norm refuses. Cast the buffers too.
        config.setdefault("data_types", {}).setdefault("buffer_dtype", "bf16")
    return config


def build_mixup(cfg: TrainConfig, num_classes: int) -> Any:
    """timm's Mixup/CutMix (None when both are off); it folds label smoothing into its soft targets."""
    from timm.data import Mixup

    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )


def loss_fn(cfg: TrainConfig, mixing: bool) -> torch.nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixing:
        return SoftTargetCrossEntropy()  # Mixup already folds label smoothing into the soft targets
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return torch.nn.CrossEntropyLoss()


# --- everything that can be refused, before any process group ------------------------------------------------------


@dataclass
class Prepared:
    splits: Splits
    num_classes: int
    train_indices: np.ndarray
    val_indices: np.ndarray
    steps_per_epoch: int
    model: torch.nn.Module
    macs: int
    reinit: list[str]  # the tensors that init_from left freshly initialised (the classifier)


def settings_check(cfg: TrainConfig, world_size: int):
    """runtime.checkpoint's check of a checkpoint's saved settings against this run's, under vision's RESUME_POLICY."""
    config = to_dict(cfg)
    return lambda directory, manifest: resume_differences(directory, manifest, config, world_size, RESUME_POLICY)


def prepare(cfg: TrainConfig, world: int) -> Prepared:
    """Check and build what the run needs, for `world` ranks; refuses with ValueError, FileNotFoundError or
    TrainingError (a checkpoint of another kind of run)."""
    validate(cfg)
    root = Path(cfg.output_dir) / CHECKPOINTS
    refuse_to_start_over(root, cfg.resume, cfg.output_dir)
    check_resume_settings(root, cfg.resume, settings_check(cfg, world))
    splits = build_datasets(cfg)
    num_classes = cfg.num_classes or splits.num_classes
    if num_classes < splits.num_classes:
        raise ValueError(
            f"num_classes={num_classes} but the training set has {splits.num_classes} classes; raise num_classes "
            f"or set it to none"
        )
    train_indices = subset_indices(len(splits.train), cfg.train_subset, cfg.seed)  # type: ignore[arg-type]
    val_indices = subset_indices(len(splits.val), cfg.val_subset, cfg.seed + 1)  # type: ignore[arg-type]
    gradient_accumulation_steps(cfg.global_batch_size, cfg.micro_batch_size, world)
    steps_per_epoch = len(train_indices) // cfg.global_batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"global_batch_size={cfg.global_batch_size} is larger than the training set ({len(train_indices)} "
            f"images, train_subset={cfg.train_subset}); lower the batch or use more data"
        )
    init_path = resolve_init_weights(cfg.init_from, cfg.init_from_ema) if cfg.init_from else None
    seed_all(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, num_classes)
    macs = count_macs(model, cfg.img_size, cfg.in_chans)
    reinit = load_init_weights(model, init_path, cfg.keep_classifier) if init_path is not None else []
    return Prepared(splits, num_classes, train_indices, val_indices, steps_per_epoch, model, macs, reinit)


def build_inputs(
    cfg: TrainConfig, prep: Prepared, pretrained_cfg: dict[str, Any], world: int, rank: int
) -> tuple[Any, Any]:
    """(the training dataset, this rank's validation loader): the model's normalisation and timm's transforms."""
    mean, std = resolve_mean_std(cfg, pretrained_cfg)
    train_tf, val_tf = build_transforms(cfg, mean, std)
    img_mode = "L" if cfg.in_chans == 1 else "RGB"
    train_ds = SeededTransformDataset(prep.splits.train, train_tf, img_mode, cfg.skip_bad_images)
    val_ds = SeededTransformDataset(prep.splits.val, val_tf, img_mode, cfg.skip_bad_images)
    val_sampler = EvalBatchSampler(prep.val_indices, cfg.micro_batch_size * 2, world, rank)
    return train_ds, make_loader(val_ds, val_sampler, cfg.num_workers)
