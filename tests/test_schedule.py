"""runtime.schedule, the learning-rate schedule of both trainers: the LLM's values are the former optim.lr_at's
bit for bit; vision's groups follow it scaled by their lr_scale (timm's layer decay), through a resume too."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from llm.train.config import load_config as load_llm_config
from llm.train.optim import schedule
from runtime.schedule import STYLES, apply_schedule
from tests.trainer_utils import ONE_RANK_ENGINE_PREAMBLE
from vision.build import lr_schedule, param_groups
from vision.config import TrainConfig as VisionConfig


def former_lr_at(step: int, cfg) -> float:
    """llm/train/optim.py:lr_at as it was before runtime.schedule (copied verbatim but for this docstring)."""
    if cfg.warmup_iters and step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    decay_iters = cfg.lr_decay_iters or cfg.resolved_train_iters()
    decay_start = cfg.warmup_iters
    if cfg.lr_decay_style == "wsd":
        decay_start = max(decay_iters - math.ceil(cfg.wsd_decay_fraction * decay_iters - 1e-9), cfg.warmup_iters)
    span = max(decay_iters - decay_start, 1)
    progress = min(max(step - decay_start, 0) / span, 1.0)
    if cfg.lr_decay_style in ("linear", "wsd"):
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


@pytest.mark.parametrize("style", STYLES)
def test_the_llm_schedule_is_the_former_lr_at_bit_for_bit(style: str) -> None:
    cases = [  # (train_iters, warmup_iters, lr, min_lr, lr_decay_iters, wsd_decay_fraction)
        (110, 10, 1.0, 0.1, None, 0.2),
        (1000, 37, 3e-4, 3e-5, None, 0.1),
        (1000, 0, 6e-4, 0.0, 700, 0.55),
        (97, 96, 1e-3, 1e-4, None, 1.0),
        (5000, 250, 2.5e-3, 2.5e-4, 4000, 0.33),
    ]
    for train_iters, warmup, lr, min_lr, decay_iters, fraction in cases:
        overrides = ["--train_iters", str(train_iters), "--warmup_iters", str(warmup), "--lr", repr(lr)]
        overrides += ["--min_lr", repr(min_lr), "--lr_decay_style", style, "--wsd_decay_fraction", repr(fraction)]
        if decay_iters is not None:
            overrides += ["--lr_decay_iters", str(decay_iters)]
        cfg = load_llm_config("tiny", cli_overrides=overrides)
        new = schedule(cfg)
        steps = range(train_iters + 50)
        assert [new.lr_at(s) for s in steps] == [former_lr_at(s, cfg) for s in steps], (style, train_iters)
        # The LambdaLR that the engine steps: the same bits as the former lambda's.
        optimizers = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr) for _ in range(2)]
        former = torch.optim.lr_scheduler.LambdaLR(optimizers[0], lambda step, c=cfg: former_lr_at(step, c) / c.lr)
        schedulers = [former, new.scheduler(optimizers[1])]
        for _ in range(train_iters + 5):
            assert schedulers[1].get_last_lr() == schedulers[0].get_last_lr()
            for optimizer, scheduler in zip(optimizers, schedulers):
                optimizer.step()
                scheduler.step()


def _vision_run(cfg: VisionConfig, steps_per_epoch: int, steps: int, resume_at: int | None = None):
    """Each group's (lr_scale, LR) at every optimizer step of a short run, stepped as DeepSpeed's engine steps its
    scheduler (after each optimizer step); `resume_at`: rebuilt from the saved state at that step, as a resume is."""
    torch.manual_seed(0)
    model = timm.create_model("parameternet_tiny", num_classes=3)
    sched = lr_schedule(cfg, steps_per_epoch)

    def build():
        optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
        return optimizer, sched.scheduler(optimizer)

    optimizer, scheduler = build()
    seen = []
    for step in range(steps):
        if step == resume_at:
            saved = optimizer.state_dict(), scheduler.state_dict()
            optimizer, scheduler = build()
            optimizer.load_state_dict(saved[0])
            scheduler.load_state_dict(saved[1])
            apply_schedule(scheduler, optimizer)
        seen.append([(g.get("lr_scale", 1.0), g["lr"]) for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return sched, seen


def test_vision_groups_follow_the_schedule_scaled_by_layer_decay_and_resume_on_it() -> None:
    cfg = VisionConfig(lr=2e-3, min_lr=2e-5, warmup_epochs=1.5, epochs=4, layer_decay=0.5, weight_decay=0.05)
    sched, seen = _vision_run(cfg, steps_per_epoch=4, steps=20)
    assert (sched.warmup_iters, sched.decay_iters, sched.style) == (6, 16, "cosine")
    scales = {scale for scale, _ in seen[0]}
    assert 1.0 in scales and 0.5**11 in scales  # the head and the stem (tests/test_vision_config.py)
    for step, groups in enumerate(seen):
        for scale, lr in groups:
            assert lr == pytest.approx(scale * sched.lr_at(step), rel=1e-12, abs=0), (step, scale)
    # Warmup to the peak, cosine to min_lr (scaled per group: the floor too) at the end of the epochs, then the floor.
    assert [sched.lr_at(s) for s in (0, 5, 6, 16, 19)] == pytest.approx([2e-3 / 6, 2e-3, 2e-3, 2e-5, 2e-5])
    assert min(lr for scale, lr in seen[-1] if scale == 0.5**11) == pytest.approx(2e-5 * 0.5**11)
    # A resumed run lands on the same LRs, bit for bit, at every step after the resume.
    _, resumed = _vision_run(cfg, steps_per_epoch=4, steps=20, resume_at=7)
    assert resumed == seen


def test_a_vision_checkpoint_of_deepspeeds_warmup_cosine_lr_resumes_on_the_schedule() -> None:
    """Checkpoints saved before runtime.schedule hold WarmupCosineLR's state (last_batch_iteration = steps - 1)."""
    cfg = VisionConfig(lr=2e-3, min_lr=2e-5, warmup_epochs=1.0, epochs=4, layer_decay=0.5)
    sched, seen = _vision_run(cfg, steps_per_epoch=4, steps=12)
    model = timm.create_model("parameternet_tiny", num_classes=3)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    scheduler = sched.scheduler(optimizer)
    scheduler.load_state_dict({"last_batch_iteration": 8})  # 9 steps taken
    apply_schedule(scheduler, optimizer)
    assert [(g.get("lr_scale", 1.0), g["lr"]) for g in optimizer.param_groups] == seen[9]


