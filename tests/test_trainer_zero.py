"""Training through the deepspeed launcher on 2 CPU ranks at every supported ZeRO stage."""

from __future__ import annotations

import pytest

from tests.trainer_utils import launch, losses_by_iteration

pytestmark = pytest.mark.distributed


def test_zero3_and_zero0_give_the_same_loss_curve(tmp_path):
    """Vanilla LLaMA: ZeRO-3 partitions every tensor across the 2 ranks (here with activation checkpointing, which
    recomputes exactly); the math must not change."""
    curves = {}
    for stage in (0, 3):
        out = tmp_path / f"zero{stage}"
        result = launch(
            "llama",
            out,
            "--train_iters",
            "6",
            "--zero_stage",
            str(stage),
            "--save_interval",
            "100",
            "--export",
            "false",
            "--activation_checkpointing",
            "true" if stage == 3 else "false",
        )
        assert result.returncode == 0, result.stdout[-4000:]
        curves[stage] = losses_by_iteration(out)
    assert list(curves[0]) == list(range(1, 7))
    assert curves[0][6] < curves[0][1]
    for it in curves[0]:
        assert curves[3][it] == pytest.approx(curves[0][it], rel=1e-4), (it, curves)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, stage",
    [("llama", 1), ("llama", 2), ("llama", 3), ("parameternet", 1), ("parameternet", 2), ("parameternet", 3)],
)
def test_training_lowers_the_loss(tmp_path, model, stage):
    out = tmp_path / "run"
    result = launch(
        model,
        out,
        "--train_iters",
        "16",
        "--zero_stage",
        str(stage),
        "--save_interval",
        "8",
        "--eval_interval",
        "8",
        "--lr",
        "3e-3",
    )
    assert result.returncode == 0, result.stdout[-4000:]
    losses = losses_by_iteration(out)
    first, last = sum(losses[i] for i in (1, 2)) / 2, sum(losses[i] for i in (15, 16)) / 2
    assert last < first - 0.3, losses
    assert (out / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_vanilla_exact_resume_after_sigkill(tmp_path):
    import os
    import signal

    from tests.trainer_utils import wait_for_iteration

    args = ["--train_iters", "24", "--save_interval", "8", "--zero_stage", "1"]  # headroom: see test_trainer_resume
    straight = tmp_path / "straight"
    assert launch("llama", straight, *args).returncode == 0
    out = tmp_path / "killed"
    proc = launch("llama", out, *args, wait=False)
    wait_for_iteration(proc, out, 9)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    result = launch("llama", out, *args, "--resume", "auto")
    assert result.returncode == 0, result.stdout[-4000:]
    assert losses_by_iteration(out) == losses_by_iteration(straight)
