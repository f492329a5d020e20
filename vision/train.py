"""Image-classification training of ParameterNet (or any timm model) on the DeepSpeed engine.

    python -m vision.train --config fashion_mnist_tiny                       # one process
    deepspeed --num_gpus 2 --module vision.train --config fashion_mnist_tiny # N ranks (CPU ranks without a GPU)
    bash launch/train_vision.sh                                              # the laptop demo, both twins

Every field of vision.config.TrainConfig is a `--key value` flag (`--help` lists them); the presets in vision/configs/
mirror them. Two-stage flow: pretrain with one label set (`parameternet_600m_in22k`), then fine-tune from that run's
`model.safetensors` with a new classifier and layer-wise LR decay (`parameternet_600m_in1k_ft`, `--init_from RUN`).

The run directory follows runtime.rundir: config.yaml, metrics.jsonl (train and valid records keyed by "iteration"),
checkpoints/iter_NNNNNNN (runtime.checkpoint), summary.json at the end, and model.safetensors (+ model_ema.safetensors)
for the next stage. A killed run continues exactly where its last checkpoint left off: sample order and augmentation
are functions of (seed, epoch, position) (vision/data.py), and every micro-step reseeds the RNGs that Mixup/CutMix and
dropout use from (seed, epoch, step, micro-step, rank). SIGTERM or SIGUSR1 (a scheduler's preemption, `timeout`, the
launch script's stop) finishes the step, saves a checkpoint and exits 0; the same command resumes.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from runtime import collectives
from runtime.checkpoint import save_checkpoint, tag_for
from runtime.dist import PreemptionFlag, init_distributed, launcher_world_size, set_cpu_threads
from runtime.ds_config import gradient_accumulation_steps
from runtime.errors import TrainingError, trainer_main
from runtime.metrics import MetricsLogger, wandb_settings
from runtime.resume import resume_from
from runtime.rundir import CHECKPOINTS, claim_and_set_up, write_config, write_summary
from runtime.schedule import apply_schedule
from vision.build import (
    Prepared,
    build_inputs,
    build_mixup,
    derived_seed,
    ds_config,
    loss_fn,
    lr_schedule,
    param_groups,
    prepare,
    seed_all,
    settings_check,
)
from vision.config import ENGINE, TrainConfig, load_config, to_dict
from vision.data import (
    TrainBatchSampler,
    make_loader,
)
from vision.evaluate import evaluate, sync_batchnorm
from vision.records import describe, run_summary
from vision.weights import EMA_WEIGHTS, WEIGHTS, save_weights

PROG = "vision.train"


def say(text: str) -> None:
    print(f"{PROG}: {text}", flush=True)


@dataclass
class Position:
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already done in `epoch`
    iteration: int = 0  # optimizer steps done in all


class Trainer:
    """One training run on the DeepSpeed engine: set-up and resume, the step loop, evaluation, checkpoints."""

    def __init__(self, cfg: TrainConfig, prep: Prepared) -> None:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.cfg, self.prep = cfg, prep
        self.out_dir = Path(cfg.output_dir)
        self.ckpt_root = self.out_dir / CHECKPOINTS
        init_distributed()
        set_cpu_threads()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        # One run per output_dir, held by rank 0 until the run ends (runtime.rundir): a second one is refused here.
        self.claim = claim_and_set_up(self.out_dir, self._set_up)

    def _set_up(self) -> None:
        import deepspeed

        cfg, prep = self.cfg, self.prep
        self.grad_accum = gradient_accumulation_steps(cfg.global_batch_size, cfg.micro_batch_size, self.world)
        self.schedule = lr_schedule(cfg, prep.steps_per_epoch)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=prep.model,
            model_parameters=param_groups(prep.model, cfg),
            config=ds_config(cfg, self.world),
            lr_scheduler=self.schedule.scheduler,
        )
        self.device = self.engine.device
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.engine.module, decay=cfg.ema_decay, device=self.device, dtype=torch.float32)
        self.preemption = PreemptionFlag()
        self.stopped = False
        self.pos = Position()
        self.saved_iteration = -1
        self.skipped_before = 0
        self._resume()
        # Records past the iteration this run starts from belong to a dead run's replayed steps: dropped.
        # A run resumed at its last iteration evaluates it again (fit): that validation record goes too.
        at_end = self.pos.iteration >= (cfg.train_iters or cfg.epochs * prep.steps_per_epoch)
        self.metrics = MetricsLogger(
            self.out_dir,
            self.is_main,
            self.pos.iteration,
            cfg.tensorboard,
            at_end,
            wandb=wandb_settings(cfg),
            config=to_dict(cfg),
        )
        if self.is_main:
            write_config(self.out_dir, to_dict(cfg))

        self.train_ds, self.val_loader = build_inputs(
            cfg, prep, self.engine.module.pretrained_cfg, self.world, self.rank
        )
        self.mixup = build_mixup(cfg, prep.num_classes)
        self.criterion = loss_fn(cfg, self.mixup is not None)
        self.last_loss = float("nan")
        self.last_eval: dict[str, Any] | None = None

    def _resume(self) -> None:
        loaded = resume_from(self.engine, self.ckpt_root, self.cfg.resume, settings_check(self.cfg, self.world))
        if loaded is None:
            return
        iteration, state, changes = loaded
        apply_schedule(self.scheduler, self.optimizer)
        self.pos = Position(**state["position"])
        self.saved_iteration = iteration
        self.skipped_before = int(state.get("skipped_images", 0))  # every rank's, when it saved
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        if self.is_main:
            where = self.ckpt_root / tag_for(iteration) if self.cfg.resume == "auto" else Path(self.cfg.resume)
            for line in changes:
                say(line)
            say(f"resumed from {where} (epoch {self.pos.epoch}, iteration {iteration})")

    def skipped_images(self) -> int:
        """Unreadable images skipped by every rank (--skip_bad_images), this run and those it resumed (a collective:
        every rank calls it)."""
        mine = self.train_ds.skipped.value + self.val_loader.dataset.skipped.value
        return self.skipped_before + int(collectives.all_reduce_values([mine])[0])

    def _modules(self) -> list[torch.nn.Module]:
        return [self.engine.module] + ([self.ema.module] if self.ema is not None else [])

    def checkpoint(self) -> None:
        if self.saved_iteration == self.pos.iteration:
            return
        self.saved_iteration = self.pos.iteration
        sync_batchnorm(self._modules(), self.world)
        client_state = {
            "position": asdict(self.pos),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "skipped_images": self.skipped_images(),
        }
        position = {"epoch": self.pos.epoch, "step_in_epoch": self.pos.step_in_epoch}
        save_checkpoint(
            self.engine,
            self.ckpt_root,
            self.pos.iteration,
            client_state,
            self.cfg.keep_last,
            to_dict(self.cfg),
            manifest_extra=position,
            run_token=self.claim.token,
        )

    def evaluate(self) -> dict[str, Any]:
        sync_batchnorm(self._modules(), self.world)
        record: dict[str, Any] = {"kind": "valid", "iteration": self.pos.iteration, "epoch": self.pos.epoch}
        record.update(evaluate(self.engine.module, self.val_loader, self.device, self.dtype))
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.val_loader, self.device, torch.float32)
            record.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
        self.metrics.log(record)
        if self.is_main:
            ema_text = f", EMA top-1 {record['ema_top1']:.2f}" if self.ema is not None else ""
            say(
                f"epoch {self.pos.epoch} iteration {self.pos.iteration}: val top-1 {record['top1']:.2f} top-5 "
                f"{record['top5']:.2f} loss {record['val_loss']:.4f}{ema_text}"
            )
        self.last_eval = record
        return record

    def step(self, batches: Any) -> tuple[float, bool]:
        """One optimizer step (grad_accum micro-batches); returns the loss averaged over the global batch and whether
        any rank was asked to stop.

        One collective and one host sync per step: the loss is summed on the device across micro-batches and goes,
        with this rank's stop flag, into one all-reduce whose values the host reads once (the finiteness check
        needs the loss on the host)."""
        cfg, pos = self.cfg, self.pos
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, stop votes
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
            sums[0] += loss.detach().double()
        sums[1].fill_(1.0 if self.preemption.raised else 0.0)  # a fill on the device, not a copy from the host
        loss_sum, stop_votes = collectives.all_reduce(sums).tolist()
        loss_value = loss_sum / (self.grad_accum * self.world)
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"loss is {loss_value} at epoch {pos.epoch} iteration {pos.iteration + 1}; lower --lr (now {cfg.lr}) "
                f"or use --precision fp32, in a new --output_dir or from the last checkpoint (--resume auto)"
            )
        pos.step_in_epoch += 1
        pos.iteration += 1
        if self.ema is not None:
            self.ema.update(self.engine.module, step=pos.iteration)
        return loss_value, stop_votes > 0

    def train_epoch(self, last_iteration: int) -> None:
        """From the current position to the end of the epoch, `last_iteration` or a stop signal; evaluates and
        saves at the epoch end, saves every save_interval steps and on a stop signal."""
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
            dynamic_ncols=True,
            disable=not (self.is_main and cfg.progress_bar),
            mininterval=1.0,
        )
        window_start, window_images = time.time(), 0
        while pos.step_in_epoch < steps and pos.iteration < last_iteration:
            self.last_loss, stop = self.step(batches)
            window_images += cfg.global_batch_size
            bar.update(1)
            bar.set_postfix(loss=f"{self.last_loss:.4f}", refresh=False)
            if pos.iteration % cfg.log_interval == 0:
                rate = window_images / max(time.time() - window_start, 1e-9)
                self.metrics.log(
                    {
                        "kind": "train",
                        "iteration": pos.iteration,
                        "epoch": pos.epoch,
                        "loss": self.last_loss,
                        "lr": self.schedule.lr_at(pos.iteration - 1),  # the LR this step used (lr_scale 1)
                        "images_per_s": rate,
                    }
                )
                window_start, window_images = time.time(), 0
            epoch_end = pos.step_in_epoch == steps
            if epoch_end:
                pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
                if pos.epoch % cfg.eval_interval_epochs == 0 or pos.epoch == cfg.epochs:
                    self.evaluate()
                self.checkpoint()
            elif stop or (cfg.save_interval and pos.iteration % cfg.save_interval == 0):
                self.checkpoint()
            if stop:  # a signal on any rank, gathered by the step's all-reduce
                self.stopped = True
                if self.is_main:
                    say(
                        f"stop signal: checkpoint of iteration {pos.iteration} saved; exiting (the same command "
                        f"resumes)"
                    )
            if stop or epoch_end:
                break  # the next epoch has another sample order: a new sampler
        bar.close()

    def fit(self) -> dict[str, Any]:
        cfg, pos = self.cfg, self.pos
        if self.is_main:
            say(describe(cfg, self.prep, self.engine.module, self.world, self.device, self.grad_accum))
        start_time = time.time()
        last_iteration = cfg.train_iters or cfg.epochs * self.prep.steps_per_epoch
        self.engine.train()
        while not self.stopped and pos.epoch < cfg.epochs and pos.iteration < last_iteration:
            self.train_epoch(last_iteration)
        if self.stopped:
            return {"preempted": True, "iteration": pos.iteration}
        self.checkpoint()  # no-op unless train_iters stopped the run between checkpoints
        if self.last_eval is None or self.last_eval["iteration"] != pos.iteration:
            self.evaluate()
        assert self.last_eval is not None
        return self._finish(self.last_eval, time.time() - start_time)

    def _finish(self, last_eval: dict[str, Any], seconds: float) -> dict[str, Any]:
        cfg, module = self.cfg, self.engine.module
        summary = run_summary(
            cfg, self.prep, module, self.pos.iteration, last_eval, self.last_loss, seconds, self.world
        )
        summary["skipped_images"] = self.skipped_images()
        if self.is_main:
            meta = {"model": cfg.model, "num_classes": str(self.prep.num_classes), "in_chans": str(cfg.in_chans)}
            save_weights(module.state_dict(), self.out_dir / WEIGHTS, meta)
            if self.ema is not None:
                save_weights(self.ema.module.state_dict(), self.out_dir / EMA_WEIGHTS, meta)
            write_summary(self.out_dir, summary)
            say(f"done: {summary}")
        dist.barrier()
        return summary


def run(cfg: TrainConfig, prep: Prepared) -> dict[str, Any]:
    trainer = Trainer(cfg, prep)
    try:
        return trainer.fit()
    finally:
        trainer.metrics.close()
        trainer.claim.release()


def train(cfg: TrainConfig) -> dict[str, Any]:
    return run(cfg, prepare(cfg, launcher_world_size()))


def main(argv: list[str] | None = None) -> int:
    return trainer_main(ENGINE, load_config, __doc__ or "", train, argv)


if __name__ == "__main__":
    sys.exit(main())
