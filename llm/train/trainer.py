"""The pretraining loop on the DeepSpeed engine (Megatron-style: iterations of global batches, resumable exactly)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from runtime import collectives
from runtime.checkpoint import (
    complete_checkpoints,
    disk_full,
    engine_load,
    kept_checkpoint,
    save_checkpoint,
    tag_for,
)
from runtime.dist import PreemptionFlag, init_distributed
from runtime.ds_config import gradient_accumulation_steps
from runtime.errors import TrainingError
from runtime.metrics import MetricsLogger, memory_gib, peak_flops, wandb_settings
from runtime.nonfinite import NonFiniteGradGuard
from runtime.reshard import Topology, load_resharded, needs_reshard
from runtime.resume import (
    check_resume_settings,
    refuse_to_start_over,
    resume_differences,
    resume_from,
    saved_world_size,
)
from runtime.rundir import CHECKPOINTS, claim_and_set_up, write_config, write_summary
from runtime.schedule import apply_schedule

from .build import build_engine, build_model
from .config import RESUME_POLICY, TrainConfig
from .inputs import build_inputs, loader
from .optim import schedule
from .records import console_line, expert_load, run_summary
from .weights import WEIGHTS, full_state_dict, restore_expert_shards, save_full_weights, weights_finite


class Trainer:
    def __init__(self, cfg: TrainConfig, build_device: str | None = None) -> None:
        self.cfg = cfg
        self.build_device = build_device  # where the model is created (llm.train.build.build_model); None: the CPU
        init_distributed()
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_root = self.output_dir / CHECKPOINTS
        self.train_iters = cfg.resolved_train_iters()
        # One run per output_dir, held by rank 0 until the run ends; a second one is refused here.
        self.claim = claim_and_set_up(self.output_dir, self._set_up)

    def _set_up(self) -> None:
        cfg = self.cfg
        # Everything is checked before anything is written to output_dir: a refused run leaves it as it was.
        refuse_to_start_over(self.ckpt_root, cfg.resume, cfg.output_dir)
        check_resume_settings(self.ckpt_root, cfg.resume, self._settings_check)
        from llm.model import load_model_config

        self.model_config = load_model_config(cfg.model, **cfg.model_overrides)
        self.grad_accum = gradient_accumulation_steps(cfg.global_batch_size, cfg.micro_batch_size, self.world)
        self.inputs = build_inputs(cfg, self.model_config, self.train_iters, self.rank)
        self.tokenizer_dir = self.inputs.tokenizer_dir
        self.eos_id = self.inputs.tokenizer.eos_token_id
        if cfg.document_mask and self.eos_id is None:
            raise TrainingError(
                f"document_mask=True splits packed samples into documents at the EOS token, but tokenizer "
                f"{self.tokenizer_dir} has no eos_token; use a tokenizer with one (llm.data.tokenizer's has id 2) "
                f"or turn document_mask off"
            )
        from llm.model.flops import account

        self.model, self.ep_group, self.moe_names = build_model(
            cfg, self.model_config, self.world, self.rank, self.build_device
        )
        self.accounting = account(self.model_config, cfg.seq_len)
        self.zero_shot = None
        if (cfg.eval_tasks or "").strip():  # '' (say, `--eval_tasks "$TASKS"` with TASKS unset) means none
            from evals.live import LiveZeroShot  # lm-eval integration lives in evals/, imported only when asked

            try:  # the tasks and their documents, loaded once
                self.zero_shot = LiveZeroShot(cfg.eval_tasks, cfg.eval_limit, self.inputs.tokenizer)
            except ValueError as err:
                raise TrainingError(f"eval_tasks={cfg.eval_tasks!r}: {err}") from err
        self.engine, self.optimizer, self.scheduler = build_engine(cfg, self.model, self.ep_group, self.world)
        self.device = self.engine.device
        self.peak = peak_flops(torch.device(self.device), cfg.precision)
        self.grad_guard = NonFiniteGradGuard(self.engine.module.parameters(), torch.device(self.device))
        self.iteration = 0
        self.consumed_samples = 0
        self.preemption = PreemptionFlag()
        self._resume()
        # Records past the iteration this run starts from belong to a dead run's replayed steps: dropped.
        self.logger = MetricsLogger(
            self.output_dir,
            enabled=self.rank == 0,
            start_iteration=self.iteration,
            tensorboard=getattr(cfg, "tensorboard", True),
            reevaluated=self.iteration >= self.train_iters,  # resumed at the end: the final evaluation is redone
            wandb=wandb_settings(cfg),
            config=cfg.to_dict(),
        )
        if self.rank == 0:
            write_config(self.output_dir, cfg.to_dict())

    def _settings_check(self, directory: Path, manifest: dict[str, Any]) -> tuple[str | None, list[str]]:
        return resume_differences(directory, manifest, self.cfg.to_dict(), self.world, RESUME_POLICY, reshards=True)

    def _load_state(self, engine, directory: Path, manifest: dict[str, Any], load_optimizer: bool) -> dict[str, Any]:
        """The engine's own load on the saved topology; on another world size, expert-parallel size or ZeRO stage,
        runtime.reshard's (the settings check allowed only what it can do)."""
        saved = Topology.of(manifest.get("config") or {}, saved_world_size(manifest) or self.world)
        self.resharded = needs_reshard(saved, Topology.of(self.cfg.to_dict(), self.world))
        if not self.resharded:
            return engine_load(engine, directory, manifest, load_optimizer)
        from safetensors import safe_open

        from llm.model.moe import current_state_key
        from llm.parallel import expert_slices

        buffers = {name for name, _ in engine.module.named_buffers()}
        with safe_open(str(directory / WEIGHTS), framework="pt") as weights:
            # Under their current names: a checkpoint from before the router module names its bias differently.
            saved_buffers = {
                current_state_key(k): weights.get_tensor(k)
                for k in weights.keys()  # noqa: SIM118
                if current_state_key(k) in buffers
            }
        load_resharded(engine, directory, saved, expert_slices(engine.module), saved_buffers)
        return {"consumed_samples": manifest["consumed_samples"]}

    def _resume(self) -> None:
        self.resharded = False
        loaded = resume_from(self.engine, self.ckpt_root, self.cfg.resume, self._settings_check, self._load_state)
        if loaded is None:
            return
        self.iteration, state, changes = loaded
        if self.ep_group is not None and not self.resharded:
            restore_expert_shards(self.engine.module, self.ckpt_root / tag_for(self.iteration))
        self.consumed_samples = int(state["consumed_samples"])
        apply_schedule(self.scheduler, self.optimizer)
        if self.rank == 0:
            for line in changes:
                print(line)
            print(f"resumed from iteration {self.iteration} ({self.consumed_samples} samples consumed)")

    # ------------------------------------------------------------------------------------------------ steps
    def _batches(self):
        return iter(
            loader(
                self.inputs.train_ds,
                self.consumed_samples,
                self.cfg.micro_batch_size,
                self.rank,
                self.world,
                torch.device(self.device),
            )
        )

    def _document_inputs(self, cpu_batch: torch.Tensor, batch: torch.Tensor) -> dict[str, Any]:
        """--document_mask: the forward's attention inputs that keep each token in its document (llm.train.packing).
        The sdpa/eager mask is built on the device from the device batch (no copy of a [batch, seq, seq] mask, no
        sync); flash-attn's segment lengths from the CPU batch (their maximum is a host int)."""
        from .packing import attention_inputs

        cfg = self.cfg
        source = cpu_batch if cfg.attn_implementation == "flash_attention_2" else batch
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        kwargs = attention_inputs(source[:, :-1], self.eos_id, cfg.attn_implementation, dtype)
        kwargs = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        if hasattr(self.engine.module, "moe_layers"):  # ParameterNet: centred routers restart their mean too
            kwargs["document_mask"] = True
        return kwargs

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        cpu_batch = batch
        batch = batch.to(self.device, non_blocking=True)  # pinned on CUDA (inputs.loader); a no-op on CPU
        inputs, targets = batch[:, :-1], batch[:, 1:]
        extra = self._document_inputs(cpu_batch, batch) if self.cfg.document_mask else {}
        out = self.engine(input_ids=inputs, **extra)
        lm_loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), targets.reshape(-1))
        router = getattr(out, "router_loss", None)  # logged value; its gradient is in the graph (router.RouterLoss)
        if router is None:
            return lm_loss, lm_loss, out
        return self.engine.module.track_router_loss_scale(lm_loss + router.to(lm_loss.dtype)), lm_loss, out

    def train_step(self, batches) -> dict[str, Any]:
        """One global batch: grad_accum micro-batches through the engine, one optimizer step.

        After the update, the MoE layers' router biases (aux-loss-free load balancing) move by the step's expert
        counts, summed over all ranks by that same reduce.

        Host syncs: one per call. Losses, the non-finite count and the expert counts stay on the device across
        micro-batches; after the last backward they go, with the preemption flag, into ONE all-reduce of one small
        float64 vector whose values the host reads once (it needs the skip decision before `engine.step()`). The
        gradient norm stays as the engine left it (often a device tensor) until a log interval reads it.

        A micro-batch whose loss is non-finite on a rank contributes nothing from that rank: zero gradients
        (`NonFiniteGradGuard`) and no loss or routing statistics. If any micro-batch on any rank was non-finite, the
        update is skipped (LR 0 for this step; the scheduler sets the next step's LR as usual)."""
        ga = self.grad_accum
        device = torch.device(self.device)
        losses = torch.zeros(3, dtype=torch.float64, device=device)  # lm, aux, z: sums over finite micro-batches
        nonfinite = torch.zeros((), dtype=torch.float64, device=device)  # how many micro-batches were not finite
        counts: torch.Tensor | None = None
        dropped: torch.Tensor | None = None
        router: torch.Tensor | None = None  # per MoE layer: sums of the mean top-1 probability and entropy
        for micro in range(ga):
            total, lm_loss, out = self._forward(next(batches))
            bad = torch.isfinite(total.detach()).logical_not()
            nonfinite += bad
            parts = [lm_loss.detach()]
            if getattr(out, "aux_loss", None) is not None:
                parts += [out.aux_loss.detach(), out.z_loss.detach()]
                c = out.tokens_per_expert.detach().masked_fill(bad, 0)
                counts = c if counts is None else counts + c
                d = out.dropped_tokens.detach().masked_fill(bad, 0)
                dropped = d if dropped is None else dropped + d
                r = torch.stack([out.router_top1_prob, out.router_entropy]).detach().double().masked_fill(bad, 0.0)
                router = r if router is None else router + r
            # float64 sums in micro-batch order: the same numbers as adding Python floats of the fp32 losses.
            losses[: len(parts)] += torch.stack([p.double() for p in parts]).masked_fill(bad, 0.0)
            self.grad_guard.drop = bad
            self.engine.backward(total)
            if micro == ga - 1:
                reduced = self._reduce_step(losses, nonfinite, counts, dropped, router)
                if reduced["skipped"]:
                    for group in self.optimizer.param_groups:
                        group["lr"] = 0.0  # skip the update
            self.engine.step()
        if not reduced["skipped"] and reduced["counts"] is not None:
            # Aux-loss-free load balancing (router_bias_update_rate; a no-op without it): the step's loads, already
            # summed over every rank by the reduce above, so every rank moves its router biases alike; no collective,
            # no host sync: the reduced counts are still on the device (a host-to-device copy of the host's would be
            # one on CUDA).
            self.engine.module.update_router_bias(reduced["loads"])
        reduced["grad_norm"] = self.engine.get_global_grad_norm()  # read (a host sync if a tensor) at log time only
        return reduced

    def _reduce_step(
        self,
        losses: torch.Tensor,
        nonfinite: torch.Tensor,
        counts: torch.Tensor | None,
        dropped: torch.Tensor | None,
        router: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """The step's one collective and one host sync. Returns host values: mean losses over the global batch, the
        skip and stop decisions, and the expert counts/dropped tokens summed over ranks (None without MoE layers, or
        when no micro-batch anywhere was finite); `loads`: those counts still on the device (float64)."""
        ga, device = self.grad_accum, losses.device
        # torch.full launches a fill; torch.tensor([...], device=cuda) would copy from the host and wait for the queue.
        stop = torch.full((1,), 1.0 if self.preemption.raised else 0.0, dtype=torch.float64, device=device)
        pieces = [losses / ga, nonfinite.reshape(1), stop]
        if counts is not None:
            # Token counts are integers far below 2**53: exact in float64, so one vector carries everything.
            pieces += [counts.double().flatten(), dropped.double().flatten(), router.flatten()]
        reduced = collectives.all_reduce(torch.cat(pieces))
        values = reduced.tolist()
        n_nonfinite, stop_votes = values[3], values[4]
        # A skipped step has no loss: its sums leave out the non-finite micro-batches, so they would read as a
        # loss far too low (0.0 when none was finite).
        lm, aux, z = (None, None, None) if n_nonfinite > 0 else (v / self.world for v in values[:3])
        stats: dict[str, Any] = {
            "lm_loss": lm,
            "aux_loss": aux,
            "z_loss": z,
            "skipped": n_nonfinite > 0,
            "nonfinite_micro_batches": int(n_nonfinite),
            "stop": stop_votes > 0,
            "counts": None,
            "dropped": None,
            "loads": None,
        }
        if counts is not None and n_nonfinite < ga * self.world:
            n = counts.numel()
            stats["counts"] = torch.tensor(values[5 : 5 + n], dtype=torch.float64).long().view(counts.shape)
            stats["loads"] = reduced[5 : 5 + n].view(counts.shape)  # the same counts, on the device
            m = dropped.numel()
            stats["dropped"] = torch.tensor(values[5 + n : 5 + n + m], dtype=torch.float64).long().view(dropped.shape)
            # Means over the micro-batches of every rank (the record is logged only when none was skipped).
            stats["router"] = torch.tensor(values[5 + n + m :], dtype=torch.float64).view(router.shape) / (
                ga * self.world
            )
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean LM loss over the first eval_iters global batches of the validation split (the same every time)."""
        if self.inputs.valid_ds is None or self.cfg.eval_iters == 0:
            return {}
        self.engine.eval()
        batches = loader(
            self.inputs.valid_ds, 0, self.cfg.micro_batch_size, self.rank, self.world, torch.device(self.device)
        )
        loss_sum = torch.zeros((), dtype=torch.float64, device=torch.device(self.device))  # no host sync per batch
        n = 0
        for i, batch in enumerate(batches):
            if i >= self.cfg.eval_iters * self.grad_accum:
                break
            loss_sum += self._forward(batch)[1].double()
            n += 1
        self.engine.train()
        mean = (loss_sum / max(n, 1)).reshape(1)
        val_loss = collectives.all_reduce(mean).item() / self.world
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    # ---------------------------------------------------------------------------------------------- the loop
    def _refuse_nonfinite(self, what: str) -> None:
        """Stop rather than publish non-finite weights as a checkpoint or as hf/ (they would be resumed from or
        evaluated as if fine)."""
        good = complete_checkpoints(self.ckpt_root)
        newest = f"the newest checkpoint, {good[-1][1]}, is from before" if good else "no checkpoint was written"
        raise TrainingError(
            f"iteration {self.iteration}: {what}; neither a checkpoint nor hf/ is written from these weights "
            f"({newest}). Resume from an earlier checkpoint with --resume DIR, or check the data and lower --lr "
            f"in a new --output_dir"
        )

    def save(self) -> None:
        if not weights_finite(self.engine.module):
            self._refuse_nonfinite("the weights are not finite (NaN or inf)")
        client_state = {
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_samples * self.cfg.seq_len,
            "config": self.cfg.to_dict(),
            "model_config": self.model_config.to_dict(),
            "tokenizer_dir": self.tokenizer_dir,
        }
        manifest = {
            k: client_state[k] for k in ("consumed_samples", "consumed_tokens", "model_config", "tokenizer_dir")
        }
        save_checkpoint(
            self.engine,
            self.ckpt_root,
            self.iteration,
            client_state,
            self.cfg.keep_last,
            self.cfg.to_dict(),
            manifest,
            run_token=self.claim.token,
            extra=lambda directory: save_full_weights(self.engine.module, self.ep_group, self.rank, directory),
        )

    def _log_train(self, stats: dict[str, Any], elapsed: float, iters: int) -> dict[str, Any]:
        cfg = self.cfg
        tokens_per_s = iters * cfg.global_batch_size * cfg.seq_len / max(elapsed, 1e-9)
        record: dict[str, Any] = {
            "kind": "train",
            "iteration": self.iteration,
            "tokens": self.consumed_samples * cfg.seq_len,
            "lm_loss": stats["lm_loss"],
            "lr": schedule(cfg).lr_at(self.iteration - 1),  # the LR this step used
            "grad_norm": None if stats["grad_norm"] is None else float(stats["grad_norm"]),
            "tokens_per_s": tokens_per_s,
            "skipped": stats["skipped"],
        }
        if stats["skipped"]:
            record["nonfinite_micro_batches"] = stats["nonfinite_micro_batches"]
        if self.moe_names and not stats["skipped"] and stats["counts"] is not None:
            record.update(
                aux_loss=stats["aux_loss"],
                z_loss=stats["z_loss"],
                dropped_tokens=int(stats["dropped"].sum()),
                expert_counts=stats["counts"].tolist(),
            )
            record.update(expert_load(stats["counts"], self.moe_names, *stats["router"]))
        flops = self.accounting.train_flops_per_token * tokens_per_s / self.world
        if self.peak is not None:
            record["tflops_per_device"] = flops / 1e12
            record["mfu"] = flops / self.peak
        record.update(memory_gib(torch.device(self.device)))
        self.logger.log(record)
        return record

    def train(self) -> dict[str, Any]:
        """Train to train_iters (or a stop signal); the run directory's lock is released at the end, whatever it is."""
        try:
            return self._train()
        finally:
            self.logger.close()
            self.claim.release()

    def _train(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        batches = self._batches()
        bar = tqdm(
            total=self.train_iters,
            initial=self.iteration,
            desc="pretrain",
            dynamic_ncols=True,
            disable=self.rank != 0 or not cfg.progress_bar,
            file=sys.stderr,
        )
        consecutive_bad = 0
        last_log_time, last_log_iter = time.perf_counter(), self.iteration
        last_eval: dict[str, float] = {}
        validate_at = cfg.validation_iterations()
        preempted = False
        while self.iteration < self.train_iters:
            stats = self.train_step(batches)
            self.iteration += 1
            self.consumed_samples += cfg.global_batch_size
            bar.update(1)
            consecutive_bad = consecutive_bad + 1 if stats["skipped"] else 0
            if stats["skipped"] and self.rank == 0:
                bar.write(f"iteration {self.iteration}: non-finite loss, update skipped ({consecutive_bad} in a row)")
                self.logger.log({"kind": "skip", "iteration": self.iteration})
            if consecutive_bad >= cfg.max_nonfinite_steps:
                raise TrainingError(
                    f"{consecutive_bad} consecutive iterations had a non-finite loss (max_nonfinite_steps="
                    f"{cfg.max_nonfinite_steps}); lower lr, check the data, or resume from an earlier checkpoint"
                )
            if self.iteration % cfg.log_interval == 0 or self.iteration == self.train_iters:
                now = time.perf_counter()
                record = self._log_train(stats, now - last_log_time, self.iteration - last_log_iter)
                last_log_time, last_log_iter = now, self.iteration
                if self.rank == 0 and record["lm_loss"] is not None:
                    bar.set_postfix(loss=f"{record['lm_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if self.rank == 0:
                    bar.write(console_line(record, self.train_iters, self.moe_names))
            periodic_save = self.iteration % cfg.save_interval == 0 and self.iteration != self.train_iters
            if periodic_save:  # before the evaluation of this iteration: no evaluation ever costs this checkpoint
                self.save()
                last_log_time = time.perf_counter()
            if self.iteration in validate_at and self.iteration != self.train_iters:
                last_eval = self._eval_and_log()
                last_log_time = time.perf_counter()
            if stats["stop"]:  # a signal on any rank, gathered by the step's all-reduce
                preempted = True
                if self.rank == 0:
                    bar.write(f"signal received: saving a checkpoint at iteration {self.iteration} and exiting")
                if not periodic_save:
                    self.save()
                break
        bar.close()
        if preempted:
            return {"preempted": True, "iteration": self.iteration}
        last_eval = self._eval_and_log(zero_shot=False)
        if "val_loss" in last_eval and not math.isfinite(last_eval["val_loss"]):
            self._refuse_nonfinite(f"the final validation loss is not finite ({last_eval['val_loss']})")
        self.save()
        self._zero_shot_and_log()  # after the final save: the training is kept whatever lm-eval does
        result = {"iteration": self.iteration, "tokens": self.consumed_samples * cfg.seq_len, **last_eval}
        if self.ep_group is not None:
            from llm.parallel import dense_weights_identical

            result["dense_weights_identical"] = dense_weights_identical(self.engine.module)
        if cfg.export:
            try:
                self.export()
            except Exception as err:  # safetensors' SafetensorError is neither an OSError nor a RuntimeError
                if not disk_full(err):
                    raise
                raise TrainingError(
                    f"No space left on device under {self.output_dir / 'hf'} while exporting the final weights; "
                    f"{kept_checkpoint(self.ckpt_root)}. Free some space, then run the same command with --resume "
                    f"auto (it evaluates and exports again)"
                ) from err
        self._write_summary(result)
        return result

    def _zero_shot_and_log(self) -> None:
        """--eval_tasks on the live model, every rank (collectives under ZeRO-3 and EP); a failure never ends a run."""
        if self.zero_shot is not None:
            self.engine.eval()
            tokens = self.consumed_samples * self.cfg.seq_len
            self.zero_shot.evaluate_and_log(self.engine.module, self.logger, self.iteration, tokens, self.rank)
            self.engine.train()

    def _eval_and_log(self, zero_shot: bool = True) -> dict[str, float]:
        result = self.evaluate()
        if zero_shot:
            self._zero_shot_and_log()
        if result:
            self.logger.log(
                {
                    "kind": "valid",
                    "iteration": self.iteration,
                    "tokens": self.consumed_samples * self.cfg.seq_len,
                    **result,
                }
            )
            if self.rank == 0:
                print(
                    f"[valid] iteration {self.iteration}: loss {result['val_loss']:.4f} ppl {result['val_ppl']:.2f}",
                    file=sys.stderr,
                )
        return result

    def export(self) -> None:
        from llm.export import write_hf_directory

        state = full_state_dict(self.engine.module, self.ep_group, self.rank)
        if self.rank == 0:
            # The step goes into the export's record: evaluations of RUN/hf are kept per step (evals.zero_shot).
            write_hf_directory(
                self.model_config, state, self.tokenizer_dir, self.output_dir / "hf", iteration=self.iteration
            )
        dist.barrier()

    def _write_summary(self, result: dict[str, Any]) -> None:
        if self.rank == 0:
            write_summary(
                self.output_dir, run_summary(self.cfg, self.accounting, result, self.world, self.model_config)
            )
