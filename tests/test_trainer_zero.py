"""Training through the deepspeed launcher on 2 CPU ranks at every supported ZeRO stage."""

from __future__ import annotations

import pytest

from tests.trainer_utils import launch, losses_by_iteration

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(
    ("model", "stages"),
    [
        pytest.param("llama", (0, 3), id="llama-zero0-zero3"),
        # Expert weights are partitioned and reduced like the rest; ZeRO-1 is every other test's default.
        pytest.param("parameternet", (0, 2, 3), id="parameternet-zero0-zero2-zero3", marks=pytest.mark.slow),
    ],
)
def test_zero_stages_give_the_same_loss_curve(tmp_path, model: str, stages: tuple[int, ...]) -> None:
    """ZeRO-2 shards gradients and optimizer state, ZeRO-3 every tensor across the 2 ranks (here with activation
    checkpointing, which recomputes exactly); the math must not change: each stage's curve is ZeRO-0's, which falls.
    The last stage also exports (gathering partitioned weights, experts included)."""
    curves = {}
    for stage in stages:
        out = tmp_path / f"zero{stage}"
        result = launch(
            model,
            out,
            "--train_iters",
            "6",
            "--zero_stage",
            str(stage),
            "--save_interval",
            "100",
            "--lr",
            "3e-3",
            "--export",
            "true" if stage == stages[-1] else "false",
            "--activation_checkpointing",
            "true" if stage == 3 else "false",
        )
        assert result.returncode == 0, result.stdout[-4000:]
        curves[stage] = losses_by_iteration(out)
    assert list(curves[0]) == list(range(1, 7))
    assert curves[0][6] < curves[0][1] - 0.1, curves[0]
    for stage in stages[1:]:
        for it in curves[0]:
            assert curves[stage][it] == pytest.approx(curves[0][it], rel=1e-4), (stage, it, curves)
    assert (tmp_path / f"zero{stages[-1]}" / "hf" / "config.json").is_file()


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
