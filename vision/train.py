"""Image-classification training of ParameterNet (or any timm model) on the DeepSpeed engine.

    python -m vision.train --config fashion_mnist_tiny                       # one process
    deepspeed --num_gpus 2 --module vision.train --config fashion_mnist_tiny # N ranks (CPU ranks without a GPU)
    bash launch/train_vision.sh                                              # the laptop demo, both twins

Two-stage flow: pretrain with one label set (`parameternet_600m_in22k`), then fine-tune from that run's
`model.safetensors` with a new classifier and layer-wise LR decay (`parameternet_600m_in1k_ft`, `--init-from RUN`).

A killed run continues exactly where its last checkpoint left off: sample order and augmentation are functions of
(seed, epoch, position) (see vision/data.py), and every micro-step reseeds the RNGs that Mixup/CutMix and dropout use
from (seed, epoch, step, micro-step, rank).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

import vision  # noqa: F401  (registers the ParameterNet models in timm)
from runtime import collectives
from runtime.config import print_error
from runtime.shm import release_own_segment
from runtime.slurm import rank_env as slurm_rank_env
from vision.checkpoint import (
    EMA_WEIGHTS,
    WEIGHTS,
    latest_tag,
    load_init_weights,
    resolve_init_weights,
    save_checkpoint,
    save_weights,
    write_json_atomic,
    write_text_atomic,
)
from vision.config import ENGINE, TrainConfig, ds_config_name, load_config, to_dict, validate
from vision.summary import count_macs
from vision.data import (
    EvalBatchSampler,
    SeededTransformDataset,
    Splits,
    TrainBatchSampler,
    build_datasets,
    build_transforms,
    make_loader,
    resolve_mean_std,
    subset_indices,
)

# Fields whose change makes a checkpoint's position meaningless (different data order, schedule or network).
RESUME_MUST_MATCH = (
    "model",
    "num_experts",
    "num_classes",
    "in_chans",
    "img_size",
    "dataset",
    "train_subset",
    "epochs",
    "global_batch_size",
    "micro_batch_size",
    "seed",
    "precision",
    "ema",
)

log = logging.getLogger("vision.train")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_dist_env() -> None:
    """A plain `python -m vision.train` is a world of one; DeepSpeed otherwise tries MPI discovery. In an srun step
    with one task per rank the ranks come from SLURM's task ids."""
    os.environ.update(slurm_rank_env(os.environ))
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def set_cpu_threads() -> None:
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def derived_seed(*parts: int) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        "torch": torch.get_rng_state(),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in states["python"]))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])


class MetricsLog:
    """JSONL (always) and TensorBoard (optional) on rank 0."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            # Drop what a killed run logged after its last checkpoint: those steps are about to be redone.
            kept = [
                line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step
            ]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step else None
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            kind = record["kind"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{kind}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Position:
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already done in `epoch`
    global_step: int = 0


def build_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    kwargs: dict[str, Any] = dict(
        num_classes=num_classes, in_chans=cfg.in_chans, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate
    )
    if cfg.num_experts is not None:
        kwargs["num_experts"] = cfg.num_experts
    return timm.create_model(cfg.model, **kwargs)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """timm's weight-decay / layer-decay groups, with each group's LR made explicit for DeepSpeed's scheduler.

    DeepSpeed's WarmupCosineLR scales every group's initial LR by the same factor, so `lr * lr_scale` per group gives
    layer-wise decay under warmup + cosine.
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