ENGINE_RUN = (
    ONE_RANK_ENGINE_PREAMBLE
    + r"""
import timm
from runtime.schedule import apply_schedule
from vision.build import ds_config, lr_schedule, param_groups
from vision.config import TrainConfig

cfg = TrainConfig(lr=2e-3, min_lr=2e-5, warmup_epochs=1.5, epochs=4, layer_decay=0.5, weight_decay=0.05,
                  micro_batch_size=2, global_batch_size=2, zero_stage=int(sys.argv[2]))

def engine():
    torch.manual_seed(0)
    model = timm.create_model("parameternet_tiny", num_classes=3)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg), config=ds_config(cfg, 1),
        lr_scheduler=lr_schedule(cfg, 4).scheduler)
    return engine, optimizer, scheduler

def steps(engine, optimizer, first, last):
    seen = {}
    for step in range(first, last):
        seen[step] = [(g.get("lr_scale", 1.0), g["lr"]) for g in optimizer.param_groups]
        torch.manual_seed(step)
        loss = engine(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean()
        engine.backward(loss)
        engine.step()
    return seen

straight = engine()
seen = steps(straight[0], straight[1], 0, 6)
straight[0].save_checkpoint(sys.argv[1], tag="six")
seen.update(steps(straight[0], straight[1], 6, 20))
resumed = engine()
resumed[0].load_checkpoint(sys.argv[1], tag="six", load_optimizer_states=True, load_lr_scheduler_states=True)
apply_schedule(resumed[2], resumed[1])
print(json.dumps({"straight": seen, "resumed": steps(resumed[0], resumed[1], 6, 20)}))
"""
)


@pytest.mark.slow
def test_vision_lr_on_deepspeeds_engine_follows_the_schedule_and_a_resume_lands_on_it(tmp_path) -> None:
    """What the engine's optimizer groups hold at each of 20 steps (warmup, cosine, floor) of the vision set-up with
    layer decay, and after a checkpoint of step 6 is loaded into a fresh engine (ZeRO 0, one gloo rank; slow: ~5 min
    on a busy 2-core machine, most of it importing and starting DeepSpeed)."""
    zero_stage = 0
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE_RUN, str(tmp_path / "ckpt"), str(zero_stage)],
        capture_output=True, text=True, cwd=repo, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    sched = lr_schedule(VisionConfig(lr=2e-3, min_lr=2e-5, warmup_epochs=1.5, epochs=4), 4)
    straight = {int(step): groups for step, groups in out["straight"].items()}
    assert sorted(straight) == list(range(20)) and len({scale for scale, _ in straight[0]}) > 2  # layer decay
    for step, groups in straight.items():
        for scale, lr in groups:
            assert lr == pytest.approx(scale * sched.lr_at(step), rel=1e-12, abs=0), (step, scale)
    assert out["resumed"] == {str(step): straight[step] for step in range(6, 20)}
