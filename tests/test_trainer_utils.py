"""The shared tiny-run flags (tests/trainer_utils.py) that the launch, install, SLURM and GPU tests build on."""

from __future__ import annotations

import json
from pathlib import Path

from tests.trainer_utils import TINY_ARGS, TINY_MODEL, TINY_RUN, tiny_args, tiny_vision_args


def test_tiny_args_replace_in_place_drop_none_and_add_after() -> None:
    assert TINY_ARGS == tiny_args() and TINY_ARGS[-2:] == ["--model_overrides", json.dumps(TINY_MODEL)]
    args = tiny_args(global_batch_size=2, log_interval=None, export=True, output_dir=Path("/runs/a"))
    assert args[:6] == ["--seq_len", "32", "--micro_batch_size", "2", "--global_batch_size", "2"]
    assert "--log_interval" not in args and args[-4:] == ["--export", "true", "--output_dir", "/runs/a"]
    assert len(args) == 2 * (len(TINY_RUN) - 1 + 2)
    vision = tiny_vision_args(data_dir=Path("/images"), tensorboard=None)
    assert vision[:2] == ["--config", "fashion_mnist_tiny"] and "--tensorboard" not in vision
    assert vision[-2:] == ["--data_dir", "/images"] and vision[vision.index("--progress_bar") + 1] == "false"