def ds_config(cfg: TrainConfig, world_size: int, steps_per_epoch: int) -> dict[str, Any]:
    from runtime.ds_config import complete_ds_config

    total_steps = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    config = complete_ds_config(
        ds_config_name(cfg),
        micro_batch_size=cfg.micro_batch_size,
        global_batch_size=cfg.global_batch_size,
        data_parallel_size=world_size,
        precision=cfg.precision,
        gradient_clipping=cfg.grad_clip,
        zero_stage=cfg.zero_stage,
        optimizer={
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": [cfg.adam_beta1, cfg.adam_beta2],
                "eps": cfg.adam_eps,
                "weight_decay": cfg.weight_decay,
                # torch's AdamW (no fused_adam JIT build on CPU machines), with its fused kernel on CPU and CUDA.
                "torch_adam": True,
                "fused": True,
            },
        },
        scheduler={
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_num_steps": max(1, warmup),
                "warmup_min_ratio": 0.0,
                "warmup_type": "linear",
                "cos_min_ratio": cfg.min_lr / cfg.lr,  # per group: layer decay scales the floor too
            },
        },
    )
    if cfg.precision == "bf16":
        # DeepSpeed casts parameters only; BatchNorm then sees bf16 weights beside fp32 running statistics, which
        # batch_norm refuses. Cast the buffers too.
        config.setdefault("data_types", {}).setdefault("buffer_dtype", "bf16")
    return config


