"""Every way users start a run, launched for real on tiny shapes: the literal `deepspeed launch/pretrain_llama.sh`,
`deepspeed --no_python`, torchrun, a script that finds itself inside a launcher, and two nodes on this machine (two
launcher processes, one rank each, no ssh) - with expert parallelism across the "nodes", SIGUSR1 to both and a resume.
SLURM's forms run on a real cluster in tests/test_slurm_launch.py."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from llm.train.checkpoint import complete_checkpoints
from tests.trainer_utils import (
    TINY_ARGS,
    free_port,
    losses_by_iteration,
    read_log,
    spawn,
    train_records,
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


def test_literal_deepspeed_form_trains_the_chosen_model(tmp_path):
    """`deepspeed [launcher flags] launch/pretrain_llama.sh parameternet ...`: DeepSpeed runs the file with python on
    each rank; the same model/size/config choice as `bash launch/pretrain_llama.sh parameternet`."""
    out = tmp_path / "run"
    _run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), SCRIPT, "parameternet",
          "--output_dir", str(out), *TINY_ARGS, "--train_iters", "3"], out)
    summary = _summary(out)
    assert summary["model"] == "parameternet-llama-tiny" and summary["world_size"] == 2
    assert [r["iteration"] for r in train_records(out)] == [1, 2, 3]


def test_no_python_and_inside_a_launcher_run_the_trainer_without_a_second_launcher(tmp_path):
    # deepspeed --no_python executes the file as a program; the ranks it starts must not start launchers of their own.
    out = tmp_path / "no_python"
    log = _run([DEEPSPEED, "--no_python", "--num_gpus", "1", "--master_port", str(free_port()), SCRIPT, "llama",
                "--output_dir", str(out), *TINY_ARGS, "--train_iters", "2"], out)
    assert _summary(out)["model"] == "llama-tiny"
    assert log.count("WORLD INFO DICT") == 1  # DeepSpeed's per-node launcher ran once: ours did not start another

    # The rank variables of any launcher (here set by hand, as mpirun/srun wrappers do): the trainer runs in-process.
    out = tmp_path / "inside"
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    log = _run(["bash", SCRIPT, "parameternet", "--output_dir", str(out), *TINY_ARGS, "--train_iters", "2"], out, env)
    assert "WORLD INFO DICT" not in log and "cmd = " not in log  # no DeepSpeed launcher at all
    assert _summary(out)["model"] == "parameternet-llama-tiny"


def test_torchrun_module_form(tmp_path):
    out = tmp_path / "run"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
          "-m", "llm.pretrain", "--config", "tiny", "--model", "llama-tiny", "--output_dir", str(out), *TINY_ARGS,
          "--train_iters", "2"], out)
    assert _summary(out)["world_size"] == 2


def _two_nodes(out: Path, port: int, *extra: str, model: str = "parameternet") -> list:
    """Two launcher processes on this machine stand in for two nodes: NNODES=2, NODE_RANK 0 and 1, one rank each,
    rendezvous on the loopback master - what launch/slurm/pretrain_llama.sbatch runs on each node."""
    procs = []
    for node in (0, 1):
        env = {"NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "NPROC": "1"}
        cmd = ["bash", SCRIPT, model, "--output_dir", str(out), *TINY_ARGS, *extra]
        procs.append(spawn(cmd, out, env, log_name=f"{out.name}.node{node}.log"))
    return procs


def _node_log(out: Path, node: int) -> str:
    return (out.parent / f"{out.name}.node{node}.log").read_text(errors="replace")


def test_two_nodes_without_ssh_expert_parallel_across_nodes_usr1_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["--train_iters", "100", "--save_interval", "100", "--zero_stage", "2", "--expert_parallel_size", "2"]
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
    assert len(saved) == 1 and 2 <= saved[0] < 100 and not (out / "hf").exists()

    procs = _two_nodes(out, free_port(), *args, "--resume", "auto")
    for node, proc in enumerate(procs):
        assert proc.wait(timeout=600) == 0, _node_log(out, node)[-4000:]
    assert f"resumed from iteration {saved[0]}" in _node_log(out, 0)
    summary = _summary(out)
    assert summary["world_size"] == 2 and summary["expert_parallel_size"] == 2 and summary["iterations"] == 100
    assert summary["dense_weights_identical_across_ranks"] is True
    assert sorted(losses_by_iteration(out)) == list(range(1, 101))
