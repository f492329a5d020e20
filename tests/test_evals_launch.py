"""launch/compare.sh and launch/eval_zero_shot.sh: argument checks (fast) and the whole pipeline (slow):
train both tiny models through launch/pretrain_llama.sh, evaluate them offline, write the report; and evaluate a
bare training checkpoint, which evals.zero_shot exports first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from evals.zero_shot import run_zero_shot
from runtime.dist import free_port
from tests.trainer_utils import tiny_args

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _run(*cmd: str, timeout: int = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), cwd=REPO, env=env or ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0"], "--seeds '0': give a positive integer"),
        (["--run", "only llama"], "at least two --run"),
        (["--run", "a llama", "--run", "b gpt"], "KIND must be llama or parameternet, got 'gpt'"),
        (["--run", "a llama", "--run", "a parameternet"], "run name 'a' is used twice"),
        (["--train_iters", "5"], "unknown option '--train_iters' (trainer options go after --"),
    ],
)
def test_compare_sh_refuses_bad_arguments(args: list[str], message: str, tmp_path: Path) -> None:
    proc = _run("bash", "launch/compare.sh", "--out", str(tmp_path / "out"), *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before training anything


def test_eval_zero_shot_sh_reports_missing_model(tmp_path: Path) -> None:
    proc = _run("bash", "launch/eval_zero_shot.sh", str(tmp_path / "missing"), "--offline")
    assert proc.returncode == 2
    assert f"--model {tmp_path / 'missing'}: no such directory" in proc.stderr


@pytest.mark.slow
def test_compare_sh_end_to_end_and_checkpoint_export(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    env = {**ENV, "MASTER_PORT": str(free_port()), "NPROC": "1"}
    proc = _run(
        "bash",
        "launch/compare.sh",
        "--out",
        str(out),
        "--seeds",
        "2",
        "--offline",
        "--tasks",
        "arc_easy,piqa",
        "--limit",
        "3",
        "--",
        *tiny_args(
            train_iters=2, seq_len=64, global_batch_size=2, eval_interval=1, warmup_iters=None, model_overrides=None
        ),
        timeout=1500,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| Δ parameternet − llama |" in proc.stdout
    data = json.loads((out / "compare" / "results.json").read_text())
    assert [g["label"] for g in data["groups"]] == ["llama", "parameternet"]
    for group in data["groups"]:
        assert group["seeds"] == [1234, 1235]
        assert group["tokens"] == 2 * 2 * 64
        assert group["final_val_loss"]["n"] == 2
    # identical data order and budget: the same seed gives both models the same tokens
    for s in (1234, 1235):
        a, b = (
            yaml.safe_load((out / name / f"seed{s}" / "config.yaml").read_text()) for name in ("llama", "parameternet")
        )
        assert (a.pop("model"), b.pop("model")) == ("llama-tiny", "parameternet-llama-tiny")
        assert (a.pop("output_dir"), b.pop("output_dir")) == (
            str(out / "llama" / f"seed{s}"),
            str(out / "parameternet" / f"seed{s}"),
        )
        assert a == b and a["seed"] == s
    for png in ("accuracy.png", "loss.png"):
        assert (out / "compare" / png).stat().st_size > 10_000

    # A run without its hf/ export: evals.zero_shot exports the newest checkpoint first.
    run = out / "parameternet" / "seed1234"
    bare = tmp_path / "bare_run"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("hf", "eval"))
    result = run_zero_shot(bare, tasks="piqa", offline=True, limit=2)
    assert result.model_dir == bare / "eval" / "hf"
    assert "auto_map" in json.loads((result.model_dir / "config.json").read_text())
    assert set(result.results["results"]) == {"piqa_offline"}
