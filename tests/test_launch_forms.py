"""Launch forms, for real on tiny shapes, beyond what running the commands of docs/training.md checks
(tests/test_readme_commands.py runs every form once - the literal `deepspeed launch/pretrain_llama.sh`, --no_python,
torchrun, two nodes, sbatch - and checks each run's model and world size): a script inside a launcher starts none,
the vision launcher's literal form, and two nodes on this machine (two launcher
processes, one rank each, no ssh) split the experts across the "nodes", checkpoint on SIGUSR1 and resume; a signal to
the launch script's whole process group (what `timeout`, Ctrl-C and many schedulers send) stops the run cleanly.
SLURM's forms run on a real cluster in tests/test_slurm_launch.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.checkpoint import complete_checkpoints
from tests.trainer_utils import (
    TINY_ARGS,
    free_port,
    launch,
    losses_by_iteration,
    read_log,
    spawn,
    tiny_image_folder,
    tiny_vision_args,
    wait_for_iteration,
)

pytestmark = pytest.mark.distributed
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
SCRIPT = "launch/pretrain_llama.sh"


def _run(cmd: list[str], out: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    proc = spawn(cmd, out, env or {})
    rc = proc.wait(timeout=timeout)
    log = read_log(out)
    assert rc == 0, f"{' '.join(cmd)} exited {rc}:\n{log[-4000:]}"
    return log


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_a_script_inside_a_launcher_runs_the_trainer_in_process(tmp_path):
    # The rank variables of any launcher (here set by hand, as mpirun/srun wrappers do): no DeepSpeed launcher at all.
    out = tmp_path / "inside"
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    log = _run(["bash", SCRIPT, "parameternet", "--output_dir", str(out), *TINY_ARGS, "--train_iters", "2"], out, env)
    assert "WORLD INFO DICT" not in log and "cmd = " not in log
    assert _summary(out)["model"] == "parameternet-llama-tiny"


def _two_nodes(out: Path, port: int, *extra: str, model: str = "parameternet") -> list:
    """Two launcher processes on this machine stand in for two nodes: NNODES=2, NODE_RANK 0 and 1, one rank each,
    rendezvous on the loopback master - what launch/slurm/pretrain_llama.sbatch runs on each node."""
    procs = []
    for node in (0, 1):
        env = {
            "NNODES": "2",
            "NODE_RANK": str(node),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "NPROC": "1",
        }
        cmd = ["bash", SCRIPT, model, "--output_dir", str(out), *TINY_ARGS, *extra]
        procs.append(spawn(cmd, out, env, log_name=f"{out.name}.node{node}.log"))
    return procs


def _node_log(out: Path, node: int) -> str:
    return (out.parent / f"{out.name}.node{node}.log").read_text(errors="replace")


def test_two_nodes_without_ssh_expert_parallel_across_nodes_usr1_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["--train_iters", "30", "--save_interval", "100", "--zero_stage", "2", "--expert_parallel_size", "2"]
    port = free_port()
    procs = _two_nodes(out, port, *args)
    wait_for_iteration(procs[0], out, 2)
    # SLURM's --signal=USR1 reaches every node's launcher: every rank finishes its step, checkpoints and exits 0.
    for proc in procs:
        os.kill(proc.pid, signal.SIGUSR1)
    for node, proc in enumerate(procs):
        assert proc.wait(timeout=300) == 0, _node_log(out, node)[-4000:]
    logs = [_node_log(out, 0), _node_log(out, 1)]
    assert "rank 0 holds experts 0..3 of 8" in logs[0] and "rank 1 holds experts 4..7 of 8" in logs[1]
    saved = [it for it, _ in complete_checkpoints(out / "checkpoints")]
    assert len(saved) == 1 and 2 <= saved[0] < 30 and not (out / "hf").exists()

    procs = _two_nodes(out, free_port(), *args, "--resume", "auto")
    for node, proc in enumerate(procs):
        assert proc.wait(timeout=600) == 0, _node_log(out, node)[-4000:]
    assert f"resumed from iteration {saved[0]}" in _node_log(out, 0)
    summary = _summary(out)
    assert summary["world_size"] == 2 and summary["expert_parallel_size"] == 2 and summary["iterations"] == 30
    assert summary["dense_weights_identical_across_ranks"] is True
    assert sorted(losses_by_iteration(out)) == list(range(1, 31))


def test_literal_deepspeed_form_of_the_vision_launcher(tmp_path):
    """launch/train_vision.sh is a bash/Python file too, on launch/common.sh: `deepspeed launch/train_vision.sh ...`
    runs vision.train on every rank."""
    tiny_image_folder(tmp_path / "images")
    out = tmp_path / "vision"
    log = _run(
        [
            DEEPSPEED,
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "launch/train_vision.sh",
            *tiny_vision_args(
                data_dir=tmp_path / "images", val_subset=0, micro_batch_size=2, log_interval=None, output_dir=out
            ),
        ],
        out,
    )
    assert log.count("WORLD INFO DICT") == 1 and "dist_world_size=2" in log
    assert json.loads((out / "summary.json").read_text())["iterations"] == 2


def _processes_of(out: Path) -> list[str]:
    """Live processes started for the run writing to `out` (its path is on their command lines)."""
    found = subprocess.run(["pgrep", "-af", "--", f"--output_dir {out}"], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def _ranks_of(out: Path) -> list[str]:
    return [line for line in _processes_of(out) if "llm/pretrain.py --local_rank" in line]


def test_a_signal_to_the_whole_process_group_checkpoints_and_exits_after_the_last_rank(tmp_path):
    """`timeout`, Ctrl-C and schedulers signal the launch script's whole process group. SIGTERM there used to kill
    DeepSpeed's runner at once, so the script exited 143 in about a second while the ranks were still saving (and
    DeepSpeed's launch.py SIGKILLed them 30 s later). Now: exit 0 once every rank has checkpointed and gone. SIGKILL to
    the group still leaves no rank behind, though the launcher runs in a session of its own."""
    out = tmp_path / "run"
    proc = launch("llama", out, "--train_iters", "200", "--save_interval", "1000", wait=False)
    wait_for_iteration(proc, out, 2)
    assert len(_ranks_of(out)) == 2
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, read_log(out)[-4000:]
    assert _processes_of(out) == []
    saved = [it for it, _ in complete_checkpoints(out / "checkpoints")]
    assert len(saved) == 1 and 2 <= saved[0] < 200, saved
    assert f"saving a checkpoint at iteration {saved[0]} and exiting" in read_log(out)

    proc = launch("llama", out, "--train_iters", "200", "--save_interval", "1000", "--resume", "auto", wait=False)
    deadline = time.time() + 300
    while len(_ranks_of(out)) < 2 and time.time() < deadline:
        time.sleep(0.2)  # both ranks started (DeepSpeed's launch.py spawned them in the launcher's own session)
    assert len(_ranks_of(out)) == 2
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.time() + 10
    while _processes_of(out) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_of(out) == []
