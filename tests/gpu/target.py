"""What the GPU tests run on, and how they launch the trainers.

By default (`make test-gpu`) the tests need a CUDA GPU and skip, with the reason in pytest's summary, where
`torch.cuda.is_available()` is false. `PN_GPU_TESTS_DEVICE=cpu` runs the same test code on CPU, on smaller shapes:
that checks the TEST CODE (it runs, its launches and assertions hold), not the GPU path - no NCCL, no CUDA kernels,
no tensor cores, no Hopper grouped GEMM. Only a run on a GPU tests the GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.trainer_utils import REPO, TINY_MODEL, free_port, read_log, spawn, tiny_args

MODE_ENV = "PN_GPU_TESTS_DEVICE"
MODES = ("cuda", "cpu")


@dataclass(frozen=True)
class Target:
    device: str  # "cuda": the GPU tests; "cpu": a check of the test code on CPU

    @property
    def check_mode(self) -> bool:
        return self.device == "cpu"

    def llm_args(self) -> list[str]:
        """Trainer flags on top of the `tiny` preset (launch/pretrain_llama.sh's default SIZE=tiny): the tiny run of the
        CPU launch tests (tests/trainer_utils.TINY_RUN) in bf16, ZeRO-1, lr 3e-3.

        On the GPU: the tiny presets as they are (hidden 256, 4 layers), seq_len 64 - one key block of the fused
        attention kernels, so their backward has no atomics whose order could vary and the resume can be bitwise.
        In the CPU check: the 2-layer width-64 model of the CPU tests (bf16 is ~30x slower than fp32 on CPUs without
        native bf16)."""
        if self.check_mode:
            shape = dict(global_batch_size=4)
        else:
            shape = dict(seq_len=64, micro_batch_size=8, global_batch_size=16, model_overrides=None)
        return tiny_args(precision="bf16", zero_stage=1, lr="3e-3", **shape)

    def model_overrides(self) -> dict[str, int]:
        return dict(TINY_MODEL) if self.check_mode else {}

    @property
    def eval_dtype(self) -> str:
        return "float32" if self.check_mode else "bfloat16"


def _target_from_env() -> tuple[Target, str | None]:
    """The target, and the error to report (by tests/gpu/conftest.py's pytest_configure) for a bad value."""
    value = os.environ.get(MODE_ENV, "cuda").strip().lower() or "cuda"
    if value not in MODES:
        return Target("cuda"), (
            f"{MODE_ENV}={value!r} is not one of {', '.join(MODES)}: leave it unset (or cuda) "
            f"for the GPU tests, or set cpu to check the test code on CPU"
        )
    return Target(value), None


TARGET, TARGET_ERROR = _target_from_env()

# Every module of tests/gpu sets `pytestmark = [gpu, needs_device]`.
gpu = pytest.mark.gpu
needs_device = pytest.mark.skipif(
    TARGET.device == "cuda" and not torch.cuda.is_available(),
    reason=f"needs a CUDA GPU (torch.cuda.is_available() is False); {MODE_ENV}=cpu runs this test's code on CPU, "
    f"which checks the test code only",
)


def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def attention_param(name: str):
    """An `attn_implementation` test parameter, skipped with its reason where it cannot run."""
    if name != "flash_attention_2":
        return pytest.param(name, id=name)
    if TARGET.check_mode:
        reason = "flash_attention_2 runs on CUDA only (CPU check mode)"
    elif not has_flash_attn():
        reason = "flash_attn is not importable (pip install -e '.[gpu]' installs flash-attn)"
    else:
        return pytest.param(name, id=name)
    return pytest.param(name, id=name, marks=pytest.mark.skip(reason=reason))


def launch_llm(model: str, output_dir: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`bash launch/pretrain_llama.sh MODEL` on one rank: the deepspeed launcher with --num_gpus 1, as users run it
    (NPROC=1; on a GPU machine that is GPU 0)."""
    cmd = [
        "bash",
        str(REPO / "launch" / "pretrain_llama.sh"),
        model,
        "--output_dir",
        str(output_dir),
        *TARGET.llm_args(),
        *extra,
    ]
    env = {"NPROC": "1", "MASTER_PORT": str(free_port())}
    if TARGET.check_mode:
        env["DS_ACCELERATOR"] = "cpu"  # a CPU check stays on CPU even on a machine with a GPU
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    proc = spawn(cmd, output_dir, env)
    rc = proc.wait(timeout=timeout)
    return subprocess.CompletedProcess(cmd, rc, stdout=read_log(output_dir))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of the test's own subprocesses (export, reload, lm-eval, vision): the repo importable."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if TARGET.check_mode:
        env["DS_ACCELERATOR"] = "cpu"
    return env
