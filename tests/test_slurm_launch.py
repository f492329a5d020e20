"""SLURM for real (tests/slurm_cluster.py: one slurmctld, two slurmd on this machine): USR1 makes every rank on both
nodes checkpoint, the job requeues and resumes, or is resubmitted on one node and reshards; `srun` starting one task
per rank runs the trainer directly with ranks from SLURM. (The sbatch commands of README.md and docs/training.md, run
by tests/test_readme_commands.py, train on two nodes to the end.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from runtime.checkpoint import complete_checkpoints
from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (the fixture, found by name)
from tests.trainer_utils import REPO, TINY_ARGS, losses_by_iteration, tiny_image_folder, tiny_vision_args, train_records

pytestmark = pytest.mark.distributed
# The header asks for 8 GPUs and 64 CPUs per node; these nodes have one CPU and no GPU (docs/training.md's CPU form).
CPU_NODES = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1"]


def _submit(cluster: SlurmCluster, out: Path, *args: str, nodes: int = 2) -> tuple[int, Path]:
    log = out.parent / f"{out.name}-slurm.out"
    job = cluster.sbatch(
        [
            *CPU_NODES,
            f"--nodes={nodes}",
            f"--output={log}",
            "launch/slurm/pretrain_llama.sbatch",
            "parameternet",
            "--output_dir",
            str(out),
            *TINY_ARGS,
            *args,
        ],
        cwd=REPO,
        env_extra={"SIZE": "tiny"},
    )
    return job, log


def test_usr1_checkpoints_on_both_nodes_requeues_and_resumes(slurm_cluster: SlurmCluster, tmp_path: Path):
    out = tmp_path / "run"
    job, log = _submit(slurm_cluster, out, "--train_iters", "60", "--save_interval", "1000")
    _wait_for_iteration(slurm_cluster, job, out, log, 2)
    # What --signal=B:USR1@180 does before the time limit: USR1 to the batch script.
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    result = slurm_cluster.wait(job, timeout=600)  # a requeued (pending) job is not finished
    text = log.read_text(errors="replace")
    print(text[-3000:])
    assert (result.state, result.exit_code) == ("COMPLETED", 0), text[-4000:]
    assert result.info["Restarts"] == "1"
    saved = [int(line.split()[3]) for line in text.splitlines() if line.startswith("resumed from iteration")]
    assert len(saved) == 1 and 2 <= saved[0] < 60, text[-4000:]
    assert "restart 0" in text and "restart 1" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations"] == 60
    assert [it for it, _ in complete_checkpoints(out / "checkpoints")][-1] == 60
    assert sorted(losses_by_iteration(out)) == list(range(1, 61))


def _wait_for_iteration(cluster: SlurmCluster, job: int, out: Path, log: Path, iteration: int) -> None:
    deadline = time.time() + 300
    while not any(r["iteration"] >= iteration for r in train_records(out)):
        assert time.time() < deadline and cluster.job_info(job)["JobState"] in ("PENDING", "RUNNING"), log.read_text(
            errors="replace"
        )[-4000:]
        time.sleep(0.5)


def test_a_2_node_job_stopped_by_usr1_continues_on_1_node_resharded(slurm_cluster: SlurmCluster, tmp_path: Path):
    """Two nodes, expert parallelism over both, ZeRO-2; stopped by USR1 (it checkpoints and requeues itself); the
    requeued job is cancelled and the run resubmitted on one node (EP 1, ZeRO-1): it reshards, resumes and ends."""
    out = tmp_path / "run"
    two_nodes = ["--train_iters", "40", "--save_interval", "1000", "--zero_stage", "2", "--expert_parallel_size", "2"]
    job, log = _submit(slurm_cluster, out, *two_nodes)
    _wait_for_iteration(slurm_cluster, job, out, log, 2)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    deadline = time.time() + 300
    while slurm_cluster.job_info(job).get("Restarts") != "1":  # checkpointed on both nodes, then requeued
        assert time.time() < deadline, log.read_text(errors="replace")[-4000:]
        time.sleep(0.2)
    slurm_cluster.run(["scancel", str(job)])  # the nodes are gone: no second start on two
    assert slurm_cluster.wait(job, timeout=120).state == "CANCELLED"
    saved = [it for it, _ in complete_checkpoints(out / "checkpoints")]
    assert saved and 2 <= saved[-1] < 40, log.read_text(errors="replace")[-4000:]

    one_node = [*two_nodes[:4], "--zero_stage", "1", "--expert_parallel_size", "1"]
    job, log = _submit(slurm_cluster, out, *one_node, nodes=1)
    result = slurm_cluster.wait(job, timeout=600)
    text = log.read_text(errors="replace")
    assert (result.state, result.exit_code) == ("COMPLETED", 0), text[-4000:]
    assert "resume: resharded from 2 ranks (EP 2, ZeRO-2) to 1 rank (EP 1, ZeRO-1)" in text, text[-4000:]
    assert f"resumed from iteration {saved[-1]}" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["iterations"] == 40
    assert sorted(losses_by_iteration(out)) == list(range(1, 41))


def test_srun_one_task_per_rank_runs_the_trainer_directly(slurm_cluster: SlurmCluster, tmp_path: Path):
    """Two tasks on one node (more tasks than nodes): each task is a rank, no DeepSpeed launcher starts."""
    out = tmp_path / "run"
    proc = slurm_cluster.run(
        [
            "srun",
            "--nodes=1",
            "--ntasks=2",
            "--overcommit",
            "bash",
            "launch/pretrain_llama.sh",
            "llama",
            "--output_dir",
            str(out),
            *TINY_ARGS,
            "--train_iters",
            "2",
        ],
        timeout=300,
        cwd=REPO,
        env_extra={"SIZE": "tiny"},
    )
    assert "WORLD INFO DICT" not in proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["model"] == "llama-tiny"


def test_srun_one_task_per_rank_trains_vision_too(slurm_cluster: SlurmCluster, tmp_path: Path):
    tiny_image_folder(tmp_path / "images")
    out = tmp_path / "vision"
    proc = slurm_cluster.run(
        [
            "srun",
            "--nodes=1",
            "--ntasks=2",
            "--overcommit",
            "bash",
            "launch/train_vision.sh",
            # the preset's train_subset and val_subset, as this test always ran
            *tiny_vision_args(
                data_dir=tmp_path / "images",
                train_subset=None,
                val_subset=None,
                micro_batch_size=2,
                log_interval=None,
                output_dir=out,
            ),
        ],
        timeout=300,
        cwd=REPO,
    )
    log = proc.stdout + proc.stderr
    assert "WORLD INFO DICT" not in log and " 2 rank(s)" in log and " 1 rank(s)" not in log, log[-3000:]
    assert json.loads((out / "summary.json").read_text())["iterations"] == 2
