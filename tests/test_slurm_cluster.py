"""The real SLURM cluster of tests/slurm_cluster.py: multi-node steps, batch jobs and a fast requeue all work."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

import tests.slurm_cluster as cluster_module
from tests.slurm_cluster import (
    CRED_EXPIRE_S,
    NODES,
    SlurmCluster,
    parse_scontrol,
    skip_reason,
    slurm_cluster,  # noqa: F401  (the fixture, found by name)
    start_cluster,
)

# Variables a launcher may read to find its rank and world; printed by every job step below.
STEP_VARS = (
    "SLURM_JOB_ID",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NODEID",
    "SLURM_STEP_ID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_STEP_NUM_NODES",
    "SLURM_GPUS_ON_NODE",
    "SLURMD_NODENAME",
)
PRINT_VARS = "echo " + " ".join(f"{v}=${{{v}-unset}}" for v in STEP_VARS)


def _vars(line: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in line.split())


def test_parse_scontrol_keeps_values_with_spaces():
    info = parse_scontrol("JobId=7 JobName=a b JobState=PENDING Reason=BeginTime TRES=cpu=2,node=2 ExitCode=0:0")
    assert info == {
        "JobId": "7",
        "JobName": "a b",
        "JobState": "PENDING",
        "Reason": "BeginTime",
        "TRES": "cpu=2,node=2",
        "ExitCode": "0:0",
    }


def test_srun_spans_both_nodes(slurm_cluster: SlurmCluster):
    out = slurm_cluster.run(
        ["srun", "--nodes=2", "bash", "-c", "echo $SLURM_NODEID $SLURMD_NODENAME"], timeout=60
    ).stdout
    assert sorted(out.split("\n")[:-1]) == ["0 n1", "1 n2"], out


def test_batch_job_on_two_nodes_runs_one_srun_task_per_node(slurm_cluster: SlurmCluster, tmp_path: Path):
    """The layout a multi-node launcher runs under: the batch script on the first node, srun starting one task per
    node. Both print their SLURM_* variables to the job's output (the test output shows them with -rP)."""
    (tmp_path / "job.sh").write_text(
        f"#!/bin/bash\n{PRINT_VARS} | sed 's/^/batch /'\nsrun bash -c '{PRINT_VARS}' | sed 's/^/task /'\n"
    )
    job = slurm_cluster.sbatch(["--nodes=2", "--ntasks-per-node=1", "--output=out.txt", "job.sh"], cwd=tmp_path)
    result = slurm_cluster.wait(job, timeout=60)
    out = (tmp_path / "out.txt").read_text()
    print(out)
    assert (result.state, result.exit_code) == ("COMPLETED", 0), out
    lines = out.splitlines()
    [batch] = [_vars(line.removeprefix("batch ")) for line in lines if line.startswith("batch ")]
    tasks = sorted(
        (_vars(line.removeprefix("task ")) for line in lines if line.startswith("task ")),
        key=lambda t: t["SLURM_PROCID"],
    )
    assert batch["SLURMD_NODENAME"] == "n1" and batch["SLURM_JOB_NUM_NODES"] == "2"
    # The batch script looks like task 0 of 2 (SLURM_PROCID=0, SLURM_NTASKS=2) but is no step: only srun tasks have
    # SLURM_STEP_ID and SLURM_STEP_NUM_TASKS. A launcher tells the two apart by those.
    assert (batch["SLURM_PROCID"], batch["SLURM_NTASKS"]) == ("0", "2")
    assert batch["SLURM_STEP_ID"] == batch["SLURM_STEP_NUM_TASKS"] == "unset"
    assert [(t["SLURM_PROCID"], t["SLURM_NODEID"], t["SLURMD_NODENAME"]) for t in tasks] == [
        ("0", "0", "n1"),
        ("1", "1", "n2"),
    ]
    assert {t["SLURM_STEP_NUM_TASKS"] for t in tasks} == {"2"} and {t["SLURM_STEP_ID"] for t in tasks} == {"0"}


def test_requeued_job_runs_again_within_the_short_delay(slurm_cluster: SlurmCluster, tmp_path: Path):
    """A job that requeues itself on its first run starts a second time (SLURM_RESTART_COUNT=1) a few seconds
    later, not after SLURM's default two minutes: the fixture's AuthInfo=cred_expire takes effect."""
    (tmp_path / "job.sh").write_text(
        "#!/bin/bash\n"
        'echo "start ${SLURM_RESTART_COUNT-unset} $(date +%s.%N)" >> runs.txt\n'
        'if [ -z "$SLURM_RESTART_COUNT" ]; then\n'
        '  echo "requeue $(date +%s.%N)" >> runs.txt\n'
        "  scontrol requeue $SLURM_JOB_ID\n"
        "  sleep 60\n"  # killed by the requeue
        "fi\n"
    )
    job = slurm_cluster.sbatch(["--requeue", "--output=out.txt", "job.sh"], cwd=tmp_path)
    started = time.monotonic()
    result = slurm_cluster.wait(job, timeout=60)
    runs = (tmp_path / "runs.txt").read_text()
    print(f"{runs}waited {time.monotonic() - started:.1f} s")
    assert (result.state, result.exit_code) == ("COMPLETED", 0), runs
    assert result.info["Restarts"] == "1", result.info
    events = [line.split() for line in runs.splitlines()]
    assert [e[:-1] for e in events] == [["start", "unset"], ["requeue"], ["start", "1"]], runs
    delay = float(events[2][-1]) - float(events[1][-1])
    print(f"requeue delay {delay:.1f} s")
    # BeginTime is the requeue time + cred_expire + 1 s; a scheduler pass (sched_interval=1) follows within seconds.
    assert CRED_EXPIRE_S < delay < CRED_EXPIRE_S + 10, f"requeue delay {delay:.1f} s\n{runs}"


def test_cluster_has_the_two_nodes(slurm_cluster: SlurmCluster):
    out = slurm_cluster.run(["scontrol", "show", "nodes", "--oneliner"]).stdout
    nodes = {info["NodeName"]: info for info in map(parse_scontrol, out.splitlines())}
    assert sorted(nodes) == list(NODES)
    assert {info["NodeAddr"] for info in nodes.values()} == {"127.0.0.1"}


def test_a_cluster_that_cannot_start_fails_with_the_daemon_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A broken cluster is an error that says why (not a hang, not a skip), and leaves no daemon running."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    real_write_conf = cluster_module.write_conf

    def broken_conf(root: Path, *ports) -> Path:
        conf = real_write_conf(root, *ports)
        conf.write_text(conf.read_text().replace("select/cons_tres", "select/nonexistent"))
        return conf

    monkeypatch.setattr(cluster_module, "write_conf", broken_conf)
    with pytest.raises(RuntimeError, match="did not come up") as error:
        start_cluster(tmp_path, timeout=30)
    assert "select/nonexistent" in str(error.value)  # slurmctld's log tail names the cause
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "slurm.conf")], capture_output=True, text=True).stdout
    assert not left, f"daemons left running: {left}"
