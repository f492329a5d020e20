"""ParameterNet (dynamic convolutions) trains bf16 steps on the device through DeepSpeed: `NPROC=1 bash
launch/train_vision.sh ...` as users run it (ranks and rendezvous come from NPROC/MASTER_PORT in the environment, as in
launch/common.sh). Mirrors tests/test_vision_train.py::test_bf16_zero1_trains_a_few_steps."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

from tests.gpu.target import TARGET, gpu, needs_device, subprocess_env
from tests.trainer_utils import REPO, free_port, tiny_image_folder, tiny_vision_args

pytestmark = [gpu, needs_device]

STEPS = 2


def test_vision_bf16_steps_through_deepspeed_on_the_device(tmp_path: Path) -> None:
    data = tiny_image_folder(tmp_path / "images")  # 2 classes x 4 images per split
    out = tmp_path / "run"
    cmd = [
        "bash",
        str(REPO / "launch" / "train_vision.sh"),
        *tiny_vision_args(
            model="parameternet_tiny",
            data_dir=data,
            val_subset=0,
            precision="bf16",
            zero_stage=1,
            ds_config="zero1",
            ema=True,
            train_iters=STEPS,
            output_dir=out,
        ),
    ]
    env = subprocess_env(NPROC="1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    # vision.train describes its engine: the device it placed the model on and the precision.
    assert re.search(rf"on 1 rank\(s\), {TARGET.device}(:\d+)?, bf16, ZeRO-1", proc.stdout), proc.stdout[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == STEPS and summary["world_size"] == 1 and summary["model"] == "parameternet_tiny"
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["final_val_loss"])
    assert math.isfinite(summary["ema_top1"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))