def loss_fn(cfg: TrainConfig, mixing: bool) -> torch.nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixing:
        return SoftTargetCrossEntropy()  # Mixup already folds label smoothing into the soft targets
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return torch.nn.CrossEntropyLoss()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Top-1 / top-5 and loss over the whole validation split, summed exactly over ranks."""
    was_training = model.training
    model.eval()
    # Summed on the device (no host sync per batch), reduced once, read once. float64: the counts stay exact.
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, targets in loader:
        logits = model(images.to(device=device, dtype=dtype, non_blocking=True)).float()
        targets = targets.to(device, non_blocking=True)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        totals[0] += hits[:, 0].sum()
        totals[1] += hits.any(dim=1).sum()
        totals[2] += F.cross_entropy(logits, targets, reduction="sum").double()
        totals[3] += targets.numel()
    correct1, correct5, loss_sum, count = collectives.all_reduce(totals).tolist()
    model.train(was_training)
    n = max(1.0, count)
    return {
        "top1": 100.0 * correct1 / n,
        "top5": 100.0 * correct5 / n,
        "loss": loss_sum / n,
        "count": int(count),
    }


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    for name in RESUME_MUST_MATCH:
        if name in saved and saved[name] != getattr(cfg, name):
            raise ValueError(
                f"cannot resume from {where}: {name}={getattr(cfg, name)!r} but the checkpoint was trained with "
                f"{name}={saved[name]!r}; use the same value, a new --output_dir, or --resume none to start over"
            )


@dataclass
class Prepared:
    """Everything that can be refused as bad input, settled before any process group exists."""

    splits: Splits
    num_classes: int
    train_indices: np.ndarray
    val_indices: np.ndarray
    steps_per_epoch: int
    model: torch.nn.Module
    macs: int
    reinit: list[str]
    resume_from: Path | None  # the checkpoint directory to continue


def prepare(cfg: TrainConfig) -> Prepared:
    from runtime.ds_config import gradient_accumulation_steps

    validate(cfg)
    splits = build_datasets(cfg)
    num_classes = cfg.num_classes or splits.num_classes
    if num_classes < splits.num_classes:
        raise ValueError(
            f"num_classes={num_classes} but the training set has {splits.num_classes} classes; raise num_classes "
            f"or set it to null"
        )
    train_indices = subset_indices(len(splits.train), cfg.train_subset, cfg.seed)  # type: ignore[arg-type]
    val_indices = subset_indices(len(splits.val), cfg.val_subset, cfg.seed + 1)  # type: ignore[arg-type]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gradient_accumulation_steps(cfg.global_batch_size, cfg.micro_batch_size, world)
    steps_per_epoch = len(train_indices) // cfg.global_batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"global_batch_size={cfg.global_batch_size} is larger than the training set ({len(train_indices)} "
            f"images, train_subset={cfg.train_subset}); lower the batch or use more data"
        )
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    resume_from = None
    if cfg.resume == "auto":
        tag = latest_tag(ckpt_dir)
        resume_from = ckpt_dir / tag if tag is not None else None
    elif cfg.resume != "none":
        resume_from = Path(cfg.resume)
    if resume_from is not None:
        saved = yaml.safe_load((resume_from / "config.yaml").read_text())
        check_resume_config(saved, cfg, resume_from)
    init_path = resolve_init_weights(cfg.init_from, cfg.init_from_ema) if cfg.init_from else None
    seed_all(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, num_classes)
    macs = count_macs(model, cfg.img_size, cfg.in_chans)
    reinit = load_init_weights(model, init_path, cfg.keep_classifier) if init_path is not None else []
    return Prepared(
        splits, num_classes, train_indices, val_indices, steps_per_epoch, model, macs, reinit, resume_from
    )


def train(cfg: TrainConfig) -> dict[str, Any]:
    return run(cfg, prepare(cfg))


def run(cfg: TrainConfig, prep: Prepared) -> dict[str, Any]:
    ensure_dist_env()
    set_cpu_threads()
    trainer = Trainer(cfg, prep)
    try:
        return trainer.fit()
    finally:
        trainer.metrics.close()


class Trainer:
    """One training run on the DeepSpeed engine: set-up and resume, the step loop, evaluation, checkpoints."""

    def __init__(self, cfg: TrainConfig, prep: Prepared) -> None:
        import deepspeed
        from timm.data import Mixup

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.cfg, self.prep = cfg, prep
        self.out_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"

        deepspeed.init_distributed()
        release_own_segment()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.grad_accum = cfg.global_batch_size // (cfg.micro_batch_size * self.world)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=prep.model,
            model_parameters=param_groups(prep.model, cfg),
            config=ds_config(cfg, self.world, prep.steps_per_epoch),
        )
        self.device = self.engine.device
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.engine.module, decay=cfg.ema_decay, device=self.device, dtype=torch.float32)

        self.pos = Position()
        self.saved_step = -1
        if prep.resume_from is not None:
            self._resume(prep.resume_from)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.metrics = MetricsLog(self.out_dir, self.is_main, cfg.tensorboard, self.pos.global_step)

        mean, std = resolve_mean_std(cfg, self.engine.module.pretrained_cfg)
        train_tf, val_tf = build_transforms(cfg, mean, std)
        img_mode = "L" if cfg.in_chans == 1 else "RGB"
        self.train_ds = SeededTransformDataset(prep.splits.train, train_tf, img_mode)
        val_ds = SeededTransformDataset(prep.splits.val, val_tf, img_mode)
        val_sampler = EvalBatchSampler(prep.val_indices, cfg.micro_batch_size * 2, self.world, self.rank)
        self.val_loader = make_loader(val_ds, val_sampler, cfg.num_workers)
        mixing = cfg.mixup > 0 or cfg.cutmix > 0
        self.mixup = (
            Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob,
                label_smoothing=cfg.label_smoothing,
                num_classes=prep.num_classes,
            )
            if mixing
            else None
        )
        self.criterion = loss_fn(cfg, mixing)
        self.last_loss = float("nan")
        self.last_eval: dict[str, Any] | None = None

    def _resume(self, where: Path) -> None:
        _, client = self.engine.load_checkpoint(str(where.parent), tag=where.name)
        if client is None:
            raise FileNotFoundError(f"{where}: DeepSpeed could not load this checkpoint")
        self.pos = Position(**client["position"])
        self.saved_step = self.pos.global_step
        if self.ema is not None:
            self.ema.module.load_state_dict(client["ema"])
        restore_rng_states(client["rng"])
        if self.is_main:
            print(f"vision.train: resumed from {where} (epoch {self.pos.epoch}, step {self.saved_step})", flush=True)

    def _describe(self) -> str:
        cfg, prep = self.cfg, self.prep
        n_params = sum(p.numel() for p in self.engine.module.parameters())
        reinit = f", re-initialised {', '.join(prep.reinit)}" if prep.reinit else ""
        return (
            f"vision.train: {cfg.model} ({n_params / 1e6:.2f}M params, {prep.num_classes} classes{reinit}) on "
            f"{self.world} rank(s), {self.device}, {cfg.precision}, ZeRO-{cfg.zero_stage}; "
            f"{len(prep.train_indices)} train / {len(prep.val_indices)} val images, {prep.steps_per_epoch} steps/epoch "
            f"x {cfg.epochs} epochs, global batch {cfg.global_batch_size} = {cfg.micro_batch_size} x {self.world} x "
            f"{self.grad_accum}"
        )

    def sync_batchnorm(self) -> None:
        # Each rank's BatchNorm running statistics come from its own batches (no SyncBN on gloo). Averaging them
        # before evaluation and checkpoints makes every rank evaluate the same network and lets the rank-0
        # checkpoint restore every rank exactly.
        from timm.utils import distribute_bn

        if self.world > 1:
            distribute_bn(self.engine.module, self.world, reduce=True)
            if self.ema is not None:
                distribute_bn(self.ema.module, self.world, reduce=True)

    def checkpoint(self) -> None:
        if self.saved_step == self.pos.global_step:
            return
        self.saved_step = self.pos.global_step
        self.sync_batchnorm()
        client_state = {
            "position": vars(self.pos).copy(),
            "rng": rng_states(),
            "config": to_dict(self.cfg),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
        }
        extra = {"config.yaml": yaml.safe_dump(to_dict(self.cfg), sort_keys=False)}
        keep = self.cfg.keep_last
        save_checkpoint(self.engine, self.ckpt_dir, self.pos.global_step, client_state, keep, extra)

    def evaluate(self) -> dict[str, Any]:
        self.sync_batchnorm()
        record: dict[str, Any] = {"kind": "eval", "step": self.pos.global_step, "epoch": self.pos.epoch}
        record.update(evaluate(self.engine.module, self.val_loader, self.device, self.dtype))
        if self.ema is not None:
            ema_result = evaluate(self.ema.module, self.val_loader, self.device, torch.float32)
            record.update({f"ema_{k}": v for k, v in ema_result.items() if k != "count"})
        self.metrics.write(record)
        if self.is_main:
            ema_text = f", EMA top-1 {record['ema_top1']:.2f}" if self.ema is not None else ""
            print(
                f"vision.train: epoch {self.pos.epoch} step {self.pos.global_step}: val top-1 {record['top1']:.2f} "
                f"top-5 {record['top5']:.2f} loss {record['loss']:.4f}{ema_text}",
                flush=True,
            )
        self.last_eval = record
        return record

    def step(self, batches: Any) -> float:
        """One optimizer step (grad_accum micro-batches); returns the loss averaged over the global batch.

        One host sync per step: the loss is summed on the device across micro-batches, all-reduced once and read
        once (the finiteness check below needs it on the host)."""
        cfg, pos = self.cfg, self.pos
        step_loss = torch.zeros(1, dtype=torch.float64, device=self.device)
        for micro_step in range(self.grad_accum):
            images, targets = next(batches)
            # Mixup/CutMix draw from numpy, dropout and drop-path from torch: reseed from the position.
            seed_all(derived_seed(cfg.seed, pos.epoch, pos.step_in_epoch, micro_step, self.rank))
            # The loader pins memory on CUDA: these copies are queued, not waited for.
            images = images.to(device=self.device, non_blocking=True)
            targets = targets.to(device=self.device, non_blocking=True)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            logits = self.engine(images.to(dtype=self.dtype))
            loss = self.criterion(logits.float(), targets)
            self.engine.backward(loss)
            self.engine.step()
            step_loss += loss.detach().double()
        loss_value = collectives.all_reduce(step_loss).item() / (self.grad_accum * self.world)
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"loss is {loss_value} at epoch {pos.epoch} step {pos.global_step}; lower lr={cfg.lr} or use fp32"
            )
        pos.step_in_epoch += 1
        pos.global_step += 1
        if self.ema is not None:
            self.ema.update(self.engine.module, step=pos.global_step)
        return loss_value

    def train_epoch(self, max_steps: int) -> None:
        """From the current position to the end of the epoch (or max_steps); evaluates and saves at the epoch end."""
        from tqdm import tqdm

        cfg, pos, steps = self.cfg, self.pos, self.prep.steps_per_epoch
        sampler = TrainBatchSampler(
            self.prep.train_indices,
            seed=cfg.seed,
            epoch=pos.epoch,
            micro_batch_size=cfg.micro_batch_size,
            world_size=self.world,
            rank=self.rank,
            grad_accum=self.grad_accum,
            start_step=pos.step_in_epoch,
        )
        batches = iter(make_loader(self.train_ds, sampler, cfg.num_workers))
        bar = tqdm(
            total=steps,
            initial=pos.step_in_epoch,
            desc=f"epoch {pos.epoch}",
            disable=not (self.is_main and cfg.progress_bar),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        window_start, window_samples = time.time(), 0
        while pos.step_in_epoch < steps and pos.global_step < max_steps:
            self.last_loss = self.step(batches)
            window_samples += cfg.global_batch_size
            bar.update(1)
            bar.set_postfix(loss=f"{self.last_loss:.4f}", refresh=False)
            if pos.global_step % cfg.log_interval == 0:
                lr = max(self.scheduler.get_last_lr()) if self.scheduler is not None else cfg.lr
                rate = window_samples / max(time.time() - window_start, 1e-9)
                self.metrics.write(
                    {"kind": "train", "step": pos.global_step, "epoch": pos.epoch, "loss": self.last_loss, "lr": lr,
                     "images_per_s": rate}
                )  # fmt: skip
                window_start, window_samples = time.time(), 0
            if pos.step_in_epoch == steps:
                pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
                if pos.epoch % cfg.eval_interval_epochs == 0 or pos.epoch == cfg.epochs:
                    self.evaluate()
                self.checkpoint()
                break  # the next epoch has another sample order: a new sampler
            if cfg.save_interval and pos.global_step % cfg.save_interval == 0:
                self.checkpoint()
        bar.close()

    def fit(self) -> dict[str, Any]:
        cfg, pos = self.cfg, self.pos
        if self.is_main:
            print(self._describe(), flush=True)
        start_time = time.time()
        max_steps = cfg.train_iters or cfg.epochs * self.prep.steps_per_epoch
        self.engine.train()
        while pos.epoch < cfg.epochs and pos.global_step < max_steps:
            self.train_epoch(max_steps)
        self.checkpoint()  # no-op unless max_steps stopped the run between checkpoints
        if self.last_eval is None or self.last_eval["step"] != pos.global_step:
            self.evaluate()
        assert self.last_eval is not None
        return self._finish(self.last_eval, time.time() - start_time)

    def _finish(self, last_eval: dict[str, Any], seconds: float) -> dict[str, Any]:
        cfg, module = self.cfg, self.engine.module
        result = {
            "model": cfg.model,
            "num_experts": getattr(module, "num_experts", None),
            "params": sum(p.numel() for p in module.parameters()),
            "macs": self.prep.macs,
            "img_size": cfg.img_size,
            "num_classes": self.prep.num_classes,
            "epochs": self.pos.epoch,
            "global_step": self.pos.global_step,
            "train_loss": self.last_loss,
            "top1": last_eval["top1"],
            "top5": last_eval["top5"],
            "val_loss": last_eval["loss"],
            "val_images": last_eval["count"],
            "seconds": round(seconds, 1),
            "world_size": self.world,
        }
        if self.ema is not None:
            result.update(ema_top1=last_eval["ema_top1"], ema_top5=last_eval["ema_top5"])
        if self.is_main:
            meta = {"model": cfg.model, "num_classes": str(self.prep.num_classes), "in_chans": str(cfg.in_chans)}
            save_weights(module.state_dict(), self.out_dir / WEIGHTS, meta)
            if self.ema is not None:
                save_weights(self.ema.module.state_dict(), self.out_dir / EMA_WEIGHTS, meta)
            write_json_atomic(self.out_dir / "final_metrics.json", result)
            print("vision.train: " + json.dumps(result), flush=True)
        dist.barrier()
        return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, code = ENGINE.parse_command_line(argv, lambda path, pairs: load_config(path, cli_overrides=pairs),
                                          __doc__ or "")
    if cfg is None:
        return code
    try:
        prep = prepare(cfg)
    except (ValueError, FileNotFoundError) as err:
        # Bad input: a message, not a traceback. Failures once training runs keep their traceback.
        if os.environ.get("RANK", "0") == "0":
            print_error(str(err), prog="vision.train")  # one line in one write: ranks share the terminal
        return 2
    try:
        run(cfg, prep)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
