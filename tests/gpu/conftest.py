"""Fixtures of the GPU tests (see tests/gpu/target.py for the device and the CPU check mode)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.gpu.target import TARGET_ERROR, launch_llm

# Iterations of every trained tiny run, and the checkpoint in the middle that the resume test restarts from.
ITERS, SAVE = 16, 8


def pytest_configure(config: pytest.Config) -> None:
    if TARGET_ERROR is not None:
        raise pytest.UsageError(TARGET_ERROR)


@pytest.fixture(scope="session")
def trained_llm(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """`trained_llm(model, attn)`: the run directory of `launch/pretrain_llama.sh MODEL` trained for ITERS bf16
    iterations with that attention, checkpoints at SAVE and ITERS, exported to RUN/hf. Trained once per session."""
    runs: dict[tuple[str, str], Path] = {}

    def get(model: str, attn: str = "sdpa") -> Path:
        if (model, attn) not in runs:
            out = tmp_path_factory.mktemp(f"{model}-{attn}") / "run"
            result = launch_llm(
                model, out, "--attn_implementation", attn, "--train_iters", str(ITERS), "--save_interval", str(SAVE)
            )
            assert result.returncode == 0, result.stdout[-4000:]
            runs[model, attn] = out
        return runs[model, attn]

    return get
