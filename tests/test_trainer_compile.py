"""`compile: true` (DeepSpeed's engine.compile -> torch.compile) trains ParameterNet-LLaMA with the eager losses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.trainer_utils import REPO, losses_by_iteration, tiny_args


def _pretrain(out: Path, compile_: bool) -> subprocess.CompletedProcess:
    # One rank without the launcher (init_distributed sets up a world of one): the compile path is rank-independent.
    cmd = [
        sys.executable,
        "-m",
        "llm.pretrain",
        "--config",
        "tiny",
        "--model",
        "parameternet-llama-tiny",
        *tiny_args(train_iters=3, global_batch_size=2, export=False, compile=compile_),
        "--output_dir",
        str(out),
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_compiled_training_matches_eager(tmp_path):
    eager, compiled = _pretrain(tmp_path / "eager", False), _pretrain(tmp_path / "compiled", True)
    assert eager.returncode == 0, eager.stderr[-3000:]
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert summary["compiled_graphs"] > 0  # torch.compile really ran
    a, b = losses_by_iteration(tmp_path / "eager"), losses_by_iteration(tmp_path / "compiled")
    assert list(a) == [1, 2, 3] and list(b) == [1, 2, 3]
    for it in a:
        assert abs(a[it] - b[it]) <= 1e-4 * abs(a[it]), (it, a[it], b[it])
